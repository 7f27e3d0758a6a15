"""The memorizing denoiser: the optimal denoiser of the empirical distribution of the data."""

from __future__ import annotations

import math

import torch

from ..diffusion.processes import Process, Time
from ..ops import softmax_mean
from ._stored import check_affine, stored_posterior
from .base import Denoiser, as_param, check_time, gaussian_log_norm


class EmpiricalDenoiser(Denoiser):
    """x0_hat(x, t) = sum_i softmax_i(-||x - alpha y_i||^2 / (2 sigma^2)) y_i over all N points.

    data: (N, *data_shape), stored as a buffer (not trained): float, or codes in a storage
    dtype (uint8, float16, bfloat16) with values y = scale * code + offset (scale a number > 0,
    offset a number or one value per feature; see _stored.py), read as stored, never copied
    to floats. backend / precision are passed to diffmem.softmax_mean.

    ``op`` (a class attribute) is the softmax-mean function; a subclass that sets it to
    diffmem.distributed.softmax_mean, with each process's shard of the points as data, gets
    x0 and the nearest point (global index) over the whole set on every process.
    """

    op = staticmethod(softmax_mean)
    min_points = 1  # a shard of a sharded set may be empty

    def __init__(self, data: torch.Tensor, process: Process | None = None, prediction: str = "x0",
                 *, scale: float | None = None, offset=None, backend: str = "auto",
                 precision: str = "exact"):
        super().__init__(process, prediction)
        if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < self.min_points:
            raise ValueError(f"data must be a tensor (N, *data_shape) with N >= {self.min_points}")
        self.register_buffer("data", data)
        self.scale, offset = check_affine(data, scale, offset)
        self.register_buffer("offset", offset)
        self.backend, self.precision = backend, precision

    @property
    def points(self) -> torch.Tensor:
        """The training points as stored, flattened to (N, D)."""
        return self.data.reshape(self.data.shape[0], -1)

    def _posterior(self, x: torch.Tensor, t: Time, points: torch.Tensor, bias=None,
                   return_lse: bool = True, return_nearest: bool = False):
        alpha = as_param(self.process.alpha(t), x)
        var = as_param(self.process.sigma(t), x) ** 2
        return stored_posterior(x, points, alpha, var, scale=self.scale, offset=self.offset,
                                bias=bias, backend=self.backend, precision=self.precision,
                                return_lse=return_lse, return_nearest=return_nearest,
                                op=self.op)

    def x0(self, x, t):
        return self._posterior(x, t, self.points, return_lse=False)[0]

    def x0_nearest(self, x_t: torch.Tensor, t: Time
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For queries x_t (B, *data_shape) at t: x0_hat (B, *data_shape), and the index (B,) of
        the training point with the largest posterior weight (ties to the lower index) with
        that weight (B,), all from one pass."""
        check_time(t, x_t.shape[0])
        x = x_t.reshape(x_t.shape[0], -1)
        mean, _, idx, weight = self._posterior(x, as_param(t, x), self.points, return_lse=False,
                                               return_nearest=True)
        return mean.reshape(x_t.shape), idx, weight

    def nearest(self, x_t: torch.Tensor, t: Time) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query (B, *data_shape): the index (B,) of the training point with the largest
        posterior weight at t (ties to the lower index) and that weight (B,), from the same
        pass as the denoiser's mean."""
        return self.x0_nearest(x_t, t)[1:]

    def log_prob(self, x_t, t):
        """log p_t(x) = logsumexp_i(-||x - alpha y_i||^2/(2 sigma^2)) - log N
        - (D/2) log(2 pi sigma^2)."""
        x = x_t.reshape(x_t.shape[0], -1)
        _, lse = self._posterior(x, t, self.points)
        var = as_param(self.process.sigma(t), x) ** 2
        return lse - math.log(self.points.shape[0]) + gaussian_log_norm(x.shape[1], var)
