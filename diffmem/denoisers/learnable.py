"""Learnable isotropic homoscedastic GMMs: the model the paper trains (SPEC C.4, C.5).

``LearnableGMM`` holds G independent models (one per size M, padded to a common M with masked
components) so that one softmax_mean call evaluates and differentiates all of them at once.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.parametrization import FIELDS, from_x0
from ..diffusion.processes import VP, Process, Time, time_grid
from ..ops import softmax_mean
from ._init import initial_means
from .gmm import IsotropicGMM


def _check_float_tensor(value, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, "
                         f"got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite")
    return value


def _std_tensor(std, count: int, like: torch.Tensor, name: str = "std") -> torch.Tensor:
    """std as a (count,) tensor of like's dtype; a float or 0-d tensor is repeated."""
    if isinstance(std, bool) or not isinstance(std, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(std).__name__}")
    std = torch.as_tensor(std, dtype=like.dtype, device=like.device)
    if std.dim() == 0:
        std = std.expand(count)
    if std.shape != (count,):
        raise ValueError(f"{name} must be a float or have shape ({count},), got {tuple(std.shape)}")
    if not bool(torch.isfinite(std).all()) or bool((std == 0).any()):
        raise ValueError(f"{name} must be finite and nonzero")
    return std.clone()


def _times(t: Time, batch_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """t (a float, or a tensor broadcastable to batch_shape, values in (0, 1]) as a tensor of
    like's dtype and device."""
    if isinstance(t, torch.Tensor):
        try:
            ok = torch.broadcast_shapes(t.shape, batch_shape) == torch.Size(batch_shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"t must be a scalar or broadcast to {batch_shape}, "
                             f"got {tuple(t.shape)}")
        if t.numel() and not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError("t must lie in (0, 1]")
        return t.to(dtype=like.dtype, device=like.device)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
        raise ValueError(f"t must be a number in (0, 1] or a tensor, got {t!r}")
    return torch.tensor(float(t), dtype=like.dtype, device=like.device)


class LearnableGMM(nn.Module):
    """G learnable isotropic GMMs with trainable means and scalar std (variance std^2), uniform
    static priors over each model's valid components (SPEC C.4).

    means: (M, d) for one model or (G, M, d); std: float or (G,); mask: None or (G, M) bool,
    False marks a padding component (log-prior -inf). ``model(x_t, t)`` takes x_t of shape (B, d)
    (shared by all models) or (G, B, d) (one batch per model) and t a float or a tensor
    broadcastable to (B,) / (G, B); it returns the field ``prediction`` with shape (G, B, d), or
    (B, d) when built from 2-D means.
    """

    def __init__(self, means: torch.Tensor, std, *, mask: torch.Tensor | None = None,
                 process: Process | None = None, prediction: str = "eps",
                 backend: str = "auto", precision: str = "exact"):
        super().__init__()
        means = _check_float_tensor(means, "means", (2, 3))
        if prediction not in FIELDS:
            raise ValueError(f"prediction must be one of {FIELDS}, got {prediction!r}")
        if process is not None and not isinstance(process, Process):
            raise TypeError(f"process must be a Process, got {type(process).__name__}")
        self.single = means.dim() == 2
        means = means[None] if self.single else means
        G, M, _ = means.shape
        if mask is None:
            mask = torch.ones(G, M, dtype=torch.bool, device=means.device)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor")
        mask = mask[None] if mask.dim() == 1 else mask
        if mask.shape != (G, M):
            raise ValueError(f"mask must have shape ({G}, {M}), got {tuple(mask.shape)}")
        if not bool(mask.any(-1).all()):
            raise ValueError("mask must keep at least one component per model")
        self.means = nn.Parameter(means.detach().clone())
        self.std = nn.Parameter(_std_tensor(std, G, means))
        counts = mask.sum(-1, keepdim=True).to(means.dtype)
        log_prior = torch.where(mask, -counts.log(), torch.full_like(counts, -torch.inf))
        self.register_buffer("mask", mask.to(means.device))
        self.register_buffer("log_prior", log_prior)
        self.process = process if process is not None else VP()
        self.prediction = prediction
        self.backend, self.precision = backend, precision

    @property
    def num_models(self) -> int:
        return self.means.shape[0]

    def variance(self) -> torch.Tensor:
        """std^2, shape (G,)."""
        return self.std * self.std

    def field(self, x: torch.Tensor, t: Time, prediction: str | None = None) -> torch.Tensor:
        """The requested field for x (B, d) or (G, B, d); returns (G, B, d)."""
        prediction = self.prediction if prediction is None else prediction
        if prediction not in FIELDS:
            raise ValueError(f"prediction must be one of {FIELDS}, got {prediction!r}")
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            raise ValueError("x_t must be a (B, d) or (G, B, d) tensor")
        G, _, d = self.means.shape
        if x.shape[-1] != d or (x.dim() == 3 and x.shape[0] != G):
            raise ValueError(f"x_t must have shape (B, {d}) or ({G}, B, {d}), "
                             f"got {tuple(x.shape)}")
        t = _times(t, (G, x.shape[-2]), x)[..., None]                    # (..., 1)
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)
        var = self.variance().to(x.dtype)[:, None, None]                  # (G, 1, 1)
        s = alpha * alpha * var + sigma * sigma                           # (G, B or 1, 1)
        mu_bar = self.posterior_mean(x, alpha[..., 0], s[..., 0])          # (G, B, d)
        if prediction == "eps":  # sigma (x - alpha mu_bar) / s: no cancellation at small sigma
            return sigma * (x - alpha * mu_bar) / s
        x0 = (alpha * var / s) * x + (sigma * sigma / s) * mu_bar
        return from_x0(prediction, x0, x, t, self.process)

    def posterior_mean(self, x: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor, *,
                       check_inputs: bool = True) -> torch.Tensor:
        """mu_bar = softmax_k(log pi_k - ||x - alpha mu_k||^2 / (2 s)) . mu (G, B, d), for x
        (B, d) or (G, B, d) and alpha, s broadcastable to (G, B); s = alpha^2 std^2 + sigma^2.
        check_inputs: softmax_mean's scan of its inputs (skip it only for inputs known finite)."""
        return softmax_mean(x, self.means.to(x.dtype), alpha, s, self.log_prior.to(x.dtype),
                            backend=self.backend, precision=self.precision,
                            check_inputs=check_inputs)

    def forward(self, x_t: torch.Tensor, t: Time) -> torch.Tensor:
        out = self.field(x_t, t)
        return out[0] if self.single else out

    def denoiser(self, g: int = 0, prediction: str = "x0") -> IsotropicGMM:
        """Model g as a fixed IsotropicGMM (valid means, variance std^2, uniform priors)."""
        from .gmm import IsotropicGMM

        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < self.num_models:
            raise ValueError(f"g must be an int in [0, {self.num_models}), got {g!r}")
        means, std = self.parts()[g]
        return IsotropicGMM(means, std * std, process=self.process, prediction=prediction,
                            backend=self.backend, precision=self.precision)

    def parts(self) -> list[tuple[torch.Tensor, float]]:
        """Each model's valid means (M_g, d) and std, detached."""
        return [(self.means[g][self.mask[g]].detach().clone(), float(self.std[g].detach()))
                for g in range(self.num_models)]


def grid_index(t: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Index of the first grid point ts[i] <= t on the descending grid ts (T,), clipped to T-1
    (the reference clips to M-1, SPEC C.5 [FLAG]). t: any shape; returns long, same shape."""
    idx = torch.searchsorted(-ts.to(t.dtype).contiguous(), -t.contiguous(), side="left")
    return idx.clamp(0, ts.shape[0] - 1)


class SplitLearnableGMM(nn.Module):
    """One learnable GMM with separate means (T, M, d) and std (T,) per grid time (SPEC C.5).

    A time t uses the parameters of grid_index(t, ts). ``model(x_t (B, d), t)`` -> (B, d).
    """

    def __init__(self, means: torch.Tensor, std, ts: torch.Tensor | None = None, *,
                 process: Process | None = None, prediction: str = "eps",
                 backend: str = "auto", precision: str = "exact"):
        super().__init__()
        means = _check_float_tensor(means, "means", (3,))
        if prediction not in FIELDS:
            raise ValueError(f"prediction must be one of {FIELDS}, got {prediction!r}")
        T = means.shape[0]
        ts = time_grid(num=T) if ts is None else ts
        if not isinstance(ts, torch.Tensor) or ts.shape != (T,):
            raise ValueError(f"ts must be a ({T},) tensor, got {getattr(ts, 'shape', ts)}")
        if T > 1 and not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError("ts must be strictly descending")
        self.means = nn.Parameter(means.detach().clone())
        self.std = nn.Parameter(_std_tensor(std, T, means))
        self.register_buffer("ts", ts.to(means.dtype))
        self.process = process if process is not None else VP()
        self.prediction = prediction
        self.backend, self.precision = backend, precision

    def forward(self, x_t: torch.Tensor, t: Time) -> torch.Tensor:
        if (not isinstance(x_t, torch.Tensor) or x_t.dim() != 2
                or x_t.shape[1] != self.means.shape[2]):
            raise ValueError(f"x_t must have shape (B, {self.means.shape[2]})")
        B = x_t.shape[0]
        t = _times(t, (B,), x_t)
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(B)
        idx = grid_index(t, self.ts)                                      # (B,)
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)       # (B,)
        var = (self.std * self.std)[idx]                                   # (B,)
        s = alpha * alpha * var + sigma * sigma
        mu_bar = softmax_mean(x_t[:, None, :], self.means[idx], alpha[:, None], s[:, None],
                              backend=self.backend, precision=self.precision)[:, 0]
        if self.prediction == "eps":
            return (sigma / s)[:, None] * (x_t - alpha[:, None] * mu_bar)
        x0 = (alpha * var / s)[:, None] * x_t + (sigma * sigma / s)[:, None] * mu_bar
        return from_x0(self.prediction, x0, x_t, t, self.process)


# ---------------------------------------------------------------------------------------------
# Initialization strategies (SPEC F.1). Each returns (means (M, d), std float), priors uniform.

INIT_STRATEGIES = ("pmem", "gaussian", "sphere", "prior")


def _check_size(M, name: str = "M") -> int:
    if isinstance(M, bool) or not isinstance(M, int):
        raise TypeError(f"{name} must be an int, got {type(M).__name__}")
    if M < 1:
        raise ValueError(f"{name} must be >= 1, got {M}")
    return M


def _check_var(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")


def init_pmem(data: torch.Tensor, M: int, *, generator: torch.Generator | None = None,
              noise_var: float = 0.0, init_var: float = 1e-6) -> tuple[torch.Tensor, float]:
    """PMEM: M training points (without replacement if M <= N, else all N plus M - N drawn with
    replacement) plus sqrt(noise_var) N(0, I); std = sqrt(init_var). data: (N, d)."""
    data = _check_float_tensor(data, "data", (2,))
    M = _check_size(M)
    noise_var, init_var = _check_var(noise_var, "noise_var"), _check_var(init_var, "init_var")
    if init_var == 0:
        raise ValueError("init_var must be > 0")
    _check_generator(generator)
    means = initial_means("pmem", M, data=data, generator=generator, means_noise_var=noise_var)
    return means, init_var ** 0.5


def _init_random(kind: str, d: int, M: int, generator, means_scale: float, init_var: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    d, M = _check_size(d, "d"), _check_size(M)
    _check_var(means_scale, "means_scale")
    if _check_var(init_var, "init_var") == 0:
        raise ValueError("init_var must be > 0")
    _check_generator(generator)
    means = initial_means(kind, M, dim=d, generator=generator, means_scale=means_scale, dtype=dtype)
    return means, init_var ** 0.5


def init_gaussian(d: int, M: int, *, generator: torch.Generator | None = None,
                  means_scale: float = 1.0, init_var: float = 1e-6,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """GAUSSIAN: means N(0, I) * means_scale / sqrt(d) (norm about means_scale);
    std = sqrt(init_var)."""
    return _init_random("gaussian", d, M, generator, means_scale, init_var, dtype)


def init_sphere(d: int, M: int, *, generator: torch.Generator | None = None,
                means_scale: float = 1.0, init_var: float = 1e-6,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """SPHERE: means uniform on the sphere of radius means_scale; std = sqrt(init_var)
    (the reference crashes here, SPEC F.1 [FLAG])."""
    return _init_random("sphere", d, M, generator, means_scale, init_var, dtype)


def init_prior(gt, M: int, *,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """PRIOR: M fresh samples of the ground-truth IsotropicGMM gt; std = sqrt(gt variance).
    Priors are uniform over the M samples (the reference keeps gt's K priors, SPEC F.1 [FLAG])."""
    from .gmm import IsotropicGMM

    if not isinstance(gt, IsotropicGMM):
        raise TypeError(f"gt must be an IsotropicGMM, got {type(gt).__name__}")
    M = _check_size(M)
    _check_generator(generator)
    means, _ = gt.sample(M, generator=generator)
    return means, float(gt.variance) ** 0.5


def initialize(strategy: str, M: int, *, generator: torch.Generator | None = None,
               data: torch.Tensor | None = None, gt=None, init_var: float = 1e-6,
               noise_var: float = 0.0,
               means_scale: float | None = None) -> tuple[torch.Tensor, float]:
    """Dispatch to init_<strategy>; pmem needs data (N, d), prior needs gt, gaussian/sphere need
    data (for d and dtype) or gt; means_scale defaults to sqrt(d)."""
    if strategy not in INIT_STRATEGIES:
        raise ValueError(f"strategy must be one of {INIT_STRATEGIES}, got {strategy!r}")
    if strategy == "pmem":
        if data is None:
            raise ValueError("strategy 'pmem' needs data")
        return init_pmem(data, M, generator=generator, noise_var=noise_var, init_var=init_var)
    if strategy == "prior":
        if gt is None:
            raise ValueError("strategy 'prior' needs gt")
        return init_prior(gt, M, generator=generator)
    ref = data if data is not None else (gt.means if gt is not None else None)
    if ref is None:
        raise ValueError(f"strategy {strategy!r} needs data or gt (for d)")
    d = ref.shape[-1]
    scale = d ** 0.5 if means_scale is None else means_scale
    fn = init_gaussian if strategy == "gaussian" else init_sphere
    return fn(d, M, generator=generator, means_scale=scale, init_var=init_var, dtype=ref.dtype)
