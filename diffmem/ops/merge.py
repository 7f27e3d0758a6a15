"""Exact merges of results computed over disjoint parts of the points.

When the points are split into parts 1..P (by memory, by file, by device or by process), the
softmax-weighted mean over their union follows from each part's (mean_p, lse_p) alone:

    M      = max_p lse_p
    w_p    = exp(lse_p - M)
    lse    = M + log(sum_p w_p)
    mean   = sum_p w_p mean_p / sum_p w_p

computed here in float64 and rounded once to the inputs' dtype. The same holds for the k nearest
neighbours (the k smallest of the parts' lists) and for the nearest point (the part whose
heaviest point has the largest logit lse_p + log w_p). Every function takes the parts stacked
on dim 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_INT64_MAX = torch.iinfo(torch.int64).max


def _stacked(name: str, value) -> torch.Tensor:
    """A tensor stacked on dim 0, or a sequence of equally shaped tensors stacked here."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise ValueError(f"{name} is empty: at least one part (P >= 1) is needed")
        if not all(isinstance(v, torch.Tensor) for v in value):
            raise TypeError(f"{name} must be a tensor or a sequence of tensors")
        shapes = {tuple(v.shape) for v in value}
        if len(shapes) > 1:
            raise ValueError(f"the parts of {name} have different shapes {sorted(shapes)}; "
                             "they must all have the same shape")
        return torch.stack(list(value))
    raise TypeError(f"{name} must be a tensor stacked on dim 0 (P, ...) or a sequence of "
                    f"tensors, got {type(value).__name__}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_parts(name: str, t: torch.Tensor, min_dim: int, what: str) -> None:
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has P = 0 parts (dim 0); at least one part is needed")


def _check_same(names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{names[1]} is on {b.device} but {names[0]} is on {a.device}")


def _check_lses(lses: torch.Tensor) -> None:
    """lse may be finite or -inf (an empty or fully masked part); never NaN or +inf."""
    if lses.numel() == 0:
        return
    if bool(torch.isnan(lses).any()) or bool((lses == math.inf).any()):
        raise ValueError("lses contains NaN or +inf; a part's lse must be finite or -inf "
                         "(-inf: the part has no point with a finite logit)")


def _logsumexp_parts(lse64: torch.Tensor):
    """(lse, total, shift): logsumexp over dim 0 of float64 lse64, differentiable.

    Parts with -inf contribute nothing; where every part is -inf the result is -inf with zero
    gradients. total = sum_p exp(lse_p - shift) (0 where every part is -inf) and shift the
    finite max used, so that the weights are exp(lse_p - shift) / total.
    """
    top = lse64.detach().amax(0)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse64 - shift)
    total = weights.sum(0)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, -math.inf), shift + torch.log(safe_total))
    return lse, weights, safe_total, empty


def merge_softmax_means(means, lses, *, check_inputs: bool = True):
    """The softmax-weighted mean and lse over the union of disjoint parts of the points.

    Args:
        means: (P, ..., B, d) each part's mean (``softmax_mean`` over that part), or a
            sequence of P tensors (..., B, d).
        lses: (P, ..., B) each part's lse, or a sequence of P tensors (..., B). A part with
            lse = -inf (no points, or all masked by bias = -inf) contributes nothing, whatever
            its mean holds (NaN included).
        check_inputs: refuse NaN or +inf in lses (one scan of P*B values).

    Returns:
        (mean (..., B, d) in means' dtype, lse (..., B) in lses' dtype): exactly what
        ``softmax_mean`` over all the points gives, merged in float64. Differentiable w.r.t.
        means and lses, without NaN gradients (parts with lse = -inf get zero gradients).
        Where every part has lse = -inf there is no point to average: lse is -inf and mean NaN.
    """
    means = _stacked("means", means)
    lses = _stacked("lses", lses)
    _check_float("means", means)
    _check_float("lses", lses)
    _check_parts("means", means, 3, "(P, ..., B, d)")
    _check_same(("means", "lses"), means, lses)
    if tuple(lses.shape) != tuple(means.shape[:-1]):
        raise ValueError(f"lses must have shape (P, ..., B) = {tuple(means.shape[:-1])} to match "
                         f"means {tuple(means.shape)}, got {tuple(lses.shape)}")
    if check_inputs:
        _check_lses(lses)
    lse, weights, total, empty = _logsumexp_parts(lses.double())
    # A part with no weight contributes nothing, even a NaN mean (and gets a zero gradient).
    live = (weights > 0).unsqueeze(-1)
    parts = torch.where(live, means.double(), torch.zeros((), dtype=torch.float64,
                                                          device=means.device))
    mean = (weights.unsqueeze(-1) * parts).sum(0) / total.unsqueeze(-1)
    mean = torch.where(empty.unsqueeze(-1), torch.full_like(mean, math.nan), mean)
    return mean.to(means.dtype), lse.to(lses.dtype)


def merge_knn(dists, idxs, k: int):
    """The k nearest points over the union of parts, from each part's k-nearest lists.

    Args:
        dists: (P, ..., B, k_p) each part's distances (``knn`` over that part; any order),
            or a sequence of P tensors; inf marks padding (a part with fewer than k_p points).
        idxs: (P, ..., B, k_p) int64 GLOBAL indices of those points (padding: any value,
            conventionally -1).
        k: how many to keep, 1 <= k <= P * k_p.

    Returns:
        dist (..., B, k) ascending, in dists' dtype, and idx (..., B, k) int64; ties go to the
        lower global index, padding comes last (so it appears only where the parts together
        hold fewer than k points). Not differentiable.
    """
    dists = _stacked("dists", dists)
    idxs = _stacked("idxs", idxs)
    _check_float("dists", dists)
    if idxs.dtype != torch.int64:
        raise TypeError(f"idxs must be an int64 tensor of global indices, got dtype {idxs.dtype}")
    _check_parts("dists", dists, 3, "(P, ..., B, k_p)")
    _check_same(("dists", "idxs"), dists, idxs)
    if tuple(idxs.shape) != tuple(dists.shape):
        raise ValueError(f"idxs must have the shape of dists {tuple(dists.shape)}, "
                         f"got {tuple(idxs.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    P, kp = dists.shape[0], dists.shape[-1]
    if not 1 <= k <= P * kp:
        raise ValueError(f"k must satisfy 1 <= k <= P * k_p = {P} * {kp} = {P * kp} (the "
                         f"candidates the parts hold), got k = {k}")
    if dists.numel() and bool(torch.isnan(dists).any()):
        raise ValueError("dists contains NaN; distances must be numbers (inf marks padding)")
    dists, idxs = dists.detach(), idxs.detach()
    cand_d = dists.movedim(0, -2).flatten(-2)
    cand_i = idxs.movedim(0, -2).flatten(-2)
    # Sort by index, then stably by distance: ties keep the lower index first; padding
    # (inf) sorts after every real point at inf.
    pad = torch.isinf(cand_d) & (cand_d > 0)
    key = torch.where(pad, torch.full_like(cand_i, _INT64_MAX), cand_i)
    order = torch.sort(key, dim=-1, stable=True).indices
    cand_d, cand_i = cand_d.gather(-1, order), cand_i.gather(-1, order)
    order = torch.sort(cand_d, dim=-1, stable=True).indices[..., :k]
    return cand_d.gather(-1, order), cand_i.gather(-1, order)


def merge_nearest(idxs, weights, lses):
    """The heaviest point over the union of parts and its softmax weight there.

    Args:
        idxs: (P, ..., B) int64 GLOBAL index of each part's largest-logit point.
        weights: (P, ..., B) its softmax weight within the part.
        lses: (P, ..., B) the part's lse; -inf marks a part without points (its idx and
            weight are ignored).

    Returns:
        idx (..., B) int64 and weight (..., B) in weights' dtype. The part whose point has the
        largest logit lse_p + log w_p wins (ties to the lower global index); its weight over
        the union is exp(lse_p + log w_p - lse), lse the merged lse. Where every part is -inf,
        idx is -1 and weight 0. Not differentiable.
    """
    idxs = _stacked("idxs", idxs)
    weights = _stacked("weights", weights)
    lses = _stacked("lses", lses)
    if idxs.dtype != torch.int64:
        raise TypeError(f"idxs must be an int64 tensor of global indices, got dtype {idxs.dtype}")
    _check_float("weights", weights)
    _check_float("lses", lses)
    _check_parts("idxs", idxs, 2, "(P, ..., B)")
    for name, t in (("weights", weights), ("lses", lses)):
        _check_same(("idxs", name), idxs, t)
        if tuple(t.shape) != tuple(idxs.shape):
            raise ValueError(f"{name} must have the shape of idxs {tuple(idxs.shape)}, "
                             f"got {tuple(t.shape)}")
    _check_lses(lses)
    lse64 = lses.detach().double()
    merged, *_ = _logsumexp_parts(lse64)
    live = lse64 > -math.inf
    key = torch.where(live, lse64 + torch.log(weights.detach().double()),
                      torch.full_like(lse64, -math.inf))
    best = key.amax(0)
    found = best > -math.inf
    winner = (key == best) & found
    idx = torch.where(winner, idxs, torch.full_like(idxs, _INT64_MAX)).amin(0)
    idx = torch.where(found, idx, torch.full_like(idx, -1))
    weight = torch.where(found, torch.exp(best - merged), torch.zeros_like(best))
    return idx, weight.to(weights.dtype)


__all__ = ["merge_knn", "merge_nearest", "merge_softmax_means"]
