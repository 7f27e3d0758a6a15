"""The methods the benchmark times: every diffmem backend and precision (forward, and forward +
backward), the torch peers computing the same mean (naive cdist, chunked online softmax, SDPA
with the point term folded or as a mask, and jax.jit of the matmul form when jax is installed)
and the bare-matmul floor. A method's setup turns a Problem into a zero-argument call; setup
allocations count as memory."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ops import backends, softmax_mean
from . import jax_peer
from .problems import Problem

PRECISIONS = ("exact", "fast")
CHUNK_ELEMENTS = 1 << 22  # logits per chunk of torch-chunked (16 MiB in float32)


def _point_term(y, alpha, var, bias):
    """The per-point logit term -alpha^2 ||y||^2 / (2 var) + bias, shape (N,).

    vector_norm reduces without the N x d temporary that (y * y).sum(1) would allocate.
    """
    t = torch.linalg.vector_norm(y, dim=1).square() * (-(alpha * alpha) / (2 * var))
    return t if bias is None else t + bias


def torch_naive(x, y, alpha, var, bias=None, *, direct=False, with_lse=False):
    """cdist -> squared -> logits -> softmax -> matmul, materializing the B x N logits.

    Uses ||x - alpha y|| = alpha ||x / alpha - y|| so as not to copy the points.
    """
    mode = "donot_use_mm_for_euclid_dist" if direct else "use_mm_for_euclid_dist_if_necessary"
    logits = torch.cdist(x / alpha, y, compute_mode=mode).square() * (-(alpha * alpha) / (2 * var))
    if bias is not None:
        logits = logits + bias
    mean = torch.softmax(logits, -1) @ y
    return (mean, torch.logsumexp(logits, -1)) if with_lse else mean


def torch_chunked(x, y, alpha, var, bias=None):
    """Online softmax over chunks of points, logits by the matmul form (||x||^2 cancels)."""
    B, d = x.shape
    N = y.shape[0]
    step = max(1, min(N, CHUNK_ELEMENTS // B))
    q = x * (alpha / var)
    term = _point_term(y, alpha, var, bias)
    m = x.new_full((B,), -math.inf)
    s = x.new_zeros(B)
    acc = x.new_zeros(B, d)
    for start in range(0, N, step):
        yc = y[start : start + step]
        logits = torch.addmm(term[start : start + step], q, yc.T)
        m_new = torch.maximum(m, logits.amax(1))
        scale = torch.exp(m - m_new)
        w = logits.sub_(m_new[:, None]).exp_()
        s = s * scale + w.sum(1)
        acc = torch.addmm(acc * scale[:, None], w, yc)
        m = m_new
    return acc / s[:, None]


def sdpa_fold(x, y, alpha, var, bias=None):
    """SDPA with q' = [alpha x / var, 1], k' = [y, point term], v = y and scale 1."""
    q = torch.cat([x * (alpha / var), x.new_ones(x.shape[0], 1)], 1)
    k = torch.cat([y, _point_term(y, alpha, var, bias)[:, None]], 1)
    return F.scaled_dot_product_attention(q[None], k[None], y[None], scale=1.0)[0]


def sdpa_mask(x, y, alpha, var, bias=None):
    """SDPA with q = alpha x / var, k = v = y, scale 1 and the point term as a (1, N) mask."""
    mask = _point_term(y, alpha, var, bias)[None]
    return F.scaled_dot_product_attention(
        (x * (alpha / var))[None], y[None], y[None], attn_mask=mask, scale=1.0
    )[0]


@dataclass
class Method:
    name: str
    kind: str  # "diffmem", "baseline" or "floor"
    setup: Callable[[Problem], Callable[[], torch.Tensor | None]]
    mem: Callable[[int, int, int], int]  # expected peak extra bytes, to skip what cannot fit
    backward: bool = False
    setup_fwd: Callable | None = None  # backward rows: forward only of the same function
    skip: str = ""  # reason it cannot run here


def _scalar(value: float, like: torch.Tensor, grad: bool = False) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device, requires_grad=grad)


def backward_setup(forward):
    """fwd+bwd of mean.sum() + lse.sum() w.r.t. x, points, alpha, var; forward -> (mean, lse)."""

    def setup(p):
        leaves = [p.x.detach().requires_grad_(), p.y.detach().requires_grad_(),
                  _scalar(p.alpha, p.x, True), _scalar(p.var, p.x, True)]

        def call():
            for t in leaves:
                t.grad = None
            mean, lse = forward(*leaves, p.bias)
            (mean.sum() + lse.sum()).backward()

        return call

    return setup


def forward_setup(forward):
    """The forward of a backward row alone, without autograd, for the bwd/fwd ratio."""

    def setup(p):
        alpha, var = _scalar(p.alpha, p.x), _scalar(p.var, p.x)

        def call():
            with torch.no_grad():
                return forward(p.x, p.y, alpha, var, p.bias)[0]

        return call

    return setup


def _simple(fn, **kw):
    """Setup for a baseline fn(x, y, alpha, var, bias) taking the scalars as floats."""
    return lambda p: (lambda: fn(p.x, p.y, p.alpha, p.var, p.bias, **kw))


def _floor_setup(p):
    """x @ y.T and P @ y into preallocated outputs, P a fixed B x N matrix of weights."""
    B, N = p.x.shape[0], p.y.shape[0]
    scores = p.x.new_empty(B, N)
    probs = p.x.new_full((B, N), 1.0 / N)
    out = p.x.new_empty(B, p.x.shape[1])

    def call():
        torch.mm(p.x, p.y.T, out=scores)
        return torch.mm(probs, p.y, out=out)

    return call


def diffmem_forward(backend, precision, check_inputs=True):
    """(x, y, alpha, var, bias) -> (mean, lse) with one diffmem backend and precision."""

    def forward(x, y, alpha, var, bias):
        return softmax_mean(x, y, alpha, var, bias, backend=backend, precision=precision,
                                    return_lse=True, check_inputs=check_inputs)

    return forward


def build_methods(device: str, include_reference: bool, check_inputs: bool = True) -> list[Method]:
    """Every method for this device, with a skip reason on those that cannot run."""
    methods = []
    f32 = 4
    for backend, info in backends().items():
        skip = ""
        if not info["available"]:
            skip = f"backend unavailable: {info['reason']}"
        elif device not in info["devices"]:
            skip = f"backend runs on {', '.join(info['devices'])}, not {device}"
        elif backend == "reference" and not include_reference:
            skip = "slow float64 oracle; pass --include-reference"
        elif backend == "triton" and device == "cpu":
            skip = "Triton on CPU is the test-only interpreter"
        precisions = ("exact",) if backend == "reference" else PRECISIONS  # reference ignores it
        small = (lambda B, N, d: 256 << 20) if backend == "reference" else (
            lambda B, N, d: 4 * (B + N) * d * f32)
        for precision in precisions:
            name = f"diffmem-{backend}-{precision}"
            fwd = diffmem_forward(backend, precision, check_inputs)
            methods.append(Method(
                name, "diffmem",
                lambda p, b=backend, pr=precision: (
                    lambda: softmax_mean(p.x, p.y, p.alpha, p.var, p.bias, backend=b,
                                                 precision=pr, check_inputs=check_inputs)),
                small, skip=skip))
            methods.append(Method(name + "-backward", "diffmem", backward_setup(fwd), small,
                                  backward=True, setup_fwd=forward_setup(fwd), skip=skip))
    bn = lambda k: (lambda B, N, d: k * B * N * f32)  # noqa: E731
    naive_lse = lambda *a: torch_naive(*a, with_lse=True)  # noqa: E731
    methods += [
        Method("torch-naive", "baseline", _simple(torch_naive), bn(4)),
        Method("torch-naive-direct", "baseline", _simple(torch_naive, direct=True), bn(4)),
        Method("torch-chunked", "baseline", _simple(torch_chunked),
               lambda B, N, d: 3 * CHUNK_ELEMENTS * f32 + 4 * (B + N) * d * f32),
        Method("sdpa-fold", "baseline", _simple(sdpa_fold), bn(4)),
        Method("sdpa-mask", "baseline", _simple(sdpa_mask), bn(4)),
        Method("matmul-floor", "floor", _floor_setup, bn(2)),
        Method("torch-naive-backward", "baseline", backward_setup(naive_lse), bn(10),
               backward=True, setup_fwd=forward_setup(naive_lse)),
        Method(jax_peer.NAME, "baseline", lambda p: jax_peer.setup(p, p.x.device.type), bn(4),
               skip=jax_peer.skip_reason(device)),
    ]
    return methods


__all__ = ["Method", "backward_setup", "build_methods", "diffmem_forward", "forward_setup",
           "sdpa_fold", "sdpa_mask", "torch_chunked", "torch_naive"]
