// Backward kernels, the same three passes as the Triton backend (see diffmem/ops/_triton/
// _backward.py for the algebra): with e = exp(logit' - lse'), q = g . (y - c),
//   stats_kernel  blocks own 64 queries, stream over points -> Z = sum_n e, sum_n e q
//   query_kernel  blocks own 64 queries, stream over points -> dx, dalpha, dvar
//   point_kernel  blocks own 64 points, stream over queries -> dpoints, dbias
// with w = e / Z and P = w (q + r), r = h - D supplied by the host. Every gradient is a plain
// sum in a fixed order (splits write partial sums that the host adds): deterministic.
// The exact kernels recompute the float64 logits in each query's form (exact.cuh), replace those
// of the points listed by the forward (in.top_idx, in.top_val) and take e = exp(float32(logit -
// lse)) against the float64 lse in.lse64.
// q enters only through q - D (D = sum_n w q), so any per-query constant can be taken off it:
// with in.kappa, q' = q - kappa where kappa is q of the query's heaviest point, computed by
// kappa_kernel exactly as the tiles compute q (one fmaf chain over the features). Then q' = 0
// for that point and D' is small when it carries most of the weight, where q - D would otherwise
// cancel in float32 (q ~ |g| |y - c|, and an error ~ eps |q| in P ~ h).
#pragma once
#include "tiles.cuh"

namespace dmc {

// Shared-memory layout common to the three kernels (sizes in floats): six tiles, per-row vectors,
// the row reduction scratch, then float64 lse per row, the top-K lists (float64 values and
// int64 indices) and the rows' forms.
constexpr int kBackwardRows = 11;  // per-row vectors of 64 floats
constexpr int kBackwardSmem = 6 * kTileFloats + kBackwardRows * kTile + kTile * (kSide + 1) +
                              2 * kTile + 4 * kTile * kTopK + 4 * kTile;

struct BackwardSmem {
  LogitSmem ls;
  float* t0;  // extra tiles
  float* t1;
  float *alpha, *var, *lse, *z, *r, *tmp, *expand, *xscale, *kappa;
  float* red;
  double* lse64;
  double* topv;
  int64_t* topi;
  double* form;
};

DM_DEVICE BackwardSmem backward_smem(float* smem) {
  BackwardSmem s;
  s.ls.xs = smem;
  s.ls.ys = smem + kTileFloats;
  s.ls.yr = smem + 2 * kTileFloats;
  s.ls.gs = smem + 3 * kTileFloats;
  s.t0 = smem + 4 * kTileFloats;
  s.t1 = smem + 5 * kTileFloats;
  float* rows = smem + 6 * kTileFloats;
  s.alpha = rows;
  s.var = rows + kTile;
  s.lse = rows + 2 * kTile;
  s.z = rows + 3 * kTile;
  s.r = rows + 4 * kTile;
  s.tmp = rows + 5 * kTile;
  s.ls.cs = rows + 6 * kTile;
  s.expand = rows + 7 * kTile;
  s.xscale = rows + 8 * kTile;
  s.kappa = rows + 9 * kTile;
  s.ls.ynorm = nullptr;
  s.red = rows + kBackwardRows * kTile;
  s.lse64 = reinterpret_cast<double*>(s.red + kTile * (kSide + 1));
  s.topv = s.lse64 + kTile;
  s.topi = reinterpret_cast<int64_t*>(s.topv + kTile * kTopK);
  s.form = reinterpret_cast<double*>(s.topi + kTile * kTopK);
  s.ls.form = s.form;
  s.ls.alpha = s.alpha;
  s.ls.var = s.var;
  s.ls.expand = s.expand;
  s.ls.xscale = s.xscale;
  return s;
}

// Load alpha, var, lse' (float32 for fast, float64 for exact), Z, r, the forms and the top
// lists of queries b0 .. b0 + 63 of group g; padded queries get e = 0. Synchronizes (twice).
DM_DEVICE void load_query_rows(const BackwardSmem& s, const Problem& p, const RowInputs& in,
                               int64_t g, int64_t b0) {
  load_rows(s.alpha, p.alpha + g * p.gs_alpha, b0, p.B, 0.f);
  load_rows(s.var, p.var + g * p.gs_var, b0, p.B, 1.f);
  if (in.lse) load_rows(s.lse, in.lse + g * p.B, b0, p.B, INFINITY);
  if (in.z) load_rows(s.z, in.z + g * p.B, b0, p.B, 1.f);
  if (in.r) load_rows(s.r, in.r + g * p.B, b0, p.B, 0.f);
  if (in.kappa) load_rows(s.kappa, in.kappa + g * p.B, b0, p.B, 0.f);
  for (int r = DM_THREAD_X; r < kTile; r += kThreads) {
    const bool valid = b0 + r < p.B;
    if (in.lse64) s.lse64[r] = valid ? in.lse64[g * p.B + b0 + r] : INFINITY;
    for (int k = 0; k < kTopK; ++k) {
      const bool listed = valid && k < in.top_k;
      s.topi[r * kTopK + k] = listed ? in.top_idx[(g * p.B + b0 + r) * in.top_k + k] : -1;
      s.topv[r * kTopK + k] = listed ? in.top_val[(g * p.B + b0 + r) * in.top_k + k] : 0.0;
    }
  }
  DM_SYNC();
  load_forms(s.expand, s.xscale, s.form, s.alpha, s.var, p, g, b0);
  DM_SYNC();
}

// The exponentials' arguments logit - lse of a tile for the backward kernels: fast (float32), or
// exact (float64 logits in the rows' forms, mixed: some query of the tile expands, with the
// listed points' logits replaced, minus the float64 lse, then rounded), and q - kappa.
template <bool kFast, bool kWithQ>
DM_DEVICE void backward_logits(const Problem& p, const RowInputs& in, const BackwardSmem& s,
                               int64_t g, int64_t b0, int64_t n0, bool mixed, const float* gm_g,
                               Tile4& arg, Tile4& q, Tile4* dist = nullptr) {
  const int ty = DM_THREAD_X / kSide;
  if constexpr (kFast) {
    logit_tile<true, kWithQ>(p, g, b0, n0, s.ls, false, false, gm_g, arg, q);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) arg.v[i][j] -= s.lse[ty * 4 + i];
  } else {
    Tile4d logit;
    if (mixed)
      logit_tile<false, kWithQ, false, true>(p, g, b0, n0, s.ls, false, false, gm_g, logit, q);
    else
      logit_tile<false, kWithQ>(p, g, b0, n0, s.ls, false, false, gm_g, logit, q, false, dist);
    if (in.top_k > 0) override_listed(logit, s.topi, s.topv, n0);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        arg.v[i][j] = static_cast<float>(logit.v[i][j] - s.lse64[ty * 4 + i]);
  }
  if (kWithQ && in.kappa) {
    for (int i = 0; i < 4; ++i) {
      const float kappa = s.kappa[ty * 4 + i];
      for (int j = 0; j < 4; ++j) q.v[i][j] -= kappa;
    }
  }
}

// kappa (G, B): q = g . (y_n - c) of point n = ref[g, b] (-1: kappa = 0), as logit_tile
// computes it: one fmaf chain over the features in order. Grid: cdiv(G * B, 256) blocks.
DM_GLOBAL void kappa_kernel(Problem p, const float* DM_RESTRICT gm, const int64_t* DM_RESTRICT ref,
                            float* DM_RESTRICT kappa) {
  const int64_t e = DM_BLOCK_X * kThreads + DM_THREAD_X;
  if (e >= p.G * p.B) return;
  const int64_t g = e / p.B, n = ref[e];
  float q = 0.f;
  if (n >= 0) {
    const float* c = p.c + g * p.gs_c;
    const float* gr = gm + e * p.d;
    with_points(p, g, [&](auto y_g) {
      const auto* y = y_g + n * p.d;
      for (int64_t k = 0; k < p.d; ++k) q = fmaf(gr[k], to_float(y[k]) - c[k], q);
    });
  }
  kappa[e] = q;
}

// Grid: G * split * cdiv(B, 64). Partial sums (split, G, B): z = sum_n e, eq = sum_n e q.
template <bool kFast, bool kWithQ>
DM_GLOBAL DM_TILE_KERNEL void stats_kernel(Problem p, RowInputs in, float* DM_RESTRICT z_out,
                            float* DM_RESTRICT eq_out, int64_t split) {
  DM_SHARED_FLOATS(smem);
  const BackwardSmem s = backward_smem(smem);
  const Coords pc = program_coords(cdiv(p.B, kTile), split);
  const int64_t g = pc.group, b0 = pc.block * kTile;
  const float* gm_g = in.gm ? in.gm + g * p.B * p.d : nullptr;
  load_query_rows(s, p, in, g, b0);
  const bool mixed = !kFast && any_flag(s.expand);
  float zs[4] = {0.f, 0.f, 0.f, 0.f}, eqs[4] = {0.f, 0.f, 0.f, 0.f};
  const TileRange tr = split_tiles(p.N, split, pc.split);
  for (int64_t t = tr.begin; t < tr.end; ++t) {
    Tile4 arg, q;
    backward_logits<kFast, kWithQ>(p, in, s, g, b0, t * kTile, mixed, gm_g, arg, q);
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const float e = expf(arg.v[i][j]);
        zs[i] += e;
        if (kWithQ) eqs[i] = fmaf(e, q.v[i][j], eqs[i]);
      }
    }
  }
  const int64_t row0 = (pc.split * p.G + g) * p.B + b0;
  const int64_t valid_b = p.B - b0 < kTile ? p.B - b0 : kTile;
  row_sums(zs, s.red, s.tmp, false);
  for (int r = DM_THREAD_X; r < valid_b; r += kThreads) z_out[row0 + r] = s.tmp[r];
  DM_SYNC();
  row_sums(eqs, s.red, s.tmp, false);
  for (int r = DM_THREAD_X; r < valid_b; r += kThreads) eq_out[row0 + r] = s.tmp[r];
}

// P = w (q + r) of a tile of exponentials' arguments logit - lse (backward_logits), written to pt as element (n, b) when pt is not null; adds the
// per-row sums of P to row_p and the per-column sums to col_p (per thread: rows ty * 4 + i,
// columns tx * 4 + j). w = e / Z is written to wt as (b, n) when wt is not null, and
// P alpha / var to coef as (b, n) when coef is not null. With dist (the tile's shifted squared
// distances), the per-row sums of P dist are added to row_pd.
template <bool kWithQ>
DM_DEVICE void grad_logit_tile(const BackwardSmem& s, const Tile4& arg, const Tile4& q,
                               float* pt, float* wt, float* coef, float (&row_p)[4],
                               float (&col_p)[4], const Tile4* dist = nullptr,
                               float* row_pd = nullptr) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  float P[4][4], w[4][4];
  for (int i = 0; i < 4; ++i) {
    const int b = ty * 4 + i;
    const float z = s.z[b], r = s.r[b];
    for (int j = 0; j < 4; ++j) {
      w[i][j] = expf(arg.v[i][j]) / z;
      P[i][j] = w[i][j] * ((kWithQ ? q.v[i][j] : 0.f) + r);
      row_p[i] += P[i][j];
      col_p[j] += P[i][j];
      if (dist) row_pd[i] = fmaf(P[i][j], dist->v[i][j], row_pd[i]);
    }
    if (wt) dm_store4(&wt[sw(b, tx * 4)], w[i]);
    if (coef) {
      const float scale = s.alpha[b] / s.var[b];
      float cf[4];
      for (int j = 0; j < 4; ++j) cf[j] = P[i][j] * scale;
      dm_store4(&coef[sw(b, tx * 4)], cf);
    }
  }
  if (pt)
    for (int j = 0; j < 4; ++j) {
      const float col[4] = {P[0][j], P[1][j], P[2][j], P[3][j]};
      dm_store4(&pt[sw(tx * 4 + j, ty * 4)], col);
    }
}

// Grid: G * split * cdiv(B, 64). Outputs: partial sums (split, G, B, d) for dx and
// (split, G, B) for dalpha, dvar (null when not needed; kScalars: either is needed).
//   dx = -sum_n P diff / var, dalpha = sum_n P (y . diff) / var,
//   dvar = sum_n P |diff|^2 / (2 var^2), |diff|^2 = sum_k (diff_k^2 - var) + d var.
// Per query, point and feature: 2 instructions for dx, 2 more for dalpha; the exact kernel
// takes sum_k (diff_k^2 - var) for dvar from the logit tile when all its queries take the direct
// form (otherwise, and for fast, whose logits are no distances: 2 more).
template <bool kFast, bool kWithQ, bool kScalars>
DM_GLOBAL DM_TILE_KERNEL void query_kernel(Problem p, RowInputs in, float* DM_RESTRICT dx_out,
                            float* DM_RESTRICT dalpha_out, float* DM_RESTRICT dvar_out,
                            int64_t split) {
  DM_SHARED_FLOATS(smem);
  const BackwardSmem s = backward_smem(smem);
  float* pt = s.t0;  // (n, b)
  const Coords pc = program_coords(cdiv(p.B, kTile), split);
  const int64_t g = pc.group, b0 = pc.block * kTile;
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  const bool single = p.d <= kChunk;
  const float* x_g = p.x + g * p.gs_x;
  const float* gm_g = in.gm ? in.gm + g * p.B * p.d : nullptr;
  const int64_t row0 = (pc.split * p.G + g) * p.B + b0;
  const int64_t valid_b = p.B - b0 < kTile ? p.B - b0 : kTile;
  float* dx_rows = dx_out ? dx_out + row0 * p.d : nullptr;
  load_query_rows(s, p, in, g, b0);
  if (dx_rows && !single)
    for (int64_t e = DM_THREAD_X; e < valid_b * p.d; e += kThreads) dx_rows[e] = 0.f;
  DM_SYNC();
  const bool mixed = !kFast && any_flag(s.expand);
  // sum_k (diff_k^2 - var) for dvar: from the direct-form logit tile, else in the feature loop
  const bool tile_dist = kScalars && !kFast && !mixed;
  const bool loop_dist = kScalars && !tile_dist;
  float a[4], v[4];
  row_params(s.alpha, s.var, a, v);
  Tile4 dxr;
  dxr.fill(0.f);
  float sum_p[4] = {0.f, 0.f, 0.f, 0.f}, sum_pyd[4] = {0.f, 0.f, 0.f, 0.f};
  float sum_ps[4] = {0.f, 0.f, 0.f, 0.f}, unused[4] = {0.f, 0.f, 0.f, 0.f};
  double sum_ps64[4] = {0.0, 0.0, 0.0, 0.0};  // loop_dist: each chunk's float32 sums added here
  const TileRange tr = split_tiles(p.N, split, pc.split);
  for (int64_t t = tr.begin; t < tr.end; ++t) {
    const int64_t n0 = t * kTile;
    const int64_t valid_n = p.N - n0 < kTile ? p.N - n0 : kTile;
    Tile4 arg, q, dist;
    backward_logits<kFast, kWithQ>(p, in, s, g, b0, n0, mixed, gm_g, arg, q,
                                   tile_dist ? &dist : nullptr);
    grad_logit_tile<kWithQ>(s, arg, q, pt, nullptr, nullptr, sum_p, unused,
                            tile_dist ? &dist : nullptr, sum_ps);
    for (int64_t k0 = 0; k0 < p.d; k0 += kChunk) {
      DM_SYNC();  // pt complete; the previous chunk's reads of yr done
      if (!single) {
        with_points(p, g, [&](auto y_g) {
          load_chunk(nullptr, false, s.ls.yr, false, y_g, n0, p.N, k0, p.d, nullptr, nullptr);
        });
        DM_SYNC();
      }
      Tile4 xv;
      load_block(x_g, b0, p.B, k0, p.d, xv);
      bool kvalid[4];
      for (int j = 0; j < 4; ++j) kvalid[j] = k0 + tx * 4 + j < p.d;
      Tile4 sdx;
      sdx.fill(0.f);
      float cps[4] = {0.f, 0.f, 0.f, 0.f};
      for (int n = 0; n < valid_n; ++n) {
        float pv[4], yv[4];
        dm_load4(&pt[sw(n, ty * 4)], pv);
        dm_load4(&s.ls.yr[sw(n, tx * 4)], yv);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) {
            if (!kvalid[j]) continue;
            const float diff = fmaf(-a[i], yv[j], xv.v[i][j]);
            sdx.v[i][j] = fmaf(pv[i], diff, sdx.v[i][j]);
            if (kScalars) sum_pyd[i] = fmaf(pv[i], yv[j] * diff, sum_pyd[i]);
            if (loop_dist) cps[i] = fmaf(pv[i], fmaf(diff, diff, -v[i]), cps[i]);
          }
      }
      if (loop_dist)
        for (int i = 0; i < 4; ++i) sum_ps64[i] += static_cast<double>(cps[i]);
      if (!dx_rows) continue;
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) sdx.v[i][j] = -sdx.v[i][j] / v[i];
      add_block(single, dxr, dx_rows, valid_b, k0, p.d, sdx);
    }
  }
  if (dx_rows && single) store_block(dx_rows, valid_b, p.d, dxr);
  DM_SYNC();
  if (dalpha_out) {
    row_sums(sum_pyd, s.red, s.tmp, false);
    for (int r = DM_THREAD_X; r < valid_b; r += kThreads) dalpha_out[row0 + r] = s.tmp[r] / s.var[r];
    DM_SYNC();
  }
  if (dvar_out) {
    row_sums(sum_p, s.red, s.ls.cs, false);
    if (loop_dist)
      for (int i = 0; i < 4; ++i) sum_ps[i] = static_cast<float>(sum_ps64[i]);
    row_sums(sum_ps, s.red, s.tmp, false);
    for (int r = DM_THREAD_X; r < valid_b; r += kThreads) {
      const float vr = s.var[r];
      dvar_out[row0 + r] = (s.tmp[r] + static_cast<float>(p.d) * vr * s.ls.cs[r]) / (2.f * vr * vr);
    }
  }
}

// Grid: G * split * cdiv(N, 64), split along the queries. Outputs: partial sums
// (split, G, N, d) for dpoints and (split, G, N) for dbias (null when not needed).
//   dpoints = sum_b (w g + P alpha diff / var), dbias = sum_b P.
template <bool kFast, bool kWithQ>
DM_GLOBAL DM_TILE_KERNEL void point_kernel(Problem p, RowInputs in, float* DM_RESTRICT dy_out,
                            float* DM_RESTRICT dbias_out, int64_t split) {
  DM_SHARED_FLOATS(smem);
  const BackwardSmem s = backward_smem(smem);
  float* wt = s.t0;    // (b, n)
  float* coef = s.t1;  // (b, n)
  float* xr = s.ls.xs;  // (b, k) query chunk, reusing the logit tile's buffers
  float* gr = s.ls.gs;  // (b, k)
  const Coords pc = program_coords(cdiv(p.N, kTile), split);
  const int64_t g = pc.group, n0 = pc.block * kTile;
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  const bool single = p.d <= kChunk;
  const float* x_g = p.x + g * p.gs_x;
  const float* gm_g = in.gm ? in.gm + g * p.B * p.d : nullptr;
  const int64_t row0 = (pc.split * p.G + g) * p.N + n0;
  const int64_t valid_n = p.N - n0 < kTile ? p.N - n0 : kTile;
  float* dy_rows = dy_out ? dy_out + row0 * p.d : nullptr;
  if (dy_rows && !single)
    for (int64_t e = DM_THREAD_X; e < valid_n * p.d; e += kThreads) dy_rows[e] = 0.f;
  Tile4 dyr;
  dyr.fill(0.f);
  float col_p[4] = {0.f, 0.f, 0.f, 0.f}, unused[4] = {0.f, 0.f, 0.f, 0.f};
  const TileRange tr = split_tiles(p.B, split, pc.split);
  for (int64_t t = tr.begin; t < tr.end; ++t) {
    const int64_t b0 = t * kTile;
    const int64_t valid_b = p.B - b0 < kTile ? p.B - b0 : kTile;
    DM_SYNC();  // the previous tile is finished with the per-query rows
    load_query_rows(s, p, in, g, b0);
    const bool mixed = !kFast && any_flag(s.expand);
    Tile4 arg, q;
    backward_logits<kFast, kWithQ>(p, in, s, g, b0, n0, mixed, gm_g, arg, q);
    grad_logit_tile<kWithQ>(s, arg, q, nullptr, wt, coef, unused, col_p);
    if (!dy_rows) continue;
    for (int64_t k0 = 0; k0 < p.d; k0 += kChunk) {
      DM_SYNC();  // logit tile finished with xs / gs; previous chunk's reads done
      load_chunk(nullptr, false, xr, false, x_g, b0, p.B, k0, p.d, nullptr, nullptr);
      if (gm_g) load_chunk(nullptr, false, gr, false, gm_g, b0, p.B, k0, p.d, nullptr, nullptr);
      DM_SYNC();
      Tile4 yv;
      with_points(p, g, [&](auto y_g) { load_block(y_g, n0, p.N, k0, p.d, yv); });
      Tile4 sdy;
      sdy.fill(0.f);
      for (int b = 0; b < valid_b; ++b) {
        const float ab = s.alpha[b];
        float xv[4], gv[4] = {0.f, 0.f, 0.f, 0.f}, cf[4], wv[4];
        dm_load4(&xr[sw(b, tx * 4)], xv);
        if (gm_g) dm_load4(&gr[sw(b, tx * 4)], gv);
        dm_load4(&coef[sw(b, ty * 4)], cf);
        dm_load4(&wt[sw(b, ty * 4)], wv);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) {
            const float diff = fmaf(-ab, yv.v[i][j], xv[j]);
            sdy.v[i][j] = fmaf(cf[i], diff, sdy.v[i][j]);
            if (kWithQ) sdy.v[i][j] = fmaf(wv[i], gv[j], sdy.v[i][j]);
          }
      }
      add_block(single, dyr, dy_rows, valid_n, k0, p.d, sdy);
    }
  }
  if (dy_rows && single) store_block(dy_rows, valid_n, p.d, dyr);
  if (dbias_out) {
    DM_SYNC();
    col_sums(col_p, s.red, s.tmp);
    for (int r = DM_THREAD_X; r < valid_n; r += kThreads) dbias_out[row0 + r] = s.tmp[r];
  }
}

}  // namespace dmc
