"""Exact k nearest neighbours on every available backend against a float64 oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE, FAST_BACKENDS, vp_case

import diffmem

SMALL = [(1, 1, 1, 1), (5, 7, 2, 2), (9, 7, 30, 7), (5, 7, 257, 3)]
LARGE = [(27, 1031, 30, 2), (5, 1000, 3072, 2), (50, 20000, 64, 2)]
CASES = [(b, s) for b in BACKENDS for s in SMALL] + [(b, s) for b in FAST_BACKENDS for s in LARGE]


def _oracle(q, p, k):
    dist = torch.cdist(q.double(), p.double(), compute_mode="donot_use_mm_for_euclid_dist")
    order = torch.sort(dist, dim=-1, stable=True).indices[..., :k]
    return torch.gather(dist, -1, order), order


def _check(backend, q, p, k):
    dist, idx = diffmem.knn(q, p, k, backend=backend)
    ref_dist, ref_idx = _oracle(q, p, k)
    assert dist.dtype == q.dtype and idx.dtype == torch.int64
    assert dist.shape == ref_dist.shape and idx.shape == ref_idx.shape
    rel = ((dist.double() - ref_dist).abs() / ref_dist.clamp_min(1e-30)).max()
    assert float(rel) <= 1e-5
    # Indices must agree except where two candidates are equally near within rounding.
    gathered = torch.cdist(q.double(), p.double(), compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.allclose(torch.gather(gathered, -1, idx), ref_dist, rtol=1e-5, atol=0)
    return dist, idx


@pytest.mark.parametrize("backend,case", CASES)
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_knn_matches_float64(backend, case, offset):
    B, N, d, k = case
    x, y, _, _ = vp_case(B=B, N=N, d=d, t=0.1, offset=offset, seed=B + N)
    _check(backend, x, y, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_groups_and_shared_points(backend):
    x, y, _, _ = vp_case(batch=(3,), B=5, N=9, d=4, t=0.2, seed=9)
    _check(backend, x, y, 2)
    _check(backend, x, y[0], 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_ties_go_to_lower_index(backend):
    """Duplicated points tie exactly: the lower index comes first, deterministically."""
    y = torch.randn(6, 5, device=DEVICE)
    points = torch.cat([y, y])  # point i and i + 6 are identical
    dist, idx = diffmem.knn(y, points, 2, backend=backend)
    assert torch.equal(idx[:, 0], torch.arange(6, device=DEVICE))
    assert torch.equal(idx[:, 1], torch.arange(6, device=DEVICE) + 6)
    assert torch.equal(dist, torch.zeros_like(dist))


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_exact_when_query_is_a_point(backend):
    """A query equal to a far-from-origin point has distance exactly 0 to it."""
    _, y, _, _ = vp_case(B=1, N=50, d=16, offset=1000.0, seed=1)
    dist, idx = diffmem.knn(y[:7], y, 1, backend=backend)
    assert torch.equal(idx[:, 0], torch.arange(7, device=DEVICE))
    assert torch.equal(dist, torch.zeros_like(dist))
