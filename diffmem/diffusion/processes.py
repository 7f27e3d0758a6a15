"""Forward noising processes x_t = alpha(t) x0 + sigma(t) eps, and the time grid of the paper.

Time t may be a Python float or a tensor (one value per sample); every method returns the same
kind. Derivatives are the closed forms of the scalar functions (what autodiff gives).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Time = float | torch.Tensor


def _sqrt(v):
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


class Process:
    """alpha(t), sigma(t), their derivatives, and derived quantities (SPEC A.2)."""

    name = "process"

    def alpha(self, t: Time) -> Time:
        raise NotImplementedError

    def sigma(self, t: Time) -> Time:
        raise NotImplementedError

    def alpha_prime(self, t: Time) -> Time:
        raise NotImplementedError

    def sigma_prime(self, t: Time) -> Time:
        raise NotImplementedError

    def psi(self, t: Time) -> Time:
        """Signal-to-noise ratio alpha^2 / sigma^2."""
        return self.alpha(t) ** 2 / self.sigma(t) ** 2

    def r(self, t: Time) -> Time:
        """sigma'/sigma - alpha'/alpha (= -1/2 d log psi / dt)."""
        return self.sigma_prime(t) / self.sigma(t) - self.alpha_prime(t) / self.alpha(t)

    def noise(self, x0: torch.Tensor, t: Time, eps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps; a tensor t of shape (B,) applies per sample."""
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _bcast(v: Time, like: torch.Tensor) -> Time:
    """A per-sample (B,) tensor reshaped to broadcast against (B, ...) data."""
    if isinstance(v, torch.Tensor) and v.dim() == 1 and like.dim() > 1:
        return v.reshape(-1, *([1] * (like.dim() - 1)))
    return v


class VP(Process):
    """Variance preserving as in the reference: alpha = sqrt(1 - t^2), sigma = t."""

    name = "vp"

    def alpha(self, t):
        return _sqrt(1 - t * t)

    def sigma(self, t):
        return t

    def alpha_prime(self, t):
        return -t / _sqrt(1 - t * t)

    def sigma_prime(self, t):
        return t * 0 + 1


class VE(Process):
    """Variance exploding: alpha = 1, sigma(t) given (default sigma = t), sigma' given too."""

    name = "ve"

    def __init__(self, sigma: Callable[[Time], Time] | None = None,
                 sigma_prime: Callable[[Time], Time] | None = None):
        if (sigma is None) != (sigma_prime is None):
            raise ValueError("VE needs both sigma and sigma_prime, or neither (sigma = t)")
        self._sigma = sigma or (lambda t: t)
        self._sigma_prime = sigma_prime or (lambda t: t * 0 + 1)

    def alpha(self, t):
        return t * 0 + 1

    def sigma(self, t):
        return self._sigma(t)

    def alpha_prime(self, t):
        return t * 0

    def sigma_prime(self, t):
        return self._sigma_prime(t)


class FlowMatching(Process):
    """Rectified flow: alpha = 1 - t, sigma = t."""

    name = "flow"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def alpha_prime(self, t):
        return t * 0 - 1

    def sigma_prime(self, t):
        return t * 0 + 1


def time_grid(t_min: float = 0.001, t_max: float = 0.999, num: int = 26,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The reference's grid: linspace(t_min, t_max, num) in DESCENDING order, shape (num,)."""
    if not (0.0 <= t_min <= t_max <= 1.0):
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if num < 2:
        raise ValueError(f"num must be at least 2, got {num}")
    return torch.linspace(t_min, t_max, num, dtype=dtype).flip(0)
