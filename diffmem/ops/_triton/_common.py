"""Pieces shared by the Triton kernel families: tensor preparation and tile helpers.

Conventions inside the kernels: a "group base" pointer is already offset to group g (group
stride 0 = shared by all groups); rows are addressed with int64 offsets row * d; every tile
helper streams the features in NUM_D chunks of BD.

Exact logits are *shifted*: the helpers return
    -(sum_k (diff_k^2 - var)) / (2 var)  =  logit + d / 2,   diff = fma(-alpha, y, x),
which is O(sqrt(d)) instead of O(d) at high noise, so fp32 holds it (and its differences
between points) to ~1e-7 relative. Softmax weights are unchanged; lse subtracts d / 2 at the end.
Fast logits drop the per-query constant ||x - alpha c||^2 / (2 var) instead (see centred_shift).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._alloc import new_output  # noqa: F401  (re-exported for the kernel families)
from .._gpu_common import centred_shift, group_stride, groupwise  # noqa: F401  (re-exported)
from .._gpu_common import check_float32 as _check_float32


def check_float32(*tensors) -> None:
    _check_float32(*tensors, backend="triton")


# Chunk partial sums are added in groups of GROUP_D before joining the running total, so the
# sequential fp32 chain over d = 3072 is ~NUM_D / GROUP_D + GROUP_D long instead of NUM_D.
GROUP_D = tl.constexpr(8)


@triton.jit
def program_coords(n_blocks, SPLIT):
    """(block, split, group) of this program in a grid of G * SPLIT * n_blocks programs.

    The group comes back as int64, ready for pointer arithmetic with group strides.
    """
    pid = tl.program_id(0)
    block = pid % n_blocks
    split = (pid // n_blocks) % SPLIT
    group = ((pid // n_blocks) // SPLIT).to(tl.int64)
    return block, split, group


@triton.jit
def shifted_logits(x_g, y_g, c_g, rows_b, mask_b, rows_n, mask_n, alpha, var, d,
                   FAST: tl.constexpr, NUM_D: tl.constexpr, BD: tl.constexpr,
                   DOT: tl.constexpr):
    """Logits without bias for a (BB, BN) tile, shifted by a per-query constant.

    rows_b (BB,) / rows_n (BN,) are int64 row offsets (row * d) into x_g / y_g; alpha, var (BB,).
    exact: -(sum_k fma(diff, diff, -var)) / (2 var) with diff = fma(-alpha, y, x), summed per
    BD-chunk, then in groups of chunks, then across groups. The chunk is a feature-major
    (BD, BB, BN) tile: the compiler keeps the feature axis within each thread, so its sum needs
    no cross-lane shuffles (a (BB, BN, BD) tile put the features across lanes: about 7x the
    shuffles and 3x the adds, see benchmarks/triton_sass.py). fast: alpha (x'.(y - c) -
    alpha ||y - c||^2 / 2) / var with x' = x - alpha c, the dot on tensor cores.
    """
    BB: tl.constexpr = rows_b.shape[0]
    BN: tl.constexpr = rows_n.shape[0]
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    ynorm = tl.zeros((BN,), dtype=tl.float32)
    for kc0 in range(0, NUM_D, GROUP_D):
        part = tl.zeros((BB, BN), dtype=tl.float32)
        for kc in range(kc0, tl.minimum(kc0 + GROUP_D, NUM_D)):
            offs_k = kc * BD + tl.arange(0, BD)
            mask_k = offs_k < d
            xk = tl.load(x_g + rows_b[:, None] + offs_k[None, :],
                         mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            yk = tl.load(y_g + rows_n[:, None] + offs_k[None, :],
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if FAST:
                ck = tl.load(c_g + offs_k, mask=mask_k, other=0.0)
                xc = tl.fma(-alpha[:, None], ck[None, :], xk)
                yc = tl.where(mask_n[:, None], yk - ck[None, :], 0.0)
                part += tl.dot(xc, tl.trans(yc), input_precision=DOT)
                ynorm += tl.sum(yc * yc, axis=1)
            else:
                # Feature-major (BD, BB, BN) tile: the features lie along registers of each
                # thread, so the sum over them needs no shuffles across lanes.
                xt = tl.trans(xk)
                yt = tl.trans(yk)
                diff = tl.fma(-alpha[None, :, None], yt[:, None, :], xt[:, :, None])
                vk = tl.where(mask_k[:, None], var[None, :], 0.0)
                part += tl.sum(tl.fma(diff, diff, -vk[:, :, None]), axis=0)
        acc += part
    if FAST:
        return alpha[:, None] * (acc - 0.5 * alpha[:, None] * ynorm[None, :]) / var[:, None]
    else:
        return -acc / (2.0 * var[:, None])


@triton.jit
def centred_grad_dot(g_g, c_g, y_g, rows_b, mask_b, rows_n, mask_n, d,
                     NUM_D: tl.constexpr, BD: tl.constexpr):
    """(BB, BN) tile of g[b] . (y[n] - c) for the group's centre row c, by direct differences.

    Centred, the dot is O(spread) instead of O(|offset|), so subtracting its weighted mean over
    the points (the backward's D) does not cancel away the fp32 precision. Feature-major tiles,
    as in shifted_logits.
    """
    BB: tl.constexpr = rows_b.shape[0]
    BN: tl.constexpr = rows_n.shape[0]
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    for kc in range(NUM_D):
        offs_k = kc * BD + tl.arange(0, BD)
        mask_k = offs_k < d
        gk = tl.load(g_g + rows_b[:, None] + offs_k[None, :],
                     mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        ck = tl.load(c_g + offs_k, mask=mask_k, other=0.0)
        yk = tl.load(y_g + rows_n[:, None] + offs_k[None, :],
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        yc = tl.where(mask_n[:, None], yk - ck[None, :], 0.0)
        # feature-major (BD, BB, BN), as in shifted_logits: the sum stays within threads
        acc += tl.sum(tl.trans(gk)[:, :, None] * tl.trans(yc)[:, None, :], axis=0)
    return acc


@triton.jit
def zero_rows(rows_ptr, mask_r, d, NUM_D: tl.constexpr, BD: tl.constexpr):
    """Write zeros to the (R, d) rows at rows_ptr (an (R, 1) pointer tensor)."""
    R: tl.constexpr = rows_ptr.shape[0]
    for kc in range(NUM_D):
        offs_k = kc * BD + tl.arange(0, BD)
        tl.store(rows_ptr + offs_k[None, :], tl.zeros((R, BD), dtype=tl.float32),
                 mask=mask_r[:, None] & (offs_k < d)[None, :])
