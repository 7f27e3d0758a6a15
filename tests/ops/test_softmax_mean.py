"""Forward pass of softmax_mean on every available backend against a float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    BACKENDS,
    DEVICE,
    FAST_BACKENDS,
    T_GRID,
    lse_err,
    oracle,
    rel_fro,
    supports,
    vp_case,
)

import diffmem

# (B, N, d): odd B, N in {1, 7, 1000+}, d in {1, 2, 30, 255, 257, 3072}.
SMALL = [(1, 1, 1), (5, 1, 2), (27, 7, 1), (27, 7, 2), (27, 7, 30), (5, 7, 255), (5, 7, 257)]
LARGE = [(27, 1000, 2), (27, 1031, 30), (9, 1003, 255), (9, 1000, 257), (5, 1000, 3072)]
CASES = [(b, s) for b in BACKENDS for s in SMALL] + [(b, s) for b in FAST_BACKENDS for s in LARGE]

EXACT_MEAN_TOL = 1e-5  # relative Frobenius error of mean, float32 inputs
EXACT_LSE_TOL = 1e-4   # |lse - ref| / max(1, |ref|)
F64_TOL = 1e-10


def _check(backend, x, y, alpha, var, bias=None, precision="exact"):
    mean, lse = diffmem.softmax_mean(x, y, alpha, var, bias, backend=backend,
                                     precision=precision, return_lse=True)
    ref_mean, ref_lse = oracle(x, y, alpha, var, bias)
    assert mean.dtype == x.dtype and mean.shape == ref_mean.shape
    assert lse.dtype == x.dtype and lse.shape == ref_lse.shape
    return rel_fro(mean, ref_mean), lse_err(lse, ref_lse)


@pytest.mark.parametrize("backend,shape", CASES)
def test_per_query_noise_over_grid(backend, shape):
    """Each query has its own t; together they cover the whole 26-point grid."""
    B, N, d = shape
    x, y, alpha, var = vp_case(B=B, N=N, d=d, per_query_t=True, seed=B * N + d)
    e_mean, e_lse = _check(backend, x, y, alpha, var)
    assert e_mean <= EXACT_MEAN_TOL and e_lse <= EXACT_LSE_TOL


@pytest.mark.parametrize("backend,shape", CASES)
def test_shared_noise_far_from_origin(backend, shape):
    """Every t of the grid as a scalar noise level, with the data offset by 1000."""
    B, N, d = shape
    worst = (0.0, 0.0)
    for i, t in enumerate(T_GRID[:: 1 if N * d <= 10_000 else 5]):
        x, y, alpha, var = vp_case(B=B, N=N, d=d, t=t, offset=1000.0, seed=i)
        e = _check(backend, x, y, float(alpha[0]), float(var[0]))
        worst = (max(worst[0], e[0]), max(worst[1], e[1]))
    assert worst[0] <= EXACT_MEAN_TOL and worst[1] <= EXACT_LSE_TOL, worst


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("t", [0.001, 0.3603, 0.999])
def test_pixel_space_dimension(backend, t):
    """d = 3072 (a 32x32x3 image), N >= 1000: the long squared-distance sums stay exact."""
    x, y, alpha, var = vp_case(B=9, N=1024, d=3072, t=t, seed=3)
    e_mean, e_lse = _check(backend, x, y, alpha, var)
    assert e_mean <= EXACT_MEAN_TOL and e_lse <= EXACT_LSE_TOL


@pytest.mark.parametrize("backend", [b for b in BACKENDS if supports(b, torch.float64)])
def test_float64_inputs(backend):
    x, y, alpha, var = vp_case(B=9, N=50, d=30, per_query_t=True, dtype=torch.float64)
    e_mean, e_lse = _check(backend, x, y, alpha, var)
    assert e_mean <= F64_TOL and e_lse <= F64_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["full", "shared_points", "shared_queries", "mixed"])
def test_leading_batch_dims(backend, layout):
    """Leading dims broadcast: groups with their own points, shared points, shared queries."""
    B, N, d = 5, 9, 6
    x, y, alpha, var = vp_case(batch=(2, 3), B=B, N=N, d=d, per_query_t=True, seed=11)
    if layout == "shared_points":
        y = y[0, 0]
    elif layout == "shared_queries":
        x, alpha, var = x[0, 0], alpha[0, 0], var[0, 0]
    elif layout == "mixed":
        y = y[:1]  # (1, 3, N, d) broadcasts against (2, 3, B, d)
    bias = torch.randn(N, dtype=x.dtype, device=DEVICE) if layout == "mixed" else None
    mean, lse = diffmem.softmax_mean(x, y, alpha, var, bias, backend=backend, return_lse=True)
    ref_mean, ref_lse = oracle(x, y, alpha, var, bias)
    if layout == "shared_queries":
        ref_mean, ref_lse = oracle(x.expand(2, 3, B, d), y, alpha, var, bias)
    assert mean.shape == (2, 3, B, d) and lse.shape == (2, 3, B)
    assert rel_fro(mean, ref_mean) <= EXACT_MEAN_TOL
    assert lse_err(lse, ref_lse) <= EXACT_LSE_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_and_masked_points(backend):
    """Finite log-weights, and -inf masking that equals dropping those points."""
    x, y, alpha, var = vp_case(B=7, N=40, d=5, t=0.6, seed=5)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(40, generator=gen).to(x.dtype).to(DEVICE)
    e_mean, e_lse = _check(backend, x, y, alpha, var, bias)
    assert e_mean <= EXACT_MEAN_TOL and e_lse <= EXACT_LSE_TOL

    keep = torch.arange(40, device=DEVICE) % 3 == 0
    masked = bias.masked_fill(~keep, -math.inf)
    mean, lse = diffmem.softmax_mean(x, y, alpha, var, masked, backend=backend, return_lse=True)
    ref_mean, ref_lse = oracle(x, y[keep], alpha, var, bias[keep])
    assert rel_fro(mean, ref_mean) <= EXACT_MEAN_TOL
    assert lse_err(lse, ref_lse) <= EXACT_LSE_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicated_points(backend):
    """Exact duplicates share the weight; the mean is unchanged and lse rises by log(copies)."""
    x, y, alpha, var = vp_case(B=5, N=6, d=4, t=0.3, seed=8)
    doubled = torch.cat([y, y, y])
    m1, l1 = diffmem.softmax_mean(x, y, alpha, var, backend=backend, return_lse=True)
    m3, l3 = diffmem.softmax_mean(x, doubled, alpha, var, backend=backend, return_lse=True)
    assert rel_fro(m3, m1) <= EXACT_MEAN_TOL
    assert lse_err(l3, l1 + math.log(3)) <= EXACT_LSE_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_point(backend):
    """N = 1: the mean is that point and lse is its logit."""
    x, y, alpha, var = vp_case(B=3, N=1, d=7, t=0.05, seed=2)
    mean, lse = diffmem.softmax_mean(x, y, alpha, var, backend=backend, return_lse=True)
    assert torch.equal(mean, y.expand(3, 7))
    diff = x.double() - alpha.double()[:, None] * y.double()
    ref_lse = -(diff**2).sum(-1) / (2 * var.double())
    assert lse_err(lse, ref_lse) <= EXACT_LSE_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_argument_forms_agree(backend):
    """alpha/var as floats, 0-d tensors, (B,) tensors and (B, 1)-broadcast shapes agree."""
    x, y, alpha, var = vp_case(B=5, N=8, d=3, t=0.4, seed=4)
    a, v = float(alpha[0]), float(var[0])
    as_tensor = lambda value: torch.tensor(value, dtype=x.dtype, device=DEVICE)  # noqa: E731
    forms = [(a, v), (as_tensor(a), as_tensor(v)),
             (alpha, var), (alpha[:1], var[:1])]
    outs = [diffmem.softmax_mean(x, y, fa, fv, backend=backend) for fa, fv in forms]
    for out in outs[1:]:
        assert rel_fro(out, outs[0]) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_query_batch(backend):
    x = torch.empty(0, 4, device=DEVICE)
    y = torch.randn(6, 4, device=DEVICE)
    mean, lse = diffmem.softmax_mean(x, y, 0.5, 0.75, backend=backend, return_lse=True)
    assert mean.shape == (0, 4) and lse.shape == (0,)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fast_precision_error_is_bounded(backend):
    """The matmul expansion stays close at moderate noise (see README for measured errors)."""
    x, y, alpha, var = vp_case(B=70, N=300, d=30, t=0.5, seed=6)  # cpu: B >= 64 runs "fast"
    e_mean, e_lse = _check(backend, x, y, alpha, var, precision="fast")
    assert e_mean <= 1e-3 and e_lse <= 1e-3


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not built")
def test_cpu_fast_runs_exact_below_64_queries():
    """Under 64 queries "fast" is slower than "exact" on the CPU: the call runs exact (bitwise
    the same results); from 64 queries on it runs the expansion (different roundings)."""
    from diffmem.ops._cpu import FAST_MIN_QUERIES

    for B, same in [(FAST_MIN_QUERIES - 1, True), (FAST_MIN_QUERIES, False)]:
        x, y, alpha, var = vp_case(B=B, N=200, d=30, t=0.5, seed=B)
        out = [diffmem.softmax_mean(x, y, alpha, var, backend="cpu", precision=p, return_lse=True)
               for p in ("exact", "fast")]
        equal = all(torch.equal(a, b) for a, b in zip(*out))
        assert equal == same, B
