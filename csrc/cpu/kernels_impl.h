// diffmem fp32 CPU kernels.  This header is compiled several times, once per instruction set
// (kernels_generic.cpp, kernels_avx2.cpp, kernels_avx512.cpp), each time with its own DM_NS
// namespace, DM_ISA level (0 generic, 1 AVX2+FMA, 2 AVX-512) and compiler flags; module.cpp
// picks one at run time.  Everything here has internal linkage, so the differently compiled
// copies can never be mixed up by the linker.
//
// Scheme (per group g, per work item = a chunk of queries x a range of point tiles):
//   * Points are streamed in tiles of NT (= NV vectors) points.  Each tile is packed into a
//     thread-local buffer twice: transposed, yT[k][j] (so logits vectorise ACROSS POINTS: one
//     vector = W points, no horizontal reductions), and row-major padded, yR[j][k] (for the
//     weighted sums, which vectorise across coordinates).
//   * Logit micro-kernel: a register block of Q queries x NV point-vectors; per coordinate k it
//     broadcasts x[q,k] and loads NV vectors of yT.
//   * Online softmax per query (running max m, running sum l, running weighted sum acc), so the
//     B x N matrix is never materialised.  m, l and acc are kept in double.
//
// Precision ("exact", the default): diff = fma(-alpha, y, x) (single rounding) and the fp32
// accumulator holds the SHIFTED distance s = sum_k (diff_k^2 - var): every chunk of 16
// coordinates starts by subtracting 16*var, which keeps partial sums near zero for points near
// the query.  Every DB = 256 coordinates the fp32 partial sum is flushed into a double
// accumulator (hierarchical summation), and for d > DB the logits are formed in double.
// The internal logit is bias - s/(2 var), i.e. the true logit + d/2 (softmax-invariant); the
// reported lse subtracts d/2 again.
// "fast": logits from the expansion around the group centre c (the centroid rounded to float):
//   x' = x - alpha c, yc = y - c,  logit = bias + alpha/var x'.yc - alpha^2/(2 var) |yc|^2,
// true lse = internal lse - |x'|^2/(2 var).  One FMA per (query, point, coordinate).
#include "problem.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif
#if DM_ISA >= 1
#include <immintrin.h>
#endif

namespace diffmem {
namespace DM_NS {
namespace {

// ---------------------------------------------------------------------------------------------
// Vector width and register-block sizes per instruction set.
#if DM_ISA == 2
constexpr int W = 16;      // fp32 lanes
constexpr int NV = 2;      // point vectors per tile -> NT = 32 points
constexpr int QB_EXACT = 6, QB_EXACT_D = 3, QB_FAST = 10, QB_P2 = 3, QB_P2F = 2;
constexpr int QB_WS = 6, DV_WS = 4, QB_DXY = 2, DV_DXY = 2, IU_DXY = 2, QB_BD = 3;
#elif DM_ISA == 1
constexpr int W = 8;
constexpr int NV = 2;
constexpr int QB_EXACT = 2, QB_EXACT_D = 1, QB_FAST = 4, QB_P2 = 1, QB_P2F = 1;
constexpr int QB_WS = 2, DV_WS = 4, QB_DXY = 2, DV_DXY = 1, IU_DXY = 1, QB_BD = 1;
#else
constexpr int W = 4;
constexpr int NV = 2;
constexpr int QB_EXACT = 2, QB_EXACT_D = 1, QB_FAST = 4, QB_P2 = 1, QB_P2F = 1;
constexpr int QB_WS = 2, DV_WS = 4, QB_DXY = 2, DV_DXY = 1, IU_DXY = 1, QB_BD = 1;
#endif
constexpr int NT = W * NV;   // points per tile
// The fast forward's tiles: NV_FAST point vectors (wider tiles: more independent FMA chains per
// broadcast query value), with query blocks of QB_FASTW.  The backward and exact mode keep NV.
#if DM_ISA == 2
constexpr int NV_FAST = 4, QB_FASTW = 6;
#else
constexpr int NV_FAST = NV, QB_FASTW = QB_FAST;
#endif
constexpr int NT_MAX = W * (NV_FAST > NV ? NV_FAST : NV);  // widest tile (workspace sizes)
constexpr int DB = 256;      // d above which the logits are accumulated and formed in double
constexpr int QCMAX = 256;   // queries per work item

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

constexpr float kInfF = __builtin_inff();
constexpr double kInfD = __builtin_inf();

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline vf vld(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline void vst(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// broadcast (not vf{} + a: without -ffast-math that is a real addition, +0 + a, which the
// compiler must keep before every broadcast)
inline vf vb(float a) {
#if DM_ISA == 2
  return _mm512_set1_ps(a);
#elif DM_ISA == 1
  return _mm256_set1_ps(a);
#else
  return vf{a, a, a, a};
#endif
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
// whether any bit of the vector is set
inline bool any_bits(vi m) {
#if DM_ISA == 2
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif DM_ISA == 1
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#else
  for (int l = 0; l < W; ++l)
    if (m[l]) return true;
  return false;
#endif
}
// a*b + c (fused where the hardware has FMA)
inline vf vfma(vf a, vf b, vf c) {
#if DM_ISA == 2
  return _mm512_fmadd_ps(a, b, c);
#elif DM_ISA == 1
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
// c - a*b with a single rounding (the exact-mode difference x - alpha*y).
inline vf vfnma(vf a, vf b, vf c) {
#if DM_ISA == 2
  return _mm512_fnmadd_ps(a, b, c);
#elif DM_ISA == 1
  return _mm256_fnmadd_ps(a, b, c);
#else
  // No FMA assumed: the product of two floats is exact in double, so this rounds (almost
  // always) exactly like a fused operation.
  typedef double vd __attribute__((vector_size(W * 8)));
  vd r = __builtin_convertvector(c, vd) - __builtin_convertvector(a, vd) * __builtin_convertvector(b, vd);
  return __builtin_convertvector(r, vf);
#endif
}
inline float hmax(vf v) {
#if DM_ISA == 2
  return _mm512_reduce_max_ps(v);
#else
  float m = v[0];
  for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
  return m;
#endif
}
inline float hsum(vf v) {
#if DM_ISA == 2
  return _mm512_reduce_add_ps(v);
#else
  float s = v[0];
  for (int l = 1; l < W; ++l) s += v[l];
  return s;
#endif
}

// exp(x) for float vectors, ~1-2 ulp.  x < kExpCut (including -inf) gives exactly 0; x is
// clamped at 88.  n = round(x/ln2) via the 1.5*2^23 trick, r = x - n ln2 (Cody-Waite split,
// exact without FMA), exp(r) by a degree-6 polynomial (our own relative-minimax fit on
// [-ln2/2, ln2/2]), times 2^n built in the exponent bits.
// Every caller computes softmax weights exp(logit - max) or exp(logit - lse): a weight below
// e^-64 (1.6e-28) changes no sum by more than N * 1.6e-28 relative, and flushing it keeps the
// products weight * point out of the subnormal range (where each FMA costs ~100 cycles).
constexpr float kExpCut = -64.0f;
inline vf vexp(vf x) {
  const vf lo = vb(kExpCut);
  const vi under = x < lo;
  vf xc = x < lo ? lo : x;
  xc = xc > vb(88.0f) ? vb(88.0f) : xc;
  const vf magic = vb(12582912.0f);
  const vf t = vfma(xc, vb(1.44269504088896341f), magic);
  const vf n = t - magic;
  vf r = vfma(n, vb(-0.693359375f), xc);
  r = vfma(n, vb(2.12194440e-4f), r);
  vf p = vb(0.0013814454432576895f);
  p = vfma(p, r, vb(0.008368711918592453f));
  p = vfma(p, r, vb(0.04166838899254799f));
  p = vfma(p, r, vb(0.1666652113199234f));
  p = vfma(p, r, vb(0.4999999403953552f));
  p = vfma(p, r * r, r) + vb(1.0f);
  const vi e = (((vi)t - (vi)magic) + 127) << 23;
  const vf res = p * (vf)e;
  return under ? vb(0.0f) : res;
}

// Row stride of row-major point tiles: for large d an odd number of cache lines, so that the
// NT rows of a tile do not all map to the same few L1 sets (d = 1024, 2048, 3072, ...).
inline int rstride(int dp) { return (dp >= 256 && (dp / 16) % 2 == 0) ? dp + 16 : dp; }

// 64-byte aligned scratch owned by one thread.
struct Buf {
  void* p = nullptr;
  ~Buf() { std::free(p); }
  template <class T>
  T* get(size_t n) {
    std::free(p);
    size_t bytes = ((n * sizeof(T) + 63) / 64) * 64 + 64;
    p = std::aligned_alloc(64, bytes);
    return static_cast<T*>(p);
  }
};

}  // namespace
#include "points.h"
namespace {

// Calls f(integral_constant<Q>, q) for query blocks of QMAX, then one smaller tail block.
template <int Q, class F>
inline void tail_dispatch(int r, int q, F& f) {
  if constexpr (Q >= 1) {
    if (r == Q) { f(std::integral_constant<int, Q>{}, q); return; }
    tail_dispatch<Q - 1>(r, q, f);
  }
}
template <int QMAX, class F>
inline void qblocks(int nq, F&& f) {
  int q = 0;
  for (; q + QMAX <= nq; q += QMAX) f(std::integral_constant<int, QMAX>{}, q);
  if (q < nq) tail_dispatch<QMAX - 1>(nq - q, q, f);
}

// ---------------------------------------------------------------------------------------------
// Tile packing.  Points [i0, i0+n) of one group go to yR[j*dp + k] (row-major, zero padded to
// dp) and yT[k*NT + j] (transposed); missing points (j >= n) are zero.  With a centre cf (float
// values, see centres) the values are yc = y - cf (one float subtraction: the exact difference
// rounded once), and yn[j] = |yc_j|^2 and (if cy) cy[j] = c.yc_j are produced in double lanes
// (fast mode).  With yTc, also the centred transposed copy y - ccf (exact-mode backward).
typedef double vd __attribute__((vector_size(W * 4)));
typedef float vh __attribute__((vector_size(W * 2)));
constexpr int H = W / 2;
inline vd vldd(const double* p) { vd r; std::memcpy(&r, p, sizeof r); return r; }
inline void vstd(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
inline vd h2d(const float* p) { vh r; std::memcpy(&r, p, sizeof r); return __builtin_convertvector(r, vd); }
inline double dsum(vd v) { double s = 0; for (int l = 0; l < H; ++l) s += v[l]; return s; }
inline double dmax(vd v) { double m = v[0]; for (int l = 1; l < H; ++l) m = v[l] > m ? v[l] : m; return m; }
inline vd vdb(double a) { vd r; for (int l = 0; l < H; ++l) r[l] = a; return r; }
inline void vsth(float* p, vh v) { std::memcpy(p, &v, sizeof v); }
inline vd vdfma(vd a, vd b, vd c) {
#if DM_ISA == 2
  return _mm512_fmadd_pd(a, b, c);
#elif DM_ISA == 1
  return _mm256_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

#if DM_ISA == 2
// dst[i*ds + j] = src[j*ss + i] for a 16 x 16 block (unpack / shuffle network, 64 shuffles).
inline void tr16(const float* src, size_t ss, float* dst, size_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d a2 = _mm512_castps_pd(t[4 * i + 2]), a3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  for (int i0 = 0; i0 < 8; ++i0) {
    const int i = i0 < 4 ? i0 : i0 + 4;
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ds, r[i]);
}
#endif

// yTc = yT - cf for the n valid points of a transposed tile (one subtraction per vector);
// missing points 0.
void centre_transposed(const float* yT, int n, int d, const float* cf, float* yTc) {
  vi valid[NV];
  for (int v = 0; v < NV; ++v)
    for (int l = 0; l < W; ++l) valid[v][l] = v * W + l < n ? -1 : 0;
  for (int k = 0; k < d; ++k) {
    const vf cb = vb(cf[k]);
    for (int v = 0; v < NV; ++v) {
      const vf t = vld(yT + (size_t)k * NT + v * W) - cb;
      vst(yTc + (size_t)k * NT + v * W, valid[v] ? t : vb(0.f));
    }
  }
}

// yT[k*NT + j] = R[j*ldr + k] for the NT rows of a tile (each readable up to d rounded up to
// W), in W-column strips (the strip of yT rows stays in L1).
template <int V = NV>
void transpose_rows(const float* R, size_t ldr, int d, float* yT) {
  for (int k0 = 0; k0 < d; k0 += W) {
    const int kn = (int)imin(W, d - k0);
#if DM_ISA == 2
    if (kn == W) {  // in-register 16 x 16 transposes
      for (int v = 0; v < V; ++v) tr16(R + (size_t)v * W * ldr + k0, ldr, yT + (size_t)k0 * (V * W) + v * W, (V * W));
      continue;
    }
#endif
    for (int j = 0; j < (V * W); ++j) {
      vf v = vld(R + (size_t)j * ldr + k0);
      for (int l = 0; l < kn; ++l) yT[(size_t)(k0 + l) * (V * W) + j] = v[l];
    }
  }
}

template <int V = NV>
void pack_tile(const PointRows& pts, int64_t i0, int n, int d, int dp, const float* cf, float* yT,
               float* yR, float* yn, float* cy, float* yTc = nullptr, const float* ccf = nullptr) {
  const int dw = d - d % W;
  for (int j = 0; j < V * W; ++j) {
    float* r = yR + (size_t)j * dp;
    if (j < n) {
      const float* src = pts.row(i0 + j, r);  // storage dtypes: converted into r, centred in place
      if (cf) {
        vd s2v = vd{}, scv = vd{};
        for (int k = 0; k < dw; k += W) {
          const vf v = vld(src + k) - vld(cf + k);
          vst(r + k, v);
          const vd lo = h2d(r + k), hi = h2d(r + k + H);
          s2v = vdfma(lo, lo, s2v);
          s2v = vdfma(hi, hi, s2v);
          if (cy) {
            scv = vdfma(h2d(cf + k), lo, scv);
            scv = vdfma(h2d(cf + k + H), hi, scv);
          }
        }
        double s2 = dsum(s2v), sc = dsum(scv);
        for (int k = dw; k < d; ++k) {
          const float v = src[k] - cf[k];
          r[k] = v;
          s2 += (double)v * v;
          sc += (double)cf[k] * (double)v;
        }
        yn[j] = (float)s2;
        if (cy) cy[j] = (float)sc;
      } else if (src != r) {
        std::memcpy(r, src, sizeof(float) * d);
      }
      for (int k = d; k < dp; ++k) r[k] = 0.f;
    } else {
      std::memset(r, 0, sizeof(float) * dp);
      if (cf) { yn[j] = 0.f; if (cy) cy[j] = 0.f; }
    }
  }
  transpose_rows<V>(yR, dp, d, yT);
  if constexpr (V == NV)
    if (yTc) centre_transposed(yT, n, d, ccf, yTc);
}

// One exact chunk [kc, ke) of at most 16 coordinates: subtract (ke - kc) * var, then add the
// squared direct differences fma(-alpha, y, x)^2 of the chunk to acc.
template <int Q>
inline void k_exact_chunk(vf (&acc)[Q][NV], const vf (&a)[Q], const float* X, const float* va, const float* yT, int kc, int ke) {
  for (int q = 0; q < Q; ++q) {
    const vf sh = vb((float)(ke - kc) * va[q]);
    for (int v = 0; v < NV; ++v) acc[q][v] -= sh;
  }
  for (int k = kc; k < ke; ++k) {
    vf yv[NV];
    for (int v = 0; v < NV; ++v) yv[v] = vld(yT + (size_t)k * NT + v * W);
    for (int q = 0; q < Q; ++q) {
      const vf xb = vb(X[k * Q + q]);
      for (int v = 0; v < NV; ++v) {
        const vf df = vfnma(a[q], yv[v], xb);
        acc[q][v] = vfma(df, df, acc[q][v]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward logit micro-kernel over coordinates [k0, k1) for Q queries and the
// NT points of a packed tile.  exact: S = sum_k (fma(-alpha,y,x)^2 - var) with the shift applied
// per 16-coordinate chunk (k0 must be a multiple of 16).  fast: S = sum_k x'_k yc_k.
template <int Q, bool FAST, int V = NV>
inline void k_logit(const float* X, const float* al, const float* va, const float* yT,
                    int k0, int k1, float* S) {
  vf acc[Q][V];
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < V; ++v) acc[q][v] = vb(0.f);
  if constexpr (FAST) {
    for (int k = k0; k < k1; ++k) {
      vf yv[V];
      for (int v = 0; v < V; ++v) yv[v] = vld(yT + (size_t)k * (V * W) + v * W);
      for (int q = 0; q < Q; ++q) {
        const vf xb = vb(X[k * Q + q]);
        for (int v = 0; v < V; ++v) acc[q][v] = vfma(xb, yv[v], acc[q][v]);
      }
    }
  } else {
    vf a[Q];
    for (int q = 0; q < Q; ++q) a[q] = vb(al[q]);
    for (int kc = k0; kc < k1; kc += 16)
      k_exact_chunk<Q>(acc, a, X, va, yT, kc, (int)imin(kc + 16, k1));
  }
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < V; ++v) vst(S + q * (V * W) + v * W, acc[q][v]);
}

// Exact-mode kernel for d > DB: the fp32 accumulator lives for ONE 16-coordinate chunk only
// (it starts at -n*var) and each chunk result is added into double accumulators held in
// registers (W/2 doubles per half vector).  Continues the sums already in Sd.
// lower / upper half of a float vector, widened to double (kept in registers)
#if DM_ISA == 2
inline vd lo_d(vf v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline vd hi_d(vf v) { return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))); }
#elif DM_ISA == 1
inline vd lo_d(vf v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline vd hi_d(vf v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
#else
static_assert(W == 4, "generic path assumes 4 lanes");
inline vd lo_d(vf v) { return __builtin_convertvector((vh){v[0], v[1]}, vd); }
inline vd hi_d(vf v) { return __builtin_convertvector((vh){v[2], v[3]}, vd); }
#endif
template <int Q>
inline void k_logit_dbl(const float* X, const float* al, const float* va, const float* yT,
                        int k0, int k1, double* Sd) {
  vd dl[Q][NV], dh[Q][NV];
  vf a[Q];
  for (int q = 0; q < Q; ++q) {
    a[q] = vb(al[q]);
    for (int v = 0; v < NV; ++v) {
      dl[q][v] = vldd(Sd + q * NT + v * W);
      dh[q][v] = vldd(Sd + q * NT + v * W + H);
    }
  }
  for (int kc = k0; kc < k1; kc += 16) {
    const int ke = (int)imin(kc + 16, k1);
    vf acc[Q][NV];
    for (int q = 0; q < Q; ++q)
      for (int v = 0; v < NV; ++v) acc[q][v] = vb(0.f);
    k_exact_chunk<Q>(acc, a, X, va, yT, kc, ke);
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

// Queries for tile_S: the query blocks of tile_S (qblocks of tile_qm) stored one after the
// other, each coordinate-major (element (q, k) of the block starting at query q0 of size Q at
// out[q0*d + k*Q + (q - q0)]), so that the micro-kernels broadcast from one running pointer.
template <bool FAST, int V = NV>
inline int tile_qm(int d) { return FAST ? (V == NV ? QB_FAST : QB_FASTW) : d <= DB ? QB_EXACT : QB_EXACT_D; }
template <class F>
void pack_x_blocks(int qm, int nq, int d, float* out, F&& val) {
  for (int q0 = 0; q0 < nq; q0 += qm) {
    const int Q = (int)imin(qm, nq - q0);
    float* o = out + (size_t)q0 * d;
    for (int q = 0; q < Q; ++q)
      for (int k = 0; k < d; ++k) o[(size_t)k * Q + q] = val(q0 + q, k);
  }
}
template <bool FAST, int V = NV, class F>
void pack_x(int nq, int d, float* out, F&& val) {
  pack_x_blocks(tile_qm<FAST, V>(d), nq, d, out, val);
}

// S for all nq queries of a tile: fp32 result in Sf when d <= DB, else a double result in Sd,
// computed in d-blocks of DB (d-block outer, so the yT block is reused from L1 by all queries).
// exact: 16-coordinate fp32 chunks flushed into double (k_logit_dbl); fast: DB-coordinate
// fp32 blocks flushed into double.
template <bool FAST, int V = NV>
void tile_S(const float* X, const float* al, const float* va, int nq, int d,
            const float* yT, float* Sf, double* Sd, float* tmp) {
  constexpr int QM = FAST ? (V == NV ? QB_FAST : QB_FASTW) : QB_EXACT;
  const int64_t ldx = d;  // X is in pack_x layout: the block of query q starts at X + q*d
  if (d <= DB) {
    qblocks<QM>(nq, [&](auto qc, int q) {
      constexpr int Q = decltype(qc)::value;
      k_logit<Q, FAST, V>(X + q * ldx, al + q, va + q, yT, 0, d, Sf + q * (V * W));
    });
    return;
  }
  for (int i = 0; i < nq * (V * W); ++i) Sd[i] = 0.0;
  for (int k0 = 0; k0 < d; k0 += DB) {
    const int k1 = (int)imin(d, k0 + DB);
    if (!FAST) {
      qblocks<QB_EXACT_D>(nq, [&](auto qc, int q) {
        constexpr int Q = decltype(qc)::value;
        k_logit_dbl<Q>(X + q * ldx, al + q, va + q, yT, k0, k1, Sd + q * (V * W));
      });
    } else {
      qblocks<QM>(nq, [&](auto qc, int q) {
        constexpr int Q = decltype(qc)::value;
        k_logit<Q, FAST, V>(X + q * ldx, al + q, va + q, yT, k0, k1, tmp);
        double* sd = Sd + q * (V * W);
        for (int i = 0; i < Q * (V * W); ++i) sd[i] += (double)tmp[i];
      });
    }
  }
}

// Per-query logit constants (identical in forward and backward).
struct QConst {
  float f1, f2;   // exact: f1 = 1/(2var);  fast: f1 = alpha/var, f2 = alpha^2/(2var)
  double d1, d2;  // the same in double (used when d > DB)
};
template <bool FAST>
inline QConst qconst(float alpha, float var) {
  QConst c;
  if (FAST) {
    c.f1 = alpha / var;
    c.f2 = 0.5f * alpha * alpha / var;
    c.d1 = (double)alpha / var;
    c.d2 = 0.5 * (double)alpha * alpha / var;
  } else {
    c.f1 = 0.5f / var;
    c.f2 = 0.f;
    c.d1 = 0.5 / (double)var;
    c.d2 = 0.0;
  }
  return c;
}
template <bool FAST>
inline vf logit_f(vf s, vf b, vf yn, const QConst& c) {
  if (FAST) return b + vb(c.f1) * s - vb(c.f2) * yn;
  return b - s * vb(c.f1);
}
template <bool FAST>
inline double logit_d(double s, float b, float yn, const QConst& c) {
  if (FAST) return (double)b + c.d1 * s - c.d2 * (double)yn;
  return (double)b - s * c.d1;
}

// Weighted-sum micro-kernel: for Q queries with weight rows P (V*W floats apart) and their
// indices qi among the chunk's rows, acc[qi, kc:kc+DV*W] = acc*sc[qi] + sum_{i<n} P[q,i] yR[i,
// kc:...] (yR rows ldr apart, acc rows dp apart).  Register block Q queries x DV vectors along
// d; fp32 over the tile, then added in double.
template <int Q, int DV, int V = NV>
inline void k_ws(const float* P, const int* qi, const float* yR, int ldr, int dp, int n, double* acc,
                 const double* sc) {
  vf r[Q][DV];
  for (int q = 0; q < Q; ++q)
    for (int j = 0; j < DV; ++j) r[q][j] = vb(0.f);
  for (int i = 0; i < n; ++i) {
    vf yv[DV];
    for (int j = 0; j < DV; ++j) yv[j] = vld(yR + (size_t)i * ldr + j * W);
    for (int q = 0; q < Q; ++q) {
      const vf pb = vb(P[q * V * W + i]);
      for (int j = 0; j < DV; ++j) r[q][j] = vfma(pb, yv[j], r[q][j]);
    }
  }
  for (int q = 0; q < Q; ++q) {  // widened to double in registers; no rescaling when sc = 1
    double* aq = acc + (size_t)qi[q] * dp;
    const double s = sc[qi[q]];
    if (s == 1.0) {
      for (int j = 0; j < DV; ++j) {
        vstd(aq + j * W, vldd(aq + j * W) + lo_d(r[q][j]));
        vstd(aq + j * W + H, vldd(aq + j * W + H) + hi_d(r[q][j]));
      }
    } else {
      const vd sv = vdb(s);
      for (int j = 0; j < DV; ++j) {
        vstd(aq + j * W, vldd(aq + j * W) * sv + lo_d(r[q][j]));
        vstd(aq + j * W + H, vldd(aq + j * W + H) * sv + hi_d(r[q][j]));
      }
    }
  }
}
template <int DVM, class F>
inline void dv_chunks(int dp, F&& f) {
  int kc = 0;
  for (; kc + DVM * W <= dp; kc += DVM * W) f(std::integral_constant<int, DVM>{}, kc);
  const int rem = (dp - kc) / W;
  if (rem) {
    auto g = [&](auto dvc, int k) { f(dvc, k); };
    tail_dispatch<DVM - 1>(rem, kc, g);
  }
}
// The weighted sums of nt consecutive tiles.  Tile t has rows R[t] (ldr[t] floats apart:
// rstride(dp) for packed copies, so that a tile's rows do not share their L1 sets, or d for
// float32 points read in place), n[t] points, rescale factors sc + t*nq, and nl[t] live queries:
// those with a non-zero weight in the tile, listed in ql + t*nq with their weight rows at
// P + t*nq*NT, one after the other.  A query whose weights in a tile are all zero (every logit
// more than -kExpCut below its running max, which then did not move: factor 1) adds nothing and
// is not listed.  Per query and coordinate the double accumulator takes the tiles in order
// (acc = acc*sc + tile sum), so the result does not depend on which queries are listed.
template <int V = NV>
void tile_wsum(const float* P, const float* const* R, const int* ldr, int nq, int dp, const int* n,
               int nt, double* acc, const double* sc, const int* ql, const int* nl) {
  bool dense = true;  // every query live in every tile: the lists are 0, 1, ..., nq - 1
  for (int t = 0; t < nt; ++t) dense = dense && nl[t] == nq;
  dv_chunks<DV_WS>(dp, [&](auto dvc, int kc) {
    constexpr int DV = decltype(dvc)::value;
    // narrow chunks (small d): more queries per block, fewer loads per FMA
    constexpr int QW = DV <= 2 ? 2 * QB_WS : QB_WS;
    auto block = [&](int t, int j, auto qc) {
      constexpr int Q = decltype(qc)::value;
      k_ws<Q, DV, V>(P + ((size_t)t * nq + j) * (V * W), ql + (size_t)t * nq + j, R[t] + kc, ldr[t],
                     dp, n[t], acc + kc, sc + (size_t)t * nq);
    };
    if (dense) {  // each block of acc stays in L1 across the tiles
      qblocks<QW>(nq, [&](auto qc, int j) {
        for (int t = 0; t < nt; ++t) block(t, j, qc);
      });
    } else {
      for (int t = 0; t < nt; ++t) qblocks<QW>(nl[t], [&](auto qc, int j) { block(t, j, qc); });
    }
  });
}

// Centre of each group's points, rounded to float.  The points are summed in blocks of CRB
// consecutive rows (contiguous reads; parallel over blocks), then the block sums are added in
// block order, so the result does not depend on the thread count.  One pass over the points.
constexpr int64_t CRB = 512;
double* centres(const Problem<float>& a, Buf& buf, double* ss = nullptr) {
  // ss (optional, G x d): per column sum_i (y_ik - c_k)^2
  const int64_t G = a.G, N = a.N, d = a.d;
  double* c = buf.get<double>((size_t)G * d + cdiv(G * d, 2));
  float* cf = reinterpret_cast<float*>(c + G * d);
  const int64_t Gd = a.gs_y == 0 ? 1 : G;  // distinct point sets
  const int T = a.threads > 0 ? a.threads : 1;
  const int64_t nb = cdiv(N, CRB);
  const int nsum = ss ? 2 : 1;  // per block: sums of e = y - y0 (and of e^2)
  Buf bpart, by0;
  double* part = bpart.get<double>((size_t)Gd * nb * nsum * d);
  double* y0 = by0.get<double>((size_t)Gd * d);  // the first point: a shift against cancellation
#pragma omp parallel num_threads(T)
  {
    Buf bconv;
    float* conv = bconv.get<float>((size_t)d);  // a point in a storage dtype, converted
#pragma omp for schedule(static)
    for (int64_t g = 0; g < Gd; ++g) {
      const float* first = point_rows(a, g).row(0, conv);
      for (int64_t k = 0; k < d; ++k) y0[g * d + k] = (double)first[k];
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < Gd * nb; ++it) {
      const int64_t g = it / nb, i1 = imin(N, (it % nb + 1) * CRB);
      const PointRows pts = point_rows(a, g);
      const double* v0 = y0 + g * d;
      double* s = part + (size_t)it * nsum * d;
      double* q = ss ? s + d : nullptr;
      for (int64_t k = 0; k < nsum * d; ++k) s[k] = 0.0;
      for (int64_t i = (it % nb) * CRB; i < i1; ++i) {
        const float* r = pts.row(i, conv);
        int64_t k = 0;
        for (; k + H <= d; k += H) {
          const vd e = h2d(r + k) - vldd(v0 + k);
          vstd(s + k, vldd(s + k) + e);
          if (q) vstd(q + k, vdfma(e, e, vldd(q + k)));
        }
        for (; k < d; ++k) {
          const double e = (double)r[k] - v0[k];
          s[k] += e;
          if (q) q[k] += e * e;
        }
      }
    }
    // the centre is rounded to float (any centre works; a float one makes y - c a single float
    // subtraction), cf holds the same values as floats
#pragma omp for schedule(static)
    for (int64_t gk = 0; gk < Gd * d; ++gk) {
      const int64_t g = gk / d, k = gk % d;
      double sk = 0.0, qk = 0.0;
      for (int64_t b = 0; b < nb; ++b) {
        const double* pb = part + (size_t)(g * nb + b) * nsum * d;
        sk += pb[k];
        if (ss) qk += pb[d + k];
      }
      const double m = sk / (double)N;
      cf[gk] = (float)(y0[gk] + m);
      c[gk] = (double)cf[gk];
      if (ss) {  // sum_i (y_i - c)^2 = sum e^2 - N m^2 + N (y0 + m - c)^2
        const double off = y0[gk] + m - c[gk];
        ss[gk] = std::fmax(0.0, qk - (double)N * m * m) + (double)N * off * off;
      }
    }
  }
  for (int64_t g = Gd; g < G; ++g) {
    std::memcpy(c + g * d, c, sizeof(double) * d);
    std::memcpy(cf + g * d, cf, sizeof(float) * d);
    if (ss) std::memcpy(ss + g * d, ss, sizeof(double) * d);
  }
  return c;
}
// The float copy of the centres (G x d) stored after them by centres().
inline const float* cfloat(const double* c, int64_t G, int64_t d) { return reinterpret_cast<const float*>(c + G * d); }
inline float xprime(float x, float alpha, double c) { return (float)((double)x - (double)alpha * c); }

// Thread-local workspace.
struct Work {
  Buf b_yT, b_yR, b_yn, b_cy, b_bt, b_Sf, b_Sd, b_tmp, b_P, b_xc, b_qc, b_sc, b_ql;
  float *yT, *yR, *yn, *cy, *bt, *Sf, *tmp, *P, *xc;
  double *Sd, *sc;
  int* ql;  // per tile: the queries with a non-zero weight (see tile_wsum)
  QConst* qc;
  // tiles: how many row-major tiles (with their weights P and factors sc) are kept at once
  void init(int d, int dp, int qcmax, int tiles = 1) {
    yT = b_yT.get<float>((size_t)dp * NT_MAX);
    yR = b_yR.get<float>((size_t)rstride(dp) * NT_MAX * tiles);
    yn = b_yn.get<float>(NT_MAX);
    cy = b_cy.get<float>(NT_MAX);
    bt = b_bt.get<float>(NT_MAX);
    Sf = b_Sf.get<float>((size_t)qcmax * NT_MAX);
    Sd = b_Sd.get<double>((size_t)qcmax * NT_MAX);
    tmp = b_tmp.get<float>((size_t)16 * NT_MAX);
    P = b_P.get<float>((size_t)qcmax * NT_MAX * tiles);
    xc = b_xc.get<float>((size_t)qcmax * dp);
    qc = b_qc.get<QConst>(qcmax);
    sc = b_sc.get<double>((size_t)qcmax * tiles);
    ql = b_ql.get<int>((size_t)qcmax * tiles);
    (void)d;
  }
};

template <int V = NV>
inline void load_bias(const float* bg, int64_t i0, int n, float* bt) {
  for (int j = 0; j < V * W; ++j) bt[j] = j < n ? (bg ? bg[i0 + j] : 0.f) : -kInfF;
}

// Tiles of nt points of group g up to its last point with a finite bias: the trailing points
// with bias -inf (the padding of batched models of different sizes) have weight exactly 0, so
// the kernels skip their tiles; every result stays bit for bit what processing them gives.
inline int64_t active_tiles(const Problem<float>& a, int64_t g, int64_t nt) {
  int64_t i = a.N;
  if (a.bias) {
    const float* bg = a.bias + g * a.gs_bias;
    while (i > 0 && bg[i - 1] == -kInfF) --i;
  }
  return cdiv(i, nt);
}

}  // namespace

#include "forward.h"
#include "backward.h"
#include "knn.h"


}  // namespace DM_NS
}  // namespace diffmem
