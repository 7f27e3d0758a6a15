"""The softmax-weighted mean over points: the primitive under every denoiser in diffmem.

    logit[b, i] = bias[i] - ||x[b] - alpha[b] * y[i]||^2 / (2 var[b])
    mean[b]     = sum_i softmax(logit[b])_i * y[i]
    lse[b]      = logsumexp_i logit[b, i]

Registered as the custom ops ``diffmem::softmax_mean`` (forward) and
``diffmem::softmax_mean_backward``, with fake kernels and autograd, so it works with
torch.compile and passes torch.library.opcheck. Plain eager calls take ``_Direct``, an
autograd.Function running the same forward and backward without the dispatcher's layers.
"""

from __future__ import annotations

import math

import torch

from . import _backends, _exact
from ._canonical import canonicalize, check_finite

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
    nearest: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Canonical layout in (see _canonical.py); dense mean (G, B, d), lse (G, B), lse64, the
    exact top logits and exact mode's plan out.

    nearest: report top lists even without a plan (K = 1: the largest exact logit), from
    which ``nearest_point`` takes the nearest point and its weight.

    lse64 (G, B) is lse in float64, kept for the backward (weights recomputed from a rounded
    lse would not sum to one when |lse| is large). top_idx (G, B, K) int64 and top_logit
    (G, B, K) float64 are the points with the largest logits and their exact values (K = 0 when
    the backend needs no correction; see _exact.py); expand (G, B) uint8 and centre (1 or G, d)
    are the plan (empty without one). All are kept for the backward, which reuses the plan.
    """
    return _forward(x, points, alpha, var, bias, backend, precision, nearest)


def _forward(x, points, alpha, var, bias, backend, precision, nearest, check_points=False):
    """The forward op's computation (see _softmax_mean_op). check_points: the kernels check
    the points for NaN/Inf (only for a backend with CHECKS_POINTS, see _kernels_check_points)."""
    mod = _module(backend, x, points)
    plan = _plan(mod, x, points, alpha, var, precision)
    checks = {"check_points": True} if check_points else {}
    if plan is None:
        out = mod.forward(x, points, alpha, var, bias, precision, nearest=nearest, **checks)
        mean, lse, lse64 = out[:3]
        if nearest:
            top_idx, top_logit = out[3:5]
        else:
            top_logit = lse64.new_empty((*lse64.shape, 0))
            top_idx = top_logit.long()
        return (mean, lse, lse64, top_idx, top_logit, x.new_empty(0, dtype=torch.uint8),
                x.new_empty(0))
    mean, lse, lse64, top_idx, top_logit = mod.forward(x, points, alpha, var, bias, precision, plan,
                                                       **checks)
    if not getattr(mod, "CORRECTS_TOP_K", False):
        mean, lse, lse64, top_logit = _exact.correct_forward(
            x, points, alpha, var, bias, mean, lse64, top_idx, top_logit)
    return mean, lse, lse64, top_idx, top_logit, plan.expand, _exact.centre_rows(plan)


def _module(backend: str, x: torch.Tensor, points: torch.Tensor):
    """The backend module that runs a call (resolved inside the ops; see _backends.resolve)."""
    return _backends.module(_backends.resolve(backend, x.device, x.dtype, points.dtype))


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
def _(x, points, alpha, var, bias, backend, precision, nearest):
    G, B, d = x.shape
    planned = not _plan_free(_module(backend, x, points), x, precision)
    K = _exact.TOP_K if planned else (1 if nearest else 0)
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
    """Gradients w.r.t. (x, points, alpha, var, bias) in x's dtype; an empty tensor where not
    needed."""
    return _backward_grads(x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand,
                           centre, grad_mean, grad_lse, needs, backend, precision)


def _backward_grads(x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand,
                    centre, grad_mean, grad_lse, needs, backend, precision):
    """The backward op's computation (see _softmax_mean_backward_op)."""
    mod = _module(backend, x, points)
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
    x, points, alpha, var, bias, backend, precision, _ = inputs
    mean, _, lse64, top_idx, top_logit, expand, centre = output
    ctx.save_for_backward(x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand,
                          centre)
    ctx.backend, ctx.precision = backend, precision


def _backward(ctx, grad_mean, grad_lse, grad_lse64, *_grads_of_plan):
    if grad_lse64 is not None:  # lse returned in float64 (softmax_mean's lse_dtype)
        extra = grad_lse64.to(ctx.saved_tensors[0].dtype)
        grad_lse = extra if grad_lse is None else grad_lse + extra
    x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand, centre = (
        ctx.saved_tensors)
    needs = list(ctx.needs_input_grad[:5])
    if bias is None:
        needs[4] = False
    # the eager path (_Direct) calls the computation itself unless a graph of the gradients is
    # being built (create_graph=True), where the op refuses a second derivative
    backward_op = (_backward_grads if getattr(ctx, "direct", False) and not torch.is_grad_enabled()
                   else _softmax_mean_backward_op)
    grads = backward_op(
        x, points, alpha, var, bias, mean, lse64, top_idx, top_logit, expand, centre, grad_mean,
        grad_lse, needs, ctx.backend, ctx.precision,
    )
    grads[1] = grads[1].to(points.dtype)  # points stored in a compact dtype
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)


_softmax_mean_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "diffmem.softmax_mean has no second derivative: its backward is a fused kernel whose "
        "own derivative is not implemented, so gradients of its gradients (double backward, "
        "e.g. a gradient penalty or a Hessian-vector product) cannot be formed; first-order "
        "gradients, also with create_graph=True for other parts of the graph, are supported")


_softmax_mean_backward_op.register_autograd(_no_double_backward,
                                            setup_context=lambda ctx, inputs, output: None)


class _Direct(torch.autograd.Function):
    """The op's forward and autograd for plain eager calls, without the dispatcher's layers
    (custom-op dispatch costs as much as the kernels of a small training step). The same
    functions run, with the same inputs: results are those of the registered op."""

    @staticmethod
    def forward(x, points, alpha, var, bias, backend, precision, nearest, check_points):
        return _forward(x, points, alpha, var, bias, backend, precision, nearest, check_points)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs[:8], output)
        ctx.direct = True
        # outputs without a gradient (lse unused, and the internal ones) get None, not zeros;
        # the kernels read a missing grad_lse as zero, and grad_mean is made zeros as before
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_mean, *grads):
        if grad_mean is None:
            grad_mean = torch.zeros_like(ctx.saved_tensors[5])
        return (*_backward(ctx, grad_mean, *grads), None)


def _runs_direct(*tensors) -> bool:
    """Whether a call may take _Direct: eager (not traced by torch.compile, no dispatch mode
    such as fake tensors, no functorch transform) on plain tensors with storage."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(t is None or (type(t) in (torch.Tensor, torch.nn.Parameter)
                             and t.device.type != "meta") for t in tensors)


def _kernels_check_points(backend: str):
    """canonicalize's kernels_check_points for this backend: eager float32 calls whose
    backend checks each point as its kernels read it (the module's CHECKS_POINTS: the cpu
    kernels) skip the separate scan, which reads large point sets a second time."""
    def decide(x: torch.Tensor, points: torch.Tensor) -> bool:
        if x.dtype != torch.float32 or x.numel() == 0 or not _runs_direct(x, points):
            return False
        return getattr(_module(backend, x, points), "CHECKS_POINTS", False)
    return decide


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
    return_nearest: bool = False,
    lse_dtype: torch.dtype | None = None,
    check_inputs: bool = True,
):
    """Softmax-weighted mean of points for each query, never forming the B x N weights.

    Args:
        x: (..., B, d) queries.
        points: (..., N, d) points; leading dims broadcast with x's. x's dtype, or with float32
            x a storage dtype (uint8, float16, bfloat16), computed as if converted to float32.
        alpha: float, 0-d tensor or tensor broadcastable to (..., B): scale of the points.
        var: like alpha, > 0: the variance dividing the squared distance.
        bias: None or (..., N) log-weights per point; -inf excludes a point.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (env DIFFMEM_BACKEND
            overrides "auto").
        precision: "exact" (direct differences; matches float64 to ~1e-5 relative on float32
            inputs) or "fast" (centred matmul expansion; see the README for its error).
        return_lse: also return lse = logsumexp of the logits, shape (..., B).
        return_nearest: also return, per query, the index (..., B) int64 of the point with the
            largest logit (ties to the lower index) and its softmax weight (..., B), from the
            same pass (not differentiable). Runs the exact kernels whatever ``precision`` says.
        lse_dtype: None (x's dtype) or torch.float64: lse as the kernels form it, before its
            rounding to float32 (for merging partial results, see merge_softmax_means).
        check_inputs: scan inputs for NaN/Inf, var <= 0 and fully masked bias (O((B+N)d));
            eager float32 calls on the cpu backend check the points in the kernels' own pass.

    Returns:
        mean (..., B, d); with return_lse (mean, lse); with return_nearest (mean, [lse,]
        nearest_idx, nearest_weight). Differentiable w.r.t. x, points (float dtypes), alpha,
        var and bias.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _backends.check_name(backend)  # resolved inside the op (see _backends.resolve)
    c = canonicalize(x, points, alpha, var, bias, check_inputs=check_inputs,
                     kernels_check_points=_kernels_check_points(backend))
    if lse_dtype not in (None, x.dtype, torch.float64):
        raise ValueError(f"lse_dtype must be None, x's dtype or torch.float64, got {lse_dtype}")
    B, d = x.shape[-2], x.shape[-1]
    if B == 0:
        mean = c.x.new_zeros((*c.batch_shape, 0, d))
        lse = c.x.new_zeros((*c.batch_shape, 0), dtype=lse_dtype)
        idx, weight = lse.long(), lse.to(x.dtype)
    else:
        # the top lists of the exact kernels give the nearest point
        kernel_precision = "exact" if return_nearest else precision
        args = (c.x, c.points, c.alpha, c.var, c.bias, backend, kernel_precision, return_nearest)
        if _runs_direct(*args[:5]):
            outputs = _Direct.apply(*args, c.points_unchecked)
        else:
            if c.points_unchecked:  # alpha, var or bias keep the call off the direct path
                check_finite("points", points)
            outputs = _softmax_mean_op(*args)
        mean, lse, lse64, top_idx, top_logit, *_ = outputs
        mean = mean.reshape(*c.batch_shape, B, d)
        wide = lse_dtype == torch.float64
        if (return_lse or wide) and top_idx.shape[-1] > 0:  # exact mode's top lists
            shift = _exact.lse_offset(c.x, c.points, c.alpha, c.var, c.bias, top_idx,
                                      top_logit)
            lse64 = lse64 + shift
            lse = lse + shift.to(lse.dtype)
            top_logit = top_logit + shift[..., None]
        lse = (lse64 if wide else lse).reshape(*c.batch_shape, B)
        if return_nearest:
            idx, weight = nearest_point(top_idx, top_logit, lse64)
            idx = idx.reshape(*c.batch_shape, B)
            weight = weight.to(x.dtype).reshape(*c.batch_shape, B)
    out = (mean, lse) if return_lse else (mean,)
    if return_nearest:
        out = (*out, idx, weight)
    return out[0] if len(out) == 1 else out


def nearest_point(top_idx: torch.Tensor, top_logit: torch.Tensor,
                  lse64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point with the largest logit (ties to the lower index) and its weight.

    top_idx (..., K) int64 (-1: empty slot), top_logit (..., K) float64 in the true frame,
    lse64 (...) -> index (...) int64, weight exp(logit - lse) (...) float64; detached.
    """
    top_idx, top_logit, lse64 = (t.detach() for t in (top_idx, top_logit, lse64))
    logit = top_logit.masked_fill(top_idx < 0, -math.inf)
    best = logit.amax(-1, keepdim=True)
    ties = torch.where(logit == best, top_idx, torch.iinfo(torch.int64).max)
    return ties.amin(-1), torch.exp(best[..., 0] - lse64)
