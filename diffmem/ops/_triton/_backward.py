"""Backward kernels: gradients of (mean, lse) w.r.t. x, points, alpha, var and bias.

With the group's centre row c (the first point, or the points' mean for "fast") and
q[b, n] = g[b] . (y[n] - c), the gradients need
    w = softmax weights,  D = sum_n w q,  P = w (q - D + h)
(q - D = g . (y - mean): centred, both terms are O(spread), so no precision is lost when the
points sit far from the origin). The weights are recomputed tile by tile from the forward's
(shifted) logits: e = exp(logit' - lse'), w = e / Z with Z = sum_n e. Dividing by the recomputed
Z makes w sum to one whatever the rounding of the saved lse (or, for "fast", the expansion's lse
error), so sum_n P = h to rounding. Three kernels, FlashAttention-2 style, so every gradient is a
plain deterministic sum:
    _stats_kernel  programs own BB queries, stream over points  -> Z, sum_n e q   (then D)
    _query_kernel  programs own BB queries, stream over points  -> dx, dalpha, dvar
    _point_kernel  programs own BN points, stream over queries  -> dpoints, dbias
Splits of the streamed dimension write partial sums that torch adds in a fixed order.

Exact logits are recomputed in each query's form of the forward (the plan's direct or expansion
form, float64 up to the exp), and the logits of the points the forward listed per query (its top
K, corrected in float64 on the host) are replaced by their corrected values (override_top).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._gpu_common import reduce_partials
from . import _config
from ._common import (
    as_float32,
    centred_grad_dot,
    centred_shift,
    check_float32,
    exact_inputs,
    exact_logits,
    fast_logits,
    forms,
    group_stride,
    groupwise,
    new_output,
    override_top,
    program_coords,
    zero_rows,
)


@triton.jit
def _tile(x_g, y_g, c_g, bias_g, g_g, xq_g, ctr_g, expand_g, top_v_g, top_i_g,
          offs_b, rows_b, mask_b, offs_n, mask_n, alpha, var, lse_s, d,
          HAS_BIAS: tl.constexpr, HAS_GM: tl.constexpr, FAST: tl.constexpr, FORMS: tl.constexpr,
          TOP_K: tl.constexpr, NUM_D: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr):
    """(e, q) for a (BB, BN) tile: e = exp(logit' - lse_s) with lse_s the shifted lse (BB,)
    float64), q = g . (y - c) (zero without a mean gradient). Masked points and queries get e = 0.

    Exact logits: each query's form (expand_g), then the listed points' corrected values
    (top_v_g / top_i_g, (B, TOP_K) rows of this group, in the shifted frame)."""
    rows_n = offs_n.to(tl.int64) * d
    if FAST:
        logit = fast_logits(x_g, y_g, c_g, rows_b, mask_b, rows_n, mask_n, alpha, var, d,
                            NUM_D, BD, DOT)
        if HAS_BIAS:
            logit += tl.load(bias_g + offs_n, mask=mask_n, other=0.0)[None, :]
        logit = tl.where(mask_n[None, :], logit, float("-inf"))
        e = tl.exp(logit - lse_s.to(tl.float32)[:, None])
    else:
        expand = tl.load(expand_g + offs_b, mask=mask_b, other=0)
        logit = exact_logits(xq_g, y_g, ctr_g, bias_g, rows_b, mask_b, offs_n, mask_n,
                             alpha, var, expand, d, HAS_BIAS, FORMS, NUM_D, BD)
        if TOP_K > 0:
            logit = override_top(logit, top_v_g, top_i_g, offs_b, mask_b, offs_n, TOP_K)
        e = tl.exp((logit - lse_s[:, None]).to(tl.float32))
    if HAS_GM:
        q = centred_grad_dot(g_g, c_g, y_g, rows_b, mask_b, rows_n, mask_n, d, NUM_D, BD)
    else:
        q = tl.zeros_like(e)
    return e, q


@triton.jit
def _row(ptr, offs_b, mask_b, other):
    """Per-query values (BB,) of a row tensor; padded queries read other."""
    return tl.load(ptr + offs_b, mask=mask_b, other=other)


@triton.jit
def _stats_kernel(
    x_ptr, y_ptr, alpha_ptr, var_ptr, bias_ptr, c_ptr,
    xq_ptr, ctr_ptr, expand_ptr, top_v_ptr, top_i_ptr,
    lse_ptr, gm_ptr,
    z_ptr, eq_ptr,
    G, B, N, d,
    gs_x, gs_y, gs_alpha, gs_var, gs_bias, gs_c, gs_xq, gs_ctr,
    SPLIT,
    HAS_BIAS: tl.constexpr, HAS_GM: tl.constexpr, FORMS: tl.constexpr, TOP_K: tl.constexpr,
    FAST: tl.constexpr, NUM_D: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr,
):
    """Grid: G * SPLIT * cdiv(B, BB). Partial sums (SPLIT, G, B): z = sum_n e, eq = sum_n e q."""
    qb, s, g64 = program_coords(tl.cdiv(B, BB), SPLIT)

    offs_b = qb * BB + tl.arange(0, BB)
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64) * d
    dense_b = g64 * B + offs_b
    alpha = _row(alpha_ptr + g64 * gs_alpha, offs_b, mask_b, 0.0)
    var = _row(var_ptr + g64 * gs_var, offs_b, mask_b, 1.0)
    lse_s = tl.load(lse_ptr + dense_b, mask=mask_b, other=float("inf"))

    n_tiles = tl.cdiv(N, BN)
    per_split = tl.cdiv(n_tiles, SPLIT)
    t_begin = s * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
    z = tl.zeros((BB,), dtype=tl.float32)
    eq = tl.zeros((BB,), dtype=tl.float32)
    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        e, q = _tile(x_ptr + g64 * gs_x, y_ptr + g64 * gs_y, c_ptr + g64 * gs_c,
                     bias_ptr + g64 * gs_bias, gm_ptr + g64 * B * d, xq_ptr + g64 * gs_xq,
                     ctr_ptr + g64 * gs_ctr, expand_ptr + g64 * B, top_v_ptr + g64 * B * TOP_K,
                     top_i_ptr + g64 * B * TOP_K, offs_b, rows_b, mask_b,
                     offs_n, offs_n < N, alpha, var, lse_s, d,
                     HAS_BIAS, HAS_GM, FAST, FORMS, TOP_K, NUM_D, BD, DOT)
        z += tl.sum(e, axis=1)
        eq += tl.sum(e * q, axis=1)
    part = (s * G + g64) * B + offs_b
    tl.store(z_ptr + part, z, mask=mask_b)
    tl.store(eq_ptr + part, eq, mask=mask_b)


@triton.jit
def _query_kernel(
    x_ptr, y_ptr, alpha_ptr, var_ptr, bias_ptr, c_ptr,
    xq_ptr, ctr_ptr, expand_ptr, top_v_ptr, top_i_ptr,
    lse_ptr, z_ptr, r_ptr, gm_ptr,
    dx_ptr, dalpha_ptr, dvar_ptr,
    G, B, N, d,
    gs_x, gs_y, gs_alpha, gs_var, gs_bias, gs_c, gs_xq, gs_ctr,
    SPLIT,
    HAS_BIAS: tl.constexpr, HAS_GM: tl.constexpr, FORMS: tl.constexpr, TOP_K: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DALPHA: tl.constexpr, NEED_DVAR: tl.constexpr,
    FAST: tl.constexpr, NUM_D: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr,
):
    """Grid: G * SPLIT * cdiv(B, BB). Outputs (SPLIT, G, B, d) / (SPLIT, G, B) partial sums.

    dx = -sum_n P diff / var, dalpha = sum_n P (y . diff) / var,
    dvar = sum_n P ||diff||^2 / (2 var^2) with ||diff||^2 = sum_k (diff_k^2 - var) + d var.
    """
    qb, s, g64 = program_coords(tl.cdiv(B, BB), SPLIT)

    offs_b = qb * BB + tl.arange(0, BB)
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64) * d
    x_g = x_ptr + g64 * gs_x
    y_g = y_ptr + g64 * gs_y
    c_g = c_ptr + g64 * gs_c
    dense_b = g64 * B + offs_b  # row in the dense (G, B) tensors: lse, Z, D, grads
    alpha = _row(alpha_ptr + g64 * gs_alpha, offs_b, mask_b, 0.0)
    var = _row(var_ptr + g64 * gs_var, offs_b, mask_b, 1.0)
    lse_s = _row(lse_ptr, dense_b, mask_b, float("inf"))  # padded queries: e = 0
    z = _row(z_ptr, dense_b, mask_b, 1.0)
    r = _row(r_ptr, dense_b, mask_b, 0.0)  # P = w (q + r), r = h - D
    part = (s * G + g64) * B + offs_b
    dx_rows = dx_ptr + part[:, None] * d

    n_tiles = tl.cdiv(N, BN)
    per_split = tl.cdiv(n_tiles, SPLIT)
    t_begin = s * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    dx = tl.zeros((BB, BD), dtype=tl.float32)  # used when NUM_D == 1
    if NEED_DX and NUM_D > 1:
        zero_rows(dx_rows, mask_b, d, NUM_D, BD)
        tl.debug_barrier()
    sum_p = tl.zeros((BB,), dtype=tl.float32)
    sum_pyd = tl.zeros((BB,), dtype=tl.float32)  # sum_n P (y . diff)
    sum_ps = tl.zeros((BB,), dtype=tl.float32)   # sum_n P sum_k (diff_k^2 - var)

    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        rows_n = offs_n.to(tl.int64) * d
        e, q = _tile(x_g, y_g, c_g, bias_ptr + g64 * gs_bias, gm_ptr + g64 * B * d,
                     xq_ptr + g64 * gs_xq, ctr_ptr + g64 * gs_ctr, expand_ptr + g64 * B,
                     top_v_ptr + g64 * B * TOP_K, top_i_ptr + g64 * B * TOP_K,
                     offs_b, rows_b, mask_b, offs_n, mask_n, alpha, var, lse_s, d,
                     HAS_BIAS, HAS_GM, FAST, FORMS, TOP_K, NUM_D, BD, DOT)
        P = e / z[:, None] * (q + r[:, None])
        sum_p += tl.sum(P, axis=1)
        for kc in range(NUM_D):
            offs_k = kc * BD + tl.arange(0, BD)
            mask_k = offs_k < d
            mq = mask_b[:, None] & mask_k[None, :]
            xk = tl.load(x_g + rows_b[:, None] + offs_k[None, :], mask=mq, other=0.0)
            yk = as_float32(tl.load(y_g + rows_n[:, None] + offs_k[None, :],
                                    mask=mask_n[:, None] & mask_k[None, :], other=0.0))
            # Feature-major (BD, BB, BN) tiles: sums over features stay within threads.
            yt = tl.trans(yk)
            diff = tl.fma(-alpha[None, :, None], yt[:, None, :], tl.trans(xk)[:, :, None])
            pd = P[None, :, :] * diff
            if NEED_DALPHA:
                sum_pyd += tl.sum(tl.sum(pd * yt[:, None, :], axis=0), axis=1)
            if NEED_DVAR:
                vk = tl.where(mask_k[:, None], var[None, :], 0.0)
                sq = tl.sum(tl.fma(diff, diff, -vk[:, :, None]), axis=0)
                sum_ps += tl.sum(P * sq, axis=1)
            if NEED_DX:
                contrib = -tl.trans(tl.sum(pd, axis=2)) / var[:, None]
                if NUM_D == 1:
                    dx += contrib
                else:
                    ptrs = dx_rows + offs_k[None, :]
                    old = tl.load(ptrs, mask=mq, other=0.0, cache_modifier=".cg")
                    tl.store(ptrs, old + contrib, mask=mq)
        if NEED_DX and NUM_D > 1:
            tl.debug_barrier()

    if NEED_DX and NUM_D == 1:
        offs_k = tl.arange(0, BD)
        tl.store(dx_rows + offs_k[None, :], dx, mask=mask_b[:, None] & (offs_k < d)[None, :])
    if NEED_DALPHA:
        tl.store(dalpha_ptr + part, sum_pyd / var, mask=mask_b)
    if NEED_DVAR:
        tl.store(dvar_ptr + part, (sum_ps + d * var * sum_p) / (2.0 * var * var), mask=mask_b)


@triton.jit
def _point_kernel(
    x_ptr, y_ptr, alpha_ptr, var_ptr, bias_ptr, c_ptr,
    xq_ptr, ctr_ptr, expand_ptr, top_v_ptr, top_i_ptr,
    lse_ptr, z_ptr, r_ptr, gm_ptr,
    dy_ptr, dbias_ptr,
    G, B, N, d,
    gs_x, gs_y, gs_alpha, gs_var, gs_bias, gs_c, gs_xq, gs_ctr,
    SPLIT,
    HAS_BIAS: tl.constexpr, HAS_GM: tl.constexpr, FORMS: tl.constexpr, TOP_K: tl.constexpr,
    NEED_DY: tl.constexpr, NEED_DBIAS: tl.constexpr,
    FAST: tl.constexpr, NUM_D: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr,
):
    """Grid: G * SPLIT * cdiv(N, BN), SPLIT along the queries.

    Outputs (SPLIT, G, N, d) / (SPLIT, G, N) partial sums:
    dy = sum_b (w g + P alpha diff / var), dbias = sum_b P.
    """
    pb, s, g64 = program_coords(tl.cdiv(N, BN), SPLIT)

    offs_n = pb * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    rows_n = offs_n.to(tl.int64) * d
    x_g = x_ptr + g64 * gs_x
    y_g = y_ptr + g64 * gs_y
    c_g = c_ptr + g64 * gs_c
    gm_g = gm_ptr + g64 * B * d
    part = (s * G + g64) * N + offs_n
    dy_rows = dy_ptr + part[:, None] * d

    b_tiles = tl.cdiv(B, BB)
    per_split = tl.cdiv(b_tiles, SPLIT)
    t_begin = s * per_split
    t_end = tl.minimum(t_begin + per_split, b_tiles)

    dy = tl.zeros((BN, BD), dtype=tl.float32)  # used when NUM_D == 1
    if NEED_DY and NUM_D > 1:
        zero_rows(dy_rows, mask_n, d, NUM_D, BD)
        tl.debug_barrier()
    dbias = tl.zeros((BN,), dtype=tl.float32)

    for t in range(t_begin, t_end):
        offs_b = t * BB + tl.arange(0, BB)
        mask_b = offs_b < B
        rows_b = offs_b.to(tl.int64) * d
        dense_b = g64 * B + offs_b
        alpha = _row(alpha_ptr + g64 * gs_alpha, offs_b, mask_b, 0.0)
        var = _row(var_ptr + g64 * gs_var, offs_b, mask_b, 1.0)
        lse_s = _row(lse_ptr, dense_b, mask_b, float("inf"))  # padded queries: e = 0
        z = _row(z_ptr, dense_b, mask_b, 1.0)
        r = _row(r_ptr, dense_b, mask_b, 0.0)
        e, q = _tile(x_g, y_g, c_g, bias_ptr + g64 * gs_bias, gm_g, xq_ptr + g64 * gs_xq,
                     ctr_ptr + g64 * gs_ctr, expand_ptr + g64 * B, top_v_ptr + g64 * B * TOP_K,
                     top_i_ptr + g64 * B * TOP_K, offs_b, rows_b, mask_b, offs_n, mask_n,
                     alpha, var, lse_s, d, HAS_BIAS, HAS_GM, FAST, FORMS, TOP_K, NUM_D, BD, DOT)
        w = e / z[:, None]
        P = w * (q + r[:, None])
        dbias += tl.sum(P, axis=0)
        if NEED_DY:
            coef = P * (alpha / var)[:, None]
            for kc in range(NUM_D):
                offs_k = kc * BD + tl.arange(0, BD)
                mask_k = offs_k < d
                mq = mask_b[:, None] & mask_k[None, :]
                mp = mask_n[:, None] & mask_k[None, :]
                xk = tl.load(x_g + rows_b[:, None] + offs_k[None, :], mask=mq, other=0.0)
                yk = as_float32(tl.load(y_g + rows_n[:, None] + offs_k[None, :], mask=mp,
                                        other=0.0))
                diff = tl.fma(-alpha[:, None, None], yk[None, :, :], xk[:, None, :])
                terms = coef[:, :, None] * diff
                if HAS_GM:
                    gk = tl.load(gm_g + rows_b[:, None] + offs_k[None, :], mask=mq, other=0.0)
                    terms += w[:, :, None] * gk[:, None, :]
                contrib = tl.sum(terms, axis=0)
                if NUM_D == 1:
                    dy += contrib
                else:
                    ptrs = dy_rows + offs_k[None, :]
                    old = tl.load(ptrs, mask=mp, other=0.0, cache_modifier=".cg")
                    tl.store(ptrs, old + contrib, mask=mp)
            if NUM_D > 1:
                tl.debug_barrier()

    if NEED_DY and NUM_D == 1:
        offs_k = tl.arange(0, BD)
        tl.store(dy_rows + offs_k[None, :], dy, mask=mask_n[:, None] & (offs_k < d)[None, :])
    if NEED_DBIAS:
        tl.store(dbias_ptr + part, dbias, mask=mask_n)


_KEY = ["d", "SPLIT", "HAS_BIAS", "HAS_GM", "FAST", "FORMS", "TOP_K", "NUM_D", "BD"]
_tuned: dict = {}


def _launcher(kernel, launch, fast):
    if launch.blocks is not None:
        return kernel, dict(launch.blocks)
    key = (id(kernel), fast, launch.block_d, launch.single_d)
    if key not in _tuned:
        # 3-D difference tiles, several live at once: half the forward's register budget
        configs = _config.autotune_configs(False, launch.block_d, launch.single_d, budget=32)
        _tuned[key] = triton.autotune(configs=configs, key=_KEY)(kernel)
    return _tuned[key], {}


def _partials(split, shape, like):
    """Output buffer with a leading split dimension, and how to reduce it."""
    return new_output((split, *shape), like.dtype, like.device)


def backward(x, points, alpha, var, bias, mean, lse64, grad_mean, grad_lse, needs,
             precision="exact", plan=None, top_idx=None, top_logit=None):
    """(dx, dpoints, dalpha, dvar, dbias) in canonical shapes, float32; None where needs[i] is
    False. Points may be stored as uint8, float16 or bfloat16 (read as float32 by the kernels).

    lse64: the forward's lse (G, B), preferably its float64 one. ``mean`` is not used: the
    kernels recompute what they need from the weights (see the module docstring).
    plan, top_idx (G, B, K) int64, top_logit (G, B, K) float64 (true frame): exact mode's plan
    and the forward's corrected top logits (None: every query in the direct form, no override).
    "fast" recomputes its expansion logits and takes neither.
    """
    check_float32(x, alpha, var, bias, points=points)
    x, points, alpha, var, bias = (groupwise(t) for t in (x, points, alpha, var, bias))
    G, B, d = x.shape
    N = points.shape[1]
    fast = precision == "fast"
    needs = tuple(bool(n) for n in needs)
    shapes = ((G, B, d), (G, N, d), (G, B), (G, B), (G, N))
    if grad_mean is None and grad_lse is None:
        return tuple(new_output(s, x.dtype, x.device).zero_() if need else None
                     for s, need in zip(shapes, needs))
    gm = None if grad_mean is None else grad_mean.contiguous()
    # Centre: the expansion centre for "fast", else each group's first point (as the forward,
    # in the points' storage dtype).
    c, kq = centred_shift(x, points, alpha, var) if fast else (points, None)
    ex = exact_inputs(x, alpha, var, None if fast else plan)
    K = 0 if top_idx is None or fast else top_idx.shape[-1]
    shift = kq.double() if fast else ex.shift
    # The lse of the kernels' shifted logits, in float64.
    lse_s = (lse64.double() + shift).contiguous()
    if K:  # the corrected logits in the kernels' frame
        top_v = (top_logit.double() + shift[:, :, None]).contiguous()
        top_i = top_idx.int().contiguous()  # int32: cheaper compares in the tiles
    else:
        top_v = top_i = lse_s
    common = dict(HAS_BIAS=bias is not None, HAS_GM=gm is not None, FAST=fast, FORMS=forms(ex),
                  TOP_K=K, DOT=_config.FAST_DOT)
    args_in = (x, points, alpha, var, x if bias is None else bias, c,
               ex.xq, ex.centre, ex.expand, top_v, top_i)
    strides = (group_stride(x), group_stride(points), group_stride(alpha), group_stride(var),
               group_stride(bias), group_stride(c), group_stride(ex.xq), group_stride(ex.centre))
    gm_arg = x if gm is None else gm

    # Row statistics: Z = sum_n e and D = sum_n w q, then r = h - D.
    launch = _config.plan("query_grad", G, B, N, d, fast, x.device)
    z_p = _partials(launch.split, (G, B), x)
    eq_p = _partials(launch.split, (G, B), x)
    kernel, meta = _launcher(_stats_kernel, launch, fast)
    grid = lambda META: (G * launch.split * triton.cdiv(B, META["BB"]),)  # noqa: E731
    _config.run_kernel(kernel, grid, (*args_in, lse_s, gm_arg, z_p, eq_p, G, B, N, d, *strides,
                                      launch.split),
                       dict(NUM_D=launch.num_d, BD=launch.block_d, **common, **meta),
                       tuned_on=(d, launch.split))
    z = reduce_partials(z_p)
    r = -reduce_partials(eq_p) / z
    if grad_lse is not None:
        r = r + grad_lse
    rows = (lse_s, z.contiguous(), r.contiguous(), gm_arg)
    dx = dpoints = dalpha = dvar = dbias = None

    if needs[0] or needs[2] or needs[3]:
        launch = _config.plan("query_grad", G, B, N, d, fast, x.device)
        S = launch.split
        dx_p = _partials(S, shapes[0], x) if needs[0] else x
        da_p = _partials(S, shapes[2], x) if needs[2] else x
        dv_p = _partials(S, shapes[3], x) if needs[3] else x
        kernel, meta = _launcher(_query_kernel, launch, fast)
        grid = lambda META: (G * S * triton.cdiv(B, META["BB"]),)  # noqa: E731
        _config.run_kernel(kernel, grid, (*args_in, *rows, dx_p, da_p, dv_p, G, B, N, d, *strides,
                                          S),
                           dict(NEED_DX=needs[0], NEED_DALPHA=needs[2], NEED_DVAR=needs[3],
                                NUM_D=launch.num_d, BD=launch.block_d, **common, **meta),
                           tuned_on=(d, S))
        dx = reduce_partials(dx_p) if needs[0] else None
        dalpha = reduce_partials(da_p) if needs[2] else None
        dvar = reduce_partials(dv_p) if needs[3] else None

    if needs[1] or needs[4]:
        launch = _config.plan("point_grad", G, B, N, d, fast, x.device)
        S = launch.split
        dy_p = _partials(S, shapes[1], x) if needs[1] else x
        db_p = _partials(S, shapes[4], x) if needs[4] else x
        kernel, meta = _launcher(_point_kernel, launch, fast)
        grid = lambda META: (G * S * triton.cdiv(N, META["BN"]),)  # noqa: E731
        _config.run_kernel(kernel, grid, (*args_in, *rows, dy_p, db_p, G, B, N, d, *strides, S),
                           dict(NEED_DY=needs[1], NEED_DBIAS=needs[4],
                                NUM_D=launch.num_d, BD=launch.block_d, **common, **meta),
                           tuned_on=(d, S))
        dpoints = reduce_partials(dy_p) if needs[1] else None
        dbias = reduce_partials(db_p) if needs[4] else None

    return dx, dpoints, dalpha, dvar, dbias
