// k-NN fp32 kernels; included by kernels_impl.h inside namespace DM_NS (it relies on the
// tile helpers defined there).
namespace {

// ---------------------------------------------------------------------------------------------
// k-NN: the exact-mode distance kernel with alpha = 1, var = 0 (no shift), fp32 partial sums of
// at most DB coordinates flushed into double; a bounded max-heap per query ordered by
// (distance, index), so ties go to the lower index and the result is deterministic.
struct Heap {
  double* dist;
  int64_t* idx;
  int64_t size;
};
inline bool lex_less(double da, int64_t ia, double db, int64_t ib) { return da < db || (da == db && ia < ib); }
inline void heap_sift_down(Heap& h, int64_t i, int64_t n) {
  for (;;) {
    int64_t l = 2 * i + 1, m = i;
    if (l < n && lex_less(h.dist[m], h.idx[m], h.dist[l], h.idx[l])) m = l;
    if (l + 1 < n && lex_less(h.dist[m], h.idx[m], h.dist[l + 1], h.idx[l + 1])) m = l + 1;
    if (m == i) return;
    double td = h.dist[i]; h.dist[i] = h.dist[m]; h.dist[m] = td;
    int64_t ti = h.idx[i]; h.idx[i] = h.idx[m]; h.idx[m] = ti;
    i = m;
  }
}
inline void heap_offer(Heap& h, int64_t K, double s, int64_t i) {
  if (h.size < K) {
    int64_t p = h.size++;
    h.dist[p] = s; h.idx[p] = i;
    while (p > 0) {
      int64_t par = (p - 1) / 2;
      if (!lex_less(h.dist[par], h.idx[par], h.dist[p], h.idx[p])) break;
      double td = h.dist[par]; h.dist[par] = h.dist[p]; h.dist[p] = td;
      int64_t ti = h.idx[par]; h.idx[par] = h.idx[p]; h.idx[p] = ti;
      p = par;
    }
  } else if (lex_less(s, i, h.dist[0], h.idx[0])) {
    h.dist[0] = s; h.idx[0] = i;
    heap_sift_down(h, 0, K);
  }
}

}  // namespace

void knn_f32(const KnnProblem<float>& a) {
  const int64_t G = a.G, B = a.B, N = a.N, d = a.d, K = a.k;
  const int dp = (int)(cdiv(d, W) * W);
  const int T = (int)imax(1, a.threads);
  const int64_t ntiles = cdiv(N, NT);
  const int64_t qcs = imax(1, imin(64, (int64_t(1) << 20) / K));
  const int64_t nqc = cdiv(B, qcs);
  // Few (group, query chunk) items (e.g. one query): split the points too; each split keeps its
  // own top-k, merged afterwards in lexicographic (distance, index) order: the same result as
  // one pass, for any split.
  int64_t S = 1;
  if (G * nqc < 2 * T) S = imax(1, imin(imin(cdiv(2 * T, G * nqc), ntiles / 4), 16));
  Buf bpd, bpi;
  double* pd = S > 1 ? bpd.get<double>((size_t)G * B * S * K) : nullptr;
  int64_t* pi = S > 1 ? bpi.get<int64_t>((size_t)G * B * S * K) : nullptr;
#pragma omp parallel num_threads(T)
  {
    Work w;
    w.init((int)d, dp, (int)qcs);
    Buf bo, bz, bhd, bhi;
    float* ones = bo.get<float>(qcs);
    float* zeros = bz.get<float>(qcs);
    for (int64_t q = 0; q < qcs; ++q) { ones[q] = 1.f; zeros[q] = 0.f; }
    double* hd = bhd.get<double>((size_t)qcs * K);
    int64_t* hi = bhi.get<int64_t>((size_t)qcs * K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < G * nqc * S; ++it) {
      const int64_t sp = it % S, g = (it / S) / nqc, q0 = ((it / S) % nqc) * qcs;
      const int64_t tb = sp * ntiles / S, te = (sp + 1) * ntiles / S;
      const int nq = (int)imin(qcs, B - q0);
      const float* xq = a.x + g * a.gs_x + q0 * d;
      pack_x<false>(nq, (int)d, w.xc, [&](int q, int k) { return xq[q * d + k]; });
      const float* X = w.xc;
      const PointRows yg = point_rows(a, g);
      Heap* hs = nullptr;
      Heap hq[64];
      hs = hq;
      for (int q = 0; q < nq; ++q) hs[q] = Heap{hd + (size_t)q * K, hi + (size_t)q * K, 0};
      for (int64_t t = tb; t < te; ++t) {
        const int64_t i0 = t * NT;
        const int n = (int)imin(NT, N - i0);
        pack_tile(yg, i0, n, (int)d, dp, nullptr, w.yT, w.yR, w.yn, w.cy);
        tile_S<false>(X, ones, zeros, nq, (int)d, w.yT, w.Sf, w.Sd, w.tmp);
        for (int q = 0; q < nq; ++q) {
          Heap& h = hs[q];
          for (int j = 0; j < n; ++j) {
            const double s = d > DB ? w.Sd[q * NT + j] : (double)w.Sf[q * NT + j];
            if (h.size == K && !(s < h.dist[0])) continue;  // later points have larger indices
            heap_offer(h, K, s, i0 + j);
          }
        }
      }
      if (S > 1) {  // this split's candidates (unsorted; missing ones +inf)
        for (int q = 0; q < nq; ++q) {
          const Heap& h = hs[q];
          const size_t o = ((size_t)(g * B + q0 + q) * S + sp) * K;
          for (int64_t r = 0; r < K; ++r) {
            pd[o + r] = r < h.size ? h.dist[r] : kInfD;
            pi[o + r] = r < h.size ? h.idx[r] : INT64_MAX;
          }
        }
        continue;
      }
      for (int q = 0; q < nq; ++q) {
        Heap& h = hs[q];
        // heap sort: repeatedly move the largest to the end
        for (int64_t e = h.size - 1; e > 0; --e) {
          double td = h.dist[0]; h.dist[0] = h.dist[e]; h.dist[e] = td;
          int64_t ti = h.idx[0]; h.idx[0] = h.idx[e]; h.idx[e] = ti;
          heap_sift_down(h, 0, e);
        }
        const int64_t ob = (g * B + q0 + q) * K;
        for (int64_t r = 0; r < K; ++r) {
          const double s = h.dist[r];
          a.dist_out[ob + r] = (float)std::sqrt(s > 0 ? s : 0.0);
          a.idx_out[ob + r] = h.idx[r];
        }
      }
    }
    if (S > 1) {
      // merge: the k lexicographically smallest of the S*K candidates (a K-heap over them)
#pragma omp for schedule(static)
      for (int64_t gb = 0; gb < G * B; ++gb) {
        Heap h{hd, hi, 0};
        const size_t o = (size_t)gb * S * K;
        for (int64_t e = 0; e < S * K; ++e)
          if (pi[o + e] != INT64_MAX) heap_offer(h, K, pd[o + e], pi[o + e]);
        for (int64_t e = h.size - 1; e > 0; --e) {
          double td = h.dist[0]; h.dist[0] = h.dist[e]; h.dist[e] = td;
          int64_t ti = h.idx[0]; h.idx[0] = h.idx[e]; h.idx[e] = ti;
          heap_sift_down(h, 0, e);
        }
        for (int64_t r = 0; r < K; ++r) {
          const double s = h.dist[r];
          a.dist_out[gb * K + r] = (float)std::sqrt(s > 0 ? s : 0.0);
          a.idx_out[gb * K + r] = h.idx[r];
        }
      }
    }
  }
}
