// Plain descriptions of a kernel call, shared by the kernels and the host module.
#pragma once
#include <cstdint>

namespace dmc {

// Storage types of the points (diffmem/ops/_canonical.py COMPACT_POINT_DTYPES): float32, or
// uint8 codes, float16 or bfloat16 values, each converted exactly to float32 as it is read
// (points.cuh), so the kernels compute as on the points converted to float32.
enum PointType : int { kPointF32 = 0, kPointU8 = 1, kPointF16 = 2, kPointBF16 = 3 };

// One softmax-mean problem in the canonical layout: G groups, each with B queries (B, d) and
// N points (N, d); per-query alpha, var (B,); optional per-point bias (N,); centre row c (d,);
// optional per-query logit form expand (B,), 1 for exact mode's expansion form around c (null:
// every query takes the direct form; see exact.cuh). The points y are stored as y_type (the
// others are float32, c included). Group strides are in elements of each tensor's own type, 0
// when a tensor is shared by all groups.
struct Problem {
  int64_t G, B, N, d;
  const float* x;
  const void* y;  // PointType y_type; read through points.cuh
  const float* alpha;
  const float* var;
  const float* bias;  // null when absent
  const float* c;
  const unsigned char* expand;  // null when absent
  int64_t gs_x, gs_y, gs_alpha, gs_var, gs_bias, gs_c, gs_expand;
  int fast;
  int y_type;
};

// Per-query inputs of the backward, dense (G, B): shifted lse (float32, the fast kernels; float64
// in the exact kernels' internal frame, lse64), Z and r; gm: (G, B, d) gradient of the mean, or
// null; kappa, when not null, is subtracted from every q = g . (y - c) of the query. Exact
// kernels with top_k > 0: per query the indices top_idx (G, B, top_k) (-1: empty)
// of points whose logit is replaced by top_val (G, B, top_k), in the internal frame.
struct RowInputs {
  const float* lse;
  const double* lse64;
  const float* z;
  const float* r;
  const float* gm;
  const float* kappa;  // (G, B) q of the query's reference point (see backward.cuh), or null
  const int64_t* top_idx;
  const double* top_val;
  int64_t top_k;
};

// Top-K outputs of a forward (see exact.cuh): (split, G, B, kTopK) values in the internal frame
// and indices; null when not wanted.
struct TopOut {
  double* val;
  int64_t* idx;
};

}  // namespace dmc
