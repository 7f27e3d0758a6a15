"""Samplers over a time grid (SPEC G.1): deterministic DDIM, stochastic DDPM, Euler
probability-flow ODE.

All take a model with ``model(x, t)`` returning the field ``model.prediction`` under
``model.process`` (defaults "x0" and VP when absent), x_init (B, *shape), and ts: the times to
visit in order (usually descending, e.g. time_grid()). They return the state at the LAST time of
ts (not a final x0 estimate), shape (B, *shape). No gradients are tracked.
"""

from __future__ import annotations

import torch

from .parametrization import convert, to_x0
from .processes import VP


def _setup(model, x_init, ts):
    if not isinstance(x_init, torch.Tensor):
        raise TypeError(f"x_init must be a torch.Tensor, got {type(x_init).__name__}")
    if x_init.dim() < 2:
        raise ValueError(f"x_init must have shape (B, *data_shape), got {tuple(x_init.shape)}")
    if isinstance(ts, torch.Tensor) and ts.dim() != 1:
        raise ValueError(f"ts must be 1-D, got shape {tuple(ts.shape)}")
    times = ts.detach().double().cpu().tolist() if isinstance(ts, torch.Tensor) else list(ts)
    if len(times) < 2:
        raise ValueError("ts must hold at least two times")
    if not all(isinstance(t, (int, float)) and 0 < t <= 1 for t in times):
        raise ValueError("ts must be numbers in (0, 1]")
    process = getattr(model, "process", None) or VP()
    prediction = getattr(model, "prediction", "x0")
    return [float(t) for t in times], process, prediction


def _x0_hat(model, x, t, process, prediction):
    return to_x0(prediction, model(x, t), x, t, process)


@torch.no_grad()
def ddim_sample(model, x_init: torch.Tensor, ts) -> torch.Tensor:
    """Deterministic DDIM:
    x_{t1} = (sigma1/sigma) x_t + alpha1 (1 - (alpha/alpha1)(sigma1/sigma)) x0_hat."""
    times, process, prediction = _setup(model, x_init, ts)
    x = x_init
    for t, t1 in zip(times[:-1], times[1:]):
        a, s, a1, s1 = process.alpha(t), process.sigma(t), process.alpha(t1), process.sigma(t1)
        x0 = _x0_hat(model, x, t, process, prediction)
        x = (s1 / s) * x + a1 * (1 - (a / a1) * (s1 / s)) * x0
    return x


@torch.no_grad()
def ddpm_sample(model, x_init: torch.Tensor, ts,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic DDPM: x_{t1} ~ N(r12 x + alpha1 (1 - r11^2) x0_hat, sigma1^2 (1 - r11^2) I),
    with r11 = (alpha/alpha1)(sigma1/sigma) and r12 = r11 sigma1/sigma."""
    times, process, prediction = _setup(model, x_init, ts)
    x = x_init
    for t, t1 in zip(times[:-1], times[1:]):
        a, s, a1, s1 = process.alpha(t), process.sigma(t), process.alpha(t1), process.sigma(t1)
        r11 = (a / a1) * (s1 / s)
        r12 = r11 * s1 / s
        x0 = _x0_hat(model, x, t, process, prediction)
        var = max(1 - r11 * r11, 0.0)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = r12 * x + a1 * var * x0 + s1 * var ** 0.5 * noise
    return x


@torch.no_grad()
def euler_ode_sample(model, x_init: torch.Tensor, ts) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dt = v(x, t)
    (v = alpha' x0_hat + sigma' eps_hat)."""
    times, process, prediction = _setup(model, x_init, ts)
    x = x_init
    for t, t1 in zip(times[:-1], times[1:]):
        v = convert(model(x, t), prediction, "v", x, t, process)
        x = x + (t1 - t) * v
    return x


__all__ = ["ddim_sample", "ddpm_sample", "euler_ode_sample"]
