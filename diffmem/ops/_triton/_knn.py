"""k nearest neighbours: exact squared distances by direct differences, running top-k per query.

One program owns BB queries and streams over point tiles, keeping the k best (distance, index)
pairs sorted in a (BB, KP) register tile (KP = next power of two >= k). Each tile is merged in k
rounds, each taking the smaller head of the running list and of the tile; ties go to the lower
index (running entries always come from earlier tiles). Splits of the points write partial
lists, merged on the host (_gpu_common.merge_knn_partials).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._gpu_common import merge_knn_partials
from . import _config
from ._common import (
    as_float32,
    check_float32,
    group_stride,
    groupwise,
    new_output,
    program_coords,
)


@triton.jit
def _knn_kernel(
    q_ptr, p_ptr, dist_ptr, idx_ptr,
    G, B, N, d, gs_q, gs_p, SPLIT,
    K: tl.constexpr, KP: tl.constexpr, SQRT: tl.constexpr,
    NUM_D: tl.constexpr, BD: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
):
    """Grid: G * SPLIT * cdiv(B, BB). dist, idx: (SPLIT, G, B, K); dist squared unless SQRT."""
    qb, s, g64 = program_coords(tl.cdiv(B, BB), SPLIT)
    offs_b = qb * BB + tl.arange(0, BB)
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64) * d
    q_g = q_ptr + g64 * gs_q
    p_g = p_ptr + g64 * gs_p

    n_tiles = tl.cdiv(N, BN)
    per_split = tl.cdiv(n_tiles, SPLIT)
    t_begin = s * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    cols = tl.arange(0, KP)
    best_d = tl.full((BB, KP), float("inf"), dtype=tl.float32)
    best_i = tl.zeros((BB, KP), dtype=tl.int64)
    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        rows_n = offs_n.to(tl.int64) * d
        dist = tl.zeros((BB, BN), dtype=tl.float32)
        for kc in range(NUM_D):
            offs_k = kc * BD + tl.arange(0, BD)
            mask_k = offs_k < d
            qk = tl.load(q_g + rows_b[:, None] + offs_k[None, :],
                         mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            pk = as_float32(tl.load(p_g + rows_n[:, None] + offs_k[None, :],
                                    mask=mask_n[:, None] & mask_k[None, :], other=0.0))
            diff = qk[:, None, :] - pk[None, :, :]
            dist += tl.sum(diff * diff, axis=2)
        dist = tl.where(mask_n[None, :], dist, float("inf"))
        idx = offs_n.to(tl.int64)

        new_d = tl.full((BB, KP), float("inf"), dtype=tl.float32)
        new_i = tl.zeros((BB, KP), dtype=tl.int64)
        for j in tl.static_range(K):
            # head of the running list (sorted, so the first minimum is its lowest index)
            bv = tl.min(best_d, axis=1)
            bcol = tl.min(tl.where(best_d == bv[:, None], cols[None, :], KP), axis=1)
            bi = tl.sum(tl.where(cols[None, :] == bcol[:, None], best_i, 0), axis=1)
            # head of the tile: smallest distance, lowest index among equals
            tv = tl.min(dist, axis=1)
            ti = tl.min(tl.where(dist == tv[:, None], idx[None, :], N), axis=1)
            take_best = bv <= tv
            new_d = tl.where(cols[None, :] == j, tl.where(take_best, bv, tv)[:, None], new_d)
            new_i = tl.where(cols[None, :] == j, tl.where(take_best, bi, ti)[:, None], new_i)
            best_d = tl.where(take_best[:, None] & (cols[None, :] == bcol[:, None]),
                              float("inf"), best_d)
            dist = tl.where((~take_best)[:, None] & (idx[None, :] == ti[:, None]),
                            float("inf"), dist)
        best_d = new_d
        best_i = new_i

    out = ((s * G + g64) * B + offs_b)[:, None] * K + cols[None, :]
    mask = mask_b[:, None] & (cols < K)[None, :]
    tl.store(dist_ptr + out, tl.sqrt(best_d) if SQRT else best_d, mask=mask)
    tl.store(idx_ptr + out, best_i, mask=mask)


def knn(queries, points, k):
    """Distances (G, B, k) ascending and int64 indices (G, B, k); ties to the lower index.
    Points float32 or stored as uint8, float16 or bfloat16."""
    check_float32(queries, points=points)
    queries, points = groupwise(queries), groupwise(points)
    G, B, d = queries.shape
    N = points.shape[1]
    plan = _config.plan("knn", G, B, N, d, False, queries.device)
    S = plan.split
    # (BB, BN, BD) difference tile of at most 8192 elements: 64 per thread with 4 warps
    blocks = plan.blocks or {"BB": 32, "BN": min(128, max(16, 256 // plan.block_d)),
                             "num_warps": 4, "num_stages": 2}
    dist = new_output((S, G, B, k), queries.dtype, queries.device)
    idx = new_output((S, G, B, k), torch.int64, queries.device)
    grid = (G * S * triton.cdiv(B, blocks["BB"]),)
    _knn_kernel[grid](
        queries, points, dist, idx, G, B, N, d, group_stride(queries), group_stride(points), S,
        K=k, KP=triton.next_power_of_2(k), SQRT=S == 1, NUM_D=plan.num_d, BD=plan.block_d,
        **blocks,
    )
    return merge_knn_partials(dist, idx, k)
