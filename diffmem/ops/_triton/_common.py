"""Pieces shared by the Triton kernel families: tensor preparation and tile helpers.

Conventions inside the kernels: a "group base" pointer is already offset to group g (group
stride 0 = shared by all groups); rows are addressed with int64 offsets row * d; every tile
helper streams the features in NUM_D chunks of BD.

Logits are *shifted* by a per-query constant (softmax weights are unchanged; lse subtracts
the shift on the host, in float64). Exact mode takes one of two forms per query, chosen by the
host's plan (see diffmem/ops/_exact.py), both summed in float32 chains of at most 16 features
added into float64 (exact_logits):
    direct     -(sum_k (diff_k^2 - var)) / (2 var)  =  logit + d / 2,   diff = fma(-alpha, y, x),
               O(sqrt(d)) instead of O(d) at high noise;
    expansion  alpha / var x'.(y - c) - alpha^2 / (2 var) |y - c|^2  =  logit + |x'|^2 / (2 var),
               x' = x - alpha c around the plan's centre c (queries far from the points).
Fast logits drop the per-query constant ||x - alpha c||^2 / (2 var) (see centred_shift).

Points (and the centre rows taken from them) may be stored as uint8, float16 or bfloat16: every
load of them goes through as_float32, so the kernels compute exactly as on the points converted
to float32 (each of these values is a float32) while reading only the stored bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._alloc import new_output  # noqa: F401  (re-exported for the kernel families)
from .._gpu_common import centred_shift, group_stride, groupwise  # noqa: F401  (re-exported)
from .._gpu_common import check_float32 as _check_float32


def check_float32(*tensors, points=None) -> None:
    """float32 tensors; points (optional) float32 or a compact storage dtype."""
    _check_float32(*tensors, backend="triton", points=points)


@dataclass
class ExactInputs:
    """What the exact kernels need from a plan (see _exact.ExactPlan), over the canonical layout.

    xq: (G, B, d) float32 rows of the exact logits' first operand: x (direct form) or
        x' = x - alpha c rounded once (expansion);
    centre: (G, d) the plan's centre c (group stride 0 when shared); expand: (G, B) uint8;
    shift: (G, B) float64, internal logit - true logit per query (d / 2 or |x'|^2 / (2 var));
    top_k: how many of the largest logits the forward reports (0: none).
    """

    xq: torch.Tensor
    centre: torch.Tensor
    expand: torch.Tensor
    shift: torch.Tensor
    top_k: int


def exact_inputs(x, alpha, var, plan) -> ExactInputs:
    """The per-query logit forms of a plan; without one (None), every query takes the direct form
    and nothing is reported."""
    G, B, d = x.shape
    if plan is None:
        return ExactInputs(xq=x, centre=x.new_zeros((1, d)).expand(G, d),
                           expand=torch.zeros((G, B), dtype=torch.uint8, device=x.device),
                           shift=torch.full((G, B), 0.5 * d, dtype=torch.float64, device=x.device),
                           top_k=0)
    centre = groupwise(plan.centre)
    c64 = centre.double()[:, None, :]
    # The product of two float32 numbers is exact in float64: x' is rounded once, to float32.
    xp = torch.addcmul(x.double(), alpha.double()[:, :, None], c64, value=-1.0).float()
    kq = xp.double().square().sum(-1) / (2.0 * var.double())
    expand = plan.expand.to(torch.uint8).contiguous()
    wide = expand.bool()
    xq = torch.where(wide[:, :, None], xp, x)
    shift = torch.where(wide, kq, 0.5 * d)
    return ExactInputs(xq=xq, centre=centre, expand=expand, shift=shift, top_k=int(plan.top_k))


def forms(ex: ExactInputs) -> int:
    """The FORMS constant of the exact kernels for these queries: DIRECT, EXPANSION or both
    (DIRECT | EXPANSION). One host synchronisation."""
    expand = ex.expand.bool()
    some_direct, some_expanded = torch.stack([(~expand).any(), expand.any()]).tolist()
    return (DIRECT.value if some_direct or not some_expanded else 0) \
        | (EXPANSION.value if some_expanded else 0)


def merge_top(val, idx, shift):
    """(split, G, B, K) per-split top-K lists (internal frame; int32 indices) -> (G, B, K)
    indices (int64) and logits in the true frame (float64); empty slots keep index -1 and
    logit -inf."""
    S, G, B, K = val.shape
    if S == 1 or K == 0:
        val, idx = val[0], idx[0]
    else:
        val = val.permute(1, 2, 0, 3).reshape(G, B, S * K)
        idx = idx.permute(1, 2, 0, 3).reshape(G, B, S * K)
        val, order = val.topk(K, dim=-1)
        idx = torch.gather(idx, -1, order)
    return idx.long(), val - shift[:, :, None]


# Fast logits: chunk partial sums are added in groups of GROUP_D before joining the running
# total, so the sequential fp32 chain over d = 3072 is ~NUM_D / GROUP_D + GROUP_D long.
GROUP_D = tl.constexpr(8)


@triton.jit
def as_float32(v):
    """Loaded point values as float32, exactly: float32 as is, uint8 codes and float16 by
    conversion, bfloat16 widened bit by bit (its bits are the top half of the float32's)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


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
def fast_logits(x_g, y_g, c_g, rows_b, mask_b, rows_n, mask_n, alpha, var, d,
                NUM_D: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr):
    """precision="fast" logits without bias for a (BB, BN) tile, shifted by the per-query
    ||x - alpha c||^2 / (2 var): alpha (x'.(y - c) - alpha ||y - c||^2 / 2) / var with
    x' = x - alpha c, the dot on tensor cores (DOT precision).

    rows_b (BB,) / rows_n (BN,) are int64 row offsets (row * d) into x_g / y_g; alpha, var (BB,).
    Chunk products are summed in groups of GROUP_D chunks, then across groups.
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
            yk = as_float32(tl.load(y_g + rows_n[:, None] + offs_k[None, :],
                                    mask=mask_n[:, None] & mask_k[None, :], other=0.0))
            ck = as_float32(tl.load(c_g + offs_k, mask=mask_k, other=0.0))
            xc = tl.fma(-alpha[:, None], ck[None, :], xk)
            yc = tl.where(mask_n[:, None], yk - ck[None, :], 0.0)
            part += tl.dot(xc, tl.trans(yc), input_precision=DOT)
            ynorm += tl.sum(yc * yc, axis=1)
        acc += part
    return alpha[:, None] * (acc - 0.5 * alpha[:, None] * ynorm[None, :]) / var[:, None]


@triton.jit
def centred_grad_dot(g_g, c_g, y_g, rows_b, mask_b, rows_n, mask_n, d,
                     NUM_D: tl.constexpr, BD: tl.constexpr):
    """(BB, BN) tile of g[b] . (y[n] - c) for the group's centre row c, by direct differences.

    Centred, the dot is O(spread) instead of O(|offset|), so subtracting its weighted mean over
    the points (the backward's D) does not cancel away the fp32 precision. Feature-major tiles,
    as in exact_logits.
    """
    BB: tl.constexpr = rows_b.shape[0]
    BN: tl.constexpr = rows_n.shape[0]
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    for kc in range(NUM_D):
        offs_k = kc * BD + tl.arange(0, BD)
        mask_k = offs_k < d
        gk = tl.load(g_g + rows_b[:, None] + offs_k[None, :],
                     mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        ck = as_float32(tl.load(c_g + offs_k, mask=mask_k, other=0.0))
        yk = as_float32(tl.load(y_g + rows_n[:, None] + offs_k[None, :],
                                mask=mask_n[:, None] & mask_k[None, :], other=0.0))
        yc = tl.where(mask_n[:, None], yk - ck[None, :], 0.0)
        # feature-major (BD, BB, BN), as in exact_logits: the sum stays within threads
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


# Features per float32 chain of the exact logits; each chain joins a float64 sum.
EXACT_CHAIN = tl.constexpr(16)
# The logit forms a launch computes (exact_logits' FORMS): bit 0 direct, bit 1 expansion.
DIRECT = tl.constexpr(1)
EXPANSION = tl.constexpr(2)


@triton.jit
def exact_logits(xq_g, y_g, ctr_g, bias_g, rows_b, mask_b, offs_n, mask_n, alpha, var, expand,
                 d, HAS_BIAS: tl.constexpr, FORMS: tl.constexpr, NUM_D: tl.constexpr,
                 BD: tl.constexpr):
    """(BB, BN) float64 exact logits, each query in its form's internal frame, bias included,
    -inf for masked points. Both forms are a sum over features of one term u v - s:

        direct (expand == 0)     u = v = fma(-alpha, y, x), s = var;  logit = -S / (2 var)
        expansion (expand != 0)  u = x', v = y - c, s = 0;  logit = alpha / var S
                                                                  - alpha^2 / (2 var) |y - c|^2

    so one feature-major (CH, BB, BN) tile serves both (xq_g rows hold x or x' per query, see
    ExactInputs). S is summed in float32 chains of CH <= EXACT_CHAIN features, each added into
    a float64 sum; y - c is one float32 subtraction and |y - c|^2 a float64 sum. FORMS: the
    forms present in the launch (DIRECT, EXPANSION or both, see forms()); a mixed launch pays
    one select per element. The feature-major tile keeps the feature sum within each thread
    (a (BB, BN, BD) tile put the features across lanes: about 7x the shuffles and 3x the adds,
    see benchmarks/triton_sass.py).
    """
    BB: tl.constexpr = mask_b.shape[0]
    BN: tl.constexpr = mask_n.shape[0]
    CH: tl.constexpr = BD if BD < EXACT_CHAIN else EXACT_CHAIN
    rows_n = offs_n.to(tl.int64) * d
    wide = expand != 0
    a_u = tl.where(wide, 0.0, alpha)  # the scale of y in u: alpha (direct) or 0 (expansion)
    s_u = tl.where(wide, 0.0, var)
    acc = tl.zeros((BB, BN), dtype=tl.float64)
    yn = tl.zeros((BN,), dtype=tl.float64)
    for kc in range(NUM_D * (BD // CH)):
        offs_k = kc * CH + tl.arange(0, CH)
        mask_k = offs_k < d
        xt = tl.trans(tl.load(xq_g + rows_b[:, None] + offs_k[None, :],
                              mask=mask_b[:, None] & mask_k[None, :], other=0.0))
        mask_y = mask_n[:, None] & mask_k[None, :]
        yk = as_float32(tl.load(y_g + rows_n[:, None] + offs_k[None, :], mask=mask_y, other=0.0))
        sk = tl.where(mask_k[:, None], s_u[None, :], 0.0)[:, :, None]
        if FORMS == DIRECT:
            u = tl.fma(-alpha[None, :, None], tl.trans(yk)[:, None, :], xt[:, :, None])
            v = u
        else:
            ck = tl.load(ctr_g + offs_k, mask=mask_k, other=0.0)
            yc = tl.where(mask_y, yk - ck[None, :], 0.0)
            yc64 = yc.to(tl.float64)
            yn += tl.sum(yc64 * yc64, axis=1)
            if FORMS == EXPANSION:
                u = xt[:, :, None]
                v = tl.trans(yc)[:, None, :]
            else:
                u = tl.fma(-a_u[None, :, None], tl.trans(yk)[:, None, :], xt[:, :, None])
                v = tl.where(wide[None, :, None], tl.trans(yc)[:, None, :], u)
        acc += tl.sum(tl.fma(u, v, -sk), axis=0).to(tl.float64)
    a = alpha.to(tl.float64)
    inv_v = 1.0 / var.to(tl.float64)
    if FORMS == DIRECT:
        logit = acc * (-0.5 * inv_v)[:, None]
    else:
        logit = acc * tl.where(wide, a * inv_v, -0.5 * inv_v)[:, None] \
            - tl.where(wide, 0.5 * a * a * inv_v, 0.0)[:, None] * yn[None, :]
    if HAS_BIAS:
        logit += tl.load(bias_g + offs_n, mask=mask_n, other=0.0).to(tl.float64)[None, :]
    return tl.where(mask_n[None, :], logit, float("-inf"))


@triton.jit
def topk_update(top_v, top_i, logit, offs_n, K: tl.constexpr):
    """Merge a (BB, BN) logit tile (-inf: masked points) into each row's running top K.

    top_v, top_i: (BB, KP) values and int32 indices, KP = K rounded up to a power of 2; slots
    < K start at (-inf, -1), the padding slots >= K hold +inf and are never replaced. Each of K
    rounds takes the tile's row maximum out of the tile and puts it in place of the row's
    smallest kept value if larger. Tiles that beat no row's smallest kept value are skipped.
    """
    KP: tl.constexpr = top_v.shape[1]
    kk = tl.arange(0, KP)
    if tl.max((tl.max(logit, axis=1) > tl.min(top_v, axis=1)).to(tl.int32)) > 0:
        work = logit
        for _ in tl.static_range(K):
            best = tl.max(work, axis=1)
            at = tl.min(tl.where(work == best[:, None], offs_n[None, :], 2147483647), axis=1)
            work = tl.where(offs_n[None, :] == at[:, None], float("-inf"), work)
            lowest = tl.min(top_v, axis=1)
            slot = tl.min(tl.where(top_v == lowest[:, None], kk[None, :], KP), axis=1)
            put = (kk[None, :] == slot[:, None]) & (best > lowest)[:, None]
            top_v = tl.where(put, best[:, None], top_v)
            top_i = tl.where(put, at[:, None], top_i)
    return top_v, top_i


@triton.jit
def override_top(logit, top_v_g, top_i_g, offs_b, mask_b, offs_n, K: tl.constexpr):
    """Replace the logits of each query's listed points (top_i_g, (B, K) rows, -1: empty) by the
    values at top_v_g (same layout, the logits' frame)."""
    for k in tl.static_range(K):
        at = tl.load(top_i_g + offs_b * K + k, mask=mask_b, other=-1)
        val = tl.load(top_v_g + offs_b * K + k, mask=mask_b, other=0.0)
        logit = tl.where(offs_n[None, :] == at[:, None], val[:, None], logit)
    return logit
