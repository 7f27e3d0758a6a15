"""Forward kernels: online softmax over point tiles, giving the mean and lse per query.

One program owns BB queries of one group and streams over its share of the point tiles with
the running (max m, sum l, accumulator acc) of the online softmax; B x N is never stored. When
the points are split across programs, each writes its partial (m, l, acc) and ``_merge_kernel``
combines them. The accumulator stays in registers when d <= BD and is streamed through the
program's own rows in global memory otherwise (see _config.py).

The kernels write the final (m, l) of the shifted logits; lse = m + log(l) - shift is formed in
float64 on the host (lse64, which the backward uses) and rounded once to float32.

Exact logits (precision="exact", and the few-query plan whatever the precision) take the form
the host's plan chose per query (direct or expansion, see _common.py and diffmem/ops/_exact.py)
and are kept in float64 up to the softmax's exp; the kernels also keep each query's top K
logits (topk_update) for the host's float64 correction, merged across splits on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from ._common import (
    EXPANSION,
    as_float32,
    centred_shift,
    check_float32,
    exact_inputs,
    exact_logits,
    fast_logits,
    forms,
    group_stride,
    groupwise,
    merge_top,
    new_output,
    program_coords,
    topk_update,
    zero_rows,
)


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, alpha_ptr, var_ptr, bias_ptr, c_ptr,
    xq_ptr, ctr_ptr, expand_ptr,
    acc_ptr, m_ptr, l_ptr, top_v_ptr, top_i_ptr,
    G, B, N, d,
    gs_x, gs_y, gs_alpha, gs_var, gs_bias, gs_c, gs_xq, gs_ctr,
    SPLIT,
    HAS_BIAS: tl.constexpr, FAST: tl.constexpr, FINAL: tl.constexpr,
    FORMS: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr,
    NUM_D: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr,
):
    """Grid: G * SPLIT * cdiv(B, BB) programs.

    acc_ptr: (SPLIT, G, B, d) partial accumulators sum_n p (y_n - c), or the mean (G, B, d) when
    FINAL (SPLIT = 1); c_ptr: centre row(s) c of each group (see forward()).
    m_ptr (float64), l_ptr: (SPLIT, G, B) max and sum of exp(logit - max) of the shifted logits
    (partial unless FINAL).
    Exact logits (not FAST, see exact_logits): rows xq_ptr (G, B, d) of x or x', the plan's
    centre ctr_ptr, form flags expand_ptr (G, B, uint8) and the forms present, FORMS.
    top_v_ptr (float64) / top_i_ptr (int32): (SPLIT, G, B, TOP_K) the largest shifted logits of
    this split's points and their indices (TOP_K = 0: none); KP: TOP_K rounded up to a power
    of 2.
    """
    qb, s, g64 = program_coords(tl.cdiv(B, BB), SPLIT)

    offs_b = qb * BB + tl.arange(0, BB)
    mask_b = offs_b < B
    rows_b = offs_b.to(tl.int64) * d
    x_g = x_ptr + g64 * gs_x
    y_g = y_ptr + g64 * gs_y
    c_g = c_ptr + g64 * gs_c
    alpha = tl.load(alpha_ptr + g64 * gs_alpha + offs_b, mask=mask_b, other=0.0)
    var = tl.load(var_ptr + g64 * gs_var + offs_b, mask=mask_b, other=1.0)
    xq_g = xq_ptr + g64 * gs_xq
    ctr_g = ctr_ptr + g64 * gs_ctr
    bias_g = bias_ptr + g64 * gs_bias
    expand = tl.load(expand_ptr + g64 * B + offs_b, mask=mask_b, other=0)
    part = (s * G + g64) * B + offs_b  # row of this split's partial results
    acc_rows = acc_ptr + part[:, None] * d

    n_tiles = tl.cdiv(N, BN)
    per_split = tl.cdiv(n_tiles, SPLIT)
    t_begin = s * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    # exact logits are float64 up to the exp (the expansion's are sums of large terms)
    m = tl.full((BB,), float("-inf"), dtype=tl.float32 if FAST else tl.float64)
    l = tl.zeros((BB,), dtype=tl.float32)
    kk = tl.arange(0, KP)
    top_v = tl.where(kk < TOP_K, float("-inf"), float("inf")).to(tl.float64)[None, :] \
        + tl.zeros((BB, KP), dtype=tl.float64)
    top_i = tl.full((BB, KP), -1, dtype=tl.int32)
    acc = tl.zeros((BB, BD), dtype=tl.float32)  # used when NUM_D == 1
    if NUM_D > 1:
        zero_rows(acc_rows, mask_b, d, NUM_D, BD)
        tl.debug_barrier()

    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        rows_n = offs_n.to(tl.int64) * d
        if FAST:
            logit = fast_logits(x_g, y_g, c_g, rows_b, mask_b, rows_n, mask_n, alpha, var, d,
                                NUM_D, BD, DOT)
            if HAS_BIAS:
                logit += tl.load(bias_g + offs_n, mask=mask_n, other=0.0)[None, :]
            logit = tl.where(mask_n[None, :], logit, float("-inf"))
        else:
            logit = exact_logits(xq_g, y_g, ctr_g, bias_g, rows_b, mask_b, offs_n,
                                 mask_n, alpha, var, expand, d, HAS_BIAS, FORMS, NUM_D, BD)
            if TOP_K > 0:
                top_v, top_i = topk_update(top_v, top_i, logit, offs_n, TOP_K)

        m_new = tl.maximum(m, tl.max(logit, axis=1))
        # While every point so far is masked m_new is -inf: use 0 so no exp sees -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        corr = tl.exp((m - m_safe).to(tl.float32))
        p = tl.exp((logit - m_safe[:, None]).to(tl.float32))
        l = l * corr + tl.sum(p, axis=1)

        for kc in range(NUM_D):
            offs_k = kc * BD + tl.arange(0, BD)
            mask_k = offs_k < d
            yk = as_float32(tl.load(y_g + rows_n[:, None] + offs_k[None, :],
                                    mask=mask_n[:, None] & mask_k[None, :], other=0.0))
            # Centred points keep acc small (mean = c + acc / l): fp32 sums of y ~ 1000 would
            # cost several ulps of the mean, which the backward turns into gradient error.
            ck = as_float32(tl.load(c_g + offs_k, mask=mask_k, other=0.0))
            yc = tl.where(mask_n[:, None], yk - ck[None, :], 0.0)
            if FAST:
                contrib = tl.dot(p, yc, input_precision=DOT)
            elif BB >= 16 and BN >= 16 and BD >= 16:
                # An explicit IEEE fp32 dot: the compiler rewrites a broadcast-multiply-sum of
                # this shape into a TF32 dot (measured on an H200: 6e-4 relative error).
                contrib = tl.dot(p, yc, input_precision="ieee")
            else:
                contrib = tl.sum(p[:, :, None] * yc[None, :, :], axis=1)
            if NUM_D == 1:
                acc = acc * corr[:, None] + contrib
            else:
                ptrs = acc_rows + offs_k[None, :]
                mask = mask_b[:, None] & mask_k[None, :]
                old = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(ptrs, old * corr[:, None] + contrib, mask=mask)
        if NUM_D > 1:
            tl.debug_barrier()  # this tile's stores are visible before the next tile's loads
        m = m_new

    tl.store(m_ptr + part, m.to(tl.float64), mask=mask_b)
    tl.store(l_ptr + part, l, mask=mask_b)
    if TOP_K > 0:
        top = part.to(tl.int64)[:, None] * TOP_K + kk[None, :]
        mask_top = mask_b[:, None] & (kk < TOP_K)[None, :]
        tl.store(top_v_ptr + top, top_v, mask=mask_top)
        tl.store(top_i_ptr + top, top_i, mask=mask_top)
    l = tl.where(mask_b, l, 1.0)  # padded rows: keep the division finite
    if NUM_D == 1:
        offs_k = tl.arange(0, BD)
        mask = mask_b[:, None] & (offs_k < d)[None, :]
        if FINAL:
            out = acc / l[:, None] \
                + as_float32(tl.load(c_g + offs_k, mask=offs_k < d, other=0.0))[None, :]
            tl.store(acc_rows + offs_k[None, :], out, mask=mask)
        else:
            tl.store(acc_rows + offs_k[None, :], acc, mask=mask)
    elif FINAL:  # normalize the streamed accumulator in place: it is the mean buffer
        for kc in range(NUM_D):
            offs_k = kc * BD + tl.arange(0, BD)
            mask_k = offs_k < d
            ptrs = acc_rows + offs_k[None, :]
            mask = mask_b[:, None] & mask_k[None, :]
            out = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg") / l[:, None]
            ck = as_float32(tl.load(c_g + offs_k, mask=mask_k, other=0.0))
            tl.store(ptrs, out + ck[None, :], mask=mask)


@triton.jit
def _merge_kernel(
    acc_ptr, m_ptr, l_ptr, c_ptr, mean_ptr, m_out_ptr, l_out_ptr,
    B, d, gs_c, SPLIT, stride_s,
    NUM_D: tl.constexpr, BD: tl.constexpr, BB: tl.constexpr,
):
    """Combine SPLIT partial (m, l, acc) into mean (G, B, d) and the final (m, l) (G, B), m in
    float64.

    Grid: G * cdiv(B, BB).

    Partial results of split s start at row s * stride_s (stride_s = G * B).
    """
    pid = tl.program_id(0)
    nqb = tl.cdiv(B, BB)
    qb = pid % nqb
    g64 = (pid // nqb).to(tl.int64)
    offs_b = qb * BB + tl.arange(0, BB)
    mask_b = offs_b < B
    row = g64 * B + offs_b

    m_max = tl.full((BB,), float("-inf"), dtype=tl.float64)
    for s in range(SPLIT):
        m_max = tl.maximum(m_max, tl.load(m_ptr + s * stride_s + row, mask=mask_b,
                                          other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # only for padded rows
    l = tl.zeros((BB,), dtype=tl.float32)
    for s in range(SPLIT):
        m_s = tl.load(m_ptr + s * stride_s + row, mask=mask_b, other=float("-inf"))
        l += tl.load(l_ptr + s * stride_s + row, mask=mask_b, other=1.0) \
            * tl.exp((m_s - m_safe).to(tl.float32))
    tl.store(m_out_ptr + row, m_max, mask=mask_b)
    tl.store(l_out_ptr + row, l, mask=mask_b)
    l = tl.where(mask_b, l, 1.0)  # padded rows: keep the division finite

    c_g = c_ptr + g64 * gs_c
    for kc in range(NUM_D):
        offs_k = kc * BD + tl.arange(0, BD)
        mask_k = offs_k < d
        mask = mask_b[:, None] & mask_k[None, :]
        acc = tl.zeros((BB, BD), dtype=tl.float32)
        for s in range(SPLIT):
            m_s = tl.load(m_ptr + s * stride_s + row, mask=mask_b, other=float("-inf"))
            part = tl.load(acc_ptr + (s * stride_s + row)[:, None] * d + offs_k[None, :],
                           mask=mask, other=0.0)
            acc += part * tl.exp((m_s - m_safe).to(tl.float32))[:, None]
        out = acc / l[:, None] + as_float32(tl.load(c_g + offs_k, mask=mask_k, other=0.0))[None, :]
        tl.store(mean_ptr + row[:, None] * d + offs_k[None, :], out, mask=mask)


_KEY = ["d", "SPLIT", "HAS_BIAS", "FAST", "FINAL", "FORMS", "TOP_K", "NUM_D", "BD"]
_tuned: dict = {}


def _launcher(launch, fast, expansion):
    """The kernel with fixed blocks (interpreter, forced plans) or its autotuned wrapper.

    Launches with expanded queries get half the register budget: the expansion's float64 sums
    (and, with both forms, a second difference tile) made the (16, 32) tiles of 4 warps spill
    on sm_90 (Triton 3.9, benchmarks/triton_sass.py), the 8-warp ones not.
    """
    if launch.blocks is not None:
        return _forward_kernel, dict(launch.blocks)
    key = (fast, launch.block_d, launch.single_d, expansion)
    if key not in _tuned:
        configs = _config.autotune_configs(fast, launch.block_d, launch.single_d,
                                           budget=32 if expansion else 64)
        _tuned[key] = triton.autotune(configs=configs, key=_KEY)(_forward_kernel)
    return _tuned[key], {}


def forward(x, points, alpha, var, bias, precision="exact", plan=None, nearest=False):
    """nearest without a plan is not served here (the op plans every call that asks for it).

    (mean (G, B, d), lse (G, B), lse64 (G, B, float64), top_idx (G, B, K) int64,
    top_logit (G, B, K) float64) for float32 canonical inputs; points float32 or stored as
    uint8, float16 or bfloat16 (converted as the kernels read them).

    plan: the exact-mode plan (_exact.ExactPlan) or None (every query in the direct form, K = 0).
    The top K logits (true frame, as lse64) come from the kernels that compute exact logits;
    fast tiles report none (K = 0).
    """
    check_float32(x, alpha, var, bias, points=points)
    x, points, alpha, var, bias = (groupwise(t) for t in (x, points, alpha, var, bias))
    G, B, d = x.shape
    N = points.shape[1]
    launch = _config.plan("forward", G, B, N, d, precision == "fast", x.device)
    fast = precision == "fast" and not launch.few  # the few-query plan computes exact logits
    ex = exact_inputs(x, alpha, var, None if fast else plan)
    K = ex.top_k
    S = launch.split
    mean = new_output((G, B, d), x.dtype, x.device)
    m = new_output((G, B), torch.float64, x.device)
    l = new_output((G, B), x.dtype, x.device)
    top_v = new_output((S, G, B, K), torch.float64, x.device)
    top_i = new_output((S, G, B, K), torch.int32, x.device)
    # Centre of the accumulator: the points' mean (fast, also the expansion centre) or simply
    # each group's first point (exact; any point of the data is close enough; read in the
    # points' storage dtype).
    c, kq = centred_shift(x, points, alpha, var) if fast else (points, None)
    final = S == 1
    if final:
        acc, m_part, l_part = mean, m, l
    else:
        acc = new_output((S, G, B, d), x.dtype, x.device)
        m_part = new_output((S, G, B), torch.float64, x.device)
        l_part = new_output((S, G, B), x.dtype, x.device)

    form_set = forms(ex)
    kernel, meta = _launcher(launch, fast, bool(form_set & EXPANSION.value))
    grid = lambda META: (G * S * triton.cdiv(B, META["BB"]),)  # noqa: E731
    args = (
        x, points, alpha, var, x if bias is None else bias, c,
        ex.xq, ex.centre, ex.expand,
        acc, m_part, l_part, top_v if K else m_part, top_i if K else m_part,
        G, B, N, d,
        group_stride(x), group_stride(points), group_stride(alpha), group_stride(var),
        group_stride(bias), group_stride(c), group_stride(ex.xq), group_stride(ex.centre),
        S,
    )
    constexprs = dict(HAS_BIAS=bias is not None, FAST=fast, FINAL=final,
                      FORMS=form_set, TOP_K=K, KP=triton.next_power_of_2(max(1, K)),
                      NUM_D=launch.num_d, BD=launch.block_d, DOT=_config.FAST_DOT, **meta)
    _config.run_kernel(kernel, grid, args, constexprs, tuned_on=(d, S))
    if not final:
        bb = 16 if launch.block_d >= 64 else 32
        _merge_kernel[(G * triton.cdiv(B, bb),)](
            acc, m_part, l_part, c, mean, m, l,
            B, d, group_stride(c), S, G * B,
            NUM_D=launch.num_d, BD=launch.block_d, BB=bb,
        )
    # The shift the kernels' logits carry (see _common.py): per query for exact logits, kq for
    # the fast expansion.
    shift = kq.double() if fast else ex.shift
    lse64 = m + torch.log(l.double()) - shift
    top_idx, top_logit = merge_top(top_v, top_i, shift)
    return mean, lse64.float(), lse64, top_idx, top_logit
