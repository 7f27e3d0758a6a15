"""Evaluation metrics (SPEC G): memorization ratio, learned-means metrics, per-t losses."""

from __future__ import annotations

import math

import torch

from .diffusion.loss import loss_per_t
from .ops import knn


def _flat(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (n, *data_shape), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x.detach().reshape(x.shape[0], -1)


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    return float(threshold)


def _pair(queries, points, qname, pname):
    q, p = _flat(queries, qname), _flat(points, pname)
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"{qname} and {pname} must have the same data size, "
                         f"got {q.shape[1]} and {p.shape[1]}")
    if p.dtype != q.dtype:
        p = p.to(q.dtype)
    return q, p.to(q.device)


def nearest_two(queries: torch.Tensor, points: torch.Tensor, qname="queries", pname="points"):
    """Distances (n, 2) of each query to its two nearest points (needs N >= 2)."""
    q, p = _pair(queries, points, qname, pname)
    return knn(q, p, 2)[0]


def memorization_ratio(samples: torch.Tensor, data: torch.Tensor,
                       threshold: float = 1 / 3) -> float:
    """Fraction of samples with d1 < threshold * d2 (strict), d1 <= d2 the distances to the two
    nearest data points. samples: (n, *shape), n >= 1; data: (N, *shape), N >= 2."""
    threshold = _check_threshold(threshold)
    q, p = _pair(samples, data, "samples", "data")
    if q.shape[0] == 0:
        raise ValueError("samples must hold at least one sample")
    if p.shape[0] < 2:
        raise ValueError(f"data must hold at least two points, got {p.shape[0]}")
    return float(memorized(knn(q, p, 2)[0], threshold).double().mean())


def memorized(distances: torch.Tensor, threshold: float = 1 / 3) -> torch.Tensor:
    """Which samples are copies: d1 < threshold * d2 (strict), from the distances (n, 2) of each
    sample to its two nearest data points (as diffmem.knn gives them). Bool (n,)."""
    threshold = _check_threshold(threshold)
    return distances[:, 0] < threshold * distances[:, 1]


def _percentiles(values: torch.Tensor, percentiles) -> list[float]:
    qs = torch.tensor([float(p) / 100 for p in percentiles], dtype=torch.float64)
    if qs.numel() == 0:
        return []
    if bool(((qs < 0) | (qs > 1)).any()):
        raise ValueError("percentiles must lie in [0, 100]")
    return torch.quantile(values.double().cpu(), qs, interpolation="linear").tolist()


def learned_means_metrics(means: torch.Tensor, true_means: torch.Tensor, data: torch.Tensor,
                          threshold: float = 1 / 3, percentiles=(10, 25, 50, 75, 90)) -> dict:
    """Where learned means sit: near a true mean, near a training sample, or neither (SPEC G.2).

    means: (M, *shape) learned; true_means: (K, *shape); data: (N, *shape). With dT1 <= dT2 the
    distances to the two nearest true means and dS1 <= dS2 those to the two nearest samples:
      near true mean: dT1 < thr dS1 and (K > 1) dT1 < thr dT2
      near sample:    dS1 < thr dT1 and (N > 1) dS1 < thr dS2
    Returns counts, means of dT1 dS1 dT2 dS2 (NaN when K = 1 / N = 1) and linear-interpolation
    percentiles of dT1 and dS1 (lists in the order of `percentiles`).
    """
    threshold = _check_threshold(threshold)
    m, mu = _pair(means, true_means, "means", "true_means")
    _, x = _pair(means, data, "means", "data")
    if m.shape[0] == 0 or mu.shape[0] == 0 or x.shape[0] == 0:
        raise ValueError("means, true_means and data must each hold at least one row")
    dT = knn(m, mu, min(2, mu.shape[0]))[0].double()
    dS = knn(m, x, min(2, x.shape[0]))[0].double()
    dT1, dS1 = dT[:, 0], dS[:, 0]
    near_true = dT1 < threshold * dS1
    near_sample = dS1 < threshold * dT1
    if dT.shape[1] > 1:
        near_true &= dT1 < threshold * dT[:, 1]
    if dS.shape[1] > 1:
        near_sample &= dS1 < threshold * dS[:, 1]
    nan = math.nan
    return {
        "num_near_true_mean": int(near_true.sum()),
        "num_near_sample": int(near_sample.sum()),
        "mean_dT1": float(dT1.mean()),
        "mean_dS1": float(dS1.mean()),
        "mean_dT2": float(dT[:, 1].mean()) if dT.shape[1] > 1 else nan,
        "mean_dS2": float(dS[:, 1].mean()) if dS.shape[1] > 1 else nan,
        "percentiles": [float(p) for p in percentiles],
        "dT1_percentiles": _percentiles(dT1, percentiles),
        "dS1_percentiles": _percentiles(dS1, percentiles),
    }


def per_t_losses(model, data: torch.Tensor, ts, **kwargs) -> torch.Tensor:
    """Per-t DSM losses (T,) of model on data (SPEC D.3); keyword arguments as loss_per_t."""
    return loss_per_t(model, data, ts, **kwargs)


__all__ = ["learned_means_metrics", "memorization_ratio", "memorized", "nearest_two",
           "per_t_losses"]
