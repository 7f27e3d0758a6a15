"""Initialisation helpers for the learnable structured models (SPEC F.1, C.6, C.7)."""

from __future__ import annotations

import math

import torch

STRATEGIES = ("gaussian", "sphere", "pmem", "prior")


def check_strategy(strategy: str) -> str:
    """The strategy name in lower case; ValueError when unknown."""
    if not isinstance(strategy, str) or strategy.lower() not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy.lower()


def check_count(name: str, value) -> int:
    """A positive int (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def pmem_indices(n: int, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PMEM rule (M,): m distinct indices of range(n) if m <= n, else all n then m - n uniform
    draws."""
    if m <= n:
        return torch.randperm(n, generator=generator)[:m]
    extra = torch.randint(0, n, (m - n,), generator=generator)
    return torch.cat([torch.arange(n), extra])


def initial_means(strategy: str, components: int, *, data=None, dim=None, generator=None,
                  means_scale: float = 1.0, means_noise_var: float = 0.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, D) initial means for "gaussian" (N(0, I) scale/sqrt(D)), "sphere" (norm = scale)
    or "pmem" (data rows chosen by pmem_indices, plus N(0, means_noise_var I))."""
    if strategy == "pmem":
        if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
            raise ValueError("strategy 'pmem' needs data, a tensor (N, ...) with N >= 1")
        if means_noise_var < 0:
            raise ValueError(f"means_noise_var must be >= 0, got {means_noise_var}")
        flat = data.reshape(data.shape[0], -1)
        idx = pmem_indices(flat.shape[0], components, generator).to(flat.device)
        noise = torch.randn(components, flat.shape[1], generator=generator, dtype=flat.dtype)
        return flat[idx] + math.sqrt(means_noise_var) * noise.to(flat.device)
    if dim is None and isinstance(data, torch.Tensor):
        dim = data[0].numel()
        dtype = data.dtype
    check_count("dim", dim)
    z = torch.randn(components, dim, generator=generator, dtype=dtype)
    if strategy == "gaussian":
        return z * (means_scale / math.sqrt(dim))
    return z / z.norm(dim=-1, keepdim=True) * means_scale


def normalized_factors(components: int, dim: int, rank: int, cov_scale: float,
                       generator=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) factors (M, D, r) divided by the Frobenius norm of the whole tensor, times
    sqrt(cov_scale) (SPEC C.6)."""
    if not cov_scale > 0:
        raise ValueError(f"cov_scale must be > 0, got {cov_scale}")
    u = torch.randn(components, dim, rank, generator=generator, dtype=dtype)
    return u / u.norm() * math.sqrt(cov_scale)
