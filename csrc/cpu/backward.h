// Backward fp32 kernels; included by kernels_impl.h inside namespace DM_NS (it relies
// on the helpers defined there).
//
// Backward (single pass over the points; per group, thread tid owns a contiguous range of point
// tiles, and each tile is processed for all queries in chunks of QCMAX):
//   The forward's float64 lse (lse64) gives the weights w = exp(logit - lse) directly: the
//   logits are recomputed with exactly the forward's operations (bit for bit), and lse64 is
//   exact to ~1e-16 relative, so the weights sum to 1 within the exp's rounding (~1e-7) without
//   any re-normalisation.  D[b] = g[b].(mean[b] - c) comes from the forward's mean (O(B d)),
//   c = centroid of the points (g.y is accumulated as g.(y - c) too).  The float32 mean has an
//   absolute error ~eps |mean|, too coarse when the points are far from the origin relative to
//   their spread (|c| > 2 rms(y - c), e.g. data offset by 1000, or N = 1): then a first pass
//   recomputes D = sum_i w_i g.(y_i - c) / sum_i w_i from the weights (3 FMA per element).
//   Per (query block x point tile):
//     loop 1 over k (vectorised over points, transposed tile yT): the shifted distance s (exact)
//            or x'.yc (fast), g.y and y.diff, with diff = fma(-alpha, y, x);
//     then P = w (g.y - D + h) and the per-query sums for dalpha (sum P y.diff) and dvar
//            (sum P s + d var sum P: no cancellation thanks to the shifted distance);
//     loop 2 over k (row form, vectorised over coordinates, register block of queries x
//            coordinate vectors, one point at a time): diff = fma(-alpha, y, x) is formed once
//            and feeds both dx (sum_i P diff) and dy (sum_b w g + (P alpha/var) diff).
//   dy and dbias of a tile are complete when the tile is done (one thread owns the tile); dx
//   and the per-query sums go to per-thread partials reduced in thread order at the end
//   (deterministic for a given thread count, no atomics).
// The gradient formulas use the difference x - alpha y directly (not the expanded form), so
// they do not cancel catastrophically for small var or data far from the origin.
namespace {

// The per-(query, point) sums a k_blogit call forms: the logit's S (exact: the shifted distance,
// fast: x'.yc), G = g.(y - c), and Y = y.diff (fast: with SD, the shifted distance as well).
constexpr int kPartS = 1, kPartG = 2, kPartY = 4;

// Loop 1 of the backward over coordinates [k0, k1) for Q queries (rows qi of X, Gm, al and va)
// and the NT points of a transposed tile; writes rows 0..Q-1 of S, GY, YD, SD.  Each sum is formed
// by the same operations whichever other parts a call forms, so S is the forward's bit for bit.
template <int Q, bool FAST, int PARTS>
inline void k_blogit(const int* qi, const float* X, const float* Gm, int64_t ld, const float* al,
                     const float* va, const float* yT, const float* yTg, int k0, int k1, float* S,
                     float* GY, float* YD, float* SD) {
  constexpr bool PS = PARTS & kPartS, PG = PARTS & kPartG, PY = PARTS & kPartY;
  constexpr bool SHIFT_S = !FAST && PS;
  constexpr bool HAS_SD = FAST && PY;
  constexpr bool DIFF = (!FAST && PS) || PY;  // df = fma(-alpha, y, x) needed
  vf aS[Q][NV], aG[Q][NV], aY[Q][NV], aD[Q][NV];
  vf a[Q];
  const float* xq[Q];
  const float* gq[Q];
  for (int q = 0; q < Q; ++q) {
    a[q] = vb(al[qi[q]]);
    xq[q] = X + qi[q] * ld;
    gq[q] = PG ? Gm + qi[q] * ld : nullptr;
    for (int v = 0; v < NV; ++v) aS[q][v] = aG[q][v] = aY[q][v] = aD[q][v] = vb(0.f);
  }
  for (int kc = k0; kc < k1; kc += 16) {
    const int ke = (int)imin(kc + 16, k1);
    if (SHIFT_S || HAS_SD) {
      for (int q = 0; q < Q; ++q) {
        const vf sh = vb((float)(ke - kc) * va[qi[q]]);
        for (int v = 0; v < NV; ++v) {
          if (SHIFT_S) aS[q][v] -= sh;
          if (HAS_SD) aD[q][v] -= sh;
        }
      }
    }
    for (int k = kc; k < ke; ++k) {
      vf yv[NV], yg[NV];
      for (int v = 0; v < NV; ++v) {
        yv[v] = vld(yT + (size_t)k * NT + v * W);
        if (PG) yg[v] = FAST ? yv[v] : vld(yTg + (size_t)k * NT + v * W);
      }
      for (int q = 0; q < Q; ++q) {
        const vf xb = vb(xq[q][k]);
        vf gb;
        if (PG) gb = vb(gq[q][k]);
        for (int v = 0; v < NV; ++v) {
          vf df;
          if (DIFF) df = vfnma(a[q], yv[v], xb);
          if (PS) aS[q][v] = FAST ? vfma(xb, yv[v], aS[q][v]) : vfma(df, df, aS[q][v]);
          if (PY) {
            aY[q][v] = vfma(yv[v], df, aY[q][v]);
            if (FAST) aD[q][v] = vfma(df, df, aD[q][v]);
          }
          if (PG) aG[q][v] = vfma(gb, yg[v], aG[q][v]);
        }
      }
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < NV; ++v) {
      if (PS) vst(S + q * NT + v * W, aS[q][v]);
      if (PG) vst(GY + q * NT + v * W, aG[q][v]);
      if (PY) vst(YD + q * NT + v * W, aY[q][v]);
      if (HAS_SD) vst(SD + q * NT + v * W, aD[q][v]);
    }
}


// Fused dx / dy micro-kernel (row form) for coordinates [kc, kc + DV*W) of Q queries (rows qi
// of X, Gm, al and dxa; rows q of P, Wt and Pq) and the n points of a packed tile (row stride dp
// of yR / dyR; ld of X, Gm and dxa): with
// diff = fma(-alpha_q, y_i, x_q),
//   dxa[q] += sum_i P[q,i] diff          (fp32 over the tile, then added in double)
//   dyR[i] += sum_q Wt[q,i] g_q + Pq[q,i] diff
template <int Q, int DV, bool DX, bool DY>
inline void k_dxy(const int* qi, const float* X, const float* Gm, int64_t ld, const float* al,
                  const float* P, const float* Wt, const float* Pq, const float* yR, int dp, int n,
                  double* dxa, float* dyR) {
  vf xr[Q][DV], gr[Q][DV], r[Q][DV], a[Q];
  for (int q = 0; q < Q; ++q) {
    a[q] = vb(al[qi[q]]);
    for (int j = 0; j < DV; ++j) {
      xr[q][j] = vld(X + qi[q] * ld + j * W);
      if (DY) gr[q][j] = vld(Gm + qi[q] * ld + j * W);
      r[q][j] = vb(0.f);
    }
  }
  // IU points at a time: independent dy chains (the dy update is a chain of 2Q FMAs per point)
  auto step = [&](auto iuc, int i) {
    constexpr int IU = decltype(iuc)::value;
    vf yv[IU][DV], dy[IU][DV];
    for (int u = 0; u < IU; ++u)
      for (int j = 0; j < DV; ++j) {
        yv[u][j] = vld(yR + (size_t)(i + u) * dp + j * W);
        if (DY) dy[u][j] = vld(dyR + (size_t)(i + u) * dp + j * W);
      }
    for (int q = 0; q < Q; ++q)
      for (int u = 0; u < IU; ++u) {
        const vf pb = vb(P[q * NT + i + u]);
        vf wb, qb;
        if (DY) { wb = vb(Wt[q * NT + i + u]); qb = vb(Pq[q * NT + i + u]); }
        for (int j = 0; j < DV; ++j) {
          const vf df = vfnma(a[q], yv[u][j], xr[q][j]);
          if (DX) r[q][j] = vfma(pb, df, r[q][j]);
          if (DY) dy[u][j] = vfma(qb, df, vfma(wb, gr[q][j], dy[u][j]));
        }
      }
    if (DY)
      for (int u = 0; u < IU; ++u)
        for (int j = 0; j < DV; ++j) vst(dyR + (size_t)(i + u) * dp + j * W, dy[u][j]);
  };
  int i = 0;
  for (; i + IU_DXY <= n; i += IU_DXY) step(std::integral_constant<int, IU_DXY>{}, i);
  for (; i < n; ++i) step(std::integral_constant<int, 1>{}, i);
  if (DX)
    for (int q = 0; q < Q; ++q) {
      double* aq = dxa + (size_t)qi[q] * ld;  // dxa rows have X's stride
      alignas(64) float t[DV * W];
      for (int j = 0; j < DV; ++j) vst(t + j * W, r[q][j]);
      for (int l = 0; l < DV * W; ++l) aq[l] += (double)t[l];
    }
}

// yP / dyP are in panel layout (see to_panels): the panel of coordinates [kc, kc + PW) of all NT
// points is contiguous (row stride PW), so one k-chunk touches two small contiguous blocks.
constexpr int PW = DV_DXY * W;
inline size_t panel_off(int kc) { return (size_t)(kc / PW) * NT * PW; }
void to_panels(const float* yR, int ldr, int dp, int n, float* yP) {
  for (int kc = 0; kc < dp; kc += PW) {
    const int w = (int)imin(PW, dp - kc);
    float* dst = yP + panel_off(kc);
    for (int i = 0; i < n; ++i) std::memcpy(dst + (size_t)i * PW, yR + (size_t)i * ldr + kc, sizeof(float) * w);
  }
}
// dx / dy of the tile for the nl queries listed in qi (rows of X, Gm, al and dxa), whose rows
// of P, Wt and Pq are stored one after the other.
template <bool DX, bool DY>
void tile_dxy(const int* qi, int nl, const float* X, const float* Gm, int dp, const float* al,
              const float* P, const float* Wt, const float* Pq, const float* yP, int n, double* dxa,
              float* dyP) {
  dv_chunks<DV_DXY>(dp, [&](auto dvc, int kc) {
    constexpr int DV = decltype(dvc)::value;
    const size_t po = panel_off(kc) + (size_t)(kc % PW);
    qblocks<QB_DXY>(nl, [&](auto qcn, int j) {
      constexpr int Q = decltype(qcn)::value;
      k_dxy<Q, DV, DX, DY>(qi + j, X + kc, Gm + kc, dp, al, P + j * NT, Wt + j * NT, Pq + j * NT,
                           yP + po, PW, n, dxa ? dxa + kc : nullptr, dyP + po);
    });
  });
}

// Exact-mode S for d > DB over coordinates [k0, k1) (one DB block) for Q queries (rows qi of X,
// al and va): the shifted distance in 16-coordinate fp32 chunks added into double in the same
// order as the forward's k_logit_dbl (bit-identical logits; the double sums are in registers,
// continuing rows 0..Q-1 of Sd).
template <int Q>
inline void k_blogit_dbl(const int* qi, const float* X, int64_t ld, const float* al, const float* va,
                         const float* yT, int k0, int k1, double* Sd) {
  vf a[Q];
  vd dl[Q][NV], dh[Q][NV];
  const float* xq[Q];
  for (int q = 0; q < Q; ++q) {
    a[q] = vb(al[qi[q]]);
    xq[q] = X + qi[q] * ld;
    for (int v = 0; v < NV; ++v) {
      dl[q][v] = vldd(Sd + q * NT + v * W);
      dh[q][v] = vldd(Sd + q * NT + v * W + H);
    }
  }
  for (int kc = k0; kc < k1; kc += 16) {
    const int ke = (int)imin(kc + 16, k1);
    vf acc[Q][NV];
    for (int q = 0; q < Q; ++q) {
      const vf sh = vb((float)(ke - kc) * va[qi[q]]);
      for (int v = 0; v < NV; ++v) acc[q][v] = vb(0.f) - sh;
    }
    for (int k = kc; k < ke; ++k) {
      vf yv[NV];
      for (int v = 0; v < NV; ++v) yv[v] = vld(yT + (size_t)k * NT + v * W);
      for (int q = 0; q < Q; ++q) {
        const vf xb = vb(xq[q][k]);
        for (int v = 0; v < NV; ++v) {
          const vf df = vfnma(a[q], yv[v], xb);
          acc[q][v] = vfma(df, df, acc[q][v]);
        }
      }
    }
    for (int q = 0; q < Q; ++q)
      for (int v = 0; v < NV; ++v) {
        dl[q][v] += lo_d(acc[q][v]);
        dh[q][v] += hi_d(acc[q][v]);
      }
  }
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < NV; ++v) {
      vstd(Sd + q * NT + v * W, dl[q][v]);
      vstd(Sd + q * NT + v * W + H, dh[q][v]);
    }
}

struct BWork {
  Buf b_Xp, b_Gp, b_GY, b_YD, b_SD, b_GYd, b_YDd, b_SDd, b_W, b_Pq, b_dx, b_tmp, b_q, b_yTc, b_yP,
      b_Se, b_ynd, b_iota;
  int* iota;  // 0, 1, 2, ...: the query list of a whole chunk
  bool dense = true;  // most queries had a non-zero weight in the previous tile (see tile_BS)
  float *Xp, *Gp, *GY, *YD, *SD, *Wt, *Pq, *tmp, *yTc, *yP;
  double *GYd, *YDd, *SDd, *dxa, *qd, *Se, *ynd;
  void init(int dp, int qcmax) {
    Xp = b_Xp.get<float>((size_t)qcmax * dp);
    Gp = b_Gp.get<float>((size_t)qcmax * dp);
    GY = b_GY.get<float>((size_t)qcmax * NT);
    YD = b_YD.get<float>((size_t)qcmax * NT);
    SD = b_SD.get<float>((size_t)qcmax * NT);
    GYd = b_GYd.get<double>((size_t)qcmax * NT);
    YDd = b_YDd.get<double>((size_t)qcmax * NT);
    SDd = b_SDd.get<double>((size_t)qcmax * NT);
    Wt = b_W.get<float>((size_t)qcmax * NT);
    Pq = b_Pq.get<float>((size_t)qcmax * NT);
    dxa = b_dx.get<double>((size_t)qcmax * dp);
    tmp = b_tmp.get<float>((size_t)4 * 16 * NT);
    qd = b_q.get<double>((size_t)qcmax * 12);
    yTc = b_yTc.get<float>((size_t)dp * NT);
    yP = b_yP.get<float>((size_t)cdiv(dp, DV_DXY * W) * NT * DV_DXY * W);
    Se = b_Se.get<double>((size_t)qcmax * NT);
    ynd = b_ynd.get<double>(NT);
    iota = b_iota.get<int>((size_t)qcmax + 8);
    for (int q = 0; q < qcmax + 8; ++q) iota[q] = q;
  }
};

// The logits' S of one tile for the nq candidate queries cq (rows of X, Gm, al, va), in rows
// 0..nq-1: float in w.Sf, and for d > DB in double in w.Sd (the values the forward formed: exact
// 16-coordinate fp32 chunks, fast DB-coordinate blocks, added into double in the same order).
// When most candidates had a non-zero weight in the previous tile (bw.dense) and d <= DB, GY (YD,
// SD with FULL) are formed in the same pass, in the same rows (returns true); otherwise tile_BG
// forms them afterwards for the live queries only.
template <bool FAST, bool FULL>
bool tile_BS(const int* qi, int nq, const float* X, const float* Gm, int64_t ld, const float* al,
             const float* va, int d, const float* yT, const float* yTg, Work& w, BWork& bw) {
  if (d <= DB && bw.dense) {
    qblocks<FAST ? QB_P2F : QB_P2>(nq, [&](auto qc, int q) {
      constexpr int Q = decltype(qc)::value;
      k_blogit<Q, FAST, kPartS | kPartG | (FULL ? kPartY : 0)>(qi + q, X, Gm, ld, al, va, yT, yTg, 0, d,
                                                               w.Sf + q * NT, bw.GY + q * NT,
                                                               bw.YD + q * NT, bw.SD + q * NT);
    });
    return true;
  }
  if (d <= DB) {  // S alone: the forward's query blocks (fewer accumulators than fused)
    qblocks<QB_EXACT>(nq, [&](auto qc, int q) {
      constexpr int Q = decltype(qc)::value;
      k_blogit<Q, FAST, kPartS>(qi + q, X, nullptr, ld, al, va, yT, nullptr, 0, d, w.Sf + q * NT,
                                nullptr, nullptr, nullptr);
    });
    return false;
  }
  for (int i = 0; i < nq * NT; ++i) w.Sd[i] = 0.0;
  for (int k0 = 0; k0 < d; k0 += DB) {
    const int k1 = (int)imin(d, k0 + DB);
    if (!FAST) {
      qblocks<QB_BD>(nq, [&](auto qc, int q) {
        constexpr int Q = decltype(qc)::value;
        k_blogit_dbl<Q>(qi + q, X, ld, al, va, yT, k0, k1, w.Sd + q * NT);
      });
    } else {
      qblocks<QB_P2F>(nq, [&](auto qc, int q) {
        constexpr int Q = decltype(qc)::value;
        k_blogit<Q, true, kPartS>(qi + q, X, nullptr, ld, al, va, yT, nullptr, k0, k1, bw.tmp,
                                  nullptr, nullptr, nullptr);
        for (int i = 0; i < Q * NT; ++i) w.Sd[q * NT + i] += (double)bw.tmp[i];
      });
    }
  }
  for (int i = 0; i < nq * NT; ++i) w.Sf[i] = (float)w.Sd[i];
  return false;
}

// GY (and with FULL, YD and for fast SD) of one tile for the nl live queries qi (rows of X, Gm,
// al, va), in rows 0..nl-1 of bw.GY, bw.YD, bw.SD: moved there from rows lrow when tile_BS formed
// them (fused) for nc candidates, else formed now, for d > DB in fp32 over DB-coordinate blocks
// added into double.  Sets bw.dense for the next tile.
template <bool FAST, bool FULL>
void tile_BG(bool fused, const int* qi, const int* lrow, int nl, int nc, const float* X,
             const float* Gm, int64_t ld, const float* al, const float* va, int d, const float* yT,
             const float* yTg, BWork& bw) {
  constexpr int PARTS = kPartG | (FULL ? kPartY : 0);
  constexpr int QM = FAST ? QB_P2F : QB_P2;
  bw.dense = 2 * nl > nc;
  if (fused) {  // rows lrow[j] >= j: moving them up in order reads every row before it is overwritten
    for (int j = 0; j < nl; ++j) {
      const int r = lrow[j];
      if (r == j) continue;
      std::memcpy(bw.GY + j * NT, bw.GY + r * NT, sizeof(float) * NT);
      if (FULL) std::memcpy(bw.YD + j * NT, bw.YD + r * NT, sizeof(float) * NT);
      if (FAST && FULL) std::memcpy(bw.SD + j * NT, bw.SD + r * NT, sizeof(float) * NT);
    }
    return;
  }
  if (d <= DB) {
    qblocks<QM>(nl, [&](auto qc, int j) {
      constexpr int Q = decltype(qc)::value;
      k_blogit<Q, FAST, PARTS>(qi + j, X, Gm, ld, al, va, yT, yTg, 0, d, nullptr, bw.GY + j * NT,
                               bw.YD + j * NT, bw.SD + j * NT);
    });
    return;
  }
  const int m = nl * NT;
  for (int i = 0; i < m; ++i) bw.GYd[i] = bw.YDd[i] = bw.SDd[i] = 0.0;
  float* t1 = bw.tmp;
  float* t2 = t1 + 16 * NT;
  float* t3 = t2 + 16 * NT;
  for (int k0 = 0; k0 < d; k0 += DB) {
    const int k1 = (int)imin(d, k0 + DB);
    qblocks<QM>(nl, [&](auto qc, int j) {
      constexpr int Q = decltype(qc)::value;
      k_blogit<Q, FAST, PARTS>(qi + j, X, Gm, ld, al, va, yT, yTg, k0, k1, nullptr, t1, t2, t3);
      const int o = j * NT;
      for (int i = 0; i < Q * NT; ++i) {
        bw.GYd[o + i] += (double)t1[i];
        if (FULL) bw.YDd[o + i] += (double)t2[i];
        if (FAST && FULL) bw.SDd[o + i] += (double)t3[i];
      }
    });
  }
  for (int i = 0; i < m; ++i) {
    bw.GY[i] = (float)bw.GYd[i];
    bw.YD[i] = (float)bw.YDd[i];
    bw.SD[i] = (float)bw.SDd[i];
  }
}

// w = exp(logit - lse') for query q of the current tile (NV vectors).  lse' (double) is split
// into hi + lo floats, so the argument keeps the double lse's precision: (logit - hi) is exact
// for every non-negligible weight (Sterbenz), then lo is subtracted.
template <bool FAST>
inline void tile_weights(const Work& w, int q, const QConst& qc, double lse_d, bool dbl, vf* out) {
  if (!dbl) {
    const float hi = (float)lse_d;
    const vf vhi = vb(hi), vlo = vb((float)(lse_d - (double)hi));
    for (int v = 0; v < NV; ++v)
      out[v] = vexp((logit_f<FAST>(vld(w.Sf + q * NT + v * W), vld(w.bt + v * W), vld(w.yn + v * W), qc) - vhi) - vlo);
  } else {
    alignas(64) float t[NT];
    for (int j = 0; j < NT; ++j) t[j] = (float)(logit_d<FAST>(w.Sd[q * NT + j], w.bt[j], w.yn[j], qc) - lse_d);
    for (int v = 0; v < NV; ++v) out[v] = vexp(vld(t + v * W));
  }
}

// Per-group data shared by all threads of the backward (prepared once per group).
struct BShared {
  float *Xp, *Gp;       // (B, dp): x (exact) or x' (fast), and grad_mean (or 0), zero padded
  QConst* qc;           // logit constants per query
  double *lse_d, *c0, *cx;  // per query: lse in the internal frame, h - g.(mean - c), c.x'
  double* part;         // (T, B, dp) per-thread sum_i P diff   (dx)
  double* sums;         // (T, B, 3) per-thread sum P, sum P s, sum P y.diff
  double* kc;           // per query: S - s, i.e. d var (shifted distance) or |x'|^2 (expansion)
  // exact-mode plan: per-query form (null: all direct), the expansion queries' x' (B, dp),
  // constants and lse in their frame; the corrected logits of the listed points (B, K),
  // internal frame
  const uint8_t* ex = nullptr;
  float* Xe = nullptr;
  QConst* qe = nullptr;
  double* lse_e = nullptr;
  int K = 0;
  const int64_t* ov_idx = nullptr;
  double* ov_val = nullptr;
  bool expands(int64_t b) const { return ex && ex[b]; }
};

// x'.yc for Q queries given by their rows (x', row-major) and the NT points of a centred
// transposed tile, over coordinates [k0, k1): float32 into S (Q x NT).
template <int Q>
inline void k_xdot_rows(const float* const* rows, const float* yT, int k0, int k1, float* S) {
  vf acc[Q][NV];
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < NV; ++v) acc[q][v] = vb(0.f);
  for (int k = k0; k < k1; ++k) {
    vf yv[NV];
    for (int v = 0; v < NV; ++v) yv[v] = vld(yT + (size_t)k * NT + v * W);
    for (int q = 0; q < Q; ++q) {
      const vf xb = vb(rows[q][k]);
      for (int v = 0; v < NV; ++v) acc[q][v] = vfma(xb, yv[v], acc[q][v]);
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < NV; ++v) vst(S + q * NT + v * W, acc[q][v]);
}

// x'.yc of the expansion queries among the nq candidates cq (queries q0 + cq[r]) for the current
// tile, in the forward's 16-coordinate chains added into double (bw.Se, row r), in register
// blocks of queries.
void tile_expand(const BShared& sh, int64_t q0, const int* cq, int nq, int d, int dp,
                 const float* yTc, float* tmp, BWork& bw) {
  int eq[QCMAX + 8];  // a chunk holds at most QCMAX (+1 in the first pass) queries
  int ne = 0;
  for (int r = 0; r < nq; ++r)
    if (sh.expands(q0 + cq[r])) eq[ne++] = r;
  qblocks<QB_FAST>(ne, [&](auto qc, int j0) {
    constexpr int Q = decltype(qc)::value;
    const float* rows[Q];
    for (int j = 0; j < Q; ++j) {
      rows[j] = sh.Xe + (size_t)(q0 + cq[eq[j0 + j]]) * dp;
      double* se = bw.Se + eq[j0 + j] * NT;
      for (int i = 0; i < NT; ++i) se[i] = 0.0;
    }
    for (int k0 = 0; k0 < d; k0 += 16) {
      k_xdot_rows<Q>(rows, yTc, k0, (int)imin(d, k0 + 16), tmp);
      for (int j = 0; j < Q; ++j) {
        double* se = bw.Se + eq[j0 + j] * NT;
        for (int i = 0; i < NT; ++i) se[i] += (double)tmp[j * NT + i];
      }
    }
  });
}

// Weights exp(logit - lse) of query b (row q of the chunk) for the tile's points in its planned
// form, with the corrected logits of its listed points (exact mode; see diffmem/ops/_exact.py).
inline void query_weights(const BShared& sh, const Work& w, const BWork& bw, int64_t b, int q,
                          int64_t i0, int n, bool dbl, vf* out) {
  const bool e = sh.expands(b);
  const double lse = e ? sh.lse_e[b] : sh.lse_d[b];
  if (e) {
    const QConst& c = sh.qe[b];
    alignas(64) float t[NT];
    for (int u = 0; u < NT / H; ++u)
      vsth(t + u * H, __builtin_convertvector(h2d(w.bt + u * H) + vdb(c.d1) * vldd(bw.Se + q * NT + u * H)
                                                  - vdb(c.d2) * vldd(bw.ynd + u * H) - vdb(lse), vh));
    for (int v = 0; v < NV; ++v) out[v] = vexp(vld(t + v * W));
  } else {
    tile_weights<false>(w, q, sh.qc[b], lse, dbl, out);
  }
  for (int k = 0; k < sh.K; ++k) {
    const int64_t i = sh.ov_idx[b * sh.K + k];
    if (i < i0 || i >= i0 + n) continue;
    alignas(64) float t[NT];
    for (int v = 0; v < NV; ++v) vst(t + v * W, out[v]);
    t[i - i0] = (float)std::exp(sh.ov_val[b * sh.K + k] - lse);
    for (int v = 0; v < NV; ++v) out[v] = vld(t + v * W);
  }
}

// The weights of the nc candidate queries cq (queries q0 + cq[r], logits in rows r) for the
// current tile.  Those with any non-zero weight are listed (returns how many): lrow their rows,
// qi their queries (cq[lrow]), their weights in rows 0, 1, ... of bw.Wt.  The others add nothing
// to any gradient or sum of the tile.
template <bool FAST>
int live_weights(const BShared& sh, const Work& w, BWork& bw, int64_t q0, const int* cq, int nc,
                 int64_t i0, int n, bool dbl, int* lrow, int* qi) {
  int nl = 0;
  for (int r = 0; r < nc; ++r) {
    const int64_t b = q0 + cq[r];
    vf wv[NV];
    if (FAST) tile_weights<FAST>(w, r, sh.qc[b], sh.lse_d[b], dbl, wv);
    else query_weights(sh, w, bw, b, r, i0, n, dbl, wv);
    vi any = (vi)wv[0];
    for (int v = 1; v < NV; ++v) any |= (vi)wv[v];
    if (!any_bits(any)) continue;
    for (int v = 0; v < NV; ++v) vst(bw.Wt + nl * NT + v * W, wv[v]);
    lrow[nl] = r;
    qi[nl++] = cq[r];
  }
  return nl;
}

// Pass 1 (only where the forward's float32 mean is too coarse for D, see backward_impl) for
// queries [q0, q0+nq): D' = sum_i w_i g.(y_i - c) / sum_i w_i with exactly the g.(y - c) values
// of the main pass, summed in double, so that sum_i P_i = h holds to rounding; stores
// c0 = h - D'.  With a live map
// (B x tiles) it records which queries have a non-zero weight in which tiles.
template <bool FAST>
void bwd_pass1(const Problem<float>& a, int64_t g, int64_t q0, int nq, const float* cf, const BShared& sh,
               uint8_t* live_map, Work& w, BWork& bw) {
  const int d = (int)a.d, dp = (int)(cdiv(a.d, W) * W);
  const int64_t N = a.N, ntiles = active_tiles(a, g, NT);
  const PointRows yg = point_rows(a, g);
  const float* al = a.alpha + g * a.gs_alpha + q0;
  const float* va = a.var + g * a.gs_var + q0;
  const float* bg = a.bias ? a.bias + g * a.gs_bias : nullptr;
  const float* X = sh.Xp + (size_t)q0 * dp;
  const float* Gm = sh.Gp + (size_t)q0 * dp;
  const bool dbl = d > DB;
  double* Z = w.sc;
  double* Dq = bw.qd;
  int qi[QCMAX + 8], lrow[QCMAX + 8];
  for (int q = 0; q < nq; ++q) { Dq[q] = 0.0; Z[q] = 0.0; }
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t i0 = t * NT;
    const int n = (int)imin(NT, N - i0);
    pack_tile(yg, i0, n, d, rstride(dp), FAST ? cf : nullptr, w.yT, w.yR, w.yn, w.cy, FAST ? nullptr : bw.yTc, cf);
    load_bias(bg, i0, n, w.bt);
    const int* all = bw.iota;
    const bool fused = tile_BS<FAST, false>(all, nq, X, Gm, dp, al, va, d, w.yT, bw.yTc, w, bw);
    if (!FAST && sh.ex) {
      tile_sq_norms(bw.yTc, d, bw.ynd);
      tile_expand(sh, q0, all, nq, d, dp, bw.yTc, w.tmp, bw);
    }
    const int nl = live_weights<FAST>(sh, w, bw, q0, all, nq, i0, n, dbl, lrow, qi);
    if (live_map) {
      const int64_t ms = cdiv(N, NT);  // row stride of the map
      for (int q = 0; q < nq; ++q) live_map[(q0 + q) * ms + t] = 0;
      for (int j = 0; j < nl; ++j) live_map[(q0 + qi[j]) * ms + t] = 1;
    }
    tile_BG<FAST, false>(fused, qi, lrow, nl, nq, X, Gm, dp, al, va, d, w.yT, bw.yTc, bw);
    for (int j = 0; j < nl; ++j) {
      // in double: D enters every P_i = w_i (g.(y_i - c) - D + h) at full size, where the
      // terms cancel, so a float32 sum's rounding (~eps |g.(y - c)|) would be the gradients'
      // largest error
      vd acc = vdb(0.0), z = vdb(0.0);
      for (int v = 0; v < NV; ++v) {
        const vf wv = vld(bw.Wt + j * NT + v * W), gy = vld(bw.GY + j * NT + v * W);
        acc = vdfma(lo_d(wv), lo_d(gy), acc);
        acc = vdfma(hi_d(wv), hi_d(gy), acc);
        z += lo_d(wv) + hi_d(wv);
      }
      Dq[qi[j]] += dsum(acc);
      Z[qi[j]] += dsum(z);
    }
  }
  for (int q = 0; q < nq; ++q)
    sh.c0[q0 + q] = (a.grad_lse ? (double)a.grad_lse[g * a.B + q0 + q] : 0.0) - Dq[q] / Z[q];
}

// One packed tile (points i0..i0+n) for queries [q0, q0+nq): accumulates this thread's partial
// dx / sums, the tile's dy (dyR, panel form) and dbias (db).  The panel copy of the tile and the
// zeroed dyR are prepared by the first query chunk with a non-zero weight (panels).
// With a live map from pass 1 only the queries it lists for the tile are candidates.
template <bool FAST>
void bwd_tile(const Problem<float>& a, int64_t g, int64_t q0, int nq, int64_t t, int64_t i0, int n,
              const BShared& sh, const uint8_t* live_map, int64_t ntiles, double* part, double* sums,
              float* dyR, vf* db, bool& panels, Work& w, BWork& bw) {
  const int d = (int)a.d, dp = (int)(cdiv(a.d, W) * W);
  const float* al = a.alpha + g * a.gs_alpha + q0;
  const float* va = a.var + g * a.gs_var + q0;
  const float* X = sh.Xp + (size_t)q0 * dp;
  const float* Gm = sh.Gp + (size_t)q0 * dp;
  const bool dbl = d > DB;
  int cand[QCMAX + 8];
  const int* cq = bw.iota;
  int nc = nq;
  if (live_map) {
    nc = 0;
    for (int q = 0; q < nq; ++q)
      if (live_map[(q0 + q) * ntiles + t]) cand[nc++] = q;
    cq = cand;
    if (!nc) return;
  }
  const bool fused = tile_BS<FAST, true>(cq, nc, X, Gm, dp, al, va, d, w.yT, bw.yTc, w, bw);
  if (!FAST && sh.ex) tile_expand(sh, q0, cq, nc, d, dp, bw.yTc, w.tmp, bw);
  int qi[QCMAX + 8], lrow[QCMAX + 8];
  const int nl = live_weights<FAST>(sh, w, bw, q0, cq, nc, i0, n, dbl, lrow, qi);
  tile_BG<FAST, true>(fused, qi, lrow, nl, nc, X, Gm, dp, al, va, d, w.yT, bw.yTc, bw);
  for (int j = 0; j < nl; ++j) {
    const int q = qi[j], r = lrow[j];  // the query and its row of the logits
    const int64_t b = q0 + q;
    // expansion queries: S - |x'|^2 = alpha^2 |yc|^2 - 2 alpha x'.yc, accurate where the
    // direct shifted distance is not
    alignas(64) float se[NT];
    const bool e = !FAST && sh.expands(b);
    if (e) {
      const double av = al[q];
      for (int i = 0; i < NT; ++i) se[i] = (float)(av * av * bw.ynd[i] - 2.0 * av * bw.Se[r * NT + i]);
    }
    // c0 = h - D split into hi + lo floats: g.(y - c) + hi is exact where it cancels (Sterbenz),
    // so h survives even when |g.(y - c)| >> |h|
    const float c0h = (float)sh.c0[b];
    const vf c0 = vb(c0h), c0l = vb((float)(sh.c0[b] - (double)c0h));
    const vf pqs = vb(al[q] / va[q]);
    vf s1 = vb(0.f), s2 = vb(0.f), s3 = vb(0.f);
    for (int v = 0; v < NV; ++v) {
      const int o = j * NT + v * W;  // row j: the listed query's rows of Wt, GY, YD, SD, P, Pq
      const vf wv = vld(bw.Wt + o);
      const vf P = wv * ((vld(bw.GY + o) + c0) + c0l);
      const vf sv = FAST ? vld(bw.SD + o) : e ? vld(se + v * W) : vld(w.Sf + r * NT + v * W);
      vf yd = vld(bw.YD + o);
      if (FAST) yd += vb((float)sh.cx[b]) - vb(al[q]) * vld(w.cy + v * W);
      s1 += P;
      s2 = vfma(P, sv, s2);
      s3 = vfma(P, yd, s3);
      vst(w.P + o, P);
      vst(bw.Pq + o, P * pqs);
      db[v] += P;
    }
    sums[3 * b + 0] += (double)hsum(s1);
    sums[3 * b + 1] += (double)hsum(s2);
    sums[3 * b + 2] += (double)hsum(s3);
  }
  if (!nl) return;
  if (!panels && (a.dx || a.dy)) {
    to_panels(w.yR, rstride(dp), dp, n, bw.yP);
    if (a.dy) std::memset(dyR, 0, sizeof(float) * (size_t)cdiv(dp, PW) * NT * PW);
    panels = true;
  }
  double* dxa = part ? part + (size_t)q0 * dp : nullptr;
  if (a.dx && a.dy)
    tile_dxy<true, true>(qi, nl, X, Gm, dp, al, w.P, bw.Wt, bw.Pq, bw.yP, n, dxa, dyR);
  else if (a.dx)
    tile_dxy<true, false>(qi, nl, X, Gm, dp, al, w.P, bw.Wt, bw.Pq, bw.yP, n, dxa, dyR);
  else if (a.dy)
    tile_dxy<false, true>(qi, nl, X, Gm, dp, al, w.P, bw.Wt, bw.Pq, bw.yP, n, dxa, dyR);
}

template <bool FAST>
void backward_impl(const Problem<float>& a) {
  if (!(a.dx || a.dy || a.dalpha || a.dvar || a.dbias)) return;
  const int64_t G = a.G, B = a.B, N = a.N, d = a.d;
  const int dp = (int)(cdiv(d, W) * W);
  const int T = (int)imax(1, a.threads);
  const int64_t ntiles = cdiv(N, NT);
  const int64_t qc2 = imin(B, QCMAX);  // query chunk
  const int64_t nch = imin(B, T * cdiv(B, (int64_t)T * QCMAX));  // pass-1 query chunks
  const int64_t qc1 = cdiv(B, nch) + 1;
  const int64_t qcmax = imax(qc1, qc2);
  Buf bc, bX, bG, bq, bd3, bpart, bsums, bss, bXe, bqe, bpl, bmap;
  // which queries have a non-zero weight in which tiles, recorded by pass 1 (B x tiles bytes,
  // kept for problems up to 64 MB of it): the main pass then forms only those queries' logits
  uint8_t* live_map = B * ntiles <= (int64_t(1) << 26) ? bmap.get<uint8_t>((size_t)B * ntiles) : nullptr;
  // Centre of the points (g.y is accumulated as g.(y - c)) and their spread per column.
  double* ss = bss.get<double>((size_t)G * d);
  const double* c = centres(a, bc, ss);
  BShared sh;
  sh.Xp = bX.get<float>((size_t)B * dp);
  sh.Gp = bG.get<float>((size_t)B * dp);
  sh.qc = bq.get<QConst>((size_t)B);
  double* d3 = bd3.get<double>((size_t)3 * B);
  sh.lse_d = d3; sh.c0 = d3 + B; sh.cx = d3 + 2 * B;
  sh.part = a.dx ? bpart.get<double>((size_t)T * B * dp) : nullptr;
  sh.sums = bsums.get<double>((size_t)T * B * 3);
  const bool planned = !FAST && a.expand;
  const int K = planned ? a.top_k : 0;
  double* pl = bpl.get<double>((size_t)B * (2 + K));
  sh.kc = pl;
  if (planned) {
    sh.Xe = bXe.get<float>((size_t)B * dp);
    sh.qe = bqe.get<QConst>((size_t)B);
    sh.lse_e = pl + B;
    sh.K = K;
    sh.ov_val = pl + 2 * B;
  }
#pragma omp parallel num_threads(T)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    Work w;
    w.init((int)d, dp, (int)qcmax);
    BWork bw;
    bw.init(dp, (int)qcmax);
    Buf bdy;
    const int ldr = rstride(dp);
    const size_t npan = (size_t)cdiv(dp, PW) * NT * PW;
    // dy of the current tile in panel layout; offset by 1 KiB + 1 line against 4K aliasing
    // with yP (both are page-aligned mmaps)
    float* dyR = bdy.get<float>(npan + 272) + 272;
    double* part = sh.part ? sh.part + (size_t)tid * B * dp : nullptr;
    double* sums = sh.sums + (size_t)tid * B * 3;
    for (int64_t g = 0; g < G; ++g) {
      const double* cg = c ? c + g * d : nullptr;
      const float* cfg = c ? cfloat(c, G, d) + g * d : nullptr;
      const float* xg = a.x + g * a.gs_x;
      const float* al = a.alpha + g * a.gs_alpha;
      const float* va = a.var + g * a.gs_var;
      const float* gm = a.grad_mean ? a.grad_mean + g * B * d : nullptr;
      const float* mg = a.mean ? a.mean + g * B * d : nullptr;
      // this group's plan: forms and corrected logits
      BShared sg = sh;
      if (planned) {
        sg.ex = a.expand + g * B;
        sg.ov_idx = K ? a.top_idx + g * B * K : nullptr;
      }
      // per-query preparation, four queries at a time (their float64 sums as independent
      // chains, each summed in coordinate order)
#pragma omp for schedule(static)
      for (int64_t b0 = 0; b0 < B; b0 += 4) {
        const int nb = (int)imin(4, B - b0);
        const float *xs[4], *gs[4], *ms[4], *es[4];
        for (int u = 0; u < 4; ++u) {
          const int64_t b = b0 + (u < nb ? u : 0);  // rows past the block: repeats, unused
          float* xr = sh.Xp + (size_t)b * dp;
          float* gr = sh.Gp + (size_t)b * dp;
          xs[u] = xr;
          gs[u] = gr;
          ms[u] = mg ? mg + b * d : nullptr;
          es[u] = xr;
          if (u >= nb) continue;
          for (int64_t k = 0; k < d; ++k) {
            xr[k] = FAST ? xprime(xg[b * d + k], al[b], cg[k]) : xg[b * d + k];
            gr[k] = gm ? gm[b * d + k] : 0.f;
          }
          for (int64_t k = d; k < dp; ++k) xr[k] = gr[k] = 0.f;
          if (sg.expands(b)) {  // the expansion form around this backward's centre
            float* xe = sh.Xe + (size_t)b * dp;
            for (int64_t k = 0; k < d; ++k) xe[k] = xprime(xg[b * d + k], al[b], cg[k]);
            for (int64_t k = d; k < dp; ++k) xe[k] = 0.f;
            es[u] = xe;
          }
        }
        double x2[4] = {0.0, 0.0, 0.0, 0.0}, cxx[4] = {0.0, 0.0, 0.0, 0.0};
        double D[4] = {0.0, 0.0, 0.0, 0.0}, xe2[4] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t k = 0; k < d; ++k)
          for (int u = 0; u < 4; ++u) {
            if (gm) D[u] += (double)gs[u][k] * ((double)ms[u][k] - cg[k]);
            if (FAST) {
              x2[u] += (double)xs[u][k] * xs[u][k];
              cxx[u] += cg[k] * (double)xs[u][k];
            }
          }
        if (sg.ex)
          for (int64_t k = 0; k < d; ++k)
            for (int u = 0; u < 4; ++u) xe2[u] += (double)es[u][k] * es[u][k];
        for (int u = 0; u < nb; ++u) {
          const int64_t b = b0 + u;
          sh.qc[b] = qconst<FAST>(al[b], va[b]);
          const double lse = a.lse64[g * B + b];
          sh.lse_d[b] = FAST ? lse + 0.5 * x2[u] / (double)va[b] : lse + 0.5 * (double)d;
          sh.cx[b] = cxx[u];
          sh.c0[b] = (a.grad_lse ? (double)a.grad_lse[g * B + b] : 0.0) - D[u];
          sh.kc[b] = (double)d * (double)va[b];
          if (sg.expands(b)) {
            sh.qe[b] = qconst<true>(al[b], va[b]);
            sh.lse_e[b] = lse + 0.5 * xe2[u] / (double)va[b];
            sh.kc[b] = xe2[u];
          }
          for (int k = 0; k < K; ++k) {  // corrected logits, true frame -> internal frame
            const double v = a.top_logit[(g * B + b) * K + k];
            sh.ov_val[b * K + k] = v + (sg.expands(b) ? sh.lse_e[b] - lse : 0.5 * (double)d);
          }
        }
      }
      // D = g.(mean - c) from the forward's mean is exact to rounding, but the main pass forms
      // g.(y_i - c) in float32 chains, an absolute error ~ eps |g| |y - c| that does not cancel
      // against D: where the weight sits on a few points, P_i = w_i (g.(y_i - c) - D + h) is
      // then off by that much relative to h (data far from the origin relative to their spread,
      // or simply large: the whole problem scaled by 1e3).  Exact mode therefore always takes a
      // first pass that forms D = sum_i w_i g.(y_i - c) / sum_i w_i from the same float32
      // values (they cancel, and sum_i P_i = h holds to rounding); fast mode only where the
      // points are far from the origin (|c| > 2 rms(y - c), or N = 1).
      bool p1 = !FAST && gm;
      if (FAST && gm) {
        double c2 = 0.0, s2 = 0.0;
        for (int64_t k = 0; k < d; ++k) { c2 += cg[k] * cg[k]; s2 += ss[g * d + k]; }
        p1 = c2 > 4.0 * s2 / (double)N;
      }
      if (p1) {
#pragma omp for schedule(static)
        for (int64_t ch = 0; ch < nch; ++ch) {
          const int64_t q0 = ch * B / nch, q1 = (ch + 1) * B / nch;
          if (q1 > q0) bwd_pass1<FAST>(a, g, q0, (int)(q1 - q0), cfg, sg, live_map, w, bw);
        }
      }
      // one pass over the points (thread tid owns a contiguous range of tiles)
      if (part) std::memset(part, 0, sizeof(double) * B * dp);
      std::memset(sums, 0, sizeof(double) * B * 3);
      const int64_t tb = tid * ntiles / nth, te = (tid + 1) * ntiles / nth;
      const PointRows yg = point_rows(a, g);
      const float* bg = a.bias ? a.bias + g * a.gs_bias : nullptr;
      const int64_t live = active_tiles(a, g, NT);
      for (int64_t t = tb; t < te; ++t) {
        const int64_t i0 = t * NT;
        const int n = (int)imin(NT, N - i0);
        if (t >= live) {  // masked points: zero weight, zero gradients
          if (a.dy) std::memset(a.dy + (g * N + i0) * d, 0, sizeof(float) * n * d);
          if (a.dbias) std::memset(a.dbias + g * N + i0, 0, sizeof(float) * n);
          continue;
        }
        pack_tile(yg, i0, n, (int)d, ldr, FAST ? cfg : nullptr, w.yT, w.yR, w.yn, w.cy,
                  FAST ? nullptr : bw.yTc, cfg);
        load_bias(bg, i0, n, w.bt);
        if (sg.ex) tile_sq_norms(bw.yTc, (int)d, bw.ynd);
        vf db[NV];
        for (int v = 0; v < NV; ++v) db[v] = vb(0.f);
        bool panels = false;
        for (int64_t q0 = 0; q0 < B; q0 += qc2)
          bwd_tile<FAST>(a, g, q0, (int)imin(qc2, B - q0), t, i0, n, sg, p1 ? live_map : nullptr, ntiles,
                         part, sums, dyR, db, panels, w, bw);
        if (a.dy && !panels)  // no weight of the tile is non-zero
          std::memset(a.dy + (g * N + i0) * d, 0, sizeof(float) * n * d);
        else if (a.dy)
          for (int j = 0; j < n; ++j)
            for (int kc = 0; kc < d; kc += PW)
              std::memcpy(a.dy + (g * N + i0 + j) * d + kc, dyR + panel_off(kc) + (size_t)j * PW,
                          sizeof(float) * imin(PW, d - kc));
        if (a.dbias) {
          alignas(64) float tb_[NT];
          for (int v = 0; v < NV; ++v) vst(tb_ + v * W, db[v]);
          for (int j = 0; j < n; ++j) a.dbias[g * N + i0 + j] = tb_[j];
        }
      }
#pragma omp barrier
      // reduce the per-thread partials in thread order
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t gb = g * B + b;
        const double vv = va[b];
        if (a.dx) {
          for (int64_t k = 0; k < d; ++k) {
            double s = 0.0;
            for (int u = 0; u < nth; ++u) s += sh.part[((size_t)u * B + b) * dp + k];
            a.dx[gb * d + k] = (float)(-s / vv);
          }
        }
        double sP = 0.0, sPS = 0.0, sPY = 0.0;
        for (int u = 0; u < nth; ++u) {
          const double* su = sh.sums + ((size_t)u * B + b) * 3;
          sP += su[0]; sPS += su[1]; sPY += su[2];
        }
        if (a.dalpha) a.dalpha[gb] = (float)(sPY / vv);
        if (a.dvar) a.dvar[gb] = (float)((sPS + sP * sh.kc[b]) / (2.0 * vv * vv));
      }
    }
  }
}

}  // namespace

void backward_f32(const Problem<float>& a) {
  if (a.precision == 1) backward_impl<true>(a);
  else backward_impl<false>(a);
}
