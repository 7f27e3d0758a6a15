// Exact mode's device pieces shared by the forward and backward kernels (the host rules are in
// diffmem/ops/_exact.py): the per-query logit forms and the top-K lists.
//
// Forms. Each query's logits take the DIRECT form, S = sum_k fma(diff, diff, -var) with
// diff = fma(-alpha, y, x), internal logit -S / (2 var), or the EXPANSION form around the plan's
// centre c, dot = sum_k x'_k yc_k with x' = fma(-alpha, c, x) and yc = y - c, yn = sum_k yc_k^2,
// internal logit alpha / var dot - alpha^2 / (2 var) yn. The float32 sums run in chains of at
// most 16 features, each chain added into a float64 sum; yn is summed in float64; the internal
// logit (bias added) is a float64. The host takes the per-query constant off (d / 2, or
// |x'|^2 / (2 var)), so lse and the top logits come back in the true frame.
//
// The online softmax keeps its max m in float32, rounded up from the float64 logits (dm_float_up:
// a nearest rounding could leave a logit above m by half an ulp of m, and exp overflow once
// |logit| > 2^31), and takes the exponentials of key = float32(logit - m) <= 0.
//
// Top-K. A kernel keeps, per query, the kTopK largest logits it used, as m + key in float64:
// exactly the logit behind the kernel's weight exp(key), which the host's float64 correction
// replaces.
#pragma once
#include "device.cuh"

namespace dmc {

constexpr int kTopK = 4;  // largest logits reported per query (diffmem/ops/_exact.py TOP_K)

// The float64 coefficients of one query's form: internal logit (bias excluded) =
// lin * sum - quad * yn, with sum = S (direct: lin = -1 / (2 var), quad = 0) or the dot product
// (expansion: lin = alpha / var, quad = alpha^2 / (2 var)).
// The float32 max of the online softmax for a logit: float32 (fast, as is) or float64 (exact,
// rounded up).
DM_DEVICE float max_key(float logit) { return logit; }
DM_DEVICE float max_key(double logit) { return dm_float_up(logit); }

struct Form {
  double lin, quad;
};

DM_DEVICE Form query_form(float alpha, float var, bool expand) {
  const double a = alpha, v = var;
  if (expand) return {a / v, a * a / (2.0 * v)};
  return {-0.5 / v, 0.0};
}

// The internal logit (bias excluded) of a query with form f for a point with sum `sum` and, in the
// expansion form, yn = |y - c|^2 (any finite value in the direct form).
DM_DEVICE double form_logit(const Form& f, double sum, double yn) { return fma(-f.quad, yn, f.lin * sum); }

// Insert (v, n) into a top-K list val / idx sorted by descending value (empty slots: -inf, -1),
// dropping its smallest entry; a value not above the smallest (ties included) is not inserted,
// nor is -inf or NaN.
DM_DEVICE void topk_insert(double* val, int64_t* idx, double v, int64_t n) {
  if (!(v > val[kTopK - 1])) return;
  int pos = kTopK - 1;
  while (pos > 0 && val[pos - 1] < v) {
    val[pos] = val[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  val[pos] = v;
  idx[pos] = n;
}

DM_DEVICE void topk_clear(double* val, int64_t* idx) {
  for (int k = 0; k < kTopK; ++k) {
    val[k] = -INFINITY;
    idx[k] = -1;
  }
}

}  // namespace dmc
