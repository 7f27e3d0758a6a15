"""CPU backend: the C++ kernels of ``diffmem._C`` (OpenMP, vectorized, never B x N).

The extension takes raw pointers and element strides; this module passes them from tensors in
the canonical layout of ``_canonical.py`` (group stride 0 = shared by all groups).
"""

from __future__ import annotations

import torch

from ._alloc import new_output
from ._canonical import check_finite
from ._extension import load_cpu_extension
from ._host import PRECISION_CODES, group_stride, groupwise, ptr

# Below this many queries per group "fast" is slower than "exact" here (measured on a Zen 5 core,
# d = 30 .. 3072: centring the points costs more than the cheaper logits save; 1.4-2.2x slower
# at B = 1, even at B = 64), so such calls run the exact kernels: more accurate and faster.
FAST_MIN_QUERIES = 64


def takes_plan(precision: str, B: int, d: int) -> bool:
    """Whether a call runs the exact kernels (precision="exact", or "fast" with few queries),
    which take exact mode's plan; the fast kernels take none."""
    return precision == "exact" or B < FAST_MIN_QUERIES


def _precision_code(precision: str, B: int) -> int:
    return PRECISION_CODES["exact" if takes_plan(precision, B, 0) else precision]


def _problem(*tensors) -> list[int]:
    """Pointer and group stride of each canonical input, as the kernels take them."""
    return [v for t in tensors for v in (ptr(t), group_stride(t))]


def _threads() -> int:
    return max(1, torch.get_num_threads())


# The float32 kernels take exact mode's plan (see _exact.py) and correct their top logits
# themselves, in float64, before forming mean and lse.
EXACT_PLAN = True
CORRECTS_TOP_K = True
# The float32 forward checks every point for NaN/Inf as it reads it (check_points=True), so
# softmax_mean need not scan the points first.
CHECKS_POINTS = True


def _plan_args(plan) -> tuple:
    """(centre, expand, top_k) for the kernel: the plan (the exact kernels run), or none."""
    if plan is None:
        return None, None, 0
    return groupwise(plan.centre), plan.expand.contiguous(), plan.top_k


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def forward(x, points, alpha, var, bias, precision="exact", plan=None, nearest=False,
            check_points=False):
    """mean, lse, lse64; with a plan also top_idx (G, B, K) and top_logit (G, B, K) (K = 0 when
    the fast kernels run); with nearest and no plan (float64) the top list of K = 1.
    check_points: ValueError if the points hold NaN or Inf (float32 calls: the kernels flag
    what they read, and only a flagged call scans the points to name the problem)."""
    ext = load_cpu_extension()
    x, points, alpha, var, bias = (groupwise(t) for t in (x, points, alpha, var, bias))
    G, B, d = x.shape
    N = points.shape[1]
    code = _precision_code(precision, B)
    centre, expand, K = _plan_args(plan)
    if nearest and plan is None:
        if x.dtype != torch.float64:
            raise ValueError("the float32 kernels report the nearest point with a plan only")
        K = 1
    mean = new_output((G, B, d), x.dtype)
    lse = new_output((G, B), x.dtype)
    lse64 = new_output((G, B), torch.float64)
    top_idx = new_output((G, B, K), torch.int64)
    top_logit = new_output((G, B, K), torch.float64)
    if check_points and x.dtype != torch.float32:
        check_finite("points", points)
    flag = torch.zeros(1, dtype=torch.uint8) if check_points and x.dtype == torch.float32 else None
    ext.softmax_mean_forward(
        _dtype_name(x), code, _threads(), G, B, N, d,
        *_problem(x, points, alpha, var, bias), ptr(mean), ptr(lse), ptr(lse64),
        ptr(centre), group_stride(centre), ptr(expand), K, ptr(top_idx) if K else 0,
        ptr(top_logit) if K else 0, points_dtype=_dtype_name(points), points_bad=ptr(flag),
    )
    if flag is not None and flag.item():
        check_finite("points", points)
    if plan is None and not nearest:
        return mean, lse, lse64
    return mean, lse, lse64, top_idx, top_logit


def backward(x, points, alpha, var, bias, mean, lse64, grad_mean, grad_lse, needs,
             precision="exact", plan=None, top_idx=None, top_logit=None):
    """``mean`` and ``lse64`` are the forward's outputs (mean in the input dtype, dense (G, B, d);
    lse64 float64, dense (G, B)): the kernel recomputes the weights from lse64 in one pass."""
    ext = load_cpu_extension()
    x, points, alpha, var, bias = (groupwise(t) for t in (x, points, alpha, var, bias))
    mean = mean.to(x.dtype).contiguous()
    lse64 = lse64.to(torch.float64).contiguous()
    grad_mean = None if grad_mean is None else grad_mean.contiguous()
    grad_lse = None if grad_lse is None else grad_lse.contiguous()
    G, B, d = x.shape
    N = points.shape[1]
    shapes = ((G, B, d), (G, N, d), (G, B), (G, B), (G, N))
    out = [new_output(s, x.dtype) if need else None for s, need in zip(shapes, needs)]
    code = _precision_code(precision, B)
    _, expand, K = _plan_args(plan)
    if K:
        top_idx = top_idx.contiguous()
        top_logit = top_logit.to(torch.float64).contiguous()
    ext.softmax_mean_backward(
        _dtype_name(x), code, _threads(), G, B, N, d,
        *_problem(x, points, alpha, var, bias), ptr(mean), ptr(lse64), ptr(grad_mean),
        ptr(grad_lse),
        *(ptr(t) for t in out), ptr(expand), K, ptr(top_idx) if K else 0,
        ptr(top_logit) if K else 0, points_dtype=_dtype_name(points),
    )
    return tuple(out)


def knn(queries, points, k):
    ext = load_cpu_extension()
    queries, points = groupwise(queries), groupwise(points)
    G, B, d = queries.shape
    N = points.shape[1]
    dist = new_output((G, B, k), queries.dtype)
    idx = new_output((G, B, k), torch.int64)
    ext.knn(
        _dtype_name(queries), _threads(), G, B, N, d, k,
        ptr(queries), group_stride(queries), ptr(points), group_stride(points), ptr(dist), ptr(idx),
        points_dtype=_dtype_name(points),
    )
    return dist, idx
