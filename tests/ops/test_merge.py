"""Exact merges of partial results: merged over random splits of the points, softmax_mean,
its gradients and knn equal the unsplit op's results."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import BACKENDS, DEVICE, lse_err, oracle, rel_fro, vp_case

import diffmem

BACKEND = "cpu" if "cpu" in BACKENDS else "reference"


def random_split(N: int, P: int, seed: int) -> list[torch.Tensor]:
    """P disjoint index sets covering 0..N-1 (each point to a random part; parts may be
    empty), each ascending."""
    gen = torch.Generator().manual_seed(seed)
    part = torch.randint(0, P, (N,), generator=gen)
    return [torch.nonzero(part == p).flatten().to(DEVICE) for p in range(P)]


def partials(x, y, alpha, var, bias, parts, masked=()):
    """Stacked (means, lses) of softmax_mean over each part; an empty or masked part gets
    lse = -inf and a NaN mean, as a caller computing nothing there would give."""
    means, lses = [], []
    for p, idx in enumerate(parts):
        if len(idx) == 0 or p in masked:
            means.append(torch.full_like(x, math.nan))
            lses.append(torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device))
            continue
        b = None if bias is None else bias[..., idx]
        mean, lse = diffmem.softmax_mean(x, y[..., idx, :], alpha, var, b, backend=BACKEND,
                                         return_lse=True)
        means.append(mean)
        lses.append(lse)
    return torch.stack(means), torch.stack(lses)


def masked_bias(bias, parts, masked):
    """bias with every point of the parts in masked set to -inf."""
    out = bias.clone()
    for p in masked:
        out[..., parts[p]] = -math.inf
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("P", range(1, 8))
def test_merged_means_equal_unsplit(P, dtype, tol):
    """Over a seeded random split into P parts (some possibly empty), with bias."""
    N = 40
    x, y, alpha, var = vp_case(B=9, N=N, d=6, per_query_t=True, seed=P, dtype=dtype)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(P), dtype=dtype).to(DEVICE)
    parts = random_split(N, P, seed=10 + P)
    mean, lse = diffmem.merge_softmax_means(*partials(x, y, alpha, var, bias, parts))
    assert mean.dtype == dtype and lse.dtype == dtype
    ref_mean, ref_lse = oracle(x, y, alpha, var, bias)
    assert rel_fro(mean, ref_mean) <= tol and lse_err(lse, ref_lse) <= tol
    op_mean, op_lse = diffmem.softmax_mean(x, y, alpha, var, bias, backend=BACKEND,
                                           return_lse=True)
    assert rel_fro(mean, op_mean) <= 2 * tol and lse_err(lse, op_lse) <= 2 * tol


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("t", [0.5, 0.9])
def test_float32_parts_with_float64_lse_merge_at_large_d(P, t):
    """Held-out queries at d = 3072 (|lse| ~ 1e3 .. 1e4): each part's lse in float64
    (lse_dtype), which is absolute to ~1e-7, keeps the merged mean at the unsplit op's accuracy
    (a float32 lse alone, rounded by |lse| x 6e-8, would move the parts' weights by ~1e-4)."""
    gen = torch.Generator().manual_seed(P)
    N, d, B = 2000, 3072, 6
    y = torch.randn(N, d, generator=gen)
    alpha = (1 - t * t) ** 0.5
    x = alpha * torch.randn(B, d, generator=gen) + t * torch.randn(B, d, generator=gen)
    x, y = x.to(DEVICE), y.to(DEVICE)
    outs = [diffmem.softmax_mean(x, p, alpha, t * t, backend=BACKEND, return_lse=True,
                                 lse_dtype=torch.float64) for p in y.chunk(P)]
    mean, lse = diffmem.merge_softmax_means([m for m, _ in outs], [v for _, v in outs])
    ref_mean, ref_lse = diffmem.softmax_mean(x.double(), y.double(), alpha, t * t,
                                             backend="reference", return_lse=True)
    assert lse.dtype == torch.float64
    assert rel_fro(mean, ref_mean) <= 1e-6 and lse_err(lse, ref_lse) <= 1e-6


@pytest.mark.parametrize("P", [2, 3, 5, 7])
def test_fully_masked_part_contributes_nothing(P):
    """A part whose points are all masked (bias = -inf) has lse = -inf and a NaN mean."""
    N = 30
    x, y, alpha, var = vp_case(batch=(2,), B=5, N=N, d=4, per_query_t=True, seed=P,
                               dtype=torch.float64)
    parts = random_split(N, P, seed=P)
    masked = {max(range(P), key=lambda p: len(parts[p]))}  # the largest part
    bias = masked_bias(torch.zeros(2, N, dtype=torch.float64, device=DEVICE), parts, masked)
    means, lses = partials(x, y, alpha, var, bias, parts, masked)
    assert torch.isnan(means).any()
    mean, lse = diffmem.merge_softmax_means(means, lses)
    op_mean, op_lse = diffmem.softmax_mean(x, y, alpha, var, bias, backend=BACKEND,
                                           return_lse=True)
    assert rel_fro(mean, op_mean) <= 1e-12 and lse_err(lse, op_lse) <= 1e-12


@pytest.mark.parametrize("P", range(1, 8))
def test_gradients_through_merge_equal_unsplit(P):
    """Autograd through the merge gives the unsplit op's gradients w.r.t. x, points, alpha, var
    and bias; a masked part with a NaN mean gets zero (not NaN) gradients."""
    N, B, d = 36, 7, 5
    x, y, alpha, var = vp_case(B=B, N=N, d=d, per_query_t=True, seed=20 + P, dtype=torch.float64)
    gen = torch.Generator().manual_seed(P)
    parts = random_split(N, P, seed=30 + P)
    masked = {0} if P > 1 and len(parts[0]) < N else set()
    bias = masked_bias(torch.randn(N, generator=gen, dtype=torch.float64).to(DEVICE), parts,
                       masked)
    g = torch.randn(B, d, generator=gen, dtype=torch.float64).to(DEVICE)
    h = torch.randn(B, generator=gen, dtype=torch.float64).to(DEVICE)

    def grads(split: bool):
        leaves = [t.clone().requires_grad_() for t in (x, y, alpha, var, bias)]
        xs, ys, a, v, b = leaves
        if split:
            means, lses = partials(xs, ys, a, v, b, parts, masked)
            nan_mean = means.detach().clone().requires_grad_()  # NaN in the masked part
            means = torch.where(torch.isnan(nan_mean), nan_mean, means)
            mean, lse = diffmem.merge_softmax_means(means, lses)
        else:
            mean, lse = diffmem.softmax_mean(xs, ys, a, v, b, backend=BACKEND, return_lse=True)
        ((mean * g).sum() + (lse * h).sum()).backward()
        out = [t.grad for t in leaves]
        if split:
            assert not torch.isnan(nan_mean.grad).any()
            assert (nan_mean.grad[torch.isnan(nan_mean)] == 0).all()
        return out

    for name, got, want in zip(("x", "points", "alpha", "var", "bias"), grads(True), grads(False)):
        assert torch.isfinite(got).all(), name
        assert rel_fro(got, want) <= 1e-10, name
    if masked:
        assert (grads(True)[4][parts[0]] == 0).all()


def test_merge_of_all_masked_query_has_finite_gradients():
    """A query for which every part has lse = -inf: lse -inf, mean NaN, no NaN gradients."""
    lses = torch.tensor([[0.5, -math.inf], [-1.0, -math.inf]], dtype=torch.float64,
                        requires_grad=True)
    means = torch.randn(2, 2, 3, dtype=torch.float64).requires_grad_()
    mean, lse = diffmem.merge_softmax_means(means, lses)
    assert lse[1] == -math.inf and torch.isnan(mean[1]).all()
    assert lse[0].item() == pytest.approx(math.log(math.exp(0.5) + math.exp(-1.0)))
    (mean[0].sum() + lse[0]).backward()
    assert torch.isfinite(lses.grad).all() and torch.isfinite(means.grad).all()
    assert (lses.grad[:, 1] == 0).all() and (means.grad[:, 1] == 0).all()


def test_sequences_of_parts_are_stacked():
    means = [torch.randn(3, 2), torch.randn(3, 2)]
    lses = [torch.randn(3), torch.randn(3)]
    a = diffmem.merge_softmax_means(means, lses)
    b = diffmem.merge_softmax_means(torch.stack(means), torch.stack(lses))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def padded_knn(queries, points, idx, k):
    """knn over points[..., idx, :] with global indices, padded to k with (inf, -1)."""
    B = queries.shape[-2]
    dist = torch.full((B, k), math.inf, dtype=queries.dtype, device=queries.device)
    gidx = torch.full((B, k), -1, dtype=torch.int64, device=queries.device)
    kp = min(k, len(idx))
    if kp:
        dd, ii = diffmem.knn(queries, points[idx], kp, backend=BACKEND)
        dist[:, :kp], gidx[:, :kp] = dd, idx[ii]
    return dist, gidx


@pytest.mark.parametrize("P", range(1, 8))
@pytest.mark.parametrize("k", [1, 3, 8])
def test_merge_knn_equals_unsplit(P, k):
    """With exact duplicates of some points spread over the parts: ties to the lower index."""
    gen = torch.Generator().manual_seed(100 * P + k)
    y = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y[20:25] = y[:5]  # duplicates, equal distances
    queries = torch.cat([y[:3], torch.randn(6, 4, generator=gen, dtype=torch.float64)])
    y, queries = y.to(DEVICE), queries.to(DEVICE)
    parts = random_split(30, P, seed=P + k)
    lists = [padded_knn(queries, y, idx, k) for idx in parts]
    dist, idx = diffmem.merge_knn(torch.stack([d for d, _ in lists]),
                                  torch.stack([i for _, i in lists]), k)
    ref_dist, ref_idx = diffmem.knn(queries, y, k, backend=BACKEND)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-12, atol=0)


def test_merge_knn_ties_and_padding():
    """Equal distances across parts go to the lower index whatever the part order; padding
    comes after every real candidate, inf distances included."""
    inf = math.inf
    dists = torch.tensor([[[1.0, 2.0, inf]], [[1.0, inf, inf]], [[0.5, 2.0, inf]]])
    idxs = torch.tensor([[[7, 9, -1]], [[3, -1, -1]], [[11, 8, -1]]])
    dist, idx = diffmem.merge_knn(dists, idxs, 5)
    assert dist.tolist() == [[0.5, 1.0, 1.0, 2.0, 2.0]]
    assert idx.tolist() == [[11, 3, 7, 8, 9]]
    dist, idx = diffmem.merge_knn(dists, idxs, 7)
    assert idx.tolist() == [[11, 3, 7, 8, 9, -1, -1]] and math.isinf(dist[0, -1])


def dense_nearest(x, y, alpha, var, bias):
    """(argmax logit, ties to the lower index; its softmax weight; lse), float64."""
    diff = x[:, None, :] - alpha[:, None, None] * y[None]
    logits = bias[None] - (diff * diff).sum(-1) / (2 * var[:, None])
    best = logits.amax(-1, keepdim=True)
    idx = torch.where(logits == best, torch.arange(len(y), device=x.device), len(y)).amin(-1)
    lse = torch.logsumexp(logits, -1)
    return idx, torch.exp(best[:, 0] - lse), lse


@pytest.mark.parametrize("P", range(1, 8))
def test_merge_nearest_equals_unsplit(P):
    """Each part's heaviest point and weight (dense float64) merge to the global ones."""
    N = 25
    x, y, alpha, var = vp_case(B=11, N=N, d=3, per_query_t=True, seed=P, dtype=torch.float64)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(P), dtype=torch.float64)
    bias = bias.to(DEVICE)
    parts = random_split(N, P, seed=P)
    idxs, weights, lses = [], [], []
    for idx in parts:
        if len(idx) == 0:
            idxs.append(torch.full((11,), 5, dtype=torch.int64, device=DEVICE))  # ignored
            weights.append(torch.full((11,), math.nan, dtype=torch.float64, device=DEVICE))
            lses.append(torch.full((11,), -math.inf, dtype=torch.float64, device=DEVICE))
            continue
        i, w, lse = dense_nearest(x, y[idx], alpha, var, bias[idx])
        idxs.append(idx[i])
        weights.append(w)
        lses.append(lse)
    idx, weight = diffmem.merge_nearest(torch.stack(idxs), torch.stack(weights),
                                        torch.stack(lses))
    ref_idx, ref_weight, _ = dense_nearest(x, y, alpha, var, bias)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weight, ref_weight, rtol=1e-12, atol=1e-300)


def test_merge_nearest_ties_and_empty_parts():
    """Equal largest logits: the lower global index wins, whatever the part order; a query
    without any point gives (-1, 0)."""
    inf = math.inf
    idxs = torch.tensor([[9, 4], [2, 1]])
    weights = torch.tensor([[0.5, 0.5], [0.5, 0.25]], dtype=torch.float64)
    lses = torch.tensor([[0.0, -inf], [0.0, -inf]], dtype=torch.float64)
    idx, weight = diffmem.merge_nearest(idxs, weights, lses)
    assert idx.tolist() == [2, -1]
    assert weight[0].item() == pytest.approx(0.25) and weight[1].item() == 0


def _bad_merge_calls():
    m, l = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    d, i = torch.zeros(2, 3, 2), torch.zeros(2, 3, 2, dtype=torch.int64)
    w = torch.ones(2, 3)
    merge_means, merge_knn = diffmem.merge_softmax_means, diffmem.merge_knn
    return [
        ("mismatched shapes", lambda: merge_means(m, torch.zeros(2, 4)), ValueError, "lses"),
        ("P = 0", lambda: merge_means(m[:0], l[:0]), ValueError, "P = 0"),
        ("empty list", lambda: merge_means([], []), ValueError, "P >= 1"),
        ("too few dims", lambda: merge_means(m[0, 0], l[0]), ValueError, "means"),
        ("int means", lambda: merge_means(m.long(), l), TypeError, "means"),
        ("int lses", lambda: merge_means(m, l.long()), TypeError, "lses"),
        ("NaN lse", lambda: merge_means(m, torch.full_like(l, math.nan)), ValueError, "NaN"),
        ("not a tensor", lambda: merge_means("m", l), TypeError, "means"),
        ("k too large", lambda: merge_knn(d, i, 5), ValueError, "P * k_p"),
        ("k = 0", lambda: merge_knn(d, i, 0), ValueError, "k"),
        ("k float", lambda: merge_knn(d, i, 2.0), TypeError, "k"),
        ("float idxs", lambda: merge_knn(d, i.double(), 2), TypeError, "idxs"),
        ("int dists", lambda: merge_knn(i, i, 2), TypeError, "dists"),
        ("knn shapes", lambda: merge_knn(d, i[:, :, :1], 1), ValueError, "idxs"),
        ("knn P = 0", lambda: merge_knn(d[:0], i[:0], 1), ValueError, "P = 0"),
        ("nearest shapes", lambda: diffmem.merge_nearest(i[..., 0], w[:, :2], w), ValueError,
         "weights"),
        ("nearest idx dtype", lambda: diffmem.merge_nearest(w, w, w), TypeError, "idxs"),
    ]


@pytest.mark.parametrize("case", _bad_merge_calls(), ids=lambda c: c[0])
def test_bad_input_raises_clear_errors(case):
    _, call, exc, words = case
    with pytest.raises(exc, match=re.escape(words)):
        call()
