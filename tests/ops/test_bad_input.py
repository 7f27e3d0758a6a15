"""Bad input gets a clear error naming the argument: never a crash, a NaN or a hang."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, DEVICE

import diffmem


def _ok():
    x = torch.randn(4, 3, device=DEVICE)
    y = torch.randn(6, 3, device=DEVICE)
    return x, y


def _nan_at(t, value=math.nan):
    t = t.clone()
    t.view(-1)[0] = value
    return t


CASES = {
    "nan_x": (lambda x, y: (_nan_at(x), y, 0.5, 0.75, None), ValueError, "x contains NaN"),
    "inf_points": (lambda x, y: (x, _nan_at(y, math.inf), 0.5, 0.75, None), ValueError, "points contains Inf"),
    "nan_alpha": (lambda x, y: (x, y, torch.full((4,), math.nan, device=DEVICE), 0.75, None), ValueError, "alpha contains NaN"),
    "inf_var": (lambda x, y: (x, y, 0.5, math.inf, None), ValueError, "var contains Inf"),
    "zero_var": (lambda x, y: (x, y, 0.5, 0.0, None), ValueError, "var must be > 0"),
    "negative_var": (lambda x, y: (x, y, 0.5, torch.tensor([0.1, -0.2, 0.3, 0.4], device=DEVICE), None), ValueError, "var must be > 0"),
    "nan_bias": (lambda x, y: (x, y, 0.5, 0.75, _nan_at(torch.zeros(6, device=DEVICE))), ValueError, "bias contains NaN"),
    "pos_inf_bias": (lambda x, y: (x, y, 0.5, 0.75, _nan_at(torch.zeros(6, device=DEVICE), math.inf)), ValueError, "bias contains NaN or \\+Inf"),
    "all_masked": (lambda x, y: (x, y, 0.5, 0.75, torch.full((6,), -math.inf, device=DEVICE)), ValueError, "masks out every point"),
    "mismatched_d": (lambda x, y: (x, y[:, :2], 0.5, 0.75, None), ValueError, "feature dimension"),
    "mismatched_batch": (lambda x, y: (x.expand(2, 4, 3), y.expand(3, 6, 3), 0.5, 0.75, None), ValueError, "do not broadcast"),
    "alpha_wrong_length": (lambda x, y: (x, y, torch.ones(3, device=DEVICE), 0.75, None), ValueError, "alpha must broadcast"),
    "bias_wrong_length": (lambda x, y: (x, y, 0.5, 0.75, torch.zeros(5, device=DEVICE)), ValueError, "bias must have shape"),
    "mixed_dtypes": (lambda x, y: (x, y.double(), 0.5, 0.75, None), TypeError, "points has dtype torch.float64"),
    "mixed_param_dtype": (lambda x, y: (x, y, torch.tensor(0.5, dtype=torch.float64, device=DEVICE), 0.75, None), TypeError, "alpha has dtype"),
    "integer_x": (lambda x, y: (x.long(), y, 0.5, 0.75, None), TypeError, "x must have dtype float32 or float64"),
    "integer_alpha": (lambda x, y: (x, y, torch.tensor(1, device=DEVICE), 0.75, None), TypeError, "alpha must be a floating-point"),
    "int64_points": (lambda x, y: (x, y.long(), 0.5, 0.75, None), TypeError, "points must have the dtype of x or.*storage dtype"),
    "half_points_double_x": (lambda x, y: (x.double(), y.half(), 0.5, 0.75, None), TypeError, "float32 x, a storage dtype"),
    "empty_points": (lambda x, y: (x, y[:0], 0.5, 0.75, None), ValueError, "N = 0"),
    "zero_dim": (lambda x, y: (x[:, :0], y[:, :0], 0.5, 0.75, None), ValueError, "d = 0"),
    "vector_x": (lambda x, y: (x[0], y, 0.5, 0.75, None), ValueError, "x must have shape"),
    "not_a_tensor": (lambda x, y: (x.tolist(), y, 0.5, 0.75, None), TypeError, "x must be a torch.Tensor"),
    "string_var": (lambda x, y: (x, y, 0.5, "0.75", None), TypeError, "var must be a float or a tensor"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_softmax_mean_rejects(backend, case):
    make, error, message = CASES[case]
    with pytest.raises(error, match=message):
        diffmem.softmax_mean(*make(*_ok()), backend=backend)


def test_bad_precision_and_backend_names():
    x, y = _ok()
    with pytest.raises(ValueError, match="precision must be one of"):
        diffmem.softmax_mean(x, y, 0.5, 0.75, precision="approx")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        diffmem.softmax_mean(x, y, 0.5, 0.75, backend="gpu")


def test_unavailable_backend_is_an_error_not_a_fallback():
    """Every backend that cannot run a call (not built, no device, wrong device or dtype)
    refuses it with the reason instead of falling back to another backend."""
    x, y = _ok()
    checked = 0
    for name, info in diffmem.backends().items():
        if info["available"] and x.device.type in info["devices"]:
            if "float64" in info["dtypes"]:
                continue  # this backend runs the call
            x, y = x.double(), y.double()
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run this call"):
            diffmem.softmax_mean(x, y, 0.5, 0.75, backend=name)
        x, y = _ok()
        checked += 1
    assert checked >= 1  # at least the GPU backends' float32-only or device limits


def test_environment_variable_selects_backend(monkeypatch):
    x, y = _ok()
    monkeypatch.setenv("DIFFMEM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown DIFFMEM_BACKEND 'nonsense'"):
        diffmem.softmax_mean(x, y, 0.5, 0.75)
    monkeypatch.setenv("DIFFMEM_BACKEND", "reference")
    out = diffmem.softmax_mean(x, y, 0.5, 0.75)
    assert torch.isfinite(out).all()


def test_check_inputs_false_gives_the_same_result_on_valid_input():
    x, y = _ok()
    checked = diffmem.softmax_mean(x, y, 0.5, 0.75)
    unchecked = diffmem.softmax_mean(x, y, 0.5, 0.75, check_inputs=False)
    assert torch.equal(checked, unchecked)


KNN_CASES = {
    "k_too_large": (lambda x, y: (x, y, 7), ValueError, "k must satisfy 1 <= k <= N = 6"),
    "k_zero": (lambda x, y: (x, y, 0), ValueError, "k must satisfy"),
    "k_float": (lambda x, y: (x, y, 2.0), TypeError, "k must be an int"),
    "nan_queries": (lambda x, y: (_nan_at(x), y, 2), ValueError, "queries contains NaN"),
    "empty_points": (lambda x, y: (x, y[:0], 1), ValueError, "N = 0"),
    "mismatched_d": (lambda x, y: (x, y[:, :2], 2), ValueError, "feature dimension"),
    "integer_points": (lambda x, y: (x, y.long(), 2), TypeError, "points must have the dtype of queries or"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(KNN_CASES))
def test_knn_rejects(backend, case):
    make, error, message = KNN_CASES[case]
    with pytest.raises(error, match=message):
        diffmem.knn(*make(*_ok()), backend=backend)


def test_backends_report_says_why():
    report = diffmem.backends()
    assert report["reference"]["available"]
    for name, info in report.items():
        assert info["available"] or info["reason"], name
