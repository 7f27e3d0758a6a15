"""CUDA backend: the kernels of ``diffmem._cuda`` (csrc/cuda), called on raw device pointers.

Same contract as ``_reference.py`` over the canonical layout of ``_canonical.py``; float32
only, except that points may be stored as uint8, float16 or bfloat16 (the kernels convert each
value to float32 as they read it, csrc/cuda/points.cuh: the results are those of the points
converted to float32, bit for bit). The algorithms are the Triton backend's (exact: fp32 direct
differences with explicit FMA and chained sums; fast: the expansion around the points' mean, in
fp32 FMA on the CUDA cores), in hand-written 64 x 64 tiles; see csrc/cuda/tiles.cuh. The
kernels run on the current stream of the tensors' device. A build with DIFFMEM_CUDA_EMULATE=ON
runs the same kernel source on CPU tensors in a host emulator (slow; used to test the kernels
without a GPU).

Exact mode follows the plan of ``_exact.py`` (EXACT_PLAN): every kernel that computes exact
logits (the exact tiles, the few-query kernel, the exact backward) takes each query's form from
plan.expand (csrc/cuda/exact.cuh), the forward reports the plan.top_k largest logits per query
(each split its own lists, merged here) and the backward replaces the listed points' logits by
the corrected ones. The fast tile kernels keep their expansion and report no top logits (empty
lists).

With at most FEW_QUERIES queries per group the forward runs the few-query kernel
(csrc/cuda/few.cuh) instead of the 64-query tiles: it computes exact logits for both
precisions, since there the points' memory traffic, not arithmetic, sets the time. The tile
forward of precision="fast" can also run its dot products on the tensor cores (TF32 with the
3-product split, as Triton's tf32x3); that kernel is opt-in (DIFFMEM_CUDA_TENSOR_CORES=1, or
``force(tensor=True)``) until it has been checked on a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from types import SimpleNamespace

import torch

from ._alloc import new_output
from ._extension import cuda_reason
from ._gpu_common import (
    centred_shift,
    check_float32,
    first_rows,
    group_stride,
    groupwise,
    logit_shift,
    merge_knn_partials,
    reduce_partials,
    work_split,
)
from ._host import FEW_QUERIES, PRECISION_CODES, Pins, ptr

# Exact mode's per-query forms and top logits (see _exact.py): forward and backward take a plan.
EXACT_PLAN = True

_TILE = 64  # queries (or points) per block, csrc/cuda/tiles.cuh
# Forward kernels of csrc/cuda/launch.h.
_TILE_KERNEL, _FEW_KERNEL, _TENSOR_KERNEL = 0, 1, 2
_loaded: list = []
# Pinned by tests to reach every kernel and the split-and-merge paths on small shapes: the split
# of the points (forward, knn, query gradients) or of the queries (point gradients), whether the
# forward uses the few-query kernel, and whether the fast tile forward uses the tensor cores.
_forced = Pins({"split", "split_b", "few", "tensor"})
force = _forced.force


def takes_plan(precision: str, B: int, d: int) -> bool:
    """Every call takes exact mode's plan; the fast tile kernels report empty top lists."""
    return True


def _split(key: str, programs: int, stream_len: int, rows: int, d: int, device, **limits) -> int:
    return _forced.get(key) or work_split(programs, stream_len, rows, d, device, **limits)


def _tensor_cores() -> bool:
    """Whether the fast tile forward runs on the tensor cores: force(tensor=...), else the
    environment variable DIFFMEM_CUDA_TENSOR_CORES=1 (opt-in while unverified on a GPU)."""
    return bool(_forced.get("tensor", os.environ.get("DIFFMEM_CUDA_TENSOR_CORES") == "1"))


def _few_queries(B: int, d: int) -> bool:
    """Whether the forward takes the few-query kernel (pinned by force(few=...))."""
    max_d = _module()[2]["few_max_d"]
    few = _forced.get("few", B <= FEW_QUERIES and d <= max_d)
    if few and d > max_d:
        raise ValueError(f"the cuda few-query forward supports d <= {max_d}, got d = {d}")
    return few


def _module():
    """(module or None, reason why not, module.info()), loaded once and cached: the registry
    probes it at import, so calls under torch.compile see plain Python values."""
    if not _loaded:
        try:
            ext = importlib.import_module("diffmem._cuda")
            _loaded.append((ext, "", dict(ext.info())))
        except ImportError as exc:
            reason = cuda_reason() or f"diffmem._cuda could not be imported ({exc})"
            _loaded.append((None, reason, {}))
    return _loaded[0]


def emulated() -> bool:
    """True when diffmem._cuda is the host-emulator build (it then runs on CPU tensors)."""
    ext, _, info = _module()
    return ext is not None and bool(info["emulated"])


def status() -> tuple[bool, str]:
    """(True, "") when the kernels can run: a built module and a CUDA device (or the emulator)."""
    ext, reason, info = _module()
    if ext is None:
        return False, reason
    if info["emulated"] or info["devices"] > 0:
        return True, ""
    return False, f"diffmem._cuda is built but no CUDA device can be used ({info['reason']})"


def devices() -> tuple[str, ...]:
    return ("cpu",) if emulated() else ("cuda",)


def _ext():
    ext, reason, _ = _module()
    if ext is None:
        raise RuntimeError(f"the cuda backend is unavailable: {reason}")
    return ext


@contextlib.contextmanager
def _launch_context(t: torch.Tensor):
    """Make t's device current and yield the handle of its current stream (0 on the CPU)."""
    if t.device.type != "cuda":
        yield 0
        return
    with torch.cuda.device(t.device):
        yield torch.cuda.current_stream(t.device).cuda_stream


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _problem(fast, x, points, alpha, var, bias, c, expand) -> tuple:
    """The leading arguments of every kernel entry point (see csrc/cuda/module.cpp)."""
    G, B, d = x.shape
    N = points.shape[1]
    args = [PRECISION_CODES["fast" if fast else "exact"], G, B, N, d]
    for t in (x, points, alpha, var, bias, c, expand):
        args += [ptr(t), group_stride(t)]
    return (*args, _dtype_name(points))


def _blocks(rows: int) -> int:
    return -(-rows // _TILE)


def exact_shift(x, alpha, var, centre, expand) -> torch.Tensor:
    """What the exact kernels' internal logits carry on top of the true ones, per query (G, B)
    float64: d / 2 in the direct form, |x'|^2 / (2 var) with x' = float32(x - alpha c) in the
    expansion form (csrc/cuda/exact.cuh)."""
    d = x.shape[-1]
    direct = torch.full(x.shape[:2], 0.5 * d, dtype=torch.float64, device=x.device)
    if expand is None:
        return direct
    a = alpha.double()[..., None]
    xp = (x.double() - a * centre.double()[:, None, :]).float().double()
    expansion = (xp * xp).sum(-1) / (2.0 * var.double())
    return torch.where(expand.bool(), expansion, direct)


def _prepare(x, points, alpha, var, bias, precision, plan=None):
    """Checks the inputs and returns a namespace: the kernels' leading arguments (problem, with
    group-contiguous inputs, the centre rows and the plan's forms), the tensors behind them, the
    dropped per-query constant (shift, float64 (G, B)), the sizes G, B, N, d, the device and x.
    plan: exact mode's plan (precision "exact" only), or None (every query in the direct form).
    points: float32 or stored as uint8, float16 or bfloat16; the centre rows are float32."""
    check_float32(x, alpha, var, bias, backend="cuda", points=points)
    x, points, alpha, var, bias = (groupwise(t) for t in (x, points, alpha, var, bias))
    fast = precision == "fast"
    G, B, d = x.shape
    expand = None
    # Centre: the expansion centre for "fast", the plan's with a plan, else each group's first
    # point (the accumulator's and q's reference only).
    if fast:
        c, kq = centred_shift(x, points, alpha, var)
        shift = logit_shift(True, d, kq)
    elif plan is not None:
        check_float32(plan.centre, backend="cuda")
        c = groupwise(plan.centre.to(x.device))
        expand = plan.expand.to(device=x.device, dtype=torch.uint8).contiguous()
        if c.shape != (G, d) or expand.shape != (G, B):
            raise ValueError(f"exact plan of shapes {tuple(c.shape)}, {tuple(expand.shape)} "
                             f"for {G} groups of {B} queries in d = {d}")
        shift = exact_shift(x, alpha, var, c, expand)
    else:
        c = first_rows(points)
        shift = exact_shift(x, alpha, var, None, None)
    # problem holds raw pointers: `tensors` keeps what they point to (copies made by groupwise,
    # the centre rows, the forms) alive until the kernels have been launched.
    return SimpleNamespace(x=x, shift=shift, fast=fast, G=G, B=B, N=points.shape[1], d=d,
                           dev=x.device,
                           problem=_problem(fast, x, points, alpha, var, bias, c, expand),
                           tensors=(x, points, alpha, var, bias, c, expand))


def _merge_top(val: torch.Tensor, idx: torch.Tensor, k: int):
    """(split, G, B, k) per-split top lists -> the k largest (G, B, k) over all splits."""
    S, G, B, _ = val.shape
    if S == 1:
        return val[0], idx[0]
    val = val.permute(1, 2, 0, 3).reshape(G, B, S * k)
    idx = idx.permute(1, 2, 0, 3).reshape(G, B, S * k)
    val, order = val.topk(k, dim=-1)
    return val, torch.gather(idx, -1, order)


def forward(x, points, alpha, var, bias, precision="exact", plan=None, nearest=False):
    """nearest without a plan is not served here (the op plans every call that asks for it).

    mean (G, B, d), lse (G, B) and lse64 (G, B, float64) for float32 canonical inputs.

    With exact mode's plan (_exact.py) also top_idx (G, B, K) int64 and top_logit (G, B, K)
    float64, the K = plan.top_k largest logits per query in lse64's frame (-1 and -inf in empty
    slots); every slot is empty from the fast tile kernels, whose logits are no exact ones.
    """
    ext = _ext()
    G, B, d = x.shape
    few = _few_queries(B, d)
    # The few-query kernel's logits are exact whatever the precision asked for.
    exact = few or precision == "exact"
    use_plan = plan is not None and exact
    top_k = plan.top_k if use_plan else 0
    if use_plan and top_k != _module()[2]["top_k"]:
        raise ValueError(f"the cuda kernels report {_module()[2]['top_k']} top logits, "
                         f"the plan asks for {top_k}")
    prep = _prepare(x, points, alpha, var, bias, "exact" if exact else "fast",
                    plan if use_plan else None)
    N, dev = prep.N, prep.dev
    if few:  # small blocks (few registers, no tiles): aim at more of them per multiprocessor
        programs = G * -(-B // _module()[2]["few_queries"])
        split = _split("split", programs, N, B, d, dev, blocks_per_sm=4, min_items=256)
    else:
        split = _split("split", G * _blocks(B), N, B, d, dev)
    mean = new_output((G, B, d), torch.float32, dev)
    m = new_output((G, B), torch.float32, dev)
    l = new_output((G, B), torch.float32, dev)
    acc = m_part = l_part = top_val = top_idx = None
    if split > 1:
        acc = new_output((split, G, B, d), torch.float32, dev)
        m_part = new_output((split, G, B), torch.float32, dev)
        l_part = new_output((split, G, B), torch.float32, dev)
    if top_k:
        top_val = new_output((split, G, B, top_k), torch.float64, dev)
        top_idx = new_output((split, G, B, top_k), torch.int64, dev)
    kernel = _FEW_KERNEL if few else _TILE_KERNEL
    if prep.fast and _tensor_cores():
        kernel = _TENSOR_KERNEL
    with _launch_context(prep.x) as stream:
        ext.forward(*prep.problem, split, kernel, ptr(acc), ptr(m_part), ptr(l_part), ptr(mean),
                    ptr(m), ptr(l), ptr(top_val), ptr(top_idx), stream)
    lse64 = m.double() + torch.log(l.double()) - prep.shift
    if plan is None:
        return mean, lse64.float(), lse64
    if top_k:
        top_val, top_idx = _merge_top(top_val, top_idx, top_k)
        top_logit = top_val - prep.shift[..., None]
    else:  # fast tiles: every slot empty, the shape the op's fake kernel gives (K = plan.top_k)
        top_logit = torch.full((G, B, plan.top_k), -math.inf, dtype=torch.float64, device=dev)
        top_idx = torch.full((G, B, plan.top_k), -1, dtype=torch.int64, device=dev)
    return mean, lse64.float(), lse64, top_idx, top_logit


def backward(x, points, alpha, var, bias, mean, lse64, grad_mean, grad_lse, needs,
             precision="exact", plan=None, top_idx=None, top_logit=None):
    """(dx, dpoints, dalpha, dvar, dbias) in canonical shapes; None where needs[i] is False.

    ``mean`` is not used: the kernels recompute the weights from lse64 (see backward.cuh).
    Exact mode with a plan: each query's logits in its form, the listed points' (top_idx >= 0)
    replaced by top_logit (lse64's frame), the forward's corrected logits, and q = g . (y - c)
    taken relative to the listed point with the largest logit. precision "fast" recomputes its
    expansion logits and takes none of these.
    """
    ext = _ext()
    fast = precision == "fast"
    prep = _prepare(x, points, alpha, var, bias, precision, None if fast else plan)
    G, B, N, d, dev = prep.G, prep.B, prep.N, prep.d, prep.dev
    f32 = torch.float32
    needs = tuple(bool(n) for n in needs)
    shapes = ((G, B, d), (G, N, d), (G, B), (G, B), (G, N))
    if grad_mean is None and grad_lse is None:
        return tuple(new_output(s, f32, dev).zero_() if need else None
                     for s, need in zip(shapes, needs))
    gm = None if grad_mean is None else grad_mean.contiguous()
    # the lse the kernels' logits carry: float32 for fast, float64 for exact
    lse_int = lse64.double() + prep.shift
    lse_s = lse_int.float().contiguous() if fast else None
    lse_d = None if fast else lse_int.contiguous()
    t_idx = t_val = None
    k = 0
    if not fast and plan is not None and top_idx is not None and top_idx.shape[-1] > 0:
        k = top_idx.shape[-1]
        t_idx = top_idx.to(torch.int64).contiguous()
        t_val = (top_logit.double() + prep.shift[..., None]).contiguous()
    problem = prep.problem
    out = [None] * 5
    kappa = None
    with _launch_context(prep.x) as stream:
        if gm is not None and k:
            # q is taken relative to the query's heaviest point (csrc/cuda/backward.cuh)
            best_logit, best = top_logit.max(-1, keepdim=True)
            ref = torch.gather(t_idx, -1, best)[..., 0]
            ref = ref.masked_fill(~torch.isfinite(best_logit[..., 0]), -1).contiguous()
            kappa = new_output((G, B), f32, dev)
            ext.backward_kappa(*problem, ptr(gm), ptr(ref), ptr(kappa), stream)
        split = _split("split", G * _blocks(B), N, B, d, dev)
        z_p = new_output((split, G, B), f32, dev)
        eq_p = new_output((split, G, B), f32, dev)
        ext.backward_stats(*problem, ptr(lse_s), ptr(lse_d), 0, 0, ptr(gm), ptr(kappa),
                           ptr(t_idx), ptr(t_val), k, split, ptr(z_p), ptr(eq_p), stream)
        z = reduce_partials(z_p)
        r = -reduce_partials(eq_p) / z
        if grad_lse is not None:
            r = r + grad_lse
        z, r = z.contiguous(), r.contiguous()
        rows = (ptr(lse_s), ptr(lse_d), ptr(z), ptr(r), ptr(gm), ptr(kappa), ptr(t_idx),
                ptr(t_val), k)

        if needs[0] or needs[2] or needs[3]:
            parts = [new_output((split, *shapes[i]), f32, dev) if needs[i] else None
                     for i in (0, 2, 3)]
            ext.backward_query(*problem, *rows, split, *(ptr(t) for t in parts), stream)
            for i, t in zip((0, 2, 3), parts):
                out[i] = None if t is None else reduce_partials(t)

        if needs[1] or needs[4]:
            split_b = _split("split_b", G * _blocks(N), B, N, d, dev)
            parts = [new_output((split_b, *shapes[i]), f32, dev) if needs[i] else None
                     for i in (1, 4)]
            ext.backward_point(*problem, *rows, split_b, *(ptr(t) for t in parts), stream)
            for i, t in zip((1, 4), parts):
                out[i] = None if t is None else reduce_partials(t)
    return tuple(out)


def knn(queries, points, k):
    """Distances (G, B, k) ascending and int64 indices (G, B, k); ties to the lower index.
    Points float32 or stored as uint8, float16 or bfloat16."""
    ext = _ext()
    check_float32(queries, backend="cuda", points=points)
    max_k = _module()[2]["knn_max_k"]
    if k > max_k:
        raise ValueError(f"the cuda backend's knn supports k <= {max_k}, got k = {k}")
    queries, points = groupwise(queries), groupwise(points)
    G, B, d = queries.shape
    N = points.shape[1]
    dev = queries.device
    split = _split("split", G * _blocks(B), N, B, d, dev)
    dist = new_output((split, G, B, k), queries.dtype, dev)
    idx = new_output((split, G, B, k), torch.int64, dev)
    with _launch_context(queries) as stream:
        ext.knn(G, B, N, d, k, ptr(queries), group_stride(queries), ptr(points),
                group_stride(points), _dtype_name(points), split, split == 1, ptr(dist),
                ptr(idx), stream)
    return merge_knn_partials(dist, idx, k)
