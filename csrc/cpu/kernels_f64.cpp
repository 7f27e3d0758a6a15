// float64 path: straightforward, portable and deliberately simple (used for gradcheck and as a
// reference).  Per query it evaluates all N logits into an O(N) thread-local vector (never
// B x N), with the direct difference x - alpha*y.  The precision flag is ignored (always exact).
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "problem.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace diffmem {
namespace {

// logits of query b of group g: lg[i] = bias_i - |x - alpha y_i|^2 / (2 var)
void logits64(const Problem<double>& a, int64_t g, int64_t b, std::vector<double>& lg) {
  const int64_t N = a.N, d = a.d;
  const double* x = a.x + g * a.gs_x + b * d;
  const double* y = a.y + g * a.gs_y;
  const double al = a.alpha[g * a.gs_alpha + b], v = a.var[g * a.gs_var + b];
  const double* bias = a.bias ? a.bias + g * a.gs_bias : nullptr;
  for (int64_t i = 0; i < N; ++i) {
    double s = 0.0;
    for (int64_t k = 0; k < d; ++k) {
      const double df = std::fma(-al, y[i * d + k], x[k]);
      s += df * df;
    }
    lg[i] = (bias ? bias[i] : 0.0) - s / (2.0 * v);
  }
}

}  // namespace

void forward_f64(const Problem<double>& a) {
  const int64_t G = a.G, B = a.B, N = a.N, d = a.d;
#pragma omp parallel num_threads(a.threads > 0 ? a.threads : 1)
  {
    std::vector<double> lg(N), acc(d);
#pragma omp for schedule(static)
    for (int64_t gb = 0; gb < G * B; ++gb) {
      const int64_t g = gb / B, b = gb % B;
      logits64(a, g, b, lg);
      double M = -std::numeric_limits<double>::infinity();
      int64_t arg = -1;  // the first largest logit: ties to the lower index
      for (int64_t i = 0; i < N; ++i)
        if (lg[i] > M) { M = lg[i]; arg = i; }
      const double* y = a.y + g * a.gs_y;
      std::fill(acc.begin(), acc.end(), 0.0);
      double L = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        const double w = std::exp(lg[i] - M);
        if (w == 0.0) continue;
        L += w;
        for (int64_t k = 0; k < d; ++k) acc[k] += w * y[i * d + k];
      }
      for (int64_t k = 0; k < d; ++k) a.mean_out[gb * d + k] = acc[k] / L;
      a.lse_out[gb] = M + std::log(L);
      if (a.lse64_out) a.lse64_out[gb] = a.lse_out[gb];
      if (a.top_k >= 1) {  // the nearest point alone (top_k = 1)
        a.top_idx[gb] = arg;
        a.top_logit[gb] = arg >= 0 ? M : -std::numeric_limits<double>::infinity();
      }
    }
  }
}

void backward_f64(const Problem<double>& a) {
  if (!(a.dx || a.dy || a.dalpha || a.dvar || a.dbias)) return;
  const int64_t G = a.G, B = a.B, N = a.N, d = a.d;
  const int T = a.threads > 0 ? a.threads : 1;
  std::vector<std::vector<double>> bdy(T), bdb(T);
  int nth_used = 1;
#pragma omp parallel num_threads(T)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#pragma omp single
    nth_used = omp_get_num_threads();
#else
    const int tid = 0;
#endif
    std::vector<double> lg(N), P(N), diff(d);
    std::vector<double>& dyb = bdy[tid];
    std::vector<double>& dbb = bdb[tid];
    if (a.dy) dyb.assign(N * d, 0.0);
    if (a.dbias) dbb.assign(N, 0.0);
    for (int64_t g = 0; g < G; ++g) {
      if (a.dy) std::fill(dyb.begin(), dyb.end(), 0.0);
      if (a.dbias) std::fill(dbb.begin(), dbb.end(), 0.0);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t gb = g * B + b;
        const double* x = a.x + g * a.gs_x + b * d;
        const double* y = a.y + g * a.gs_y;
        const double al = a.alpha[g * a.gs_alpha + b], v = a.var[g * a.gs_var + b];
        const double* gm = a.grad_mean ? a.grad_mean + gb * d : nullptr;
        const double h = a.grad_lse ? a.grad_lse[gb] : 0.0;
        const double lse = a.lse64[gb];
        logits64(a, g, b, lg);
        double D = 0.0;
        for (int64_t i = 0; i < N; ++i) {
          lg[i] = std::exp(lg[i] - lse);  // w
          if (gm) {
            double gy = 0.0;
            for (int64_t k = 0; k < d; ++k) gy += gm[k] * y[i * d + k];
            P[i] = gy;
            D += lg[i] * gy;
          } else {
            P[i] = 0.0;
          }
        }
        double sa = 0.0, sv = 0.0;
        std::vector<double> dxa(d, 0.0);
        for (int64_t i = 0; i < N; ++i) {
          const double w = lg[i];
          const double p = w * (P[i] - D + h);
          double yd = 0.0, dd = 0.0;
          for (int64_t k = 0; k < d; ++k) {
            diff[k] = std::fma(-al, y[i * d + k], x[k]);
            yd += y[i * d + k] * diff[k];
            dd += diff[k] * diff[k];
            dxa[k] += p * diff[k];
          }
          sa += p * yd;
          sv += p * dd;
          if (a.dy)
            for (int64_t k = 0; k < d; ++k)
              dyb[i * d + k] += w * (gm ? gm[k] : 0.0) + p * al * diff[k] / v;
          if (a.dbias) dbb[i] += p;
        }
        if (a.dx)
          for (int64_t k = 0; k < d; ++k) a.dx[gb * d + k] = -dxa[k] / v;
        if (a.dalpha) a.dalpha[gb] = sa / v;
        if (a.dvar) a.dvar[gb] = sv / (2.0 * v * v);
      }
      if (a.dy || a.dbias) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N; ++i) {
          if (a.dy)
            for (int64_t k = 0; k < d; ++k) {
              double s = 0.0;
              for (int u = 0; u < nth_used; ++u) s += bdy[u][i * d + k];
              a.dy[(g * N + i) * d + k] = s;
            }
          if (a.dbias) {
            double s = 0.0;
            for (int u = 0; u < nth_used; ++u) s += bdb[u][i];
            a.dbias[g * N + i] = s;
          }
        }
      }
    }
  }
}

void knn_f64(const KnnProblem<double>& a) {
  const int64_t G = a.G, B = a.B, N = a.N, d = a.d, K = a.k;
#pragma omp parallel num_threads(a.threads > 0 ? a.threads : 1)
  {
    std::vector<std::pair<double, int64_t>> ds(N);
#pragma omp for schedule(static)
    for (int64_t gb = 0; gb < G * B; ++gb) {
      const int64_t g = gb / B, b = gb % B;
      const double* x = a.x + g * a.gs_x + b * d;
      const double* y = a.y + g * a.gs_y;
      for (int64_t i = 0; i < N; ++i) {
        double s = 0.0;
        for (int64_t k = 0; k < d; ++k) {
          const double df = x[k] - y[i * d + k];
          s += df * df;
        }
        ds[i] = {s, i};
      }
      std::partial_sort(ds.begin(), ds.begin() + K, ds.end());  // lexicographic: ties -> lower index
      for (int64_t r = 0; r < K; ++r) {
        a.dist_out[gb * K + r] = std::sqrt(ds[r].first);
        a.idx_out[gb * K + r] = ds[r].second;
      }
    }
  }
}

}  // namespace diffmem
