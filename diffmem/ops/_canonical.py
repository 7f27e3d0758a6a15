"""Input checking and broadcasting into the canonical layout every backend receives.

Canonical layout (G independent problems):
    x      (G, B, d)     queries
    points (G, N, d)     points
    alpha  (G, B)        per-query scale of the points
    var    (G, B)        per-query variance (> 0)
    bias   (G, N) | None per-point log-weight (-inf masks a point)

Every tensor is contiguous within one group; the group dimension may have stride 0 (one
copy shared by all groups), so broadcasting never copies the points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64)
# Storage formats points may have with float32 queries: computed exactly as if converted to
# float32 first, reading a quarter (uint8) or half (float16, bfloat16) of the bytes.
COMPACT_POINT_DTYPES = (torch.uint8, torch.float16, torch.bfloat16)


@dataclass
class Canonical:
    """Validated inputs in canonical layout, plus the shapes needed to restore the outputs."""

    x: torch.Tensor
    points: torch.Tensor
    alpha: torch.Tensor
    var: torch.Tensor
    bias: torch.Tensor | None
    batch_shape: tuple[int, ...]
    # True when all groups share points and bias, so the caller folded G into B.
    folded: bool
    # True when the points' NaN/Inf scan was left to the kernels (see canonicalize).
    points_unchecked: bool = False


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {t.dtype}")
    return t


def _check_points(name: str, points: object, x: torch.Tensor, x_name: str) -> torch.Tensor:
    """points: x's dtype, or with float32 x one of the compact storage dtypes; x's device."""
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(points).__name__}")
    compact = x.dtype == torch.float32 and points.dtype in COMPACT_POINT_DTYPES
    if points.dtype != x.dtype and not compact:
        raise TypeError(
            f"{name} has dtype {points.dtype} but {x_name} has dtype {x.dtype}; {name} must have "
            f"the dtype of {x_name} or, with float32 {x_name}, a storage dtype (uint8, float16, "
            "bfloat16)")
    if points.device != x.device:
        raise ValueError(f"{name} is on {points.device} but {x_name} is on {x.device}")
    return points


def _as_param(name: str, value: object, like: torch.Tensor) -> torch.Tensor:
    """alpha / var / bias: a Python number or a tensor of x's dtype and device."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.dtype != like.dtype:
            raise TypeError(
                f"{name} has dtype {value.dtype} but x has dtype {like.dtype}; they must match"
            )
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but x is on {like.device}")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _broadcast_pair(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of two shapes, None when they do not broadcast (plain Python: called on
    every softmax_mean, where torch.broadcast_shapes costs more than small kernels)."""
    if a == b or not b:
        return a
    if not a:
        return b
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + b
    out = []
    for m, n in zip(a, b):
        if m != n and m != 1 and n != 1:
            return None
        out.append(n if m == 1 else m)
    return tuple(out)


def _broadcast(name_shapes: list[tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    shape: tuple[int, ...] = ()
    for name, s in name_shapes:
        shape = _broadcast_pair(shape, tuple(s))
        if shape is None:
            others = ", ".join(f"{n} {tuple(t)}" for n, t in name_shapes)
            raise ValueError(
                f"leading (batch) dimensions of {name} {tuple(s)} do not broadcast with the "
                f"others ({others})"
            ) from None
    return shape


def _to_groups(t: torch.Tensor, batch_shape: tuple[int, ...],
               tail: tuple[int, ...]) -> torch.Tensor:
    """Broadcast t to batch_shape + tail and view it as (G, *tail).

    When t has no batch dimensions of its own, the result shares one contiguous copy across
    groups (stride 0 along G); otherwise it is a dense contiguous tensor.
    """
    G = math.prod(batch_shape)
    if t.dim() < len(tail):
        t = t.reshape((1,) * (len(tail) - t.dim()) + tuple(t.shape))
    n_lead = t.dim() - len(tail)
    if math.prod(t.shape[:n_lead]) == 1:
        one = t.reshape(t.shape[n_lead:]).expand(tail).contiguous()
        return one.unsqueeze(0).expand(G, *tail)
    return t.expand(*batch_shape, *tail).reshape(G, *tail).contiguous()


def _extremes(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of t in one pass without temporaries; NaN anywhere makes both NaN.

    An empty tensor gives (1.0, 1.0), which passes every check.
    """
    if t.numel() == 0:
        return 1.0, 1.0
    lo, hi = torch.aminmax(t.detach())
    return float(lo), float(hi)


def check_finite(name: str, t: torch.Tensor) -> None:
    """ValueError naming ``name`` if t holds NaN or Inf values."""
    if not t.is_floating_point():
        return  # integer codes are always finite
    lo, hi = _extremes(t)
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{name} contains NaN values; it must be finite")
    if math.isinf(lo) or math.isinf(hi):
        raise ValueError(f"{name} contains Inf values; it must be finite")


def _check_values(values, var: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The value checks of canonicalize, eagerly (ValueError naming the argument)."""
    for name, t in values:
        check_finite(name, t)
    if _extremes(var)[0] <= 0:
        raise ValueError("var must be > 0 everywhere (it is a noise variance), got a value <= 0")
    if bias is not None:
        hi = _extremes(bias)[1]
        if math.isnan(hi) or hi == math.inf:
            raise ValueError("bias contains NaN or +Inf; only finite values and -inf are allowed")
        if bool((bias == -math.inf).all(dim=-1).any()):
            raise ValueError("bias masks out every point (all -inf) in at least one problem")


def _assert_finite_traced(values) -> None:
    for name, t in values:
        if t.is_floating_point():
            torch._assert_async(torch.isfinite(t).all(),
                                f"{name} contains NaN or Inf values; it must be finite")


def _assert_values_traced(values, var: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The same checks as graph operations (torch.compile traces them instead of breaking the
    graph on a read of values); a failure raises RuntimeError with the same message."""
    _assert_finite_traced(values)
    torch._assert_async((var > 0).all(),
                        "var must be > 0 everywhere (it is a noise variance), got a value <= 0")
    if bias is not None:
        torch._assert_async(~(torch.isnan(bias) | (bias == math.inf)).any(),
                            "bias contains NaN or +Inf; only finite values and -inf are allowed")
        torch._assert_async(~(bias == -math.inf).all(dim=-1).any(),
                            "bias masks out every point (all -inf) in at least one problem")


def canonicalize(
    x: torch.Tensor,
    points: torch.Tensor,
    alpha: object,
    var: object,
    bias: torch.Tensor | None,
    check_inputs: bool = True,
    kernels_check_points: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
) -> Canonical:
    """Validate softmax_mean inputs and bring them into canonical layout (see module doc).

    kernels_check_points(x, points), called on validated x and points when check_inputs is set:
    True leaves the points' NaN/Inf scan to the kernels that run the call (they check each
    point as they read it; a second pass over large point sets would cost as much as the
    call), and the result says so (points_unchecked).
    """
    x = _check_tensor("x", x)
    points = _check_points("points", points, x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., B, d), got {tuple(x.shape)}")
    if points.dim() < 2:
        raise ValueError(f"points must have shape (..., N, d), got {tuple(points.shape)}")
    B, d = x.shape[-2], x.shape[-1]
    N = points.shape[-2]
    if points.shape[-1] != d:
        raise ValueError(
            f"points has feature dimension {points.shape[-1]} but x has {d} "
            f"(x {tuple(x.shape)}, points {tuple(points.shape)})"
        )
    if d == 0:
        raise ValueError("x and points have feature dimension d = 0; d must be at least 1")
    if N == 0:
        raise ValueError("points is empty (N = 0); at least one point is needed")

    alpha_t = _as_param("alpha", alpha, x)
    var_t = _as_param("var", var, x)
    for name, p in (("alpha", alpha_t), ("var", var_t)):
        if p.dim() >= 1 and p.shape[-1] not in (1, B):
            raise ValueError(
                f"{name} must broadcast to (..., B) with B = {B}, got shape {tuple(p.shape)}"
            )
    if bias is not None:
        bias = _check_tensor("bias", bias)
        if bias.dtype != x.dtype:
            raise TypeError(
                f"bias has dtype {bias.dtype} but x has dtype {x.dtype}; they must match")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if bias.dim() < 1 or bias.shape[-1] not in (1, N):
            raise ValueError(f"bias must have shape (..., N) with N = {N}, got {tuple(bias.shape)}")

    def lead(p: torch.Tensor) -> tuple[int, ...]:
        return tuple(p.shape[:-1]) if p.dim() >= 1 else ()

    shapes = [("x", tuple(x.shape[:-2])), ("points", tuple(points.shape[:-2])),
              ("alpha", lead(alpha_t)), ("var", lead(var_t))]
    if bias is not None:
        shapes.append(("bias", lead(bias)))
    batch_shape = _broadcast(shapes)

    points_unchecked = False
    if check_inputs and x.device.type != "meta":  # meta tensors carry no values
        points_unchecked = kernels_check_points is not None and kernels_check_points(x, points)
        values = [("x", x), ("alpha", alpha_t), ("var", var_t)]
        if not points_unchecked:
            values.insert(1, ("points", points))
        if torch.compiler.is_compiling():
            _assert_values_traced(values, var_t, bias)
        else:
            _check_values(values, var_t, bias)

    points_shared = math.prod(points.shape[:-2]) == 1
    bias_shared = bias is None or math.prod(lead(bias)) == 1
    G = math.prod(batch_shape)
    folded = G > 1 and points_shared and bias_shared
    if folded:
        # All groups use the same points: one problem with G*B queries.
        xs = _to_groups(x, batch_shape, (B, d)).reshape(1, G * B, d)
        a = _to_groups(alpha_t, batch_shape, (B,)).reshape(1, G * B)
        v = _to_groups(var_t, batch_shape, (B,)).reshape(1, G * B)
        ps = _to_groups(points, (1,), (N, d))
        bs = None if bias is None else _to_groups(bias, (1,), (N,))
        return Canonical(xs, ps, a, v, bs, batch_shape, True, points_unchecked)

    xs = _to_groups(x, batch_shape, (B, d))
    ps = _to_groups(points, batch_shape, (N, d))
    a = _to_groups(alpha_t, batch_shape, (B,))
    v = _to_groups(var_t, batch_shape, (B,))
    bs = None if bias is None else _to_groups(bias, batch_shape, (N,))
    return Canonical(xs, ps, a, v, bs, batch_shape, False, points_unchecked)


def check_knn_inputs(queries: torch.Tensor, points: torch.Tensor, k: int) -> None:
    """Validate knn inputs (shapes, dtypes, devices, finiteness, 1 <= k <= N)."""
    queries = _check_tensor("queries", queries)
    points = _check_points("points", points, queries, "queries")
    if queries.dim() < 2 or points.dim() < 2:
        raise ValueError(
            f"queries must be (..., B, d) and points (..., N, d), got {tuple(queries.shape)} "
            f"and {tuple(points.shape)}"
        )
    if points.shape[-1] != queries.shape[-1]:
        raise ValueError(
            f"points has feature dimension {points.shape[-1]} but queries has {queries.shape[-1]}"
        )
    if queries.shape[-1] == 0:
        raise ValueError("feature dimension d = 0; d must be at least 1")
    if points.shape[-2] == 0:
        raise ValueError("points is empty (N = 0); at least one point is needed")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1 or k > points.shape[-2]:
        raise ValueError(f"k must satisfy 1 <= k <= N = {points.shape[-2]}, got k = {k}")
    if queries.device.type == "meta":
        return
    values = [("queries", queries), ("points", points)]
    if torch.compiler.is_compiling():
        _assert_finite_traced(values)
    else:
        for name, t in values:
            check_finite(name, t)
