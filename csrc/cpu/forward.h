// Forward fp32 kernels; included by kernels_impl.h inside namespace DM_NS (it relies on the
// tile helpers defined there).
namespace {

// ---------------------------------------------------------------------------------------------
// Exact-mode plan helpers.  A query of the expansion form computes its logits as
//   bias + alpha/var x'.yc - alpha^2/(2 var) |yc|^2,  x' = x - alpha c, yc = y - c
// (c = the plan's centre, rounded to float; |yc|^2 in double), the direct form as above.

// |yc_j|^2 in double for the points of a centred transposed tile.
void tile_sq_norms(const float* yTc, int d, double* ynd) {
  vd s2[NV][2];
  for (int v = 0; v < NV; ++v) s2[v][0] = s2[v][1] = vd{};
  for (int k = 0; k < d; ++k)
    for (int v = 0; v < NV; ++v) {
      const vf t = vld(yTc + (size_t)k * NT + v * W);
      const vd lo = lo_d(t), hi = hi_d(t);
      s2[v][0] = vdfma(lo, lo, s2[v][0]);
      s2[v][1] = vdfma(hi, hi, s2[v][1]);
    }
  for (int v = 0; v < NV; ++v) {
    vstd(ynd + v * W, s2[v][0]);
    vstd(ynd + v * W + H, s2[v][1]);
  }
}

// yTc = yT - c for the valid points of a packed tile (0 elsewhere), and ynd[j] = |yc_j|^2.
void centre_tile(const float* yT, int n, int d, const float* cf, float* yTc, double* ynd) {
  centre_transposed(yT, n, d, cf, yTc);
  tile_sq_norms(yTc, d, ynd);
}

// Points whose logit is this far below the largest carry weights < 5e-5 of it: with logit
// errors up to 1e-2 they move the mean by < 1e-6, so the top lists keep only points within this
// gap of the running max, and no correction is needed beyond it.
constexpr double kTopGap = 10.0;

// The K largest logits of one query, kept sorted (descending) with their point indices.
inline void topk_offer(double* val, int64_t* idx, int K, double v, int64_t i) {
  if (!(v > val[K - 1])) return;
  int p = K - 1;
  while (p > 0 && val[p - 1] < v) {
    val[p] = val[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  val[p] = v;
  idx[p] = i;
}
// Offers the first n lanes of v (points i0, i0 + 1, ...): only lanes above the K-th largest
// and above floor are visited (usually none or one of a tile).
inline void offer_lanes(double* val, int64_t* idx, int K, double floor, vf v, int64_t i0, int n) {
  // lanes above both the K-th largest and floor (rounded to float either way: the offer
  // rechecks the K-th in double)
  const float thr = (float)(val[K - 1] > floor ? val[K - 1] : floor);
#if DM_ISA == 2
  unsigned m = (unsigned)_mm512_cmp_ps_mask(v, vb(thr), _CMP_GE_OQ);
  if (n < W) m &= (1u << (n > 0 ? n : 0)) - 1u;
  while (m) {
    const int l = __builtin_ctz(m);
    topk_offer(val, idx, K, (double)v[l], i0 + l);
    m &= m - 1;
  }
#else
  for (int l = 0; l < W && l < n; ++l)
    if (v[l] >= thr) topk_offer(val, idx, K, (double)v[l], i0 + l);
#endif
}
inline void topk_clear(double* val, int64_t* idx, int K) {
  for (int k = 0; k < K; ++k) { val[k] = -kInfD; idx[k] = -1; }
}

// Per-query constant from the internal logit frame to the true one: -d/2 (direct, shifted
// distance) or -|x'|^2/(2 var) (expansion), x' = float(x - alpha c) as the kernels form it.
inline double frame_shift(const float* xr, float alpha, float var, const double* c, int64_t d,
                          bool expansion) {
  if (!expansion) return -0.5 * (double)d;
  double x2 = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double xp = xprime(xr[k], alpha, c[k]);
    x2 += xp * xp;
  }
  return -0.5 * x2 / (double)var;
}

// Thread-local workspace of a planned exact forward item (queries reordered: direct first).
struct PlanWork {
  Buf b_ord, b_al, b_va, b_yTc, b_ynd, b_acc, b_m, b_l, b_tv, b_ti, b_seen;
  int* ord;
  float *al, *va, *yTc;
  double *ynd, *acc, *m, *l, *tv, *seen;
  int64_t* ti;
  void init(int dp, int qcmax, int K) {
    ord = b_ord.get<int>(qcmax);
    al = b_al.get<float>(qcmax);
    va = b_va.get<float>(qcmax);
    yTc = b_yTc.get<float>((size_t)dp * NT);
    ynd = b_ynd.get<double>(NT);
    acc = b_acc.get<double>((size_t)qcmax * dp);
    m = b_m.get<double>(qcmax);
    l = b_l.get<double>(qcmax);
    seen = b_seen.get<double>(qcmax);
    tv = b_tv.get<double>((size_t)qcmax * (K > 0 ? K : 1));
    ti = b_ti.get<int64_t>((size_t)qcmax * (K > 0 ? K : 1));
  }
};

// ---------------------------------------------------------------------------------------------
// The largest logit per query seen by the work items finished so far (G x B, internal frame),
// shared by the splits of the points: a split lists only points within kTopGap of it, so the
// splits after the first skip most of the listing work of their first tiles.  Which points a
// split lists then depends on timing, but the merge keeps only those within kTopGap of the
// final maximum, which every split lists whatever it has seen: the result does not.
struct SeenMax {
  double* v;
  void load(int64_t base, const int* ord, int nq, double* out) const {
#pragma omp critical(diffmem_seen_max)
    for (int q = 0; q < nq; ++q) out[q] = v[base + ord[q]];
  }
  void raise(int64_t base, const int* ord, int nq, const double* m) const {
#pragma omp critical(diffmem_seen_max)
    for (int q = 0; q < nq; ++q)
      if (m[q] > v[base + ord[q]]) v[base + ord[q]] = m[q];
  }
};

// The points' check (Problem::points_bad): x - x is 0 for a finite x and NaN for an infinite
// or NaN one, and a NaN term makes the sum NaN.  finite_span: n consecutive floats (a packed
// transposed tile is d x V*W of them); rows_finite: points [i0, i1) of a group, read as the
// kernels read them.
inline bool finite_span(const float* p, int64_t n) {
  vf s[4] = {vb(0.f), vb(0.f), vb(0.f), vb(0.f)};
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W)
    for (int u = 0; u < 4; ++u) {
      const vf v = vld(p + i + u * W);
      s[u] += v - v;
    }
  for (; i + W <= n; i += W) {
    const vf v = vld(p + i);
    s[0] += v - v;
  }
  float t = 0.f;
  for (; i < n; ++i) t += p[i] - p[i];
  return hsum((s[0] + s[1]) + (s[2] + s[3])) + t == 0.f;
}
inline bool rows_finite(const PointRows& pts, int64_t i0, int64_t i1, int d, float* scratch) {
  for (int64_t i = i0; i < i1; ++i)
    if (!finite_span(pts.row(i, scratch), d)) return false;
  return true;
}
inline void flag_points(const Problem<float>& a) { __atomic_store_n(a.points_bad, (uint8_t)1, __ATOMIC_RELAXED); }

// Tiles whose weighted sums are formed together (see tile_wsum): up to WS_TILES, as many as keep
// their row-major copies within 32 KB, so that they stay in L1 while every query block reads
// them (at d >= 128 that is one tile).
constexpr int WS_TILES = 8;
template <int V>
inline int ws_tiles(int dp) {
  return (int)imax(1, imin(WS_TILES, (32 << 10) / ((int64_t)V * W * rstride(dp) * 4)));
}

// r[u] = hmax(v[u]) and hsum(v[u]) for W vectors at once, with the same operations in the
// same order as one vector's reduction (bit for bit the same sums).  With AVX-512 the vectors
// are combined pairwise through the levels of _mm512_reduce_add_ps's tree (lanes i and i + 8,
// then i + 4, i + 2, i + 1), four shuffles and two operations per pair.
#if DM_ISA == 2
template <class Op>
inline vf reduce_rows(const vf* v, Op op) {
  vf a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // lanes i + i+8 of rows 2k, 2k+1
    a[k] = op(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44), _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xee));
  for (int k = 0; k < 4; ++k)  // + i+4: 128-bit lane j holds row 4k + j
    b[k] = op(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88), _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xdd));
  for (int k = 0; k < 2; ++k)  // + i+2: lane j holds rows 8k + j (elements 0, 1), 8k + 4 + j
    c[k] = op(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44), _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xee));
  // + i+1: element 4j + e holds row 4e + j
  const vf r = op(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xdd));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}
inline void hmax_rows(const vf* v, float* r) {
  vst(r, reduce_rows(v, [](vf x, vf y) { return _mm512_max_ps(x, y); }));
}
inline void hsum_rows(const vf* v, float* r) {
  vst(r, reduce_rows(v, [](vf x, vf y) { return x + y; }));
}
#else
inline void hmax_rows(const vf* v, float* r) { for (int u = 0; u < W; ++u) r[u] = hmax(v[u]); }
inline void hsum_rows(const vf* v, float* r) { for (int u = 0; u < W; ++u) r[u] = hsum(v[u]); }
#endif

// Forward work item: queries [q0, q0+nq) of group g against tiles [tb, te).  Writes the partial
// online-softmax state (m, l, acc) of these queries, and with a plan (exact mode) their K
// largest logits so far (tv, ti; internal frame).
//   fast:        every query in the expansion frame around the group centre (c, cf).
//   exact:       every query in the direct form, or, with a plan, each query in its planned
//                form (direct queries first, then expansion queries around the plan centre
//                cf; c is its double copy).
template <bool FAST>
void fwd_item(const Problem<float>& a, int64_t g, int64_t q0, int nq, int64_t tb, int64_t te,
              const double* c, const float* cf, double* mo, double* lo, double* acc,
              double* tvo, int64_t* tio, const SeenMax& seen, Work& w, PlanWork& pw) {
  constexpr int V = FAST ? NV_FAST : NV, T = V * W;  // point vectors and points per tile
  const int d = (int)a.d, dp = (int)(cdiv(a.d, W) * W);
  const int64_t N = a.N;
  const int K = FAST ? 0 : a.top_k;
  const float* xg = a.x + g * a.gs_x + q0 * a.d;
  const PointRows yg = point_rows(a, g);
  const float* al0 = a.alpha + g * a.gs_alpha + q0;
  const float* va0 = a.var + g * a.gs_var + q0;
  const float* bg = a.bias ? a.bias + g * a.gs_bias : nullptr;
  const uint8_t* ex = (!FAST && a.expand) ? a.expand + g * a.B + q0 : nullptr;
  // query order: direct queries [0, nd), then expansion queries [nd, nq)
  int nd = 0;
  for (int q = 0; q < nq; ++q)
    if (!ex || !ex[q]) pw.ord[nd++] = q;
  for (int q = 0, e = nd; q < nq; ++q)
    if (ex && ex[q]) pw.ord[e++] = q;
  const int* ord = pw.ord;
  float* al = pw.al;
  float* va = pw.va;
  for (int q = 0; q < nq; ++q) { al[q] = al0[ord[q]]; va[q] = va0[ord[q]]; }
  constexpr int QE = QB_FAST;  // query block of the expansion chains
  if (FAST) {
    pack_x<true, V>(nq, d, w.xc, [&](int q, int k) { return xprime(xg[ord[q] * d + k], al[q], c[k]); });
  } else {
    pack_x<false>(nd, d, w.xc, [&](int q, int k) { return xg[ord[q] * d + k]; });
    pack_x_blocks(QE, nq - nd, d, w.xc + (size_t)nd * d,
                  [&](int q, int k) { return xprime(xg[ord[nd + q] * d + k], al[nd + q], c[k]); });
  }
  const float* X = w.xc;
  for (int q = 0; q < nq; ++q) {
    w.qc[q] = (FAST || q >= nd) ? qconst<true>(al[q], va[q]) : qconst<false>(al[q], va[q]);
    pw.m[q] = -kInfD;
    pw.l[q] = 0.0;
    if (K) topk_clear(pw.tv + q * K, pw.ti + q * K, K);
  }
  if (K) seen.load(g * a.B + q0, ord, nq, pw.seen);
  std::memset(pw.acc, 0, sizeof(double) * nq * dp);
  const bool dbl = d > DB;
  const int wst = ws_tiles<V>(dp);
  int tn[WS_TILES];  // points of the tiles waiting for their weighted sums
  const float* trow[WS_TILES];  // their rows (ldr[] floats apart)
  int tld[WS_TILES];
  int tn_live[WS_TILES];  // live queries of the waiting tiles
  // exact-mode float32 points with d a multiple of W: full tiles are read in place (the rows
  // of a tile are consecutive and need neither conversion, centring nor padding)
  const bool in_place = !FAST && yg.type == kPointF32 && d == dp;
  // the points' check: by the first query chunk, of the first group unless each has its own
  const bool check = a.points_bad && yg.type != kPointU8 && q0 == 0 && (g == 0 || a.gs_y != 0);
  for (int64_t t = tb; t < te; ++t) {
    const int64_t i0 = t * T;
    const int n = (int)imin(T, N - i0);
    const int tl = (int)((t - tb) % wst);  // slot of this tile
    tn[tl] = n;
    float* P = w.P + (size_t)tl * nq * T;
    double* sc = w.sc + (size_t)tl * nq;
    int* ql = w.ql + (size_t)tl * nq;  // the tile's live queries, their weights compact in P
    tn_live[tl] = 0;
    if (in_place && n == T) {
      trow[tl] = yg.span(i0, 0, d, nullptr);
      tld[tl] = d;
      transpose_rows<V>(trow[tl], d, d, w.yT);
    } else {
      float* yR = w.yR + (size_t)tl * T * rstride(dp);
      trow[tl] = yR;
      tld[tl] = rstride(dp);
      pack_tile<V>(yg, i0, n, d, rstride(dp), FAST ? cf : nullptr, w.yT, yR, w.yn, nullptr);
    }
    if (check && !finite_span(w.yT, (int64_t)d * T)) flag_points(a);
    load_bias<V>(bg, i0, n, w.bt);
    tile_S<FAST, V>(X, al, va, FAST ? nq : nd, d, w.yT, w.Sf, w.Sd, w.tmp);
    if constexpr (!FAST) if (nd < nq) {
      centre_tile(w.yT, n, d, cf, pw.yTc, pw.ynd);
      double* Se = w.Sd + (size_t)nd * T;
      for (int i = 0; i < (nq - nd) * T; ++i) Se[i] = 0.0;
      qblocks<QE>(nq - nd, [&](auto qc, int q) {  // x'.yc: 16-coordinate chains into double
        constexpr int Q = decltype(qc)::value;
        const float* Xq = X + (size_t)(nd + q) * d;
        double* sq = Se + q * T;
        for (int k0 = 0; k0 < d; k0 += 16) {
          k_logit<Q, true>(Xq, nullptr, nullptr, pw.yTc, k0, (int)imin(d, k0 + 16), w.tmp);
          for (int i = 0; i < Q * T; ++i) sq[i] += (double)w.tmp[i];
        }
      });
    }
    // online softmax update, W queries at a time: their horizontal max and sum reductions are
    // done together (hmax_rows, hsum_rows); each query's weights go to row base + u of P, and
    // the live rows are then moved up so that they follow each other
    for (int qb = 0; qb < nq; qb += W) {
      const int nb = (int)imin(W, nq - qb), base = tn_live[tl];
      vf lg[W][V], rowmax[W], sum[W];
      alignas(64) double lgd[W][T];
      alignas(64) float mtf[W], tsum[W];
      double mt[W], mnew[W], scale[W];
      bool done[W];  // nothing to add for the query: everything masked so far
      for (int u = 0; u < W; ++u) {
        rowmax[u] = vb(-kInfF);
        if (u >= nb) continue;
        const int q = qb + u;
        const QConst& qc = w.qc[q];
        const bool expq = !FAST && q >= nd;
        if (!(dbl || expq)) {
          for (int v = 0; v < V; ++v) {
            lg[u][v] = logit_f<FAST>(vld(w.Sf + q * T + v * W), vld(w.bt + v * W), vld(w.yn + v * W), qc);
            rowmax[u] = vmax(rowmax[u], lg[u][v]);
          }
        } else {  // logits in double lanes
          vd mv = vdb(-kInfD);
          for (int h = 0; h < T / H; ++h) {
            const vd sd = vldd(w.Sd + q * T + h * H), bd = h2d(w.bt + h * H);
            vd l;
            if (expq) l = bd + vdb(qc.d1) * sd - vdb(qc.d2) * vldd(pw.ynd + h * H);
            else if (FAST) l = bd + vdb(qc.d1) * sd - vdb(qc.d2) * h2d(w.yn + h * H);
            else l = bd - sd * vdb(qc.d1);
            vstd(lgd[u] + h * H, l);
            mv = mv > l ? mv : l;
          }
          mt[u] = dmax(mv);
        }
      }
      hmax_rows(rowmax, mtf);
      for (int u = 0; u < W; ++u) {
        sum[u] = vb(0.f);
        done[u] = true;
        if (u >= nb) continue;
        const int q = qb + u;
        const bool dq = dbl || (!FAST && q >= nd);
        if (!dq) mt[u] = (double)mtf[u];
        const double mold = pw.m[q];
        mnew[u] = mt[u] > mold ? mt[u] : mold;
        if (K) {  // the K largest logits (internal frame) among those within kTopGap of the max
          double* tv = pw.tv + q * K;
          int64_t* ti = pw.ti + q * K;
          const double floor = (mnew[u] > pw.seen[q] ? mnew[u] : pw.seen[q]) - kTopGap;
          if (mt[u] > tv[K - 1] && mt[u] > floor) {
            if (!dq) {
              for (int v = 0; v < V; ++v) offer_lanes(tv, ti, K, floor, lg[u][v], i0 + v * W, n - v * W);
            } else {
              for (int j = 0; j < n; ++j)
                if (lgd[u][j] > floor) topk_offer(tv, ti, K, lgd[u][j], i0 + j);
            }
          }
        }
        if (mnew[u] == -kInfD) {  // everything masked so far
          sc[q] = 1.0;
          continue;
        }
        done[u] = false;
        scale[u] = mold == -kInfD ? 0.0 : mold == mnew[u] ? 1.0 : std::exp(mold - mnew[u]);
        float* p = P + (base + u) * T;
        if (!dq) {
          const vf mf = vb((float)mnew[u]);
          for (int v = 0; v < V; ++v) {
            const vf e = vexp(lg[u][v] - mf);
            vst(p + v * W, e);
            sum[u] += e;
          }
        } else {
          for (int h = 0; h < T / H; ++h)
            vsth(p + h * H, __builtin_convertvector(vldd(lgd[u] + h * H) - vdb(mnew[u]), vh));
          for (int v = 0; v < V; ++v) {
            const vf e = vexp(vld(p + v * W));
            vst(p + v * W, e);
            sum[u] += e;
          }
        }
      }
      hsum_rows(sum, tsum);
      for (int u = 0; u < nb; ++u) {
        if (done[u]) continue;
        const int q = qb + u;
        pw.l[q] = pw.l[q] * scale[u] + (double)tsum[u];
        pw.m[q] = mnew[u];
        sc[q] = scale[u];
        // all weights 0 (every logit more than -kExpCut below the max, which then did not
        // move): nothing to add, the tile's weighted sum skips this query
        if (tsum[u] == 0.f && scale[u] == 1.0) continue;
        if (tn_live[tl] != base + u) std::memcpy(P + tn_live[tl] * T, P + (base + u) * T, sizeof(float) * T);
        ql[tn_live[tl]++] = q;
      }
    }
    if (tl == wst - 1 || t == te - 1) tile_wsum<V>(w.P, trow, tld, nq, dp, tn, tl + 1, pw.acc, w.sc, w.ql, tn_live);
  }
  if (K) seen.raise(g * a.B + q0, ord, nq, pw.m);
  // back to the callers' query order
  for (int q = 0; q < nq; ++q) {
    const int o = ord[q];
    mo[o] = pw.m[q];
    lo[o] = pw.l[q];
    std::memcpy(acc + (size_t)o * dp, pw.acc + (size_t)q * dp, sizeof(double) * dp);
    for (int k = 0; k < K; ++k) {
      tvo[o * K + k] = pw.tv[q * K + k];
      tio[o * K + k] = pw.ti[q * K + k];
    }
  }
}

// The merge's float64 helpers.  Each value is formed by the same operations in the same order
// as a plain loop over it would (no contraction), several values at once.

// ex[j] = -|x - alpha y_j|^2 / (2 var) for the n rows y_j (d floats each, consecutive), the
// squares summed over k in order: four rows at a time, as the lanes of one vector.
typedef double v4d __attribute__((vector_size(32)));
inline void exact_logits(const float* x, float alpha, float var, const float* rows, int n, int64_t d,
                         double* ex) {
  const double al = (double)alpha;
  const v4d alv = {al, al, al, al};
  for (int j0 = 0; j0 < n; j0 += 4) {
    const float* r[4];
    for (int u = 0; u < 4; ++u) r[u] = rows + (size_t)(j0 + u < n ? j0 + u : j0) * d;
    v4d s2 = {0.0, 0.0, 0.0, 0.0};
    for (int64_t k = 0; k < d; ++k) {
      const double xk = (double)x[k];
      const v4d y = {(double)r[0][k], (double)r[1][k], (double)r[2][k], (double)r[3][k]};
      const v4d df = v4d{xk, xk, xk, xk} - alv * y;
      s2 += df * df;
    }
    for (int u = 0; u < 4 && j0 + u < n; ++u) ex[j0 + u] = -0.5 * s2[u] / (double)var;
  }
}

// mean[k] = float(((sum_s f[s] acc_s[k] + sum_j dw[j] rows_j[k]) * invL) + c[k]) for k < d:
// acc_s = acc + s * ss (the splits' sums), rows_j = rows + j * d; c null: no centre.
inline void finish_mean(const double* acc, size_t ss, const double* f, int S, const float* rows,
                        const double* dw, int n, double invL, const double* c, int d, float* mean) {
  int k = 0;
  for (; k + H <= d; k += H) {
    vd v = vdb(0.0);
    for (int s = 0; s < S; ++s) v += vdb(f[s]) * vldd(acc + s * ss + k);
    for (int j = 0; j < n; ++j) v += vdb(dw[j]) * h2d(rows + (size_t)j * d + k);
    v *= vdb(invL);
    if (c) v += vldd(c + k);
    vsth(mean + k, __builtin_convertvector(v, vh));
  }
  for (; k < d; ++k) {
    double v = 0.0;
    for (int s = 0; s < S; ++s) v += f[s] * acc[s * ss + k];
    for (int j = 0; j < n; ++j) v += dw[j] * (double)rows[(size_t)j * d + k];
    v *= invL;
    if (c) v += c[k];
    mean[k] = (float)v;
  }
}

template <bool FAST>
void forward_impl(const Problem<float>& a) {
  const int64_t G = a.G, B = a.B, N = a.N, d = a.d;
  const int dp = (int)(cdiv(d, W) * W);
  const int T = (int)imax(1, a.threads);
  const int K = FAST ? 0 : a.top_k;
  const bool planned = !FAST && a.expand;
  const int64_t tile = (FAST ? NV_FAST : NV) * W;  // points per tile of fwd_item<FAST>
  const int64_t ntiles = cdiv(N, tile);
  const int64_t nqc = cdiv(B, QCMAX);
  const int64_t qcs = cdiv(B, nqc);
  // split the points too when there are few (group, query chunk) items, for load balance
  int64_t S = 1;
  if (G * nqc < 2 * T) S = imax(1, imin(imin(cdiv(2 * T, G * nqc), ntiles / 4), 64));
  Buf bc, bm, bl, bacc, bpc, btv, bti;
  // centre: the group centroid (fast) or the plan's centre (exact; used by expansion queries)
  const double* c = FAST ? centres(a, bc) : nullptr;
  if (planned) {
    double* pc = bpc.get<double>((size_t)G * d);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < d; ++k) pc[g * d + k] = (double)a.centre[g * a.gs_centre + k];
    c = pc;
  }
  auto cfl = [&](int64_t g) -> const float* {
    if (FAST) return cfloat(c, G, d) + g * d;
    return planned ? a.centre + g * a.gs_centre : nullptr;
  };
  double* pm = bm.get<double>((size_t)S * G * B);
  double* pl = bl.get<double>((size_t)S * G * B);
  double* pacc = bacc.get<double>((size_t)S * G * B * dp);
  double* ptv = btv.get<double>((size_t)S * G * B * imax(1, K));
  int64_t* pti = bti.get<int64_t>((size_t)S * G * B * imax(1, K));
  Buf bseen;
  const SeenMax seen{K ? bseen.get<double>((size_t)G * B) : nullptr};
  for (int64_t i = 0; K && i < G * B; ++i) seen.v[i] = -kInfD;
  const int64_t nitems = G * nqc * S;
  Buf bact;
  int64_t* active = bact.get<int64_t>((size_t)G);
  for (int64_t g = 0; g < G; ++g) active[g] = active_tiles(a, g, tile);
#pragma omp parallel num_threads(T)
  {
    Work w;
    w.init((int)d, dp, (int)qcs, ws_tiles<FAST ? NV_FAST : NV>(dp));
    PlanWork pw;
    pw.init(dp, (int)qcs, K);
    Buf bkr;  // the corrected points' rows (float32)
    float* krows = K ? bkr.get<float>((size_t)K * d) : nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nitems; ++it) {
      const int64_t s = it % S, qi = (it / S) % nqc, g = it / (S * nqc);
      const int64_t q0 = qi * qcs;
      const int nq = (int)imin(qcs, B - q0);
      if (nq <= 0) continue;
      // the split's tiles, less the group's trailing masked ones (an empty range gives the
      // split of a fully masked range: m = -inf, nothing added)
      const int64_t tb = s * ntiles / S;
      const int64_t te = imax(tb, imin((s + 1) * ntiles / S, active[g]));
      const int64_t base = (s * G + g) * B + q0;
      fwd_item<FAST>(a, g, q0, nq, tb, te, c ? c + g * d : nullptr, cfl(g), pm + base, pl + base,
                     pacc + base * dp, ptv + base * K, pti + base * K, seen, w, pw);
    }
    // the points' check of the trailing masked points, whose tiles the items skip
    if (a.points_bad && a.y_type != kPointU8) {
      Buf bconv;
      float* conv = bconv.get<float>((size_t)d);
#pragma omp for schedule(static)
      for (int64_t g = 0; g < (a.gs_y ? G : 1); ++g)
        if (!rows_finite(point_rows(a, g), imin(N, active[g] * tile), N, (int)d, conv)) flag_points(a);
    }
    // merge the splits and finish: mean = acc/l (+ c), lse = m + log l + const
#pragma omp for schedule(static)
    for (int64_t gb = 0; gb < G * B; ++gb) {
      const int64_t g = gb / B, b = gb % B;
      double M = -kInfD;
      for (int64_t s = 0; s < S; ++s) M = pm[s * G * B + gb] > M ? pm[s * G * B + gb] : M;
      double L = 0.0;
      alignas(64) double f[64];
      const int64_t Sc = S;
      for (int64_t s = 0; s < Sc; ++s) {
        const double m = pm[s * G * B + gb];
        f[s] = m == -kInfD ? 0.0 : std::exp(m - M);
        L += f[s] * pl[s * G * B + gb];
      }
      const bool expq = FAST || (planned && a.expand[gb]);
      const float* xr = a.x + g * a.gs_x + b * d;
      const float alv = a.alpha[g * a.gs_alpha + b], vav = a.var[g * a.gs_var + b];
      const double cst = frame_shift(xr, alv, vav, expq ? c + g * d : nullptr, d, expq);
      // the K largest logits over the splits (internal frame), moved to their exact values
      // relative to the largest (see diffmem/ops/_exact.py); their weight changes dw go into
      // l and acc
      double tv[64], dw[64];
      int64_t ti[64];
      int nc = 0;  // corrected slots
      if (K) {
        topk_clear(tv, ti, K);
        for (int64_t s = 0; s < S; ++s)
          for (int k = 0; k < K; ++k) {
            const int64_t o = (s * G * B + gb) * K + k;
            if (pti[o] >= 0) topk_offer(tv, ti, K, ptv[o], pti[o]);
          }
        for (int k = 1; k < K; ++k)  // only points within kTopGap of the maximum (see SeenMax)
          if (ti[k] >= 0 && !(tv[k] > tv[0] - kTopGap)) { tv[k] = -kInfD; ti[k] = -1; }
        if (K > 1 && ti[1] >= 0 && tv[1] > tv[0] - kTopGap) {
          const PointRows pts = point_rows(a, g);
          const float* bg = a.bias ? a.bias + g * a.gs_bias : nullptr;
          double ex[64];
          for (; nc < K && ti[nc] >= 0; ++nc) {
            float* yi = krows + (size_t)nc * d;  // kept for the mean's correction
            const float* src = pts.row(ti[nc], yi);
            if (src != yi) std::memcpy(yi, src, sizeof(float) * d);
          }
          exact_logits(xr, alv, vav, krows, nc, d, ex);
          for (int k = 0; k < nc; ++k) ex[k] += bg ? (double)bg[ti[k]] : 0.0;
          for (int k = 0; k < nc; ++k) {
            const double nv = tv[0] + (ex[k] - ex[0]);
            dw[k] = std::exp(nv - M) - std::exp(tv[k] - M);
            tv[k] = nv;
            L += dw[k];
          }
        }
      }
      finish_mean(pacc + gb * dp, (size_t)G * B * dp, f, (int)Sc, krows, dw, nc, 1.0 / L,
                  FAST ? c + g * d : nullptr, (int)d, a.mean_out + gb * d);
      const double lse = M + std::log(L) + cst;
      a.lse_out[gb] = (float)lse;
      if (a.lse64_out) a.lse64_out[gb] = lse;
      for (int k = 0; k < K; ++k) {
        a.top_idx[gb * K + k] = ti[k];
        a.top_logit[gb * K + k] = ti[k] >= 0 ? tv[k] + cst : -kInfD;
      }
    }
  }
}

}  // namespace

void forward_f32(const Problem<float>& a) {
  if (a.precision == 1) forward_impl<true>(a);
  else forward_impl<false>(a);
}
