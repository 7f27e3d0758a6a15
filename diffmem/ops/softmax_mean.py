"""The softmax-weighted mean over points: the primitive under every denoiser in diffmem.

    logit[b, i] = bias[i] - ||x[b] - alpha[b] * y[i]||^2 / (2 var[b])
    mean[b]     = sum_i softmax(logit[b])_i * y[i]
    lse[b]      = logsumexp_i logit[b, i]

Registered as the custom ops ``diffmem::softmax_mean`` (forward) and
``diffmem::softmax_mean_backward``, with fake kernels and autograd, so it works with
torch.compile and passes torch.library.opcheck.
"""

from __future__ import annotations

import torch

from . import _backends, _exact
from ._canonical import canonicalize

PRECISIONS = ("exact", "fast")


@torch.library.custom_op("diffmem::softmax_mean", mutates_args=())
def _softmax_mean_op(
    x: torch.Tensor,
    points: torch.Tensor,
    alpha: torch.Tensor,
    var: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Canonical layout in (see _canonical.py); dense mean (G, B, d), lse (G, B), lse64, the
    exact top logits and exact mode's plan out.

    lse64 (G, B) is lse in float64, kept for the backward (weights recomputed from a rounded
    lse would not sum to one when |lse| is large). top_idx (G, B, K) int64 and top_logit
    (G, B, K) float64 are the points with the largest logits and their exact values (K = 0 when
    the backend needs no correction; see _exact.py); expand (G, B) uint8 and centre (1 or G, d)
    are the plan (empty without one). All are kept for the backward, which reuses the plan.
    """
    mod = _backends.module(_backends.resolve(backend, x.device, x.dtype))
    plan = _plan(mod, x, points, alpha, var, precision)
    if plan is None:
        mean, lse, lse64, *_ = mod.forward(x, points, alpha, var, bias, precision)
        empty = lse64.new_empty((*lse64.shape, 0))
        return (mean, lse, lse64, empty.long(), empty, x.new_empty(0, dtype=torch.uint8),
                x.new_empty(0))
    mean, lse, lse64, top_idx, top_logit = mod.forward(x, points, alpha, var, bias, precision, plan)
    if not getattr(mod, "CORRECTS_TOP_K", False):
        mean, lse, lse64, top_logit = _exact.correct_forward(
            x, points, alpha, var, bias, mean, lse64, top_idx, top_logit)
    return mean, lse, lse64, top_idx, top_logit, plan.expand, _exact.centre_rows(plan)


def _plan_free(mod, x, precision) -> bool:
    """Whether the call runs without an exact-mode plan: float64, a backend without plans, or
    kernels that take none (the backend's ``takes_plan(precision, B, d)``)."""
    if not getattr(mod, "EXACT_PLAN", False) or x.dtype != torch.float32:
        return True
    return not mod.takes_plan(precision, x.shape[1], x.shape[2])


def _plan(mod, x, points, alpha, var, precision):
    """The exact-mode plan where the call's kernels take one (see _plan_free), else None."""
    return None if _plan_free(mod, x, precision) else _exact.make_plan(x, points, alpha, var)


@_softmax_mean_op.register_fake
def _(x, points, alpha, var, bias, backend, precision):
    G, B, d = x.shape
    mod = _backends.module(_backends.resolve(backend, x.device, x.dtype))
    planned = not _plan_free(mod, x, precision)
    K = _exact.TOP_K if planned else 0
    Gc = 1 if _exact.shares_points(points) else G
    return (x.new_empty((G, B, d)), x.new_empty((G, B)), x.new_empty((G, B), dtype=torch.float64),
            x.new_empty((G, B, K), dtype=torch.int64), x.new_empty((G, B, K), dtype=torch.float64),
            x.new_empty((G, B) if planned else (0,), dtype=torch.uint8),
            x.new_empty((Gc, d) if planned else (0,)))


@torch.library.custom_op("diffmem::softmax_mean_backward", mutates_args=())
def _softmax_mean_backward_op(
    x: torch.Tensor,
    points: torch.Tensor,
    alpha: torch.Tensor,
    var: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    lse64: torch.Tensor,
    top_idx: torch.Tensor,
    top_logit: torch.Tensor,
    expand: torch.Tensor,
    centre: torch.Tensor,
    grad_mean: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    needs: list[bool],
    backend: str,
    precision: str,
) -> list[torch.Tensor]:
    """Gradients w.r.t. (x, points, alpha, var, bias); an empty tensor where not needed."""
    mod = _backends.module(_backends.resolve(backend, x.device, x.dtype))
    plan = None if _plan_free(mod, x, precision) else _exact.plan_from(expand, centre)
    extra = () if plan is None else (plan, top_idx, top_logit)
    grads = mod.backward(
        x, points, alpha, var, bias, mean, lse64, grad_mean, grad_lse, tuple(needs), precision,
        *extra,
    )
    return [x.new_empty(0) if g is None else g for g in grads]


@_softmax_mean_backward_op.register_fake
def _(x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand, centre, grad_mean,
      grad_lse, needs, backend, precision):
    G, B, d = x.shape
    N = points.shape[1]
    shapes = ((G, B, d), (G, N, d), (G, B), (G, B), (G, N))
    return [x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, points, alpha, var, bias, backend, precision = inputs
    mean, _, lse64, top_idx, top_logit, expand, centre = output
    ctx.save_for_backward(x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand,
                          centre)
    ctx.backend, ctx.precision = backend, precision


def _backward(ctx, grad_mean, grad_lse, *_grads_of_saved):
    x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand, centre = (
        ctx.saved_tensors)
    needs = list(ctx.needs_input_grad[:5])
    if bias is None:
        needs[4] = False
    grads = _softmax_mean_backward_op(
        x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand, centre, grad_mean,
        grad_lse, needs, ctx.backend, ctx.precision,
    )
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


_softmax_mean_op.register_autograd(_backward, setup_context=_setup_context)


def softmax_mean(
    x: torch.Tensor,
    points: torch.Tensor,
    alpha: float | torch.Tensor,
    var: float | torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    precision: str = "exact",
    return_lse: bool = False,
    check_inputs: bool = True,
):
    """Softmax-weighted mean of points for each query, never forming the B x N weights.

    Args:
        x: (..., B, d) queries.
        points: (..., N, d) points; leading dims broadcast with x's.
        alpha: float, 0-d tensor or tensor broadcastable to (..., B): scale of the points.
        var: like alpha, > 0: the variance dividing the squared distance.
        bias: None or (..., N) log-weights per point; -inf excludes a point.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (env DIFFMEM_BACKEND
            overrides "auto").
        precision: "exact" (direct differences; matches float64 to ~1e-5 relative on float32
            inputs) or "fast" (centred matmul expansion; see the README for its error).
        return_lse: also return lse = logsumexp of the logits, shape (..., B).
        check_inputs: scan inputs for NaN/Inf, var <= 0 and fully masked bias (O((B+N)d)).

    Returns:
        mean (..., B, d), or (mean, lse) when return_lse. Differentiable w.r.t. x, points,
        alpha, var and bias.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    c = canonicalize(x, points, alpha, var, bias, check_inputs=check_inputs)
    _backends.check_name(backend)  # resolved inside the op (see _backends.resolve)
    B, d = x.shape[-2], x.shape[-1]
    if B == 0:
        mean = c.x.new_zeros((*c.batch_shape, 0, d))
        lse = c.x.new_zeros((*c.batch_shape, 0))
        return (mean, lse) if return_lse else mean
    mean, lse, *_ = _softmax_mean_op(c.x, c.points, c.alpha, c.var, c.bias, backend, precision)
    mean = mean.reshape(*c.batch_shape, B, d)
    lse = lse.reshape(*c.batch_shape, B)
    return (mean, lse) if return_lse else mean
