// k nearest neighbours: exact squared distances by direct differences (the logit tile in raw
// mode), then a running sorted top-k list per query in shared memory.
#pragma once
#include "tiles.cuh"

namespace dmc {

// Floats of dynamic shared memory for a given k: query and point chunks, the distance tile,
// unit alpha / zero var rows, and the running lists (k floats and k int64 per query).
inline int64_t knn_smem_floats(int64_t k) { return 3 * kTileFloats + 3 * kTile + kTile * k * 3 + 2; }

// Grid: G * split * cdiv(B, 64). dist, idx: (split, G, B, k) ascending squared distances (their
// square roots when take_sqrt) and int64 indices; ties go to the lower index.
DM_GLOBAL DM_TILE_KERNEL void knn_kernel(Problem p, int64_t k, int64_t split, int take_sqrt,
                          float* DM_RESTRICT dist_out, int64_t* DM_RESTRICT idx_out) {
  DM_SHARED_FLOATS(smem);
  LogitSmem ls;
  ls.xs = smem;
  ls.ys = smem + kTileFloats;
  ls.yr = nullptr;
  ls.gs = nullptr;
  float* dt = smem + 2 * kTileFloats;  // (b, n) distances of the tile
  float* ones = smem + 3 * kTileFloats;
  float* zeros = ones + kTile;
  ls.cs = zeros + kTile;
  ls.ynorm = nullptr;
  ls.alpha = ones;
  ls.var = zeros;
  ls.expand = nullptr;  // direct form: squared distances
  ls.xscale = nullptr;
  ls.form = nullptr;  // raw distances: no forms
  ls.stage = nullptr;
  float* best_d = ls.cs + kTile;  // [b][k]
  // int64 list after the floats, aligned to 8 bytes
  uintptr_t raw = reinterpret_cast<uintptr_t>(best_d + kTile * k);
  int64_t* best_i = reinterpret_cast<int64_t*>((raw + 7) & ~static_cast<uintptr_t>(7));

  const Coords pc = program_coords(cdiv(p.B, kTile), split);
  const int64_t g = pc.group, b0 = pc.block * kTile;
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  const int64_t valid_b = p.B - b0 < kTile ? p.B - b0 : kTile;
  for (int r = DM_THREAD_X; r < kTile; r += kThreads) {
    ones[r] = 1.f;
    zeros[r] = 0.f;
  }
  for (int64_t e = DM_THREAD_X; e < kTile * k; e += kThreads) {
    best_d[e] = INFINITY;
    best_i[e] = 0;
  }
  DM_SYNC();
  const TileRange tr = split_tiles(p.N, split, pc.split);
  for (int64_t t = tr.begin; t < tr.end; ++t) {
    const int64_t n0 = t * kTile;
    Tile4d dist;
    Tile4 unused;
    logit_tile<false, false>(p, g, b0, n0, ls, false, false, nullptr, dist, unused, true);
    for (int i = 0; i < 4; ++i) {
      float row[4];
      for (int j = 0; j < 4; ++j) row[j] = static_cast<float>(dist.v[i][j]);
      dm_store4(&dt[sw(ty * 4 + i, tx * 4)], row);
    }
    DM_SYNC();
    if (DM_THREAD_X < valid_b) {
      const int r = DM_THREAD_X;
      float* bd = best_d + r * k;
      int64_t* bi = best_i + r * k;
      const int valid_n = static_cast<int>(p.N - n0 < kTile ? p.N - n0 : kTile);
      for (int n = 0; n < valid_n; ++n) {
        const float v = dt[sw(r, n)];
        if (!(v < bd[k - 1])) continue;  // equal distances keep the earlier (lower) index
        int64_t pos = k - 1;
        while (pos > 0 && bd[pos - 1] > v) {
          bd[pos] = bd[pos - 1];
          bi[pos] = bi[pos - 1];
          --pos;
        }
        bd[pos] = v;
        bi[pos] = n0 + n;
      }
    }
  }
  DM_SYNC();
  const int64_t row0 = (pc.split * p.G + g) * p.B + b0;
  for (int64_t e = DM_THREAD_X; e < valid_b * k; e += kThreads) {
    const float v = best_d[e];
    dist_out[row0 * k + e] = take_sqrt ? sqrtf(v) : v;
    idx_out[row0 * k + e] = best_i[e];
  }
}

}  // namespace dmc
