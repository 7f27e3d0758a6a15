"""Colored-template mixtures (SPEC C.7): the ground truth and the learnable model.

Data x has shape (C, H, W), P = H W, D = C P. Component k (uniform prior) is Gaussian with mean
m_k (x) T_k (x[c, p] = m_k[c] T_k[p]) and covariance v (I_C (x) T_k T_k^T). With tau_k = ||T_k||^2,
T^_k = T_k / sqrt(tau_k), g[c] = <x[c], T^_k>, y = g - alpha sqrt(tau_k) m_k and
A_k = alpha^2 v tau_k + sigma^2:

    Mahalanobis  q_k = sum_c ||x[c] - g[c] T^_k||^2 / sigma^2 + ||y||^2 / A_k
    log-det      L_k = C P log sigma^2 + C log(1 + alpha^2 v tau_k / sigma^2)   ("correct")
                 L_k = C P log sigma^2 +   log(1 + alpha^2 v tau_k / sigma^2)   ("reference")
    x0_hat       = sum_k w_k [m_k (x) T_k + (alpha v tau_k / A_k) y (x) T^_k],
                 w = softmax(-(q + L)/2)

"reference" reproduces the reference code's log-det, which misses the factor C (SPEC K.6). The
residual is formed directly (precision as t -> 0). The softmax over templates is dense plain torch
(see _structured.py): the per-query projection term is not of diffmem.softmax_mean's form.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..diffusion.processes import Process, Time
from . import _init
from ._structured import component_chunks, dense_posterior, noise_levels
from .base import Denoiser, check_time

LOGDETS = ("correct", "reference")


def templates_posterior(x: torch.Tensor, t: Time, process: Process, templates: torch.Tensor,
                        color_means: torch.Tensor, variance: torch.Tensor, logdet: str = "correct"):
    """E[x0 | x_t = x] (B, C*P) and log p_t(x) (B,) (exact with logdet="correct").

    x: (B, C*P); templates: (K, H, W) or (K, P); color_means: (K, C); variance: 0-d tensor.
    """
    K, C = color_means.shape
    T = templates.reshape(K, -1).to(x.dtype)
    P = T.shape[1]
    m, v = color_means.to(x.dtype), variance.to(x.dtype)
    B = x.shape[0]
    xs = x.reshape(B, C, P)
    alpha, sigma2 = noise_levels(process, t, x)                       # (T, 1)
    tau = T.square().sum(-1)                                          # (K,)
    root = tau.clamp_min(torch.finfo(x.dtype).tiny).sqrt()
    T_hat = T / root[:, None]
    g = torch.einsum("bcp,kp->bkc", xs, T_hat)                        # (B, K, C)
    perp2 = []
    for sl in component_chunks(B, K, C * P):
        resid = xs[:, None] - g[:, sl, :, None] * T_hat[None, sl, None, :]  # (B, k, C, P)
        perp2.append(resid.square().sum((-1, -2)))
    perp2 = torch.cat(perp2, 1)                                       # (B, K)
    y = g - alpha[..., None] * (root[:, None] * m)                    # (B, K, C)
    A = alpha ** 2 * v * tau + sigma2                                 # (T, K)
    q = perp2 / sigma2 + y.square().sum(-1) / A
    factor = C if logdet == "correct" else 1
    L = C * P * sigma2.log() + factor * torch.log1p(alpha ** 2 * v * tau / sigma2)
    weights, log_p = dense_posterior(-0.5 * (q + L) - math.log(K), C * P)
    x0 = torch.einsum("bk,kc,kp->bcp", weights, m, T)
    x0 = x0 + torch.einsum("bkc,kp->bcp", (weights * (alpha * v * tau / A))[..., None] * y, T_hat)
    return x0.reshape(B, C * P), log_p


def _check_inputs(templates, color_means, logdet: str) -> None:
    for name, value in (("templates", templates), ("color_means", color_means)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if templates.dim() != 3 or 0 in templates.shape:
        raise ValueError(f"templates must have shape (K, H, W), got {tuple(templates.shape)}")
    K = templates.shape[0]
    if color_means.dim() != 2 or color_means.shape[0] != K or color_means.shape[1] == 0:
        raise ValueError(f"color_means must have shape ({K}, C), got {tuple(color_means.shape)}")
    if logdet not in LOGDETS:
        raise ValueError(f"logdet must be one of {LOGDETS}, got {logdet!r}")


def _as_scalar(name: str, value, like: torch.Tensor, *, positive: bool) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got bool")
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() != 0 or not bool(torch.isfinite(value)) or (positive and not bool(value > 0)):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} scalar")
    return value


class _TemplateMixture(Denoiser):
    """Shared forward and sampling of the true and learnable colored-template models."""

    templates: torch.Tensor
    color_means: torch.Tensor
    logdet: str

    @property
    def color_var(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        return (self.color_means.shape[1], *self.templates.shape[1:])

    def x0(self, x, t):
        return templates_posterior(x, t, self.process, self.templates, self.color_means,
                                   self.color_var, self.logdet)[0]

    def log_prob(self, x_t, t):
        """log p_t(x_t) (B,); exact when logdet == "correct"."""
        check_time(t, x_t.shape[0])
        x = x_t.reshape(x_t.shape[0], -1)
        return templates_posterior(x, t, self.process, self.templates, self.color_means,
                                   self.color_var, self.logdet)[1]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        """n samples (n, C, H, W): template k uniform, colors N(m_k, v I_C); and labels (n,)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        K, C = self.color_means.shape
        labels = torch.randint(0, K, (n,), generator=generator)
        z = torch.randn(n, C, generator=generator, dtype=self.color_means.dtype)
        labels, z = labels.to(self.color_means.device), z.to(self.color_means.device)
        colors = self.color_means[labels] + self.color_var.sqrt() * z
        return colors[:, :, None, None] * self.templates[labels][:, None], labels


class ColoredTemplates(_TemplateMixture):
    """Ground truth: templates (K, H, W), color_means (K, C), color_var v > 0; buffers.

    logdet: "correct" (default) or "reference" (the reference code's, missing a factor C).
    """

    def __init__(self, templates: torch.Tensor, color_means: torch.Tensor, color_var=1.0,
                 process: Process | None = None, prediction: str = "x0",
                 logdet: str = "correct"):
        super().__init__(process, prediction)
        _check_inputs(templates, color_means, logdet)
        if not bool((templates.reshape(templates.shape[0], -1).norm(dim=-1) > 0).all()):
            raise ValueError("templates must each have a nonzero norm")
        self.register_buffer("templates", templates)
        self.register_buffer("color_means", color_means.to(templates.dtype))
        self.register_buffer("_color_var", _as_scalar("color_var", color_var, templates,
                                                      positive=True))
        self.logdet = logdet

    @property
    def color_var(self) -> torch.Tensor:
        """The shared color variance v (0-d)."""
        return self._color_var


class LearnableColoredTemplates(_TemplateMixture):
    """Trainable templates (M, H, W), color_means (M, C) and color_std (0-d); v = color_std^2.

    color_var is the initial variance: color_std = sqrt(color_var), or color_std = color_var
    when std_init="reference" (the reference code's initialisation, SPEC C.7 flag).
    """

    def __init__(self, templates: torch.Tensor, color_means: torch.Tensor, color_var=1e-6,
                 process: Process | None = None, prediction: str = "x0",
                 logdet: str = "correct", std_init: str = "sqrt"):
        super().__init__(process, prediction)
        _check_inputs(templates, color_means, logdet)
        if std_init not in ("sqrt", "reference"):
            raise ValueError(f"std_init must be 'sqrt' or 'reference', got {std_init!r}")
        var = _as_scalar("color_var", color_var, templates, positive=True)
        self.templates = nn.Parameter(templates.detach().clone())
        self.color_means = nn.Parameter(color_means.detach().clone().to(templates.dtype))
        self.color_std = nn.Parameter(var.sqrt() if std_init == "sqrt" else var.clone())
        self.logdet = logdet

    @property
    def color_var(self) -> torch.Tensor:
        """v = color_std^2 (0-d, differentiable)."""
        return self.color_std ** 2

    @classmethod
    def initialize(cls, strategy: str, components: int, *, data: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, ground_truth: ColoredTemplates | None = None,
                   generator: torch.Generator | None = None, color_var: float = 1e-6,
                   means_noise_var: float = 0.0, template_sparsity: float = 0.5,
                   color_means_scale: float = 1.0, channels: int | None = None,
                   size: tuple[int, int] | None = None, **kwargs):
        """Init per SPEC F.1. strategy "pmem" needs data (N, C, H, W), labels (N,) and
        ground_truth (its templates); "prior" needs ground_truth; "gaussian" / "sphere" need
        channels and size (or ground_truth) and draw Bernoulli(template_sparsity) templates.
        Other keyword arguments (process, prediction, logdet, std_init) go to the constructor.
        """
        strategy = _init.check_strategy(strategy)
        _init.check_count("components", components)
        if ground_truth is not None and not isinstance(ground_truth, _TemplateMixture):
            raise TypeError("ground_truth must be a ColoredTemplates")
        if strategy in ("pmem", "prior") and ground_truth is None:
            raise ValueError(f"strategy {strategy!r} needs ground_truth (its templates)")
        if strategy == "pmem":
            templates, color_means = _pmem(components, data, labels, ground_truth, generator,
                                           means_noise_var)
        elif strategy == "prior":
            x, y = ground_truth.sample(components, generator)
            templates = ground_truth.templates.detach()[y]
            color_means = color_vectors(x, templates)
            color_var = float(ground_truth.color_var)
        else:
            if ground_truth is not None:
                channels = channels or ground_truth.data_shape[0]
                size = size or tuple(ground_truth.data_shape[1:])
            _init.check_count("channels", channels)
            if size is None or len(size) != 2:
                raise ValueError(f"size must be (H, W), got {size!r}")
            if not 0 <= template_sparsity <= 1:
                raise ValueError(f"template_sparsity must lie in [0, 1], got {template_sparsity}")
            probs = torch.full((components, *size), float(template_sparsity))
            templates = torch.bernoulli(probs, generator=generator)
            c = torch.randn(components, channels, generator=generator)
            color_means = (c * color_means_scale / math.sqrt(channels) if strategy == "gaussian"
                           else c / c.norm(dim=-1, keepdim=True) * color_means_scale)
        return cls(templates, color_means, color_var, **kwargs)


def color_vectors(x: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """Each sample's colors (N, C) = sum_p x[c, p] / sum_p T[p]; x (N, C, H, W), templates
    (N, H, W)."""
    return x.flatten(2).sum(-1) / templates.flatten(1).sum(-1)[:, None]


def _pmem(components, data, labels, ground_truth, generator, means_noise_var):
    if not isinstance(data, torch.Tensor) or data.dim() != 4 or data.shape[0] == 0:
        raise ValueError("strategy 'pmem' needs data, a tensor (N, C, H, W) with N >= 1")
    if not isinstance(labels, torch.Tensor) or labels.shape != (data.shape[0],):
        raise ValueError(f"strategy 'pmem' needs labels of shape ({data.shape[0]},)")
    if means_noise_var < 0:
        raise ValueError(f"means_noise_var must be >= 0, got {means_noise_var}")
    idx = _init.pmem_indices(data.shape[0], components, generator).to(data.device)
    templates = ground_truth.templates.detach()[labels[idx].to(data.device)]
    colors = color_vectors(data[idx], templates)
    noise = torch.randn(colors.shape, generator=generator, dtype=colors.dtype)
    return templates, colors + math.sqrt(means_noise_var) * noise.to(colors.device)
