// Forward kernels: online softmax over point tiles (mean and the (max, sum) of the shifted
// logits per query), and the merge of split-N partial results.
#pragma once
#include "tiles.cuh"

namespace dmc {

// Floats of dynamic shared memory the forward kernel needs: four tiles, per-row vectors, the
// row reduction scratch, the top-K lists (kTopK float64 values and int64 indices per row) and the
// rows' forms (two float64 each).
constexpr int kForwardRows = 11;
constexpr int kForwardSmem =
    4 * kTileFloats + kForwardRows * kTile + kTile * (kSide + 1) + 4 * kTile * kTopK + 4 * kTile;

// Grid: G * split * cdiv(B, 64) blocks of 256 threads.
// acc: (split, G, B, d) partial sums sum_n p (y_n - c), or the mean (G, B, d) when final;
// m, l: (split, G, B) running max and sum of exp(logit' - m) (final values when final).
// When d <= 64 the accumulator stays in registers; otherwise each block streams its own rows
// of acc through global memory chunk by chunk (no other block touches them). kTensor (fast
// only): the logits' dot products and the weighted sum on the tensor cores (mma_tile, TF32 with
// the 3-product split), handed over to the thread-grid layout through shared memory.
// Exact: float64 logits in each query's form (p.expand, exact.cuh), the max m a float32 and the
// exponentials' arguments float32(logit - m); top (may be null): per query the kTopK largest
// logits m + float32(logit - m) and their indices, (split, G, B, kTopK). Each row's list lives in
// shared memory, kept by the row's owner thread r < 64, which scans the tile's arguments when
// the tile's largest logit can enter it.
template <bool kFast, bool kTensor = false>
DM_GLOBAL DM_TILE_KERNEL void forward_kernel(Problem p, float* DM_RESTRICT acc, float* DM_RESTRICT m_out,
                              float* DM_RESTRICT l_out, TopOut top, int64_t split, int final_) {
  DM_SHARED_FLOATS(smem);
  LogitSmem ls;
  ls.xs = smem;
  ls.ys = smem + kTileFloats;
  ls.yr = smem + 2 * kTileFloats;
  float* ps = smem + 3 * kTileFloats;  // (n, b) softmax numerators of the tile
  float* keys = ls.ys;                 // (n, b) exact: their arguments, once the logits are done
  ls.gs = nullptr;
  float* rows = smem + 4 * kTileFloats;
  float* s_alpha = rows;
  float* s_var = rows + kTile;
  float* s_m = rows + 2 * kTile;     // running max per query
  float* s_l = rows + 3 * kTile;     // running sum per query
  float* s_msafe = rows + 4 * kTile; // max used for this tile's exponentials
  float* s_corr = rows + 5 * kTile;  // rescaling of the previous accumulator
  float* s_tmp = rows + 6 * kTile;
  ls.cs = rows + 7 * kTile;
  float* s_expand = rows + 8 * kTile;
  float* s_xscale = rows + 9 * kTile;
  float* s_tmax = rows + 10 * kTile;  // the tile's largest logit per query (float32, rounded up)
  ls.ynorm = nullptr;
  float* red = rows + kForwardRows * kTile;
  double* s_topv = reinterpret_cast<double*>(red + kTile * (kSide + 1));  // [64][kTopK]
  int64_t* s_topi = reinterpret_cast<int64_t*>(s_topv + kTile * kTopK);   // [64][kTopK]
  double* s_form = reinterpret_cast<double*>(s_topi + kTile * kTopK);      // [64][2]
  ls.alpha = s_alpha;
  ls.var = s_var;
  ls.expand = s_expand;
  ls.xscale = s_xscale;
  ls.form = s_form;
  ls.stage = ps;  // free while the logits are formed
  using LT = typename std::conditional<kFast, float, double>::type;
  const bool want_top = !kFast && top.val != nullptr;

  const Coords pc = program_coords(cdiv(p.B, kTile), split);
  const int64_t g = pc.group, b0 = pc.block * kTile;
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  const bool single = p.d <= kChunk;
  const float* c_g = p.c + g * p.gs_c;
  load_rows(s_alpha, p.alpha + g * p.gs_alpha, b0, p.B, 0.f);
  load_rows(s_var, p.var + g * p.gs_var, b0, p.B, 1.f);
  for (int r = DM_THREAD_X; r < kTile; r += kThreads) {
    s_m[r] = -INFINITY;
    s_l[r] = 0.f;
    if (want_top) topk_clear(s_topv + r * kTopK, s_topi + r * kTopK);
  }
  const int64_t part_row0 = (pc.split * p.G + g) * p.B + b0;  // first row of this block's output
  float* acc_rows = acc + part_row0 * p.d;
  const int64_t valid_b = p.B - b0 < kTile ? p.B - b0 : kTile;
  DM_SYNC();
  load_forms(s_expand, s_xscale, s_form, s_alpha, s_var, p, g, b0);
  DM_SYNC();
  const bool mixed = !kFast && any_flag(s_expand);  // block-uniform: some query expands
  if (single)
    load_query_chunk(ls, p, g, b0, 0, kFast, mixed);
  else  // streamed accumulator: start from zero
    for (int64_t e = DM_THREAD_X; e < valid_b * p.d; e += kThreads) acc_rows[e] = 0.f;

  Tile4 accr;  // register accumulator (single chunk): rows ty + 16 i, features tx + 16 j
  accr.fill(0.f);
  const TileRange tr = split_tiles(p.N, split, pc.split);
  for (int64_t t = tr.begin; t < tr.end; ++t) {
    const int64_t n0 = t * kTile;
    LogitTile<kFast> logit;
    Tile4 unused;
    if constexpr (kFast)
      logit_tile<true, false, kTensor>(p, g, b0, n0, ls, single, true, nullptr, logit, unused);
    else if (mixed)
      logit_tile<false, false, false, true>(p, g, b0, n0, ls, single, true, nullptr, logit, unused);
    else
      logit_tile<false, false>(p, g, b0, n0, ls, single, true, nullptr, logit, unused);
    float vals[4];
    for (int i = 0; i < 4; ++i) {
      vals[i] = max_key(logit.v[i][0]);
      for (int j = 1; j < 4; ++j) {
        const float l = max_key(logit.v[i][j]);  // rounding keeps the order
        vals[i] = l > vals[i] ? l : vals[i];
      }
    }
    row_sums(vals, red, s_tmp, true);
    if (DM_THREAD_X < kTile) {
      const int r = DM_THREAD_X;
      const float m_new = s_tmp[r] > s_m[r] ? s_tmp[r] : s_m[r];
      // While every point so far is masked the max is -inf: use 0 so no exp sees -inf - -inf.
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      s_corr[r] = expf(s_m[r] - m_safe);
      s_msafe[r] = m_safe;
      s_m[r] = m_new;
      s_tmax[r] = s_tmp[r];
    }
    DM_SYNC();
    for (int i = 0; i < 4; ++i) vals[i] = 0.f;
    for (int j = 0; j < 4; ++j) {
      float e[4], key[4];
      for (int i = 0; i < 4; ++i) {
        key[i] = static_cast<float>(logit.v[i][j] - static_cast<LT>(s_msafe[ty * 4 + i]));
        e[i] = expf(key[i]);
        vals[i] += e[i];
      }
      dm_store4(&ps[sw(tx * 4 + j, ty * 4)], e);
      if (want_top) dm_store4(&keys[sw(tx * 4 + j, ty * 4)], key);
    }
    row_sums(vals, red, s_tmp, false);  // its barrier also publishes ps and keys
    const int64_t valid_n = p.N - n0 < kTile ? p.N - n0 : kTile;
    if (DM_THREAD_X < kTile) {
      const int r = DM_THREAD_X;
      s_l[r] = s_l[r] * s_corr[r] + s_tmp[r];
      if (want_top && r < valid_b) {
        double* tv = s_topv + r * kTopK;
        int64_t* ti = s_topi + r * kTopK;
        const double thr = tv[kTopK - 1];
        // The float32 tile max is at most a relative 2^-23 above the largest logit: scan only
        // when that can beat the list's smallest entry.
        if (static_cast<double>(s_tmax[r]) >= thr - 1e-5 * (1.0 + fabs(thr))) {
          const double m = s_msafe[r];
          for (int n = 0; n < valid_n; ++n)
            topk_insert(tv, ti, m + static_cast<double>(keys[sw(n, r)]), n0 + n);
        }
      }
    }
    for (int64_t k0 = 0; k0 < p.d; k0 += kChunk) {
      if (!single) {
        DM_SYNC();
        with_points(p, g, [&](auto y_g) {
          load_chunk(nullptr, false, ls.yr, true, y_g, n0, p.N, k0, p.d, c_g, nullptr);
        });
        DM_SYNC();
      }
      Tile4 sum;
      sum.fill(0.f);
      if (kTensor) {  // the point chunk's feature-major copy ys is free: stage through it
        Frag64 f;
        f.fill(0.f);
        mma_tile(ps, ls.yr, static_cast<int>(valid_n), f);
        frags_to_tile4(f, ls.ys, sum);
      } else {
        for (int n = 0; n < valid_n; ++n) {
          float pv[4], yv[4];
          dm_load4(&ps[sw(n, ty * 4)], pv);
          dm_load4(&ls.yr[sw(n, tx * 4)], yv);
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) sum.v[i][j] = fmaf(pv[i], yv[j], sum.v[i][j]);
        }
      }
      for (int i = 0; i < 4; ++i) {
        const int r = ty * 4 + i;
        const float corr = s_corr[r];
        for (int j = 0; j < 4; ++j) {
          if (single) {
            accr.v[i][j] = fmaf(accr.v[i][j], corr, sum.v[i][j]);
          } else {
            const int64_t k = k0 + tx * 4 + j;
            if (r < valid_b && k < p.d) {
              float* a = acc_rows + r * p.d + k;
              *a = fmaf(*a, corr, sum.v[i][j]);
            }
          }
        }
      }
    }
  }
  DM_SYNC();
  for (int r = DM_THREAD_X; r < valid_b; r += kThreads) {
    m_out[part_row0 + r] = s_m[r];
    l_out[part_row0 + r] = s_l[r];
    if (want_top)
      for (int k = 0; k < kTopK; ++k) {
        top.val[(part_row0 + r) * kTopK + k] = s_topv[r * kTopK + k];
        top.idx[(part_row0 + r) * kTopK + k] = s_topi[r * kTopK + k];
      }
  }
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    if (r >= valid_b) continue;
    const float l = s_l[r];
    for (int64_t k0 = 0; k0 < p.d; k0 += kChunk) {
      for (int j = 0; j < 4; ++j) {
        const int64_t k = k0 + tx * 4 + j;
        if (k >= p.d) continue;
        float* out = acc_rows + r * p.d + k;
        const float a = single ? accr.v[i][j] : *out;
        *out = final_ ? a / l + c_g[k] : a;
      }
    }
  }
}

// Combine split partial results into mean (G, B, d) and the final (m, l) (G, B).
// Grid: cdiv(G * B * d, 256) blocks of 256 threads, one output element each.
// Partial results of split s start at row s * G * B; c: centre rows, group stride gs_c.
DM_GLOBAL void merge_kernel(const float* DM_RESTRICT acc, const float* DM_RESTRICT m,
                            const float* DM_RESTRICT l, const float* DM_RESTRICT c, int64_t gs_c,
                            float* DM_RESTRICT mean, float* DM_RESTRICT m_out,
                            float* DM_RESTRICT l_out, int64_t G, int64_t B, int64_t d,
                            int64_t split) {
  const int64_t e = DM_BLOCK_X * kThreads + DM_THREAD_X;
  if (e >= G * B * d) return;
  const int64_t row = e / d, k = e % d, g = row / B, stride = G * B;
  float m_max = -INFINITY;
  for (int64_t s = 0; s < split; ++s) m_max = m[s * stride + row] > m_max ? m[s * stride + row] : m_max;
  const float m_safe = m_max == -INFINITY ? 0.f : m_max;
  float lsum = 0.f, a = 0.f;
  for (int64_t s = 0; s < split; ++s) {
    const float scale = expf(m[s * stride + row] - m_safe);
    lsum += l[s * stride + row] * scale;
    a += acc[(s * stride + row) * d + k] * scale;
  }
  mean[e] = a / lsum + c[g * gs_c + k];
  if (k == 0) {
    m_out[row] = m_max;
    l_out[row] = lsum;
  }
}

}  // namespace dmc
