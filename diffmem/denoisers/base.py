"""The denoiser interface: model(x_t, t) returns the requested field; x0 is computed first."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..diffusion.parametrization import FIELDS, from_x0
from ..diffusion.processes import VP, Process, Time


def as_param(value: Time, like: torch.Tensor):
    """A noise-level quantity as a Python float or a tensor of like's dtype and device."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return float(value)


def check_time(t: Time, batch: int) -> None:
    """t must be a float in (0, 1] or a tensor of shape () or (batch,) with values in (0, 1]."""
    if isinstance(t, torch.Tensor):
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if t.numel() and not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError("t must lie in (0, 1]")
    elif not (isinstance(t, (int, float)) and 0 < t <= 1):
        raise ValueError(f"t must be a number in (0, 1] or a tensor, got {t!r}")


class Denoiser(nn.Module):
    """Base class: subclasses implement ``x0(x_t, t)`` on flattened data (B, D).

    ``model(x_t, t)`` takes x_t of shape (B, *data_shape) and t (a float or a (B,) tensor) and
    returns the field named by ``prediction`` ("x0", "eps", "v" or "score"), same shape as x_t.
    """

    def __init__(self, process: Process | None = None, prediction: str = "x0"):
        super().__init__()
        if prediction not in FIELDS:
            raise ValueError(f"prediction must be one of {FIELDS}, got {prediction!r}")
        self.process = process if process is not None else VP()
        self.prediction = prediction

    def x0(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """E[x0 | x_t = x] for flattened x (B, D)."""
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, t: Time) -> torch.Tensor:
        check_time(t, x_t.shape[0])
        flat = x_t.reshape(x_t.shape[0], -1)
        t = as_param(t, flat)
        x0 = self.x0(flat, t)
        return from_x0(self.prediction, x0, flat, t, self.process).reshape(x_t.shape)

    def log_prob(self, x_t: torch.Tensor, t: Time) -> torch.Tensor:
        """log p_t(x_t), shape (B,), where a closed form exists."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form log p_t")


def gaussian_log_norm(dim: int, var) -> torch.Tensor | float:
    """-(dim/2) log(2 pi var): the log normalizer of an isotropic Gaussian."""
    if isinstance(var, torch.Tensor):
        return -0.5 * dim * torch.log(2 * math.pi * var)
    return -0.5 * dim * math.log(2 * math.pi * var)
