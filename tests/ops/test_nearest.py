"""softmax_mean(..., return_nearest=True): the point with the largest logit per query (ties to
the lower index) and its softmax weight, from the same pass, on every backend and dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE, supports
from test_accuracy_classes import CLASSES, _budget, _seeds, draw_case

import diffmem


def _exact_logits(x, y, alpha, var, bias):
    x, y, alpha, var = (t.double() for t in (x, y, alpha, var))
    diff = x[:, None, :] - alpha[:, None, None] * y[None]
    logits = -(diff * diff).sum(-1) / (2 * var[:, None])
    return logits if bias is None else logits + bias.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_nearest_is_the_largest_logit(backend, precision):
    budget, n = _budget(backend)
    for name in CLASSES:
        for seed in _seeds(name, backend, max(1, n // 4), salt=53):
            x, y, alpha, var, bias = draw_case(name, seed, budget)
            mean, lse, idx, weight = diffmem.softmax_mean(
                x, y, alpha, var, bias, backend=backend, precision=precision, return_lse=True,
                return_nearest=True)
            assert idx.shape == weight.shape == lse.shape and idx.dtype == torch.int64
            assert weight.dtype == x.dtype
            assert torch.equal(mean, diffmem.softmax_mean(
                x, y, alpha, var, bias, backend=backend, precision="exact"))
            logits = _exact_logits(x, y, alpha, var, bias)
            top2 = logits.topk(min(2, y.shape[0]), dim=-1).values
            best = logits.argmax(-1)
            # where the two largest logits are apart by more than float32 can resolve, the index
            # is the exact argmax; everywhere the chosen point's logit is the largest to 1e-4
            clear = (top2[:, 0] - top2[:, -1] > 1e-3) | (y.shape[0] == 1)
            assert torch.equal(idx[clear].cpu(), best[clear].cpu()), f"{name} seed {seed}"
            chosen = logits.gather(-1, idx[:, None].cpu().to(logits.device))[:, 0]
            assert float((top2[:, 0] - chosen).abs().max()) <= 1e-4 * float(
                top2[:, 0].abs().clamp_min(1).max())
            want_w = torch.exp(chosen - torch.logsumexp(logits, -1))
            assert float((weight.double() - want_w).abs().max()) <= 1e-5, f"{name} seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_ties_go_to_the_lower_index(backend, dtype):
    if not supports(backend, dtype):
        pytest.skip(f"{backend} does not serve {dtype}")
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(300, 20, generator=gen, dtype=dtype)
    y[200] = y[17]  # duplicates: equal logits for every query
    y[250] = y[17]
    y[90] = y[40]
    x = torch.stack([y[17], y[40], y[200] + 1e-3, y[5]]) * 0.8
    x = x.to(DEVICE)
    _, idx, weight = diffmem.softmax_mean(x, y.to(DEVICE), 0.8, 0.01, backend=backend,
                                          return_nearest=True)
    assert idx.tolist() == [17, 40, 17, 5]
    # two or three equal copies share the weight
    assert torch.allclose(weight[:3].double().cpu(), torch.tensor([1 / 3, 1 / 2, 1 / 3],
                          dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_batched_and_masked(backend):
    """Leading batch dims, and a bias that masks the nearest point: the next one is chosen."""
    gen = torch.Generator().manual_seed(9)
    y = torch.randn(2, 50, 8, generator=gen)
    x = 0.9 * y[:, :6] + 0.05 * torch.randn(2, 6, 8, generator=gen)
    bias = torch.zeros(2, 50)
    bias[1, 3] = -float("inf")
    _, idx, _ = diffmem.softmax_mean(x.to(DEVICE), y.to(DEVICE), 0.9, 0.0025, bias.to(DEVICE),
                                     backend=backend, return_nearest=True)
    assert idx.shape == (2, 6)
    assert idx[0].tolist() == list(range(6))
    assert idx[1, 3] != 3 and idx[1, [0, 1, 2, 4, 5]].tolist() == [0, 1, 2, 4, 5]


def test_nearest_of_no_queries():
    y = torch.randn(5, 3)
    mean, lse, idx, weight = diffmem.softmax_mean(torch.randn(0, 3), y, 1.0, 1.0,
                                                  return_lse=True, return_nearest=True)
    assert idx.shape == weight.shape == (0,) and idx.dtype == torch.int64
