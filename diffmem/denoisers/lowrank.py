"""Gaussian mixtures with low-rank covariances U_k U_k^T (SPEC C.6), true and learnable.

At time t component k of p_t is N(alpha mu_k, Sigma_k) with Sigma_k = alpha^2 U_k U_k^T + sigma^2 I.
With U_k = Q_k R_k (reduced QR), x_bar = x - alpha mu_k, y = Q_k^T x_bar and
A_k = alpha^2 R_k R_k^T + sigma^2 I_r (Woodbury in the orthonormal basis Q_k):

    x_bar^T Sigma_k^{-1} x_bar = ||x_bar - Q_k y||^2 / sigma^2 + y^T A_k^{-1} y
    log det Sigma_k            = D log sigma^2 + sum_i log(1 + alpha^2 lambda_i / sigma^2)
    E[x0 | x, k]               = mu_k + alpha Q_k R_k R_k^T A_k^{-1} y

lambda_i are the eigenvalues of U_k^T U_k (eigvalsh). The residual is formed directly, not as
||x_bar||^2 - ||y||^2, so the logits keep their precision as t -> 0. Rank-deficient U_k are fine.
The softmax over components is dense plain torch (see _structured.py): the Mahalanobis term is
not of the isotropic form diffmem.softmax_mean computes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.processes import Process, Time
from . import _init
from ._structured import check_priors, component_chunks, dense_posterior, noise_levels
from .base import Denoiser, check_time


def _check_means_factors(means, factors) -> None:
    for name, value in (("means", means), ("factors", factors)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if means.dim() != 2 or means.shape[0] == 0 or means.shape[1] == 0:
        raise ValueError(f"means must have shape (K, D) with K, D >= 1, got {tuple(means.shape)}")
    K, D = means.shape
    if factors.dim() != 3 or factors.shape[:2] != (K, D) or factors.shape[2] == 0:
        raise ValueError(f"factors must have shape ({K}, {D}, r) with r >= 1, "
                         f"got {tuple(factors.shape)}")


def lowrank_posterior(x: torch.Tensor, t: Time, process: Process, means: torch.Tensor,
                      factors: torch.Tensor, priors: torch.Tensor):
    """E[x0 | x_t = x] (B, D) and log p_t(x) (B,) for the mixture; x is (B, D)."""
    means, factors, priors = (v.to(x.dtype) for v in (means, factors, priors))
    B, D = x.shape
    alpha, sigma2 = noise_levels(process, t, x)                       # (T, 1)
    Q, R = torch.linalg.qr(factors)                                   # (K, D, q), (K, q, r)
    S = R @ R.transpose(-1, -2)                                       # (K, q, q)
    lam = torch.linalg.eigvalsh(factors.transpose(-1, -2) @ factors).clamp_min(0)  # (K, r)
    eye = torch.eye(S.shape[-1], dtype=x.dtype, device=x.device)
    A = alpha[..., None, None] ** 2 * S + sigma2[..., None, None] * eye  # (T, K, q, q)
    chol = torch.linalg.cholesky(A)
    y, perp2 = [], []
    for sl in component_chunks(B, means.shape[0], D):
        x_bar = x[:, None, :] - alpha[:, :, None] * means[sl]          # (B, k, D)
        y_k = torch.einsum("bkd,kdq->bkq", x_bar, Q[sl])
        resid = x_bar - torch.einsum("bkq,kdq->bkd", y_k, Q[sl])
        y.append(y_k)
        perp2.append(resid.square().sum(-1))
    y, perp2 = torch.cat(y, 1), torch.cat(perp2, 1)                  # (B, K, q), (B, K)
    z = torch.cholesky_solve(y[..., None], chol.expand(B, *chol.shape[1:]))[..., 0]
    maha = perp2 / sigma2 + (y * z).sum(-1)
    logdet = (D * sigma2.log()
              + torch.log1p(alpha[..., None] ** 2 * lam[None] / sigma2[..., None]).sum(-1))
    weights, log_p = dense_posterior(priors.log() - 0.5 * (maha + logdet), D)
    coef = torch.einsum("kij,bkj->bki", S, z) * weights[..., None]     # (B, K, q)
    x0 = weights @ means + alpha * torch.einsum("bkq,kdq->bd", coef, Q)
    return x0, log_p


class _LowRankMixture(Denoiser):
    """Shared forward of the true and learnable low-rank mixtures."""

    means: torch.Tensor
    factors: torch.Tensor
    priors: torch.Tensor

    def x0(self, x, t):
        return lowrank_posterior(x, t, self.process, self.means, self.factors, self.priors)[0]

    def log_prob(self, x_t, t):
        """log p_t(x_t) (B,), exact: log sum_k pi_k N(x_t; alpha mu_k, Sigma_k)."""
        check_time(t, x_t.shape[0])
        x = x_t.reshape(x_t.shape[0], -1)
        return lowrank_posterior(x, t, self.process, self.means, self.factors, self.priors)[1]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        """n samples x0 = mu_k + U_k z, z ~ N(0, I_r): returns (n, D) and labels (n,)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        labels = torch.multinomial(self.priors.detach().double().cpu(), n, replacement=True,
                                   generator=generator) if n else torch.zeros(0, dtype=torch.long)
        z = torch.randn(n, self.factors.shape[2], generator=generator, dtype=self.means.dtype)
        labels, z = labels.to(self.means.device), z.to(self.means.device)
        x = self.means[labels] + torch.einsum("ndr,nr->nd", self.factors[labels], z)
        return x, labels


class LowRankGMM(_LowRankMixture):
    """p(x0) = sum_k pi_k N(mu_k, U_k U_k^T). means: (K, D); factors: (K, D, r); priors: (K,)
    or None (uniform). All stored as buffers (not trained)."""

    def __init__(self, means: torch.Tensor, factors: torch.Tensor,
                 priors: torch.Tensor | None = None, process: Process | None = None,
                 prediction: str = "x0"):
        super().__init__(process, prediction)
        _check_means_factors(means, factors)
        self.register_buffer("means", means)
        self.register_buffer("factors", factors.to(means.dtype))
        self.register_buffer("priors", check_priors(priors, means.shape[0], means))


class LearnableLowRankGMM(_LowRankMixture):
    """The low-rank mixture with trainable means (M, D) and factors (M, D, r); priors static.

    Build it directly from initial tensors or with ``LearnableLowRankGMM.initialize``.
    """

    def __init__(self, means: torch.Tensor, factors: torch.Tensor,
                 priors: torch.Tensor | None = None, process: Process | None = None,
                 prediction: str = "x0"):
        super().__init__(process, prediction)
        _check_means_factors(means, factors)
        self.means = nn.Parameter(means.detach().clone())
        self.factors = nn.Parameter(factors.detach().clone().to(means.dtype))
        self.register_buffer("priors", check_priors(priors, means.shape[0], means))

    @classmethod
    def initialize(cls, strategy: str, components: int, rank: int, *,
                   data: torch.Tensor | None = None, ground_truth: LowRankGMM | None = None,
                   dim: int | None = None, generator: torch.Generator | None = None,
                   means_scale: float = 1.0, cov_scale: float = 1e-6,
                   means_noise_var: float = 0.0, process: Process | None = None,
                   prediction: str = "x0", dtype: torch.dtype = torch.float32):
        """Init per SPEC C.6 / F.1. strategy: "gaussian" | "sphere" | "pmem" | "prior".

        gaussian/sphere need dim (or data); pmem needs data (N, D); prior needs ground_truth
        with components == its K (means: fresh samples of it; its factors and priors). For the
        first three the factors are N(0, 1) / ||whole (M, D, r) tensor||_F * sqrt(cov_scale).
        """
        strategy = _init.check_strategy(strategy)
        _init.check_count("components", components)
        _init.check_count("rank", rank)
        priors = None
        if strategy == "prior":
            if not isinstance(ground_truth, _LowRankMixture):
                raise TypeError("strategy 'prior' needs ground_truth, a LowRankGMM")
            if ground_truth.means.shape[0] != components or ground_truth.factors.shape[2] != rank:
                raise ValueError("strategy 'prior' needs components and rank equal to the "
                                 f"ground truth's {tuple(ground_truth.factors.shape[::2])}")
            means, _ = ground_truth.sample(components, generator)
            factors, priors = ground_truth.factors.detach(), ground_truth.priors
        else:
            means = _init.initial_means(strategy, components, data=data, dim=dim,
                                        generator=generator, means_scale=means_scale,
                                        means_noise_var=means_noise_var, dtype=dtype)
            factors = _init.normalized_factors(components, means.shape[1], rank, cov_scale,
                                               generator, means.dtype).to(means.device)
        return cls(means, factors, priors, process, prediction)
