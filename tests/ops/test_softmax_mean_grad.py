"""Gradients of softmax_mean w.r.t. all five inputs, on every available backend."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, DEVICE, FAST_BACKENDS, oracle, rel_fro, supports, vp_case

import diffmem

F64_BACKENDS = [b for b in BACKENDS if supports(b, torch.float64)]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(backend, with_bias):
    """Finite differences in float64 on a tiny problem, all five inputs at once."""
    x, y, alpha, var = vp_case(B=3, N=4, d=3, per_query_t=False, t=0.7, dtype=torch.float64, seed=1)
    bias = torch.randn(4, dtype=torch.float64, device=DEVICE)
    inputs = _leaves(x, y, alpha, var, bias)
    if not with_bias:
        inputs = inputs[:4]

    def fn(*args):
        mean, lse = diffmem.softmax_mean(*args, backend=backend, return_lse=True)
        return mean, lse

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", F64_BACKENDS)
def test_gradcheck_float64_groups_and_mask(backend):
    """Groups with shared points (gradients summed over groups) and a masked point."""
    x, y, alpha, var = vp_case(batch=(2,), B=3, N=4, d=2, t=0.6, dtype=torch.float64, seed=2)
    bias = torch.tensor([0.0, -math.inf, 0.3, -0.2], dtype=torch.float64, device=DEVICE)
    inputs = _leaves(x, y[0], alpha, var)
    fn = lambda *a: diffmem.softmax_mean(*a, bias, backend=backend, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _grads(fn, inputs, g, h):
    mean, lse = fn(*inputs)
    return torch.autograd.grad((mean, lse), inputs, (g, h))


GRAD_CASES = [(b, s) for b in BACKENDS for s in [(5, 7, 3), (9, 7, 30)]] + \
             [(b, s) for b in FAST_BACKENDS for s in [(27, 1000, 30), (5, 300, 257)]]


def _gradient_errors(backend, shape, t, offset, seed, precision="exact"):
    """Relative errors of the five float32 gradients of (mean, lse) against float64 autograd."""
    B, N, d = shape
    x, y, alpha, var = vp_case(B=B, N=N, d=d, t=t, offset=offset, seed=seed)
    bias = 0.5 * torch.randn(N, device=DEVICE)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(B, d, generator=gen).to(DEVICE)
    h = torch.randn(B, generator=gen).to(DEVICE)
    got = _grads(lambda *a: diffmem.softmax_mean(*a, backend=backend, precision=precision,
                                                 return_lse=True),
                 _leaves(x, y, alpha, var, bias), g, h)
    want = _grads(oracle, _leaves(*(t_.double() for t_ in (x, y, alpha, var, bias))),
                  g.double(), h.double())
    assert all(a.dtype == torch.float32 for a in got)
    names = ["x", "points", "alpha", "var", "bias"]
    return {n: rel_fro(a, b) for n, a, b in zip(names, got, want)}


# Measured worst case of the cpu backend over the whole t grid: 8e-6 (d = 3072).
GRAD_TOL = 3e-5


@pytest.mark.parametrize("backend,shape", GRAD_CASES)
@pytest.mark.parametrize("t", [0.001, 0.05, 0.3603, 0.8, 0.999])
def test_float32_gradients_match_float64_autograd(backend, shape, t):
    """float32 gradients of (mean, lse) against autograd through the float64 oracle."""
    errors = _gradient_errors(backend, shape, t, offset=0.0, seed=sum(shape))
    assert max(errors.values()) <= GRAD_TOL, errors


@pytest.mark.parametrize("backend,shape", GRAD_CASES)
@pytest.mark.parametrize("t", [0.001, 0.3603, 0.8, 0.999])
def test_float32_gradients_far_from_origin(backend, shape, t):
    """Data offset by 1000: gradients must not lose accuracy to the offset.

    A backward that forms g.y[i] - g.mean (or y.x) from raw float32 values loses about
    eps * |offset| / spread; centring the points (and computing D = sum_i w_i g.(y_i - c) from the
    recomputed weights) avoids it.
    """
    errors = _gradient_errors(backend, shape, t, offset=1000.0, seed=sum(shape) + 1)
    assert max(errors.values()) <= GRAD_TOL, errors


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "reference"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("t", [0.3603, 0.8, 0.999])
def test_fast_gradients_at_moderate_noise(backend, t, offset):
    """precision="fast" gradients where its expansion is accurate (t >= 0.36; README). B = 70:
    the cpu backend runs batches under 64 queries with the exact kernels."""
    errors = _gradient_errors(backend, (70, 300, 30), t, offset=offset, seed=11,
                              precision="fast")
    assert max(errors.values()) <= GRAD_TOL, errors


# the precisions' bounds on a mean-scale problem (fast: see test_fast_precision_error_is_bounded)
PADDED_TOL = {"exact": (1e-5, GRAD_TOL), "fast": (1e-3, 1e-2)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_groups_padded_with_masked_points(backend, precision):
    """Batched models of different sizes: group g keeps its first sizes[g] points, the rest
    carry bias -inf (padding whose tiles the kernels may skip). Values and gradients equal the
    float64 oracle on the kept points alone, and the padding's gradients are exactly zero.
    Sizes cross tile boundaries (1, 31-33, 63-65, N); 70 queries (cpu runs fast from 64)."""
    N, d, B = 70, 6, 70
    sizes = [1, 31, 32, 33, 63, 64, 65, N]
    G = len(sizes)
    x, y, alpha, var = vp_case(batch=(G,), B=B, N=N, d=d, t=0.5, seed=11)
    bias = torch.zeros(G, N, dtype=x.dtype, device=DEVICE)
    for g, m in enumerate(sizes):
        bias[g, m:] = -math.inf
    leaves = _leaves(x, y, alpha, var)
    mean, lse = diffmem.softmax_mean(*leaves, bias, backend=backend, precision=precision,
                                     return_lse=True)
    (mean.square().sum() + lse.sum()).backward()
    value_tol, grad_tol = PADDED_TOL[precision]
    for g, m in enumerate(sizes):
        ref = _leaves(x[g].double(), y[g, :m].double(), alpha[g].double(), var[g].double())
        r_mean, r_lse = oracle(*ref)
        (r_mean.square().sum() + r_lse.sum()).backward()
        assert rel_fro(mean[g].detach(), r_mean.detach()) <= value_tol, (g, m)
        assert rel_fro(lse[g].detach(), r_lse.detach()) <= value_tol, (g, m)
        got = (leaves[0].grad[g], leaves[1].grad[g, :m], leaves[2].grad[g], leaves[3].grad[g])
        for name, a, b in zip(("x", "points", "alpha", "var"), got, (r.grad for r in ref)):
            assert rel_fro(a, b) <= grad_tol, (g, m, name, rel_fro(a, b))
        assert torch.all(leaves[1].grad[g, m:] == 0), (g, m)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_small_weights_across_dead_tiles(backend, precision):
    """Each query sits on a point near the end of the set and has a second point near the start
    whose logit is 50 lower (weight e^-50), every other weight being 0 (logit gaps > 1e3). The
    cpu kernels skip the work of (query, tile) pairs whose weights are all 0: the second point's
    tile must still count in the forward (it held the running max when it was visited) and in
    the backward, where its gradients are ~e^-50 and a skipped tile would leave them 0.
    300 queries: more than one query chunk of the cpu kernels."""
    B, N, d, var = 300, 1200, 16, 0.01
    gen = torch.Generator().manual_seed(5)
    alpha = math.sqrt(1 - var)
    y = 3.0 * torch.randn(N, d, generator=gen, dtype=torch.float64)
    near = torch.arange(N - B, N)  # query b sits on point N - B + b ...
    u = torch.randn(B, d, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    # ... and point b is where alpha |y_b - y_near| = sqrt(2 var 50): a logit gap of 50
    y[:B] = y[near] + math.sqrt(2 * var * 50) / alpha * u
    x = alpha * y[near]
    y, x = y.float().to(DEVICE), x.float().to(DEVICE)
    bias = torch.zeros(N, device=DEVICE)
    g = torch.randn(B, d, generator=gen).to(DEVICE)
    leaves = _leaves(x, y, torch.full((B,), alpha, device=DEVICE),
                     torch.full((B,), var, device=DEVICE), bias)
    mean = diffmem.softmax_mean(*leaves, backend=backend, precision=precision)
    (mean * g).sum().backward()
    ref = _leaves(*(t.double() for t in leaves))
    r_mean = oracle(*ref)[0]
    (r_mean * g.double()).sum().backward()
    value_tol, grad_tol = PADDED_TOL[precision]
    assert rel_fro(mean.detach(), r_mean.detach()) <= value_tol
    # the second points' gradients alone (rows 0..B-1), ~e^-50 of the others; the precisions'
    # bounds (the fast mode's logit error ~1e-7 |x'|^2 / var carries into them)
    for name, a, b in (("points", leaves[1].grad[:B], ref[1].grad[:B]),
                       ("bias", leaves[4].grad[:B], ref[4].grad[:B])):
        assert 1e-25 < b.abs().max() < 1e-18, name  # the case is what it claims
        assert rel_fro(a, b) <= (1e-4 if precision == "exact" else grad_tol), (name, rel_fro(a, b))
