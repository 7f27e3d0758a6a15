"""A Gaussian fitted to a data set and its optimal denoiser: the generalizing baseline of a
data set without a known ground truth.

With x0 ~ N(mu, C), C = U diag(lam) U^T + rest (I - U U^T) (U: D x k orthonormal) and
x_t = alpha x0 + sigma eps, the posterior mean is, with z = x - alpha mu,

    x0_hat = mu + g(rest) z + U ((g(lam) - g(rest)) * (U^T z)),
    g(v)   = alpha v / (alpha^2 v + sigma^2)

``fit_gaussian`` estimates mu and C from points stored as codes (value = scale * code + offset)
or floats, chunk by chunk in float64 (never a float copy of the set). Up to ``max_full_dim``
features (default 4096) it takes the full covariance (k = D, rest = 0) from one
eigendecomposition; above, the top ``rank`` principal components from a randomized subspace
iteration (a few passes over the data, D x (rank + 10) memory) and the mean variance of the
remaining directions as ``rest``. ``reduce`` sums a tensor over processes that each hold a
shard of the points (identity by default), so a sharded fit equals the unsharded one.
"""

from __future__ import annotations

import torch

from ..diffusion.processes import Process
from .base import Denoiser, as_param

CHUNK = 4096          # rows per pass
OVERSAMPLE = 10       # extra directions of the randomized range finder
POWER_ITERATIONS = 4  # its subspace iterations


class GaussianDenoiser(Denoiser):
    """The optimal denoiser of N(mean, U diag(eigenvalues) U^T + rest (I - U U^T)).

    mean: (D,); basis: (D, k) orthonormal columns; eigenvalues: (k,) >= 0; rest: >= 0."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, eigenvalues: torch.Tensor,
                 rest: float = 0.0, process: Process | None = None, prediction: str = "x0"):
        super().__init__(process, prediction)
        D = mean.shape[0]
        if mean.dim() != 1 or basis.shape[0] != D or eigenvalues.shape != basis.shape[1:]:
            raise ValueError(f"need mean (D,), basis (D, k) and eigenvalues (k,), got "
                             f"{tuple(mean.shape)}, {tuple(basis.shape)}, "
                             f"{tuple(eigenvalues.shape)}")
        if bool((eigenvalues < 0).any()) or not rest >= 0:
            raise ValueError("eigenvalues and rest must be >= 0")
        self.register_buffer("mean", mean)
        self.register_buffer("basis", basis)
        self.register_buffer("eigenvalues", eigenvalues)
        self.rest = float(rest)

    def x0(self, x, t):
        alpha = as_param(self.process.alpha(t), x)
        s2 = as_param(self.process.sigma(t), x) ** 2
        if isinstance(alpha, torch.Tensor) and alpha.dim() == 1:
            alpha, s2 = alpha[:, None], s2[:, None]
        mu, U = self.mean.to(x), self.basis.to(x)
        z = x - alpha * mu
        g_rest = alpha * self.rest / (alpha * alpha * self.rest + s2)
        lam = self.eigenvalues.to(x)
        g = alpha * lam / (alpha * alpha * lam + s2)
        return mu + g_rest * z + ((z @ U) * (g - g_rest)) @ U.T


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _values(flat, scale, offset, i):
    """Float64 values of rows i .. i + CHUNK of flat (n, D)."""
    v = flat[i:i + CHUNK].double()
    return v if scale is None else v * scale + offset


def fit_gaussian(points: torch.Tensor, *, scale: float | None = None, offset: float | None = None,
                 total: int | None = None, max_full_dim: int = 4096, rank: int = 256,
                 seed: int = 0, reduce=_identity, process: Process | None = None
                 ) -> GaussianDenoiser:
    """The Gaussian of the points (n, D) (see the module docstring); total: the number of points
    over all processes (default n). Float64 statistics, float32 denoiser."""
    n, D = points.shape[0], points.reshape(points.shape[0], -1).shape[1]
    total = n if total is None else total
    flat = points.reshape(n, D)
    s1 = torch.zeros(D, dtype=torch.float64)
    for i in range(0, n, CHUNK):
        s1 += _values(flat, scale, offset, i).sum(0)
    mu = reduce(s1) / total

    def centred(i):
        return _values(flat, scale, offset, i) - mu

    if D <= max_full_dim:
        s2 = torch.zeros(D, D, dtype=torch.float64)
        for i in range(0, n, CHUNK):
            c = centred(i)
            s2 += c.T @ c
        lam, U = torch.linalg.eigh(reduce(s2) / total)
        basis, lam, rest = U, lam.clamp_min(0), 0.0
    else:
        k = min(rank, D)
        gen = torch.Generator().manual_seed(seed)
        Q = torch.linalg.qr(torch.randn(D, min(k + OVERSAMPLE, D), generator=gen,
                                        dtype=torch.float64))[0]
        trace = torch.zeros((), dtype=torch.float64)
        for step in range(POWER_ITERATIONS + 1):
            Y = torch.zeros_like(Q)
            for i in range(0, n, CHUNK):
                c = centred(i)
                Y += c.T @ (c @ Q)
                if step == 0:
                    trace += c.square().sum()
            Y = reduce(Y) / total
            if step < POWER_ITERATIONS:
                Q = torch.linalg.qr(Y)[0]
        B = Q.T @ Y                                          # Q^T C Q
        lam, V = torch.linalg.eigh((B + B.T) / 2)            # ascending
        lam, basis = lam[-k:].clamp_min(0), Q @ V[:, -k:]
        trace = reduce(trace) / total
        rest = max(float(trace - lam.sum()) / (D - k), 0.0) if D > k else 0.0
    return GaussianDenoiser(mu.float(), basis.float(), lam.float(), rest, process)


__all__ = ["GaussianDenoiser", "fit_gaussian"]
