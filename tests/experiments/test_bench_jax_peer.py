"""The optional jax peer of `diffmem bench` computes the mean the other methods compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.tools.bench import jax_peer
from diffmem.tools.bench.methods import build_methods
from diffmem.tools.bench.problems import make_problem, reference_mean, row_errors


def test_jax_peer_is_listed_and_skipped_with_a_reason_when_it_cannot_run():
    (method,) = [m for m in build_methods("cpu", False) if m.name == jax_peer.NAME]
    assert method.kind == "baseline"
    assert method.skip == jax_peer.skip_reason("cpu")
    if method.skip:
        assert "jax" in method.skip


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sigma", [0.5, 0.9])
def test_jax_peer_matches_float64(bias, sigma):
    pytest.importorskip("jax")
    if jax_peer.skip_reason("cpu"):
        pytest.skip(jax_peer.skip_reason("cpu"))
    p = make_problem(40, 300, 16, sigma, seed=2, bias=bias)
    call = jax_peer.setup(p, "cpu")
    out = call()
    assert tuple(out.shape) == (40, 16)
    ref = reference_mean(p, 40)
    _, worst = row_errors(out, ref)
    # float32 matmul-form logits err by ~eps |x| |y| alpha / var: ~4e-7 in the mean here
    assert worst < 1e-5
    # the float32 torch peer of the same form errs alike
    naive = torch.softmax(
        (p.x @ p.y.T) * (p.alpha / p.var)
        - (p.alpha ** 2 / (2 * p.var)) * (p.y * p.y).sum(1)
        + (p.bias if bias else 0.0), -1) @ p.y
    assert torch.allclose(torch.tensor(np.asarray(out)), naive, rtol=1e-4, atol=1e-5)
