"""Reference backend: chunked pure torch, computed in float64, any device.

It streams over the points in chunks with the exact online-softmax merge of (max, sum, acc), so
it never holds more than a (G, B, chunk, d) block. It is the oracle for the fast backends and
the fallback when no compiled backend is available. All functions take the canonical layout of
``_canonical.py``.
"""

from __future__ import annotations

import math

import torch

from ._alloc import new_output

# Elements of the largest (G, B, chunk, d) float64 temporary (32 MiB).
_CHUNK_ELEMENTS = 1 << 22


def _chunk_size(G: int, B: int, d: int, N: int) -> int:
    return max(1, min(N, _CHUNK_ELEMENTS // max(1, G * B * d)))


def _logits(x, y, alpha, var, bias):
    """Exact logits (G, B, n) and the differences x - alpha*y (G, B, n, d), float64."""
    diff = x[:, :, None, :] - alpha[:, :, None, None] * y[:, None, :, :]
    dist = (diff * diff).sum(-1)
    logits = -dist / (2.0 * var[:, :, None])
    if bias is not None:
        logits = logits + bias[:, None, :]
    return logits, diff


def forward(x, points, alpha, var, bias, precision="exact", plan=None, nearest=False):
    """mean (G, B, d) and lse (G, B) in the input dtype, and lse (G, B) in float64; with
    nearest also the top list of the largest logit: index (G, B, 1) int64 (the lowest among
    ties) and logit (G, B, 1) float64.

    precision is ignored: the reference is always exact. Points in a storage dtype are
    converted chunk by chunk (never as a whole).
    """
    dtype = x.dtype
    x, alpha, var = (t.double() for t in (x, alpha, var))
    bias = None if bias is None else bias.double()
    G, B, d = x.shape
    N = points.shape[1]
    m = torch.full((G, B), -math.inf, dtype=torch.float64, device=x.device)
    s = torch.zeros((G, B), dtype=torch.float64, device=x.device)
    acc = torch.zeros((G, B, d), dtype=torch.float64, device=x.device)
    arg = torch.full((G, B), -1, dtype=torch.int64, device=x.device)
    step = _chunk_size(G, B, d, N)
    for start in range(0, N, step):
        yc = points[:, start:start + step].double()
        bc = None if bias is None else bias[:, start:start + step]
        logits, _ = _logits(x, yc, alpha, var, bc)
        chunk_max, chunk_arg = logits.max(-1)  # the first maximum: the lowest index
        arg = torch.where(chunk_max > m, chunk_arg + start, arg)
        m_new = torch.maximum(m, chunk_max)
        # A chunk whose points are all masked leaves m at -inf: keep the old state as is.
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale = torch.exp(m - safe)
        p = torch.exp(logits - safe[:, :, None])
        s = s * scale + p.sum(-1)
        acc = acc * scale[:, :, None] + torch.bmm(p, yc)
        m = m_new
    mean = acc / s[:, :, None]
    lse = m + torch.log(s)
    if nearest:
        return mean.to(dtype), lse.to(dtype, copy=True), lse, arg[..., None], m[..., None]
    return mean.to(dtype), lse.to(dtype, copy=True), lse


def backward(x, points, alpha, var, bias, mean, lse, grad_mean, grad_lse, needs, precision="exact"):
    """Gradients (dx, dpoints, dalpha, dvar, dbias), dense canonical shapes; None where not needed.

    needs: five booleans in that order. grad_mean / grad_lse may be None (zero). The saved
    mean and lse are recomputed in float64 rather than used: their rounding to the input dtype
    would cost accuracy when the points sit far from the origin.
    """
    dtype = x.dtype
    mean, _, lse = forward(x.double(), points, alpha.double(), var.double(),
                        None if bias is None else bias.double())
    x, alpha, var = (t.double() for t in (x, alpha, var))
    y = points
    bias = None if bias is None else bias.double()
    G, B, d = x.shape
    N = y.shape[1]
    g = torch.zeros_like(mean) if grad_mean is None else grad_mean.double()
    h = torch.zeros_like(lse) if grad_lse is None else grad_lse.double()
    D = (g * mean).sum(-1)
    dx = torch.zeros_like(x) if needs[0] else None
    dy = new_output((G, N, d), torch.float64, x.device) if needs[1] else None
    dalpha = torch.zeros_like(alpha) if needs[2] else None
    dvar = torch.zeros_like(var) if needs[3] else None
    dbias = new_output((G, N), torch.float64, x.device) if needs[4] else None
    step = _chunk_size(G, B, d, N)
    for start in range(0, N, step):
        stop = min(N, start + step)
        yc = y[:, start:stop].double()
        bc = None if bias is None else bias[:, start:stop]
        logits, diff = _logits(x, yc, alpha, var, bc)
        w = torch.exp(logits - lse[:, :, None])
        P = w * (torch.bmm(g, yc.transpose(1, 2)) - D[:, :, None] + h[:, :, None])
        if dx is not None:
            dx -= (P[:, :, :, None] * diff).sum(2) / var[:, :, None]
        if dy is not None:
            coef = P * (alpha / var)[:, :, None]
            dy[:, start:stop] = (torch.bmm(w.transpose(1, 2), g)
                                 + (coef[:, :, :, None] * diff).sum(1))
        if dalpha is not None:
            dalpha += (P * (diff * yc[:, None]).sum(-1)).sum(-1) / var
        if dvar is not None:
            dvar += (P * (diff * diff).sum(-1)).sum(-1) / (2.0 * var * var)
        if dbias is not None:
            dbias[:, start:stop] = P.sum(1)
    return tuple(None if t is None else t.to(dtype) for t in (dx, dy, dalpha, dvar, dbias))


def knn(queries, points, k):
    """k nearest points: distances (G, B, k) ascending, int64 indices; ties to the lower index."""
    dtype = queries.dtype
    x, y = queries.double(), points
    G, B, d = x.shape
    N = y.shape[1]
    best_d = torch.empty((G, B, 0), dtype=torch.float64, device=x.device)
    best_i = torch.empty((G, B, 0), dtype=torch.int64, device=x.device)
    step = _chunk_size(G, B, d, N)
    for start in range(0, N, step):
        yc = y[:, start:start + step].double()
        diff = x[:, :, None, :] - yc[:, None, :, :]
        dist = (diff * diff).sum(-1)
        idx = torch.arange(start, start + yc.shape[1], device=x.device).expand(G, B, -1)
        cand_d = torch.cat([best_d, dist], dim=-1)
        cand_i = torch.cat([best_i, idx], dim=-1)
        # Earlier candidates always have lower indices, so a stable sort breaks ties by index.
        order = torch.sort(cand_d, dim=-1, stable=True).indices[..., :k]
        best_d = torch.gather(cand_d, -1, order)
        best_i = torch.gather(cand_i, -1, order)
    return best_d.sqrt().to(dtype), best_i
