// Forward for a few queries per group, such as sampling one image at a time (B = 1), where the
// tile kernel's 64-query tiles would compute up to 64 times the logits needed.
//
// A block owns up to kFewQ queries of one group and one split of the points. Its 256 threads
// form groups of gs threads (gs a power of 2, 1 to 256, the smallest with 4 gs >= d when
// d <= 1024); thread `lane` of a group holds features lane + gs * j (j < kF) of the queries, of
// the point it is reading and of the accumulators, all in registers, so a warp's loads of a
// point row are contiguous. A group takes kFewUnroll points per step. The partial shifted
// distances of a point are summed over the group with dm_group_sum (and for gs > 32 across its
// warps through shared memory); each group runs its own online softmax, and the groups'
// (m, l, acc) are merged when the block ends, giving the same outputs as forward_kernel: the
// mean, or split partials for merge_kernel.
//
// The logits are exact whatever the requested precision: with a few queries the kernel is bound by
// reading the points, and the expansion would save nothing. Each query takes its form (p.expand,
// exact.cuh): a thread's features make one float32 chain, and the group sums of the chains (and
// of |y - c|^2 for the expansion form) are float64. With top (may be null) each group keeps
// per query the kTopK largest logits it used in shared memory (updated by the group's lane 0),
// merged across the groups when the block ends.
#pragma once
#include "tiles.cuh"

namespace dmc {

constexpr int kFewQ = 4;                  // queries per block (1 when B = 1)
constexpr int kWarps = kThreads / 32;
constexpr int kFewUnroll = 2;            // points per group per step (loads in flight)
constexpr int kFewMaxFeatures = 16;       // per thread: d <= 256 * 16
constexpr int64_t kFewMaxD = kThreads * kFewMaxFeatures;

// Floats of dynamic shared memory: double-buffered cross-warp partial sums (float64: kFewQ + 1
// per point, the queries' sums and |y - c|^2), per-group (m, l) and merge scales, the block's
// (M, L) per query, the groups' accumulators and the queries' forms (two float64 each). Several
// groups per block only occur with gs < 256, i.e. 4 features per thread, hence
// kThreads * kFewQ * 4. Then, with top-K lists, few_top_floats more.
constexpr int kFewRed = 2 * kWarps * (kFewQ + 1) * kFewUnroll * 2;
constexpr int kFewSmem = kFewRed + 3 * kThreads * kFewQ + 2 * kFewQ + kThreads * kFewQ * 4 + 4 * kFewQ;
static_assert(kFewSmem % 2 == 0, "the top-K lists (float64) follow kFewSmem floats");

// Group size for d features: the smallest power of 2 with 4 gs >= d, at most 256.
DM_HOST_DEVICE int few_group_size(int64_t d) {
  int gs = 1;
  while (4 * static_cast<int64_t>(gs) < d && gs < kThreads) gs *= 2;
  return gs;
}

// Floats of the top-K lists (kTopK float64 values and int64 indices per group and query) for kQ
// queries per block.
DM_HOST_DEVICE int64_t few_top_floats(int64_t d, int kQ) {
  return static_cast<int64_t>(kThreads / few_group_size(d)) * kQ * kTopK * 4;
}

// Blocks per multiprocessor the registers are capped for: the kernel is memory-bound, so as
// many as its live values (queries, accumulators and kFewUnroll points of kF features) allow.
DM_HOST_DEVICE constexpr int few_min_blocks(int kQ, int kF) {
  return kQ == 1 ? (kF <= 4 ? 3 : kF <= 12 ? 2 : 1) : (kF <= 4 ? 2 : 1);
}

// Grid: G * split * cdiv(B, kQ) blocks of 256 threads; kQ (1 or kFewQ) queries per block,
// kF >= cdiv(d, gs) features per thread.
// Outputs as forward_kernel: acc (split, G, B, d) partial sums sum_n p (y_n - c) or the mean
// (G, B, d) when final; m, l (split, G, B); top (split, G, B, kTopK) when not null.
template <int kQ, int kF>
DM_GLOBAL DM_FEW_KERNEL(few_min_blocks(kQ, kF)) void few_forward_kernel(Problem p, float* DM_RESTRICT acc_out,
                                                float* DM_RESTRICT m_out,
                                                float* DM_RESTRICT l_out, TopOut top,
                                                int64_t split, int final_) {
  constexpr int kU = kFewUnroll;
  constexpr int kK = kQ * kU;  // (query, point) pairs per step
  constexpr int kS = kK + kU;  // float64 sums per step: the pairs', then |y - c|^2 per point
  DM_SHARED_FLOATS(smem);
  double* red = reinterpret_cast<double*>(smem);
  float* s_gm = smem + kFewRed;             // (group, query) running max
  float* s_gl = s_gm + kThreads * kQ;       // (group, query) running sum
  float* s_scale = s_gl + kThreads * kQ;    // (group, query) rescaling to the block's max
  float* s_tot = s_scale + kThreads * kQ;   // block's max [kQ], then sum [kQ]
  float* s_acc = s_tot + 2 * kQ;            // (group, query, feature < 4 gs) accumulators
  double* s_form = reinterpret_cast<double*>(s_acc + kThreads * kQ * 4);  // [kQ][2]
  // (group, query) top-K lists, after kFewSmem floats
  const bool want_top = top.val != nullptr;
  double* s_topv = reinterpret_cast<double*>(smem + kFewSmem);

  const int tid = DM_THREAD_X;
  const int gs = few_group_size(p.d);
  const int lane = tid % gs, grp = tid / gs, ngroups = kThreads / gs;
  int64_t* s_topi = reinterpret_cast<int64_t*>(s_topv + ngroups * kQ * kTopK);
  const Coords pc = program_coords(cdiv(p.B, kQ), split);
  const int64_t g = pc.group, b0 = pc.block * kQ;
  const int nq = static_cast<int>(p.B - b0 < kQ ? p.B - b0 : kQ);
  const int64_t d = p.d;
  const float* x_g = p.x + g * p.gs_x;
  const float* c_g = p.c + g * p.gs_c;
  const float* bias_g = p.bias ? p.bias + g * p.gs_bias : nullptr;
  // Features lane + gs * j for j < nf are inside the row.
  const int nf = lane < d ? static_cast<int>((d - lane + gs - 1) / gs < kF ? (d - lane + gs - 1) / gs : kF) : 0;

  float cf[kF];
  DM_UNROLL
  for (int j = 0; j < kF; ++j) cf[j] = j < nf ? c_g[lane + gs * j] : 0.f;
  // xq: x, or x' = x - alpha c for a query in the expansion form
  float xq[kQ][kF], a[kQ], v[kQ], m[kQ], l[kQ], acc[kQ][kF];
  bool ex[kQ];
  bool any_ex = false;  // block-uniform
  DM_UNROLL
  for (int q = 0; q < kQ; ++q) {
    const bool valid = q < nq;
    a[q] = valid ? p.alpha[g * p.gs_alpha + b0 + q] : 0.f;
    v[q] = valid ? p.var[g * p.gs_var + b0 + q] : 1.f;
    ex[q] = valid && p.expand && p.expand[g * p.gs_expand + b0 + q] != 0;
    any_ex = any_ex || ex[q];
    m[q] = -INFINITY;
    l[q] = 0.f;
    DM_UNROLL
    for (int j = 0; j < kF; ++j) {
      xq[q][j] = (valid && j < nf) ? x_g[(b0 + q) * d + lane + gs * j] : 0.f;
      if (ex[q]) xq[q][j] = fmaf(-a[q], cf[j], xq[q][j]);
      acc[q][j] = 0.f;
    }
  }
  if (want_top && lane == 0)
    for (int q = 0; q < kQ; ++q)
      topk_clear(s_topv + (grp * kQ + q) * kTopK, s_topi + (grp * kQ + q) * kTopK);
  DM_UNROLL
  for (int q = 0; q < kQ; ++q)
    if (tid == q) {  // static indices: a, v, ex stay in registers
      const Form f = query_form(a[q], v[q], ex[q]);
      s_form[2 * q] = f.lin;
      s_form[2 * q + 1] = f.quad;
    }
  DM_SYNC();

  // This split's points: a whole number of steps, so every thread runs the same steps.
  const int64_t step = static_cast<int64_t>(ngroups) * kU;
  const int64_t per = cdiv(cdiv(p.N, step), split) * step;
  const int64_t n_begin = pc.split * per;
  const int64_t n_end = n_begin + per < p.N ? n_begin + per : p.N;
  int buf = 0;
  for (int64_t base = n_begin; base < n_end; base += step) {
    int64_t n[kU];
    bool ok[kU];
    float yv[kU][kF];
    DM_UNROLL
    for (int u = 0; u < kU; ++u) {
      n[u] = base + u * ngroups + grp;
      ok[u] = n[u] < n_end;
    }
    with_points(p, g, [&](auto y_g) {  // points.cuh: one branch per step on the storage type
      DM_UNROLL
      for (int u = 0; u < kU; ++u)
        DM_UNROLL
        for (int j = 0; j < kF; ++j)
          yv[u][j] = (ok[u] && j < nf) ? to_float(y_g[n[u] * d + lane + gs * j]) : 0.f;
    });
    // Per thread, one float32 chain per (query, point): the shifted squared distance
    // sum_k fma(diff, diff, -var) with diff = fma(-alpha, y, x) (direct) or x'.(y - c)
    // (expansion); then |y - c|^2 in float64 per point (only when some query expands).
    double s[kS];
    DM_UNROLL
    for (int q = 0; q < kQ; ++q)
      DM_UNROLL
      for (int u = 0; u < kU; ++u) {
        float t = 0.f;
        if (ex[q]) {
          DM_UNROLL
          for (int j = 0; j < kF; ++j)
            if (j < nf) t = fmaf(xq[q][j], yv[u][j] - cf[j], t);
        } else {
          DM_UNROLL
          for (int j = 0; j < kF; ++j)
            if (j < nf) {
              const float diff = fmaf(-a[q], yv[u][j], xq[q][j]);
              t += fmaf(diff, diff, -v[q]);
            }
        }
        s[q * kU + u] = t;
      }
    DM_UNROLL
    for (int u = 0; u < kU; ++u) {
      double t = 0.0;
      if (any_ex)
        DM_UNROLL
        for (int j = 0; j < kF; ++j)
          if (j < nf) {
            const double yc = yv[u][j] - cf[j];
            t = fma(yc, yc, t);
          }
      s[kK + u] = t;
    }
    dm_group_sum(s, gs < 32 ? gs : 32);
    if (gs > 32) {  // the group spans gs / 32 warps: add their sums through shared memory
      double* r = red + buf * (kFewRed / 4);
      const int warp = tid / 32, w0 = grp * (gs / 32);
      if (tid % 32 == 0)
        DM_UNROLL
        for (int i = 0; i < kS; ++i) r[warp * kS + i] = s[i];
      DM_SYNC();  // double-buffered: the next step writes the other half
      DM_UNROLL
      for (int i = 0; i < kS; ++i) {
        double t = r[w0 * kS + i];
        for (int w = 1; w < gs / 32; ++w) t += r[(w0 + w) * kS + i];
        s[i] = t;
      }
      buf ^= 1;
    }
    DM_UNROLL
    for (int u = 0; u < kU; ++u)
      DM_UNROLL
      for (int j = 0; j < kF; ++j) yv[u][j] -= cf[j];  // centred points for the accumulator
    DM_UNROLL
    for (int q = 0; q < kQ; ++q) {
      const Form f = {s_form[2 * q], s_form[2 * q + 1]};
      double lg[kU];
      float mx = -INFINITY;
      DM_UNROLL
      for (int u = 0; u < kU; ++u) {
        lg[u] = -INFINITY;
        if (ok[u]) lg[u] = form_logit(f, s[q * kU + u], s[kK + u]) + (bias_g ? bias_g[n[u]] : 0.f);
        const float lf = max_key(lg[u]);  // rounding keeps the order
        mx = lf > mx ? lf : mx;
      }
      const float m_new = mx > m[q] ? mx : m[q];
      // While every point so far is masked the max is -inf: use 0 so no exp sees -inf - -inf.
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      const float corr = expf(m[q] - m_safe);
      float pu[kU], psum = 0.f;
      DM_UNROLL
      for (int u = 0; u < kU; ++u) {
        const float key = static_cast<float>(lg[u] - static_cast<double>(m_safe));
        pu[u] = expf(key);
        psum += pu[u];
        if (want_top && lane == 0)
          topk_insert(s_topv + (grp * kQ + q) * kTopK, s_topi + (grp * kQ + q) * kTopK,
                      static_cast<double>(m_safe) + static_cast<double>(key), n[u]);
      }
      l[q] = l[q] * corr + psum;
      m[q] = m_new;
      DM_UNROLL
      for (int j = 0; j < kF; ++j) {
        float t = 0.f;
        DM_UNROLL
        for (int u = 0; u < kU; ++u) t = fmaf(pu[u], yv[u][j], t);
        acc[q][j] = fmaf(acc[q][j], corr, t);
      }
    }
  }

  const int64_t row0 = (pc.split * p.G + g) * p.B + b0;  // first output row of this block
  if (ngroups == 1) {  // the whole block is one group: write its state directly
    DM_UNROLL
    for (int q = 0; q < kQ; ++q)
      if (tid == 0 && q < nq) {
        m_out[row0 + q] = m[q];
        l_out[row0 + q] = l[q];
        if (want_top)
          for (int k = 0; k < kTopK; ++k) {
            top.val[(row0 + q) * kTopK + k] = s_topv[q * kTopK + k];
            top.idx[(row0 + q) * kTopK + k] = s_topi[q * kTopK + k];
          }
      }
    DM_UNROLL
    for (int q = 0; q < kQ; ++q)
      DM_UNROLL
      for (int j = 0; j < kF; ++j)
        if (q < nq && j < nf)
          acc_out[(row0 + q) * d + lane + gs * j] = final_ ? acc[q][j] / l[q] + cf[j] : acc[q][j];
    return;
  }
  // Several groups (then kF covers 4 gs >= d features): merge their (m, l, acc) and top lists.
  const int64_t width = 4 * static_cast<int64_t>(gs);
  DM_UNROLL
  for (int q = 0; q < kQ; ++q) {
    if (lane == 0) {
      s_gm[grp * kQ + q] = m[q];
      s_gl[grp * kQ + q] = l[q];
    }
    DM_UNROLL
    for (int j = 0; j < kF; ++j)
      if (j < nf) s_acc[(grp * kQ + q) * width + lane + gs * j] = acc[q][j];
  }
  DM_SYNC();
  if (tid < kQ) {
    const int q = tid;
    float mx = -INFINITY;
    for (int gi = 0; gi < ngroups; ++gi) mx = s_gm[gi * kQ + q] > mx ? s_gm[gi * kQ + q] : mx;
    const float m_safe = mx == -INFINITY ? 0.f : mx;
    float total = 0.f;
    for (int gi = 0; gi < ngroups; ++gi) {
      const float scale = expf(s_gm[gi * kQ + q] - m_safe);
      s_scale[gi * kQ + q] = scale;
      total += s_gl[gi * kQ + q] * scale;
    }
    s_tot[q] = mx;
    s_tot[kQ + q] = total;
    if (want_top && q < nq) {
      double tv[kTopK];
      int64_t ti[kTopK];
      topk_clear(tv, ti);
      for (int gi = 0; gi < ngroups; ++gi)
        for (int k = 0; k < kTopK; ++k)
          topk_insert(tv, ti, s_topv[(gi * kQ + q) * kTopK + k], s_topi[(gi * kQ + q) * kTopK + k]);
      for (int k = 0; k < kTopK; ++k) {
        top.val[(row0 + q) * kTopK + k] = tv[k];
        top.idx[(row0 + q) * kTopK + k] = ti[k];
      }
    }
  }
  DM_SYNC();
  if (tid < nq) {
    m_out[row0 + tid] = s_tot[tid];
    l_out[row0 + tid] = s_tot[kQ + tid];
  }
  for (int64_t e = tid; e < nq * d; e += kThreads) {
    const int q = static_cast<int>(e / d);
    const int64_t k = e % d;
    float t = 0.f;
    for (int gi = 0; gi < ngroups; ++gi)
      t = fmaf(s_acc[(gi * kQ + q) * width + k], s_scale[gi * kQ + q], t);
    acc_out[(row0 + q) * d + k] = final_ ? t / s_tot[kQ + q] + c_g[k] : t;
  }
}

}  // namespace dmc
