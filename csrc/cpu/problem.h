// Shared declarations for the diffmem CPU kernels (module.cpp <-> per-ISA kernel objects).
#pragma once
#include <cstdint>
#include <cstddef>

namespace diffmem {

// Storage dtype of the points of a float32 call (y_type): the points are read in these bytes
// and converted to float32 by the kernels (see points.h).
enum PointType : int { kPointF32 = 0, kPointU8 = 1, kPointF16 = 2, kPointBF16 = 3 };
inline size_t point_size(int type) { return type == kPointU8 ? 1 : type == kPointF32 ? 4 : 2; }

// Arguments of one softmax-mean call.  All strides are in elements; a group stride of 0
// means "shared by all groups".  Null pointers mean "absent" (see module.cpp).
template <class T>
struct Problem {
  int precision = 0;  // 0 = exact, 1 = fast
  int threads = 1;
  int64_t G = 0, B = 0, N = 0, d = 0;
  const T* x = nullptr;     int64_t gs_x = 0;      // (G,) x (B,d)
  const T* y = nullptr;     int64_t gs_y = 0;      // (G,) x (N,d), stored as y_type
  int y_type = kPointF32;  // float32 calls only; the group stride is in elements of y_type
  const T* alpha = nullptr; int64_t gs_alpha = 0;  // (G,) x (B,)
  const T* var = nullptr;   int64_t gs_var = 0;    // (G,) x (B,)
  const T* bias = nullptr;  int64_t gs_bias = 0;   // (G,) x (N,) or null
  // forward outputs
  T* mean_out = nullptr;  // (G,B,d)
  T* lse_out = nullptr;   // (G,B)
  double* lse64_out = nullptr;  // (G,B) float64 lse at full precision, or null
  // float32 forward: set to 1 when a point holds NaN or Inf (each point is checked once, as it
  // is read; null: no check)
  uint8_t* points_bad = nullptr;
  // backward inputs / outputs
  const T* mean = nullptr;       // (G,B,d) the forward's mean output
  const double* lse64 = nullptr; // (G,B) the forward's lse64_out
  const T* grad_mean = nullptr;  // (G,B,d) or null
  const T* grad_lse = nullptr;   // (G,B) or null
  T* dx = nullptr;      // (G,B,d) or null
  T* dy = nullptr;      // (G,N,d) or null
  T* dalpha = nullptr;  // (G,B) or null
  T* dvar = nullptr;    // (G,B) or null
  T* dbias = nullptr;   // (G,N) or null
  // exact-mode plan (float32, precision 0; null expand: every query uses the direct form and
  // no top-K is reported).  Forward: centre of the points and the per-query form; the K
  // largest logits per query go to top_idx / top_logit (true frame).  Backward: the same
  // forms, and the corrected logits of the listed points replace the recomputed ones.
  const T* centre = nullptr; int64_t gs_centre = 0;  // (G,) x (d,)
  const uint8_t* expand = nullptr;                   // (G,B): 1 = expansion form
  int top_k = 0;
  int64_t* top_idx = nullptr;   // (G,B,K), -1 = empty slot
  double* top_logit = nullptr;  // (G,B,K)
};

template <class T>
struct KnnProblem {
  int threads = 1;
  int64_t G = 0, B = 0, N = 0, d = 0, k = 1;
  const T* x = nullptr; int64_t gs_x = 0;
  const T* y = nullptr; int64_t gs_y = 0;
  int y_type = kPointF32;  // as in Problem
  T* dist_out = nullptr;      // (G,B,k)
  int64_t* idx_out = nullptr;  // (G,B,k)
};

// One set of fp32 entry points per instruction-set variant (same source, see kernels_impl.h).
#define DIFFMEM_DECLARE_F32(NS)                         \
  namespace NS {                                        \
  void forward_f32(const Problem<float>& a);             \
  void backward_f32(const Problem<float>& a);            \
  void knn_f32(const KnnProblem<float>& a);                \
  }
DIFFMEM_DECLARE_F32(isa_generic)
DIFFMEM_DECLARE_F32(isa_avx2)
DIFFMEM_DECLARE_F32(isa_avx512)

// float64: one simple portable path (used for gradcheck / references).
void forward_f64(const Problem<double>& a);
void backward_f64(const Problem<double>& a);
void knn_f64(const KnnProblem<double>& a);

}  // namespace diffmem
