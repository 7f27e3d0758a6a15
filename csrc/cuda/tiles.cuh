// Tile machinery shared by all CUDA kernels: the problem description, shared-memory layout,
// chunk loaders and the (queries x points) logit tile.
//
// Geometry: a block has 256 threads seen as a 16 x 16 grid (tx = tid % 16, ty = tid / 16) and
// works on 64 x 64 tiles. A thread owns the 4 consecutive rows ty * 4 + i and the 4 consecutive
// columns tx * 4 + j (i, j < 4), so its operands come in 16-byte shared-memory reads: per
// feature, one read of 4 query values (two addresses per warp: a broadcast) and one of 4 point
// values (16 consecutive float4 per warp). Features are processed in chunks of 64. A shared tile
// is 64 x 64 floats, element (a, c) at a * 64 + (c ^ swizzle(a)) with swizzle(a) a multiple of 4
// taken from bits 0..4 of a: groups of 4 consecutive c stay contiguous (16-byte reads), the
// loaders' column-wise stores spread over the banks (at most 2-way conflicts), and a tensor-core
// fragment (8 consecutive c in each of 4 consecutive a, see mma_tile) hits 32 distinct banks.
//
// Exact logits are float64, each query in its form (exact.cuh): the direct form
// -(sum_k fma(diff, diff, -var)) / (2 var) = logit + d / 2 with diff = fma(-alpha, y, x), or the
// expansion around the plan's centre; float32 chains of 16 features added into float64 sums.
// Fast logits are float32 from the expansion around the centre c: alpha (x'.(y - c) -
// alpha |y - c|^2 / 2) / var with x' = x - alpha c, which drops the per-query constant
// |x'|^2 / (2 var) (subtracted from lse on the host).
#pragma once
#include <type_traits>

#include "device.cuh"
#include "exact.cuh"
#include "points.cuh"
#include "problem.h"

namespace dmc {

constexpr int kThreads = 256;
constexpr int kSide = 16;   // threads per side of the 16 x 16 thread grid
constexpr int kTile = 64;   // rows (queries or points) per tile
constexpr int kChunk = 64;  // features per chunk
constexpr int kTileFloats = kTile * kChunk;
constexpr int kChain = 16;  // features per inner fp32 summation chain

// Offset of element (a, c) in a swizzled 64 x 64 shared tile (see the header comment).
DM_DEVICE int sw(int a, int c) { return a * 64 + (c ^ ((((a >> 2) & 7) << 2) ^ ((a & 3) << 3))); }

DM_DEVICE int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid coordinates of a 1-D grid of G * split * blocks programs: (block, split, group).
struct Coords {
  int64_t block, split, group;
};
DM_DEVICE Coords program_coords(int64_t blocks, int64_t split) {
  const int64_t pid = DM_BLOCK_X;
  return {pid % blocks, (pid / blocks) % split, (pid / blocks) / split};
}

// Range [begin, end) of 64-row tiles of a streamed dimension of length len owned by split s.
struct TileRange {
  int64_t begin, end;
};
DM_DEVICE TileRange split_tiles(int64_t len, int64_t split, int64_t s) {
  const int64_t tiles = cdiv(len, kTile);
  const int64_t per = cdiv(tiles, split);
  const int64_t begin = s * per;
  const int64_t end = begin + per < tiles ? begin + per : tiles;
  return {begin, end};
}

// Load rows [row0, row0 + 64) x features [k0, k0 + 64) of a (rows, d) matrix into shared
// memory as float32 (src: float32, or points in a storage type, see points.cuh), zero outside
// the matrix. kmaj (feature-major: element (k, r)) and rmaj (row-major: element (r, k)) may be
// null. Before storing, a value v becomes v - scale[r] * shift[k] for the copies whose flag is
// set (scale null = 1): centring points (shift = c) or queries (scale = alpha). Each thread
// moves groups of 4 consecutive features of one row.
template <class T>
DM_DEVICE void load_chunk(float* kmaj, bool kmaj_shifted, float* rmaj, bool rmaj_shifted,
                          const T* DM_RESTRICT src, int64_t row0, int64_t rows, int64_t k0,
                          int64_t d, const float* shift, const float* scale) {
  for (int e = DM_THREAD_X; e < kTile * (kChunk / 4); e += kThreads) {
    const int k4 = (e % (kChunk / 4)) * 4, r = e / (kChunk / 4);
    const int64_t gr = row0 + r;
    float v[4], vs[4];
    for (int q = 0; q < 4; ++q) {
      const int64_t gk = k0 + k4 + q;
      v[q] = vs[q] = 0.f;
      if (gr < rows && gk < d) {
        v[q] = vs[q] = to_float(src[gr * d + gk]);
        if (shift) vs[q] = fmaf(scale ? -scale[r] : -1.f, shift[gk], v[q]);
      }
    }
    if (kmaj)
      for (int q = 0; q < 4; ++q) kmaj[sw(k4 + q, r)] = kmaj_shifted ? vs[q] : v[q];
    if (rmaj) dm_store4(&rmaj[sw(r, k4)], rmaj_shifted ? vs : v);
  }
}

// Per-thread 4 x 4 register tile.
template <class T>
struct TileT {
  T v[4][4];
  DM_DEVICE void fill(T value) {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) v[i][j] = value;
  }
};
using Tile4 = TileT<float>;
using Tile4d = TileT<double>;
// The logits of a tile: float32 (fast) or float64 (exact).
template <bool kFast>
using LogitTile = TileT<typename std::conditional<kFast, float, double>::type>;

// The tensor-core view of a 64 x 64 tile: warp w owns rows 16 (w % 4) + [0, 16) and columns
// 32 (w / 4) + [0, 32), as four 16 x 8 accumulator fragments (see dm_mma_tf32).
struct Frag64 {
  float v[4][4];  // [8-column block][fragment register]
  DM_DEVICE void fill(float value) {
    for (int b = 0; b < 4; ++b)
      for (int q = 0; q < 4; ++q) v[b][q] = value;
  }
};

// c += sum_k A(k, m) B(k, n) over k < kc (rounded up to a multiple of 8: the tiles must hold
// zeros there) for swizzled 64 x 64 shared tiles stored feature-major, A(k, m) at sw(k, m) and
// B(k, n) at sw(k, n). TF32 on the tensor cores with the 3-product split (a_hi b_hi + a_hi b_lo
// + a_lo b_hi, the Triton backend's tf32x3): about fp32 accuracy. All threads must call it.
DM_DEVICE void mma_tile(const float* As, const float* Bs, int kc, Frag64& c) {
  const int lane = DM_THREAD_X % 32, w = DM_THREAD_X / 32;
  const int g = lane / 4, t = lane % 4, m0 = 16 * (w % 4), n0 = 32 * (w / 4);
  for (int k0 = 0; k0 < kc; k0 += 8) {
    float ah[4], al[4];
    for (int i = 0; i < 4; ++i) {
      const float v = As[sw(k0 + t + 4 * (i / 2), m0 + g + 8 * (i % 2))];
      ah[i] = dm_tf32(v);
      al[i] = dm_tf32(v - ah[i]);
    }
    for (int b = 0; b < 4; ++b) {
      float bh[2], bl[2];
      for (int i = 0; i < 2; ++i) {
        const float v = Bs[sw(k0 + t + 4 * i, n0 + 8 * b + g)];
        bh[i] = dm_tf32(v);
        bl[i] = dm_tf32(v - bh[i]);
      }
      dm_mma_tf32(c.v[b], al, bh);  // small terms first
      dm_mma_tf32(c.v[b], ah, bl);
      dm_mma_tf32(c.v[b], ah, bh);
    }
  }
}

// Hand fragments over to the thread-grid layout through a shared 64 x 64 tile `stage`: returns
// the thread's 4 x 4 block (rows ty * 4 + i, columns tx * 4 + j). Synchronizes once; the caller
// makes sure nobody still reads `stage`.
DM_DEVICE void frags_to_tile4(const Frag64& c, float* stage, Tile4& out) {
  const int lane = DM_THREAD_X % 32, w = DM_THREAD_X / 32;
  const int g = lane / 4, t = lane % 4, m0 = 16 * (w % 4), n0 = 32 * (w / 4);
  for (int b = 0; b < 4; ++b)
    for (int q = 0; q < 4; ++q) stage[sw(m0 + g + 8 * (q / 2), n0 + 8 * b + 2 * t + q % 2)] = c.v[b][q];
  DM_SYNC();
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  for (int i = 0; i < 4; ++i) dm_load4(&stage[sw(ty * 4 + i, tx * 4)], out.v[i]);
}

// Shared-memory work space of the (queries x points) logit tile.
struct LogitSmem {
  float* xs;     // (k, b) query chunk, feature-major (queries centred when fast)
  float* ys;     // (k, n) point chunk, feature-major (points centred when fast)
  float* yr;     // (n, k) point chunk, row-major, centred (shift = c) when yr_centred
  float* gs;     // (k, b) chunk of the mean's gradient (backward only)
  float* cs;     // [64] centre chunk
  float* ynorm;  // [64] |y - c|^2 of the tile's points (fast only)
  const float* alpha;  // [64] per-query alpha of the tile (shared memory)
  const float* var;    // [64] per-query var
  const float* expand;  // [64] 1 where the query takes the expansion form (exact), else 0
  const float* xscale;  // [64] alpha where expand, else 0: exact query chunks hold x - xscale c
  const double* form;   // [64][2] the queries' Form (exact.cuh)
  float* stage;        // 64 x 64 scratch tile (tensor-core logits only)
};

// Load the per-query form flags of queries b0 .. b0 + 63 (0: direct, also for padded rows and
// when p.expand is null), xscale and the forms' coefficients form[2 r], form[2 r + 1] (needs
// alpha and var loaded).
DM_DEVICE void load_forms(float* expand, float* xscale, double* form, const float* alpha,
                          const float* var, const Problem& p, int64_t g, int64_t b0) {
  for (int r = DM_THREAD_X; r < kTile; r += kThreads) {
    const bool ex = p.expand && b0 + r < p.B && p.expand[g * p.gs_expand + b0 + r] != 0;
    expand[r] = ex ? 1.f : 0.f;
    xscale[r] = ex ? alpha[r] : 0.f;
    const Form f = query_form(alpha[r], var[r], ex);
    form[2 * r] = f.lin;
    form[2 * r + 1] = f.quad;
  }
}

// Whether any of the 64 flags (0 or 1) is set; every thread reads all (after a barrier).
DM_DEVICE bool any_flag(const float* flags) {
  float total = 0.f;
  for (int r = 0; r < kTile; r += 4) {
    float f[4];
    dm_load4(&flags[r], f);
    total += (f[0] + f[1]) + (f[2] + f[3]);
  }
  return total != 0.f;
}

// Whether the thread's rows take the expansion form.
DM_DEVICE void row_expand(const LogitSmem& ls, bool mixed, bool (&ex)[4]) {
  const int ty = DM_THREAD_X / kSide;
  for (int i = 0; i < 4; ++i) ex[i] = mixed && ls.expand[ty * 4 + i] != 0.f;
}

// Exact kernels' query chunk: x, or x' = x - alpha c for the rows in the expansion form.
DM_DEVICE void load_query_chunk(const LogitSmem& ls, const Problem& p, int64_t g, int64_t b0,
                                int64_t k0, bool fast, bool mixed) {
  const float* c_g = p.c + g * p.gs_c;
  load_chunk(ls.xs, true, nullptr, false, p.x + g * p.gs_x, b0, p.B, k0, p.d,
             (fast || mixed) ? c_g : nullptr, fast ? ls.alpha : ls.xscale);
}

// alpha and var of the thread's rows ty * 4 + i, from per-row shared vectors.
DM_DEVICE void row_params(const float* alpha, const float* var, float (&a)[4], float (&v)[4]) {
  const int ty = DM_THREAD_X / kSide;
  for (int i = 0; i < 4; ++i) {
    a[i] = alpha[ty * 4 + i];
    v[i] = var[ty * 4 + i];
  }
}

// The thread's 4 x 4 block (rows row0 + ty * 4 + i, features k0 + tx * 4 + j) of a (rows, d)
// matrix in global memory (float32, or points in a storage type), zero outside it.
template <class T>
DM_DEVICE void load_block(const T* src, int64_t row0, int64_t rows, int64_t k0, int64_t d,
                          Tile4& out) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t r = row0 + ty * 4 + i, k = k0 + tx * 4 + j;
      out.v[i][j] = (r < rows && k < d) ? to_float(src[r * d + k]) : 0.f;
    }
}

// Add the thread's 4 x 4 block of one feature chunk to an accumulator of 64 rows: in registers
// (reg, when d fits one chunk) or in the block's own rows of global memory (dst, row stride d,
// valid_rows rows).
DM_DEVICE void add_block(bool single, Tile4& reg, float* dst, int64_t valid_rows, int64_t k0,
                         int64_t d, const Tile4& add) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t r = ty * 4 + i, k = k0 + tx * 4 + j;
      if (single)
        reg.v[i][j] += add.v[i][j];
      else if (r < valid_rows && k < d)
        dst[r * d + k] += add.v[i][j];
    }
}

// Write a register accumulator (features tx * 4 + j of the thread's rows) to dst (row stride d).
DM_DEVICE void store_block(float* dst, int64_t valid_rows, int64_t d, const Tile4& reg) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t r = ty * 4 + i, k = tx * 4 + j;
      if (r < valid_rows && k < d) dst[r * d + k] = reg.v[i][j];
    }
}

// Logits (and optionally q = g . (y - c)) of queries b0 + ty * 4 + i against points
// n0 + tx * 4 + j, over all d features streamed in chunks; bias added, points >= N get -inf.
// Fast: float32 expansion logits. Exact: float64 logits in each query's form (exact.cuh); with
// kMixed some rows of the tile take the expansion form (ls.expand, and the query chunks hold x'
// there), otherwise all take the direct form.
// x_resident: the single query chunk is already in ls.xs (d <= 64 and loaded by the caller,
// load_query_chunk). On return ls.yr (if not null) holds the last point chunk row-major (the
// only one when d <= 64). raw (exact only, with alpha = 1 and var = 0): return the squared
// distances sum_k (x - y)^2 instead of logits, +inf for points >= N. dist (exact only, may be
// null): receives the shifted squared distances sum_k fma(diff, diff, -var) themselves of the
// direct-form rows (0 for points >= N). kTensor (fast only, not with q): the dot products on the
// tensor cores (mma_tile), handed over through ls.stage.
template <bool kFast, bool kWithQ, bool kTensor = false, bool kMixed = false>
DM_DEVICE void logit_tile(const Problem& p, int64_t g, int64_t b0, int64_t n0, const LogitSmem& ls,
                          bool x_resident, bool yr_centred, const float* gm_g,
                          LogitTile<kFast>& logit, Tile4& q, bool raw = false,
                          Tile4* dist = nullptr) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  const float* c_g = p.c + g * p.gs_c;
  float a[4], v[4];
  row_params(ls.alpha, ls.var, a, v);
  static_assert(!kTensor || (kFast && !kWithQ), "tensor-core logits: fast forward only");
  static_assert(!kMixed || !kFast, "logit forms: exact only");
  bool ex[4];
  if (!kFast) row_expand(ls, kMixed, ex);
  Tile4 total;  // fast: all chunks
  total.fill(0.f);
  Tile4d total64;  // exact: the float32 chains added in float64
  total64.fill(0.0);
  Frag64 dots;  // tensor-core dot products x'.(y - c), all chunks
  dots.fill(0.f);
  if (kWithQ) q.fill(0.f);
  float yn[4] = {0.f, 0.f, 0.f, 0.f};         // fast: |y - c|^2
  double yn64[4] = {0.0, 0.0, 0.0, 0.0};      // exact, expansion rows: |y - c|^2
  for (int64_t k0 = 0; k0 < p.d; k0 += kChunk) {
    const int kc = static_cast<int>(p.d - k0 < kChunk ? p.d - k0 : kChunk);
    DM_SYNC();  // the previous chunk (or the caller's use of the tiles) is finished
    if (!x_resident) load_query_chunk(ls, p, g, b0, k0, kFast, kMixed);
    with_points(p, g, [&](auto y_g) {
      load_chunk(ls.ys, kFast, ls.yr, yr_centred, y_g, n0, p.N, k0, p.d,
                 (kFast || yr_centred) ? c_g : nullptr, nullptr);
    });
    if (kWithQ) load_chunk(ls.gs, false, nullptr, false, gm_g, b0, p.B, k0, p.d, nullptr, nullptr);
    if (kWithQ || kMixed)
      for (int k = DM_THREAD_X; k < kChunk; k += kThreads) ls.cs[k] = k0 + k < p.d ? c_g[k0 + k] : 0.f;
    DM_SYNC();
    if (kTensor) {
      mma_tile(ls.xs, ls.ys, kc, dots);
      for (int k = 0; k < kc; ++k) {
        float yv[4];
        dm_load4(&ls.ys[sw(k, tx * 4)], yv);
        for (int j = 0; j < 4; ++j) yn[j] = fmaf(yv[j], yv[j], yn[j]);
      }
      continue;
    }
    Tile4 part;
    part.fill(0.f);
    for (int kk = 0; kk < kc; kk += kChain) {
      const int kend = kk + kChain < kc ? kk + kChain : kc;
      Tile4 s;
      s.fill(0.f);
      for (int k = kk; k < kend; ++k) {
        float xv[4], yv[4], yc[4];
        dm_load4(&ls.xs[sw(k, ty * 4)], xv);
        dm_load4(&ls.ys[sw(k, tx * 4)], yv);
        // points minus the centre (fast points are already centred)
        const float ck = kFast || !(kWithQ || kMixed) ? 0.f : ls.cs[k];
        for (int j = 0; j < 4; ++j) yc[j] = yv[j] - ck;
        if (kFast) {
          for (int j = 0; j < 4; ++j) yn[j] = fmaf(yv[j], yv[j], yn[j]);
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) s.v[i][j] = fmaf(xv[i], yv[j], s.v[i][j]);
        } else {
          if (kMixed)
            for (int j = 0; j < 4; ++j) {
              const double y64 = yc[j];
              yn64[j] = fma(y64, y64, yn64[j]);
            }
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) {
              if (kMixed && ex[i]) {
                s.v[i][j] = fmaf(xv[i], yc[j], s.v[i][j]);
              } else {
                const float diff = fmaf(-a[i], yv[j], xv[i]);
                s.v[i][j] += fmaf(diff, diff, -v[i]);
              }
            }
        }
        if (kWithQ) {
          float gv[4];
          dm_load4(&ls.gs[sw(k, ty * 4)], gv);
          for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 4; ++i) q.v[i][j] = fmaf(gv[i], yc[j], q.v[i][j]);
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          if (kFast)
            part.v[i][j] += s.v[i][j];
          else
            total64.v[i][j] += static_cast<double>(s.v[i][j]);
        }
    }
    if (kFast)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) total.v[i][j] += part.v[i][j];
  }
  if (kTensor) frags_to_tile4(dots, ls.stage, total);  // stage is none of the chunk tiles
  const float* bias_g = p.bias ? p.bias + g * p.gs_bias : nullptr;
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + tx * 4 + j;
    const bool valid = n < p.N;
    const float b = (bias_g && valid) ? bias_g[n] : 0.f;
    for (int i = 0; i < 4; ++i) {
      if constexpr (kFast) {
        const float l = a[i] * (total.v[i][j] - 0.5f * a[i] * yn[j]) / v[i];
        logit.v[i][j] = valid ? l + b : -INFINITY;
      } else {
        if (dist) dist->v[i][j] = valid ? static_cast<float>(total64.v[i][j]) : 0.f;
        if (raw) {
          logit.v[i][j] = valid ? total64.v[i][j] : INFINITY;
          continue;
        }
        const int r = ty * 4 + i;
        const Form f = {ls.form[2 * r], ls.form[2 * r + 1]};
        const double l = form_logit(f, total64.v[i][j], yn64[j]);
        logit.v[i][j] = valid ? l + static_cast<double>(b) : -INFINITY;
      }
    }
  }
}

// Exact kernels: replace the logits of the points listed for the thread's rows (indices topi,
// values topv in the internal frame, kTopK per row; -1 never matches) in a tile of points
// starting at n0.
DM_DEVICE void override_listed(Tile4d& logit, const int64_t* topi, const double* topv,
                               int64_t n0) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  for (int i = 0; i < 4; ++i)
    for (int k = 0; k < kTopK; ++k) {
      const int64_t col = topi[(ty * 4 + i) * kTopK + k] - n0 - tx * 4;
      if (col < 0 || col >= 4) continue;
      const double value = topv[(ty * 4 + i) * kTopK + k];
      for (int j = 0; j < 4; ++j)
        if (col == j) logit.v[i][j] = value;
    }
}

// Sum over the 16 threads of a thread row (same ty) of one value per owned row i: the result
// for row ty * 4 + i lands in out[ty * 4 + i]. red: shared scratch of 64 * 17 floats.
DM_DEVICE void row_sums(const float (&vals)[4], float* red, float* out, bool take_max) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  for (int i = 0; i < 4; ++i) red[(ty * 4 + i) * (kSide + 1) + tx] = vals[i];
  DM_SYNC();
  if (DM_THREAD_X < kTile) {
    const int r = DM_THREAD_X;
    float acc = red[r * (kSide + 1)];
    for (int t = 1; t < kSide; ++t) {
      const float w = red[r * (kSide + 1) + t];
      acc = take_max ? (w > acc ? w : acc) : acc + w;
    }
    out[r] = acc;
  }
  DM_SYNC();
}

// Sum over the 16 threads of a thread column (same tx) of one value per owned column j: the
// result for column tx * 4 + j lands in out[tx * 4 + j].
DM_DEVICE void col_sums(const float (&vals)[4], float* red, float* out) {
  const int tx = DM_THREAD_X % kSide, ty = DM_THREAD_X / kSide;
  for (int j = 0; j < 4; ++j) red[(tx * 4 + j) * (kSide + 1) + ty] = vals[j];
  DM_SYNC();
  if (DM_THREAD_X < kTile) {
    const int r = DM_THREAD_X;
    float acc = 0.f;
    for (int t = 0; t < kSide; ++t) acc += red[r * (kSide + 1) + t];
    out[r] = acc;
  }
  DM_SYNC();
}

// Load a per-row value of a (G or shared) x rows vector for rows row0 .. row0 + 63.
DM_DEVICE void load_rows(float* dst, const float* src, int64_t row0, int64_t rows, float other) {
  for (int r = DM_THREAD_X; r < kTile; r += kThreads)
    dst[r] = row0 + r < rows ? src[row0 + r] : other;
}

}  // namespace dmc
