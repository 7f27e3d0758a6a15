"""Plain-torch pieces shared by the structured mixtures (low-rank GMM, colored templates).

Their logits are log pi_k - (x_bar_k^T Sigma_k^{-1} x_bar_k + log det Sigma_k) / 2 with a
per-component, non-isotropic Sigma_k. The query-dependent Mahalanobis correction cannot be
folded into diffmem.softmax_mean's per-point bias, so these models form the (B, K) logits
densely here and take the softmax with torch. K is small for these models, and the (B, K, r)
projections they need cost as much as the softmax itself.
"""

from __future__ import annotations

import math

import torch

from ..diffusion.processes import Process, Time

# Elements of a (B, K_chunk, D) residual block materialised at once.
CHUNK_ELEMENTS = 1 << 22


def noise_levels(process: Process, t: Time, x: torch.Tensor):
    """alpha and sigma^2 as tensors of x's dtype, shape (T, 1) with T = 1 or B (per-sample t)."""
    alpha = torch.as_tensor(process.alpha(t), dtype=x.dtype, device=x.device).reshape(-1, 1)
    sigma = torch.as_tensor(process.sigma(t), dtype=x.dtype, device=x.device).reshape(-1, 1)
    return alpha, sigma * sigma


def component_chunks(batch: int, components: int, dim: int):
    """Slices over the K components so that a (batch, chunk, dim) block stays bounded."""
    step = max(1, CHUNK_ELEMENTS // max(1, batch * dim))
    return [slice(k, min(k + step, components)) for k in range(0, components, step)]


def dense_posterior(logits: torch.Tensor, dim: int):
    """Softmax weights (B, K) and log p = logsumexp(logits) - (dim/2) log(2 pi), shape (B,)."""
    weights = torch.softmax(logits, dim=-1)
    log_p = torch.logsumexp(logits, dim=-1) - 0.5 * dim * math.log(2 * math.pi)
    return weights, log_p


def check_priors(priors: torch.Tensor | None, K: int, like: torch.Tensor) -> torch.Tensor:
    """Uniform priors when None; otherwise (K,), non-negative, summing to one."""
    if priors is None:
        return torch.full((K,), 1.0 / K, dtype=like.dtype, device=like.device)
    if not isinstance(priors, torch.Tensor):
        raise TypeError(f"priors must be a tensor or None, got {type(priors).__name__}")
    priors = priors.to(dtype=like.dtype, device=like.device)
    if priors.shape != (K,) or bool((priors < 0).any()) or abs(float(priors.sum()) - 1) > 1e-5:
        raise ValueError(f"priors must have shape ({K},), be non-negative and sum to 1")
    return priors
