"""The custom ops pass torch.library.opcheck and run under torch.compile."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from conftest import BACKENDS, DEVICE, FAST_BACKENDS, oracle, rel_fro, supports_points, vp_case

import diffmem


def _canonical_args(backend, with_bias, requires_grad, nearest=False, points_dtype=None):
    x, y, alpha, var = vp_case(batch=(2,), B=3, N=5, d=4, per_query_t=True, seed=3)
    if points_dtype is not None:
        y = y.to(points_dtype)
    bias = torch.randn(2, 5, device=DEVICE) if with_bias else None
    args = [x, y, alpha, var, bias]
    if requires_grad:
        args = [None if a is None else a.detach().requires_grad_(True) for a in args]
    return (*args, backend, "exact", nearest)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("nearest", [False, True])
def test_opcheck_softmax_mean(backend, with_bias, requires_grad, nearest):
    args = _canonical_args(backend, with_bias, requires_grad, nearest)
    torch.library.opcheck(torch.ops.diffmem.softmax_mean.default, args)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if supports_points(b, torch.float16)])
def test_opcheck_softmax_mean_compact_points(backend):
    """Points stored as float16 (gradients flow back in float16)."""
    args = _canonical_args(backend, True, True, points_dtype=torch.float16)
    torch.library.opcheck(torch.ops.diffmem.softmax_mean.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_knn(backend):
    x, y, _, _ = vp_case(batch=(2,), B=3, N=5, d=4, seed=4)
    torch.library.opcheck(torch.ops.diffmem.knn.default, (x, y, 2, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_forward_and_backward(backend):
    """A compiled function (fullgraph) through the op, its gradient, and the eager values."""
    x, y, alpha, var = vp_case(B=5, N=9, d=3, t=0.5, seed=5)

    def loss(x, y, alpha, var):
        mean, lse = diffmem.softmax_mean(x, y, alpha, var, backend=backend, return_lse=True,
                                         check_inputs=False)
        return (mean * mean).sum() + lse.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().requires_grad_(True) for t in (x, y, alpha, var)]
    value = compiled(*leaves)
    grads = torch.autograd.grad(value, leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, y, alpha, var)]
    ref_mean, ref_lse = oracle(*ref_leaves)
    ref_value = (ref_mean * ref_mean).sum() + ref_lse.sum()
    ref_grads = torch.autograd.grad(ref_value, ref_leaves)
    value, ref_value = float(value.detach()), float(ref_value.detach())
    assert abs(value - ref_value) <= 1e-4 * max(1.0, abs(ref_value))
    for got, want in zip(grads, ref_grads):
        assert rel_fro(got, want) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_keeps_the_input_checks(backend):
    """With check_inputs=True the checks are traced into the graph (no graph break under
    fullgraph=True) and still reject bad values, with the eager messages."""
    x, y, alpha, var = vp_case(B=4, N=6, d=3, seed=6)
    compiled = torch.compile(
        lambda x, y: diffmem.softmax_mean(x, y, alpha, var, backend=backend),
        backend="aot_eager", fullgraph=True)
    assert rel_fro(compiled(x, y), diffmem.softmax_mean(x, y, alpha, var, backend=backend)) == 0
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="x contains NaN or Inf"):
        compiled(bad, y)
    knn = torch.compile(lambda q, y: diffmem.knn(q, y, 2, backend=backend), backend="aot_eager",
                        fullgraph=True)
    with pytest.raises(RuntimeError, match="queries contains NaN or Inf"):
        knn(bad, y)


def test_meta_tensors_give_shapes():
    x, y = torch.empty(2, 5, 3, device="meta"), torch.empty(7, 3, device="meta")
    mean, lse = diffmem.softmax_mean(x, y, 0.9, torch.ones(2, 5, device="meta"),
                                     return_lse=True)
    assert mean.shape == (2, 5, 3) and lse.shape == (2, 5) and mean.device.type == "meta"
    dist, idx = diffmem.knn(x, y, k=3)
    assert dist.shape == idx.shape == (2, 5, 3)


def test_double_backward_is_refused_clearly():
    x = torch.randn(4, 3, requires_grad=True)
    mean = diffmem.softmax_mean(x, torch.randn(6, 3), 0.9, 0.5)
    (g,) = torch.autograd.grad(mean.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        g.sum().backward()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("uses", ["mean", "mean+lse", "lse"])
def test_eager_path_equals_the_registered_op(backend, uses, monkeypatch):
    """Plain eager calls skip the dispatcher (softmax_mean's _Direct); values and gradients are
    bitwise those of the registered op, for a masked, grouped float32 call in exact mode."""
    module = importlib.import_module("diffmem.ops.softmax_mean")
    x, y, alpha, var = vp_case(batch=(3,), B=40, N=9, d=5, per_query_t=True, seed=8)
    bias = torch.zeros(3, 9, device=DEVICE)
    bias[1, 4:] = -math.inf

    def run():
        leaves = [t.detach().requires_grad_(True) for t in (y, var)]
        mean, lse = diffmem.softmax_mean(x, leaves[0], alpha, leaves[1], bias, backend=backend,
                                         return_lse=True)
        loss = {"mean": (mean * mean).sum(), "lse": lse.sum(),
                "mean+lse": (mean * mean).sum() + lse.sum()}[uses]
        return (mean, lse, *torch.autograd.grad(loss, leaves))

    assert module._runs_direct(x, y, alpha, var, bias)
    direct = run()
    monkeypatch.setattr(module, "_runs_direct", lambda *tensors: False)
    registered = run()
    for got, want in zip(direct, registered):
        assert torch.equal(got, want)
