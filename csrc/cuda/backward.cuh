// Backward kernels, the same three passes as the Triton backend (see diffmem/ops/_triton/
// _backward.py for the algebra): with e = exp(logit' - lse'), q = g . (y - c),
//   stats_kernel  blocks own 64 queries, stream over points -> Z = sum_n e, sum_n e q
//   query_kernel  blocks own 64 queries, stream over points -> dx, dalpha, dvar
//   point_kernel  blocks own 64 points, stream over queries -> dpoints, dbias
// with w = e / Z and P = w (q + r), r = h - D supplied by the host. Every gradient is a plain
// sum in a fixed order (splits write partial sums that the host adds): deterministic.
#pragma once
#include "tiles.cuh"

namespace dmc {

// Shared-memory layout common to the three kernels (sizes in floats).
constexpr int kBackwardRows = 8;  // per-row vectors of 64 floats
constexpr int kBackwardSmem = 6 * kTileFloats + kBackwardRows * kTile + kTile * (kSide + 1);

struct BackwardSmem {
  LogitSmem ls;
  float* t0;  // extra tiles
  float* t1;
  float *alpha, *var, *lse, *z, *r, *tmp;
  float* red;
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
  s.ls.ynorm = nullptr;
  s.red = rows + kBackwardRows * kTile;
  s.ls.alpha = s.alpha;
  s.ls.var = s.var;
  return s;
}

// Load alpha, var, lse', Z, r of queries b0 .. b0 + 63 of group g; padded queries get e = 0.
DM_DEVICE void load_query_rows(const BackwardSmem& s, const Problem& p, const RowInputs& in,
                               int64_t g, int64_t b0) {
  load_rows(s.alpha, p.alpha + g * p.gs_alpha, b0, p.B, 0.f);
  load_rows(s.var, p.var + g * p.gs_var, b0, p.B, 1.f);
  load_rows(s.lse, in.lse + g * p.B, b0, p.B, INFINITY);
  if (in.z) load_rows(s.z, in.z + g * p.B, b0, p.B, 1.f);
  if (in.r) load_rows(s.r, in.r + g * p.B, b0, p.B, 0.f);
}

// Grid: G * split * cdiv(B, 64). Partial sums (split, G, B): z = sum_n e, eq = sum_n e q.
template <bool kFast, bool kWithQ>
DM_GLOBAL DM_TILE_KERNEL void stats_kernel(Problem p, RowInputs in, float* DM_RESTRICT z_out,
                            float* DM_RESTRICT eq_out, int64_t split) {
  DM_SHARED_FLOATS(smem);
  const BackwardSmem s = backward_smem(smem);
  const Coords pc = program_coords(cdiv(p.B, kTile), split);
  const int64_t g = pc.group, b0 = pc.block * kTile;
  const int ty = DM_THREAD_X / kSide;
  const float* gm_g = in.gm ? in.gm + g * p.B * p.d : nullptr;
  load_query_rows(s, p, in, g, b0);
  DM_SYNC();
  float zs[4] = {0.f, 0.f, 0.f, 0.f}, eqs[4] = {0.f, 0.f, 0.f, 0.f};
  const TileRange tr = split_tiles(p.N, split, pc.split);
  for (int64_t t = tr.begin; t < tr.end; ++t) {
    Tile4 logit, q;
    logit_tile<kFast, kWithQ>(p, g, b0, t * kTile, s.ls, false, false, gm_g, logit, q);
    for (int i = 0; i < 4; ++i) {
      const float lse = s.lse[ty * 4 + i];
      for (int j = 0; j < 4; ++j) {
        const float e = expf(logit.v[i][j] - lse);
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

// P = w (q + r) of a logit tile, written to pt as element (n, b) when pt is not null; adds the
// per-row sums of P to row_p and the per-column sums to col_p (per thread: rows ty * 4 + i,
// columns tx * 4 + j). w = e / Z is written to wt as (b, n) when wt is not null, and
// P alpha / var to coef as (b, n) when coef is not null. With dist (the tile's shifted squared
// distances), the per-row sums of P dist are added to row_pd.
template <bool kWithQ>
DM_DEVICE void grad_logit_tile(const BackwardSmem& s, const Tile4& logit, const Tile4& q,
                               float* pt, float* wt, float* coef, float (&row_p)[4],
                               float (&col_p)[4], const Tile4* dist = nullptr,
                               float* row_pd = nullptr) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  float P[4][4], w[4][4];
  for (int i = 0; i < 4; ++i) {
    const int b = ty * 4 + i;
    const float lse = s.lse[b], z = s.z[b], r = s.r[b];
    for (int j = 0; j < 4; ++j) {
      w[i][j] = expf(logit.v[i][j] - lse) / z;
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
// takes sum_k (diff_k^2 - var) for dvar from the logit tile (the fast one's logits are no
// distances: 2 more there).
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
  const float* y_g = p.y + g * p.gs_y;
  const float* gm_g = in.gm ? in.gm + g * p.B * p.d : nullptr;
  const int64_t row0 = (pc.split * p.G + g) * p.B + b0;
  const int64_t valid_b = p.B - b0 < kTile ? p.B - b0 : kTile;
  float* dx_rows = dx_out ? dx_out + row0 * p.d : nullptr;
  load_query_rows(s, p, in, g, b0);
  if (dx_rows && !single)
    for (int64_t e = DM_THREAD_X; e < valid_b * p.d; e += kThreads) dx_rows[e] = 0.f;
  DM_SYNC();
  float a[4], v[4];
  row_params(s.alpha, s.var, a, v);
  Tile4 dxr;
  dxr.fill(0.f);
  float sum_p[4] = {0.f, 0.f, 0.f, 0.f}, sum_pyd[4] = {0.f, 0.f, 0.f, 0.f};
  float sum_ps[4] = {0.f, 0.f, 0.f, 0.f}, unused[4] = {0.f, 0.f, 0.f, 0.f};
  const TileRange tr = split_tiles(p.N, split, pc.split);
  for (int64_t t = tr.begin; t < tr.end; ++t) {
    const int64_t n0 = t * kTile;
    const int64_t valid_n = p.N - n0 < kTile ? p.N - n0 : kTile;
    Tile4 logit, q, dist;
    logit_tile<kFast, kWithQ>(p, g, b0, n0, s.ls, false, false, gm_g, logit, q, false,
                              kScalars && !kFast ? &dist : nullptr);
    grad_logit_tile<kWithQ>(s, logit, q, pt, nullptr, nullptr, sum_p, unused,
                            kScalars && !kFast ? &dist : nullptr, sum_ps);
    for (int64_t k0 = 0; k0 < p.d; k0 += kChunk) {
      DM_SYNC();  // pt complete; the previous chunk's reads of yr done
      if (!single) {
        load_chunk(nullptr, false, s.ls.yr, false, y_g, n0, p.N, k0, p.d, nullptr, nullptr);
        DM_SYNC();
      }
      Tile4 xv;
      load_block(x_g, b0, p.B, k0, p.d, xv);
      bool kvalid[4];
      for (int j = 0; j < 4; ++j) kvalid[j] = k0 + tx * 4 + j < p.d;
      Tile4 sdx;
      sdx.fill(0.f);
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
            if (kScalars && kFast) sum_ps[i] = fmaf(pv[i], fmaf(diff, diff, -v[i]), sum_ps[i]);
          }
      }
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
  const float* y_g = p.y + g * p.gs_y;
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
    DM_SYNC();
    Tile4 logit, q;
    logit_tile<kFast, kWithQ>(p, g, b0, n0, s.ls, false, false, gm_g, logit, q);
    grad_logit_tile<kWithQ>(s, logit, q, nullptr, wt, coef, unused, col_p);
    if (!dy_rows) continue;
    for (int64_t k0 = 0; k0 < p.d; k0 += kChunk) {
      DM_SYNC();  // logit tile finished with xs / gs; previous chunk's reads done
      load_chunk(nullptr, false, xr, false, x_g, b0, p.B, k0, p.d, nullptr, nullptr);
      if (gm_g) load_chunk(nullptr, false, gr, false, gm_g, b0, p.B, k0, p.d, nullptr, nullptr);
      DM_SYNC();
      Tile4 yv;
      load_block(y_g, n0, p.N, k0, p.d, yv);
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
