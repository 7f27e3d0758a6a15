"""Exact k nearest neighbours by Euclidean distance, streaming over the points.

This is the hot loop of the memorization metric (distances of a generated sample to its
nearest two training points). Registered as the custom op ``diffmem::knn``.
"""

from __future__ import annotations

import math

import torch

from . import _backends
from ._canonical import _broadcast, _to_groups, check_knn_inputs


@torch.library.custom_op("diffmem::knn", mutates_args=())
def _knn_op(queries: torch.Tensor, points: torch.Tensor, k: int,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (G, B, d) and (G, N, d) in; dist (G, B, k) and int64 idx (G, B, k) out."""
    name = _backends.resolve(backend, queries.device, queries.dtype, points.dtype)
    return _backends.module(name).knn(queries, points, k)


@_knn_op.register_fake
def _(queries, points, k, backend):
    G, B, _ = queries.shape
    return queries.new_empty((G, B, k)), queries.new_empty((G, B, k), dtype=torch.int64)


def knn(queries: torch.Tensor, points: torch.Tensor, k: int = 2, *, backend: str = "auto"):
    """Distances to the k nearest points, ascending, and their indices.

    Args:
        queries: (..., B, d); points: (..., N, d), leading dims broadcast; 1 <= k <= N. points
            of queries' dtype or, with float32 queries, a storage dtype (uint8, float16,
            bfloat16), measured as if converted to float32.
    Returns:
        dist (..., B, k) in the input dtype, exact Euclidean distances (not differentiable);
        idx (..., B, k) int64 indices into the points; ties go to the lower index.
    """
    check_knn_inputs(queries, points, k)
    batch = _broadcast([("queries", tuple(queries.shape[:-2])),
                        ("points", tuple(points.shape[:-2]))])
    B, d = queries.shape[-2:]
    N = points.shape[-2]
    _backends.check_name(backend)  # resolved inside the op (see _backends.resolve)
    if B == 0:
        empty = queries.new_zeros((*batch, 0, k))
        return empty, empty.long()
    q = _to_groups(queries.detach(), batch, (B, d))
    p = _to_groups(points.detach(), batch, (N, d))
    if math.prod(points.shape[:-2]) == 1 and math.prod(batch) > 1:
        q, p = q.reshape(1, -1, d), p[:1]
    dist, idx = _knn_op(q, p, k, backend)
    return dist.reshape(*batch, B, k), idx.reshape(*batch, B, k)
