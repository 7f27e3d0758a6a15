"""Denoising score-matching losses (SPEC D): per-sample, training objective, per-t evaluation.

Losses sum the squared error over all coordinates and average over R noise draws per sample:

    l(x0, t) = (1/R) sum_r || f(alpha x0 + sigma eps_r, t) - target_r ||^2

with target_r = x0, eps_r or v_r = alpha' x0 + sigma' eps_r.
"""

from __future__ import annotations

import torch

from .parametrization import FIELDS, loss_scale
from .processes import VP, Process, Time, _bcast

TARGETS = ("x0", "eps", "v")


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS} (score has no DSM target), "
                         f"got {target!r}")


def _check_draws(draws: int) -> None:
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")


def _check_x0(x0: torch.Tensor, name: str = "x0") -> None:
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() < 2 or x0.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, *data_shape) with B >= 1, "
                         f"got {tuple(x0.shape)}")


def _process(model) -> Process:
    process = getattr(model, "process", None)
    return process if process is not None else VP()


def dsm_target(target: str, x0: torch.Tensor, eps: torch.Tensor, t: Time,
               process: Process) -> torch.Tensor:
    """The regression target for x_t = alpha x0 + sigma eps; x0, eps (B, *shape), t float or
    (B,)."""
    _check_target(target)
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    return _bcast(process.alpha_prime(t), x0) * x0 + _bcast(process.sigma_prime(t), x0) * eps


def dsm_loss(model, x0: torch.Tensor, t: Time, *, draws: int = 100, target: str = "eps",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample DSM loss, shape (B,), differentiable w.r.t. the model's parameters.

    model(x_t, t) must return the field named `target` (model.process gives alpha, sigma; VP if
    absent). x0: (B, *shape); t: a float or a (B,) tensor (one time per sample).
    The model is called once on (B*draws, *shape). The noise is drawn on the generator's
    device and moved to x0's.
    """
    _check_target(target)
    _check_draws(draws)
    _check_x0(x0)
    B = x0.shape[0]
    if isinstance(t, torch.Tensor):
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != B):
            raise ValueError(f"t must be a float or a ({B},) tensor, got shape {tuple(t.shape)}")
        t = t.to(device=x0.device, dtype=x0.dtype)
        if t.dim() == 1:
            t = t.repeat_interleave(draws)
    elif not isinstance(t, (int, float)) or isinstance(t, bool):
        raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
    process = _process(model)
    x0r = x0.repeat_interleave(draws, dim=0)                       # (B*R, *shape)
    # drawn where the generator lives (a CPU generator gives the same noise on every device)
    eps = torch.randn(x0r.shape, generator=generator, dtype=x0.dtype,
                      device=x0.device if generator is None else generator.device).to(x0.device)
    x_t = process.noise(x0r, t, eps)
    err = model(x_t, t) - dsm_target(target, x0r, eps, t, process)
    return err.reshape(B, draws, -1).pow(2).sum(-1).mean(1)


def _grid(ts, name: str = "ts") -> torch.Tensor:
    """A 1-D float64 CPU tensor of times in (0, 1]."""
    if isinstance(ts, torch.Tensor):
        ts = ts.detach().to("cpu", torch.float64)
    else:
        try:
            ts = torch.tensor(list(ts), dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a 1-D tensor or a sequence of floats") from e
    if ts.dim() != 1 or ts.numel() == 0:
        raise ValueError(f"{name} must be 1-D and non-empty, got shape {tuple(ts.shape)}")
    if not bool(((ts > 0) & (ts <= 1)).all()):
        raise ValueError(f"{name} must lie in (0, 1]")
    return ts


def training_loss(model, x0: torch.Tensor, ts, *, probs=None, weights=None, draws: int = 100,
                  target: str = "eps", generator: torch.Generator | None = None) -> torch.Tensor:
    """Training objective (SPEC D.2): mean_b w_{j_b} l(x_b, ts[j_b]), j_b ~ Categorical(probs).

    x0: (B, *shape); ts: (T,) grid; probs: (T,) or None (uniform); weights: (T,) or None (ones).
    Returns a 0-d tensor, differentiable w.r.t. the model's parameters.
    """
    _check_x0(x0)
    grid = _grid(ts)
    T = grid.numel()
    p = (torch.full((T,), 1.0 / T, dtype=torch.float64) if probs is None
         else _per_t(probs, T, "probs"))
    if bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError("probs must be non-negative with a positive sum")
    w = torch.ones(T, dtype=torch.float64) if weights is None else _per_t(weights, T, "weights")
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    idx = torch.multinomial(p.to(gen_dev), x0.shape[0], replacement=True, generator=generator).cpu()
    t = grid[idx].to(device=x0.device, dtype=x0.dtype)
    per = dsm_loss(model, x0, t, draws=draws, target=target, generator=generator)
    return (w[idx].to(device=x0.device, dtype=per.dtype) * per).mean()


def _per_t(values, T: int, name: str) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if v.shape != (T,):
        raise ValueError(f"{name} must have shape ({T},), got {tuple(v.shape)}")
    return v


@torch.no_grad()
def loss_per_t(model, data: torch.Tensor, ts, *, draws: int = 100, target: str = "eps",
               generator: torch.Generator | None = None, batch: int = 65536) -> torch.Tensor:
    """L_t = mean over data of l(x, t) for each t in ts (SPEC D.3); returns float64 (T,).

    data: (N, *shape); ts: (T,). Samples are processed in chunks so that the model sees at most
    about `batch` rows (chunk of samples x draws) per call.
    """
    _check_x0(data, "data")
    grid = _grid(ts)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    _check_draws(draws)
    chunk = max(1, batch // draws)
    out = torch.zeros(grid.numel(), dtype=torch.float64)
    for j, t in enumerate(grid.tolist()):
        total = 0.0
        for start in range(0, data.shape[0], chunk):
            per = dsm_loss(model, data[start:start + chunk], t, draws=draws, target=target,
                           generator=generator)
            total += float(per.double().sum())
        out[j] = total / data.shape[0]
    return out


def time_weights(ts, weighting: str = "x0", *, units: str = "eps", weights=None,
                 process: Process | None = None) -> torch.Tensor:
    """Per-t coefficients c (T,) with  sum_t c_t L_t^{units} = (1/T) sum_t w_t L_t^{weighting}.

    weighting: the field ("x0", "eps", "v", "score") in which the per-t weights w apply;
    "x0" = x0-uniform (default, the paper's 4/5 N), "eps" = the training weighting.
    weights: (T,) custom w, default ones. units: the units the losses L_t are measured in.
    Uses L_weighting = lsf(units -> weighting) L_units (SPEC D.4), e.g.
    L_x0 = L_eps (sigma/alpha)^2.
    """
    for value, name in ((weighting, "weighting"), (units, "units")):
        if value not in FIELDS:
            raise ValueError(f"{name} must be one of {FIELDS}, got {value!r}")
    grid = _grid(ts)
    T = grid.numel()
    w = torch.ones(T, dtype=torch.float64) if weights is None else _per_t(weights, T, "weights")
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    process = process if process is not None else VP()
    scale = torch.as_tensor(loss_scale(units, weighting, grid, process), dtype=torch.float64)
    return w * scale / T


def weighted_loss(losses, ts, weighting: str = "x0", *, units: str = "eps", weights=None,
                  process: Process | None = None) -> float:
    """The time-weighted average of per-t losses (T,) measured in `units` (see time_weights)."""
    c = time_weights(ts, weighting, units=units, weights=weights, process=process)
    losses = _per_t(losses, c.numel(), "losses")
    return float((c * losses).sum())


__all__ = ["TARGETS", "dsm_loss", "dsm_target", "loss_per_t", "time_weights", "training_loss",
           "weighted_loss"]
