"""The partially memorizing ("pmem") denoiser: the empirical denoiser over m of the N points
(SPEC C.2)."""

from __future__ import annotations

import math

import torch

from ..diffusion.processes import Process, Time
from ._stored import check_affine, stored_posterior
from .base import Denoiser, as_param, check_time, gaussian_log_norm

# Noise levels closer than this share a subset when the subset is redrawn per t.
T_RESOLUTION = 1e-6


def subset_indices(n: int, m: int, seed: int) -> torch.Tensor:
    """m distinct indices of range(n), sorted (all n when m >= n), determined by seed."""
    if m >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:m].sort().values


class PartialMemorizingDenoiser(Denoiser):
    """x0_hat(x, t) = sum_{i in S} softmax_i(-||x - alpha y_i||^2 / (2 sigma^2)) y_i,
    |S| = min(m, N).

    data: (N, *data_shape), a buffer: float, or codes with ``scale`` and ``offset`` as in
    EmpiricalDenoiser (read as stored). S is drawn without replacement from a seed taken from
    ``generator``. redraw_per_t=True (the reference's evaluation) uses a fresh S for each distinct
    t value, derived from the seed and t (t rounded to T_RESOLUTION), so it is reproducible.
    The subset's points are gathered (cost O(m), not O(N)) before calling diffmem.softmax_mean.
    """

    def __init__(self, data: torch.Tensor, m: int, *, generator: torch.Generator | None = None,
                 redraw_per_t: bool = False, process: Process | None = None,
                 prediction: str = "x0", scale: float | None = None, offset=None,
                 backend: str = "auto", precision: str = "exact"):
        super().__init__(process, prediction)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"data must have shape (N, *data_shape) with N >= 1, "
                             f"got {tuple(data.shape)}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be a positive int, got {m!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        self.register_buffer("data", data)
        self.scale, offset = check_affine(data, scale, offset)
        self.register_buffer("offset", offset)
        self.m, self.redraw_per_t = min(m, data.shape[0]), bool(redraw_per_t)
        self.seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
        self.backend, self.precision = backend, precision
        fixed = None if self.redraw_per_t else subset_indices(data.shape[0], m, self.seed)
        self.register_buffer("_subset", fixed.to(data.device) if fixed is not None else None)

    @property
    def subset(self) -> torch.Tensor | None:
        """The fixed subset's indices (m,), or None when the subset is redrawn per t."""
        return self._subset

    def subset_at(self, t: float) -> torch.Tensor:
        """Indices (m,) of the subset used at noise level t."""
        if self._subset is not None:
            return self._subset
        key = round(float(t) / T_RESOLUTION)
        seed = (self.seed + key * 0x9E3779B97F4A7C15) % (2 ** 63)
        return subset_indices(self.data.shape[0], self.m, seed).to(self.data.device)

    def _groups(self, x: torch.Tensor, t: Time):
        """(query indices or None for all, t for them, subset indices) per distinct subset."""
        if self._subset is not None or not isinstance(t, torch.Tensor) or t.numel() == 1:
            t0 = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else t
            return [(None, t, self.subset_at(t0))]
        keys = torch.round(t.double() / T_RESOLUTION)
        groups = []
        for key in torch.unique(keys):
            rows = (keys == key).nonzero().squeeze(1)
            groups.append((rows, t[rows], self.subset_at(float(t[rows[0]]))))
        return groups

    def _posterior(self, x: torch.Tensor, t: Time):
        """Mean (B, D) and lse (B,) of the softmax over each query's subset."""
        flat = self.data.reshape(self.data.shape[0], -1)
        mean, lse = torch.empty_like(x), x.new_empty(x.shape[0])
        for rows, t_g, idx in self._groups(x, t):
            xg = x if rows is None else x[rows]
            alpha = as_param(self.process.alpha(t_g), xg)
            var = as_param(self.process.sigma(t_g), xg) ** 2
            points = flat[idx]
            if points.dtype in (torch.float32, torch.float64):
                points = points.to(x.dtype)
            mg, lg = stored_posterior(xg, points, alpha, var, scale=self.scale,
                                      offset=self.offset, backend=self.backend,
                                      precision=self.precision)
            if rows is None:
                return mg, lg
            mean[rows], lse[rows] = mg, lg
        return mean, lse

    def x0(self, x, t):
        return self._posterior(x, t)[0]

    def log_prob(self, x_t, t):
        """log p_t(x) of the empirical distribution of the subset used at t, shape (B,)."""
        check_time(t, x_t.shape[0])
        x = x_t.reshape(x_t.shape[0], -1)
        _, lse = self._posterior(x, t)
        var = as_param(self.process.sigma(t), x) ** 2
        return lse - math.log(self.m) + gaussian_log_norm(x.shape[1], var)
