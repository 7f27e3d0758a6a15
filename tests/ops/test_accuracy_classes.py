"""Exact mode's accuracy bound on classes of inputs, drawn at random (seeded) on every backend.

Each class below is one line: a function of (gen, d, N, B) giving float64 points and queries
(the test rounds them to float32; the float64 oracle computes on the rounded values). Shapes are
drawn per case: d log-uniform over 1 .. 16384, N over 1 .. 3000, B over 1 .. 70 (both the
few-query and the tile kernels), shrunk to each backend's size budget (the Triton interpreter
and the CUDA host emulator are slow). The bound is the README's: mean 1e-5 (relative Frobenius
over the batch), lse 1e-4 (|error| / max(1, |lse|); 1e-6 when returned in float64); gradients
of all five inputs 3e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, CUDA_EMULATED, DEVICE, INTERPRETED, lse_err, rel_fro

import diffmem

MEAN_TOL, LSE_TOL, GRAD_TOL = 1e-5, 1e-4, 3e-5
D_MAX, N_MAX, B_MAX = 16384, 3000, 70


def _uniform(gen, lo, hi, n=()):
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _log_uniform(gen, lo, hi, n=()):
    return torch.exp(_uniform(gen, math.log(lo), math.log(hi), n))


def _normal(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _pick(gen, y, B):
    return y[torch.randint(0, y.shape[0], (B,), generator=gen)]


def _vp(gen, y, src, B):
    """VP queries x = alpha src + t eps, t uniform over (0.001, 0.999); var = t^2."""
    t = _uniform(gen, 0.001, 0.999, B)
    alpha = (1 - t * t).sqrt()
    return y, alpha[:, None] * src + t[:, None] * _normal(gen, B, y.shape[1]), alpha, t * t


def _ve(gen, y, src, B):
    """VE queries x = src + sigma eps, sigma log-uniform over (0.002, 80); alpha = 1."""
    s = _log_uniform(gen, 0.002, 80.0, B)
    x = src + s[:, None] * _normal(gen, B, y.shape[1])
    return y, x, torch.ones(B, dtype=torch.float64), s * s


def _far(gen, y, B):
    """Random queries of norm up to 30 per feature, any alpha, var log-uniform over 1e-2 .. 10 d."""
    d = y.shape[1]
    scale = _log_uniform(gen, 1.0, 30.0, B)
    alpha = _uniform(gen, 0.01, 1.0, B)
    return y, scale[:, None] * _normal(gen, B, d), alpha, _log_uniform(gen, 1e-2, 10.0 * d, B)


def _offset(gen, d, N):
    """Points whose mean sits 1 .. 1000 per feature away from the origin."""
    return _normal(gen, N, d) + _log_uniform(gen, 1.0, 1000.0) * torch.sign(_normal(gen, d))


def _scaled(case, s):
    y, x, alpha, var = case
    return y * s, x * s, alpha, var * s * s


# name -> (gen, d, N, B) -> (points (N, d), x (B, d), alpha (B,), var (B,)), all float64
CLASSES = {
    "near_vp": lambda g, d, N, B: _vp(g, y := _normal(g, N, d), _pick(g, y, B), B),
    "held_out_vp": lambda g, d, N, B: _vp(g, _normal(g, N, d), _normal(g, B, d), B),
    "near_ve": lambda g, d, N, B: _ve(g, y := _normal(g, N, d), _pick(g, y, B), B),
    "held_out_ve": lambda g, d, N, B: _ve(g, _normal(g, N, d), _normal(g, B, d), B),
    "far": lambda g, d, N, B: _far(g, _normal(g, N, d), B),
    "offset_near": lambda g, d, N, B: _vp(g, y := _offset(g, d, N), _pick(g, y, B), B),
    "offset_held_out": lambda g, d, N, B: _vp(g, y := _offset(g, d, N),
                                              y.mean(0) + _normal(g, B, d), B),
    "offset_far": lambda g, d, N, B: _far(g, _offset(g, d, N), B),
    "scaled_1e-3": lambda g, d, N, B: _scaled(_vp(g, _normal(g, N, d), _normal(g, B, d), B), 1e-3),
    "scaled_1e3": lambda g, d, N, B: _scaled(_vp(g, y := _normal(g, N, d), _pick(g, y, B), B),
                                             1e3),
}

# (elements B N d per case, cases per class) per backend; the slow emulations get fewer, smaller
# cases (large d still appears, with few points and queries).
_SLOW = (1.5e5, 2)
BUDGET = {"cpu": (2e7, 8), "reference": (2e6, 2)}


def _budget(backend: str) -> tuple[float, int]:
    if backend == "triton" and INTERPRETED or backend == "cuda" and CUDA_EMULATED:
        return _SLOW
    return BUDGET.get(backend, (2e7, 8))


def _shape(gen, budget):
    d = max(1, min(D_MAX, int(_log_uniform(gen, 1.0, D_MAX + 1.0))))
    N = max(1, min(N_MAX, int(_log_uniform(gen, 1.0, N_MAX + 1.0))))
    B = int(torch.randint(1, B_MAX + 1, (), generator=gen))
    while B * N * d > budget and N > 1:
        N = max(1, int(budget // (B * d)))
    while B * N * d > budget and B > 1:
        B = max(1, int(budget // (N * d)))
    return d, N, B


def draw_case(name: str, seed: int, budget: float):
    """A float32 case of class ``name``: x (B, d), points (N, d), alpha, var, bias (N,)."""
    gen = torch.Generator().manual_seed(seed)
    d, N, B = _shape(gen, budget)
    y, x, alpha, var = CLASSES[name](gen, d, N, B)
    bias = 0.5 * _normal(gen, N) if bool(torch.rand((), generator=gen) < 0.5) else None
    cast = lambda t: None if t is None else t.float().to(DEVICE)  # noqa: E731
    return cast(x), cast(y), cast(alpha), cast(var), cast(bias)


def _seeds(name: str, backend: str, n: int, salt: int = 0):
    base = sum(map(ord, name)) * 1000 + sum(map(ord, backend)) * 10 + salt
    return [base + i for i in range(n)]


def _describe(x, y, alpha, var):
    return (f"B={x.shape[0]} N={y.shape[0]} d={x.shape[1]} alpha=[{float(alpha.min()):.3g}, "
            f"{float(alpha.max()):.3g}] var=[{float(var.min()):.3g}, {float(var.max()):.3g}]")


KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_exact_forward_within_bound(backend, name):
    budget, n = _budget(backend)
    for seed in _seeds(name, backend, n):
        x, y, alpha, var, bias = draw_case(name, seed, budget)
        mean, lse = diffmem.softmax_mean(x, y, alpha, var, bias, backend=backend, return_lse=True)
        want_mean, want_lse = diffmem.softmax_mean(
            x.double(), y.double(), alpha.double(), var.double(),
            None if bias is None else bias.double(), backend="reference", return_lse=True)
        em, el = rel_fro(mean, want_mean), lse_err(lse, want_lse)
        assert em <= MEAN_TOL and el <= LSE_TOL, (
            f"seed {seed}: {_describe(x, y, alpha, var)}: mean {em:.2e}, lse {el:.2e}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_exact_lse_in_float64_is_absolute(backend, name):
    """lse_dtype=torch.float64: lse to 1e-6 of max(1, |lse|), not just its float32 rounding
    (partial results over parts of the points merge through it)."""
    budget, n = _budget(backend)
    for seed in _seeds(name, backend, max(1, n // 2), salt=3):
        x, y, alpha, var, bias = draw_case(name, seed, budget)
        _, lse = diffmem.softmax_mean(x, y, alpha, var, bias, backend=backend, return_lse=True,
                                      lse_dtype=torch.float64)
        _, want = diffmem.softmax_mean(
            x.double(), y.double(), alpha.double(), var.double(),
            None if bias is None else bias.double(), backend="reference", return_lse=True)
        assert lse.dtype == torch.float64
        assert lse_err(lse, want) <= 1e-6, f"seed {seed}: {_describe(x, y, alpha, var)}"


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_exact_gradients_within_bound(backend, name):
    budget, n = _budget(backend)
    for seed in _seeds(name, backend, max(1, n // 2), salt=7):
        x, y, alpha, var, bias = draw_case(name, seed, budget / 4)
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(x.shape, generator=gen).to(DEVICE)
        h = torch.randn(x.shape[0], generator=gen).to(DEVICE)
        errors = {}
        inputs = [t for t in (x, y, alpha, var, bias) if t is not None]
        got_in = _leaves(*inputs)
        want_in = _leaves(*(t.double() for t in inputs))
        mean, lse = diffmem.softmax_mean(*got_in, backend=backend, return_lse=True)
        got = torch.autograd.grad((mean, lse), got_in, (g, h))
        mean, lse = diffmem.softmax_mean(*want_in, backend="reference", return_lse=True)
        want = torch.autograd.grad((mean, lse), want_in, (g.double(), h.double()))
        for key, a, b in zip(["x", "points", "alpha", "var", "bias"], got, want):
            errors[key] = rel_fro(a, b)
        assert max(errors.values()) <= GRAD_TOL, (
            f"seed {seed}: {_describe(x, y, alpha, var)}: "
            + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_knn_distances_within_bound(backend, name):
    """Distances of the returned points equal the k smallest float64 distances (any tie order)."""
    budget, n = _budget(backend)
    for seed in _seeds(name, backend, max(1, n // 2), salt=13):
        x, y, _, _, _ = draw_case(name, seed, budget)
        k = min(2, y.shape[0])
        dist, idx = diffmem.knn(x, y, k=k, backend=backend)
        exact = torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist")
        want = exact.topk(k, dim=-1, largest=False).values
        at_idx = torch.gather(exact, -1, idx)
        scale = want.clamp_min(1e-30)
        assert float(((dist.double() - want).abs() / scale).max()) <= 1e-5
        assert float(((at_idx - want).abs() / scale).max()) <= 1e-5
