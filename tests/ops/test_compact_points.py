"""Points stored as uint8, float16 or bfloat16 (with float32 queries) on every backend that
takes them: the results equal those of the same call on the points converted to float32, bit
for bit (each stored value is a float32, and the kernels convert as they read), so exact mode's
bound carries over; the input classes of test_accuracy_classes.py supply the cases.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE, lse_err, rel_fro, supports_points
from test_accuracy_classes import LSE_TOL, MEAN_TOL, _budget, _seeds, draw_case

import diffmem

DTYPES = [torch.uint8, torch.float16, torch.bfloat16]
CLASSES = ["near_vp", "held_out_vp", "far", "offset_near", "scaled_1e3"]


def _store(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y in a storage dtype: uint8 codes of y's range (0 .. 255), or y rounded to dtype."""
    if dtype != torch.uint8:
        return y.to(dtype)
    lo, hi = y.min(), y.max()
    return ((y - lo) / (hi - lo).clamp_min(1e-30) * 255).round().clamp(0, 255).to(torch.uint8)


def _case(name, seed, budget, dtype):
    x, y, alpha, var, bias = draw_case(name, seed, budget)
    stored = _store(y, dtype)
    if dtype == torch.uint8:  # queries around the codes' scale
        lo, hi = y.min(), y.max()
        scale = 255 / float((hi - lo).clamp_min(1e-30))
        x = (x - alpha[:, None] * lo) * scale
        var = var * scale * scale
    return x, stored, alpha, var, bias


def _classes(backend):
    """All the classes on the fast backends; two (one near, one far) on the slow emulations."""
    budget, _ = _budget(backend)
    return CLASSES if budget >= _budget("cpu")[0] else ["near_vp", "far"]


def _pairs(dtype):
    return [b for b in BACKENDS if supports_points(b, dtype)]


PARAMS = [(b, t) for t in DTYPES for b in _pairs(t)]


@pytest.mark.parametrize(("backend", "dtype"), PARAMS)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_forward_and_nearest_equal_float32_points(backend, dtype, precision):
    budget, n = _budget(backend)
    for name in _classes(backend):
        for seed in _seeds(name, backend, max(1, n // 4), salt=31):
            x, stored, alpha, var, bias = _case(name, seed, budget, dtype)
            kw = dict(backend=backend, precision=precision, return_lse=True)
            got = diffmem.softmax_mean(x, stored, alpha, var, bias, **kw)
            want = diffmem.softmax_mean(x, stored.float(), alpha, var, bias, **kw)
            for a, b in zip(got, want):
                assert torch.equal(a, b), f"{name} seed {seed}"
            got = diffmem.softmax_mean(x, stored, alpha, var, bias, backend=backend,
                                       return_nearest=True)
            want = diffmem.softmax_mean(x, stored.float(), alpha, var, bias, backend=backend,
                                        return_nearest=True)
            for a, b in zip(got, want):
                assert torch.equal(a, b), f"{name} seed {seed} (nearest)"


@pytest.mark.parametrize(("backend", "dtype"), PARAMS)
def test_exact_within_bound_of_converted_points(backend, dtype):
    """Against the float64 oracle on the converted points (the bound of float32 points)."""
    budget, n = _budget(backend)
    for name in _classes(backend):
        for seed in _seeds(name, backend, max(1, n // 4), salt=37):
            x, stored, alpha, var, bias = _case(name, seed, budget, dtype)
            mean, lse = diffmem.softmax_mean(x, stored, alpha, var, bias, backend=backend,
                                             return_lse=True)
            want_mean, want_lse = diffmem.softmax_mean(
                x.double(), stored.double(), alpha.double(), var.double(),
                None if bias is None else bias.double(), backend="reference", return_lse=True)
            em, el = rel_fro(mean, want_mean), lse_err(lse, want_lse)
            assert em <= MEAN_TOL and el <= LSE_TOL, f"{name} seed {seed}: {em:.2e} {el:.2e}"


@pytest.mark.parametrize(("backend", "dtype"), PARAMS)
def test_gradients_equal_float32_points(backend, dtype):
    """Gradients w.r.t. x, alpha, var and bias equal those with float32 points; the points'
    own gradient (float dtypes) is the float32 one rounded to the points' dtype."""
    budget, n = _budget(backend)
    for name in _classes(backend)[:3]:
        for seed in _seeds(name, backend, 1, salt=41):
            x, stored, alpha, var, bias = _case(name, seed, budget / 4, dtype)
            gen = torch.Generator().manual_seed(seed)
            g = torch.randn(x.shape, generator=gen).to(DEVICE)
            h = torch.randn(x.shape[0], generator=gen).to(DEVICE)
            others = [t for t in (alpha, var, bias) if t is not None]
            grads = []
            for points in (stored, stored.float()):
                leaves = [t.detach().clone().requires_grad_(True) for t in (x, *others)]
                pts = points.detach().clone().requires_grad_(points.is_floating_point())
                args = [leaves[0], pts, *leaves[1:]]
                mean, lse = diffmem.softmax_mean(*args, backend=backend, return_lse=True)
                wrt = [a for a in args if a.requires_grad]
                grads.append(dict(zip(map(id, wrt), torch.autograd.grad((mean, lse), wrt, (g, h)))))
                grads[-1] = [grads[-1].get(id(a)) for a in args]
            for i, (a, b) in enumerate(zip(*grads)):
                if i == 1:  # the points
                    if dtype == torch.uint8:
                        assert a is None
                    else:
                        assert a.dtype == dtype and torch.equal(a, b.to(dtype))
                else:
                    assert torch.equal(a, b), f"{name} seed {seed}: input {i}"


@pytest.mark.parametrize(("backend", "dtype"), PARAMS)
def test_knn_equals_float32_points(backend, dtype):
    budget, n = _budget(backend)
    for name in _classes(backend):
        x, stored, _, _, _ = _case(name, _seeds(name, backend, 1, salt=43)[0], budget, dtype)
        k = min(3, stored.shape[0])
        got = diffmem.knn(x, stored, k, backend=backend)
        want = diffmem.knn(x, stored.float(), k, backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name


def test_backends_report_point_dtypes():
    report = diffmem.backends()
    assert set(report["reference"]["point_dtypes"]) == {"uint8", "float16", "bfloat16"}
    for info in report.values():
        assert set(info["point_dtypes"]) <= {"uint8", "float16", "bfloat16"}
