"""The ground-truth isotropic homoscedastic Gaussian mixture and its optimal denoiser (SPEC C.3)."""

from __future__ import annotations

import torch

from ..diffusion.processes import Process, Time
from ..ops import softmax_mean
from .base import Denoiser, as_param, gaussian_log_norm


class IsotropicGMM(Denoiser):
    """p(x0) = sum_k pi_k N(mu_k, v I). With s = alpha^2 v + sigma^2 and
    mu_bar = softmax_k(log pi_k - ||x - alpha mu_k||^2 / (2 s)) . mu:

        x0_hat = (alpha v / s) x + (sigma^2 / s) mu_bar

    means: (K, D); variance: v > 0 (float or 0-d tensor); priors: (K,) or None (uniform).
    """

    def __init__(self, means: torch.Tensor, variance, priors: torch.Tensor | None = None,
                 process: Process | None = None, prediction: str = "x0",
                 *, backend: str = "auto", precision: str = "exact"):
        super().__init__(process, prediction)
        if not isinstance(means, torch.Tensor) or means.dim() != 2 or means.shape[0] == 0:
            raise ValueError("means must be a (K, D) tensor with K >= 1")
        K = means.shape[0]
        variance = torch.as_tensor(variance, dtype=means.dtype, device=means.device)
        if variance.dim() != 0 or not bool(variance > 0):
            raise ValueError("variance must be a positive scalar")
        if priors is None:
            priors = torch.full((K,), 1.0 / K, dtype=means.dtype, device=means.device)
        if priors.shape != (K,) or bool((priors < 0).any()) or not torch.isclose(
                priors.sum(), torch.ones((), dtype=priors.dtype, device=priors.device)):
            raise ValueError(f"priors must be ({K},), non-negative and sum to 1")
        self.register_buffer("means", means)
        self.register_buffer("variance", variance)
        self.register_buffer("priors", priors.to(means.dtype))
        self.backend, self.precision = backend, precision

    def _posterior(self, x: torch.Tensor, t: Time, return_lse: bool = True):
        alpha = as_param(self.process.alpha(t), x)
        sigma2 = as_param(self.process.sigma(t), x) ** 2
        s = alpha * alpha * self.variance.to(x.dtype) + sigma2
        out = softmax_mean(x, self.means.to(x.dtype), alpha, s, self.priors.log().to(x.dtype),
                           backend=self.backend, precision=self.precision,
                           return_lse=return_lse)
        mu_bar, lse = out if return_lse else (out, None)
        return alpha, sigma2, s, mu_bar, lse

    def x0(self, x, t):
        alpha, sigma2, s, mu_bar, _ = self._posterior(x, t, return_lse=False)
        per_query = isinstance(s, torch.Tensor) and s.dim() == 1
        col = (lambda v: v[:, None]) if per_query else (lambda v: v)
        return col(alpha * self.variance.to(x.dtype) / s) * x + col(sigma2 / s) * mu_bar

    def log_prob(self, x_t, t):
        """log p_t(x) = logsumexp_k(log pi_k - ||x - alpha mu_k||^2 / (2 s)) - (D/2) log(2 pi s)."""
        x = x_t.reshape(x_t.shape[0], -1)
        _, _, s, _, lse = self._posterior(x, t)
        return lse + gaussian_log_norm(x.shape[1], s)

    def sample(self, n: int, generator: torch.Generator | None = None):
        """n samples (n, D) and their component labels (n,)."""
        labels = torch.multinomial(self.priors.float().cpu(), n, replacement=True,
                                   generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        labels = labels.to(self.means.device)
        x = self.means[labels] + self.variance.sqrt() * noise.to(self.means.device)
        return x, labels
