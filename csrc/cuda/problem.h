// Plain descriptions of a kernel call, shared by the kernels and the host module.
#pragma once
#include <cstdint>

namespace dmc {

// One softmax-mean problem in the canonical layout: G groups, each with B queries (B, d) and
// N points (N, d); per-query alpha, var (B,); optional per-point bias (N,); centre row c (d,).
// Group strides are in elements, 0 when a tensor is shared by all groups.
struct Problem {
  int64_t G, B, N, d;
  const float* x;
  const float* y;
  const float* alpha;
  const float* var;
  const float* bias;  // null when absent
  const float* c;
  int64_t gs_x, gs_y, gs_alpha, gs_var, gs_bias, gs_c;
  int fast;
};

// Per-query inputs of the backward, dense (G, B): shifted lse, Z and r; gm: (G, B, d) gradient
// of the mean, or null.
struct RowInputs {
  const float* lse;
  const float* z;
  const float* r;
  const float* gm;
};

}  // namespace dmc
