"""Loss approximations and the memorization crossover M*/N (SPEC E).

Units: every per-t quantity is returned in the units of `field` ("eps" by default, as the
reference reports losses) and multiplied by optional per-t weights lambda (T,). The crossover is
computed three ways, all under a time weighting (see diffusion.loss.time_weights; x0-uniform
default, "eps" = the training weighting):
  crossover_coded        the coded closed forms (E.1/E.3)
  crossover_instancewise the nearest-neighbour pmem excess (E.2) against Delta_gen
  crossover_measured     measured losses of the ground-truth and partially memorizing denoisers
                         (J.4)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .denoisers.empirical import EmpiricalDenoiser
from .diffusion.loss import _grid, _per_t, loss_per_t, time_weights
from .diffusion.parametrization import loss_scale
from .diffusion.processes import VP, Process
from .ops import knn


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _unit_weight(grid: torch.Tensor, field: str, weights, process: Process) -> torch.Tensor:
    """W(t) = lsf(x0 -> field)(t) * lambda(t), float64 (T,)."""
    lam = torch.ones_like(grid) if weights is None else _per_t(weights, grid.numel(), "weights")
    return torch.as_tensor(loss_scale("x0", field, grid, process), dtype=torch.float64) * lam


def delta_gen(ts, dim: int, *, variance: float = 1.0, field: str = "eps", weights=None,
              process: Process | None = None) -> torch.Tensor:
    """Generalizing minus memorizing excess (T,): W(t) d v / (1 + psi(t) v).
    VP/eps/v=1: d (1 - t^2)."""
    grid, process = _grid(ts), process if process is not None else VP()
    v = _positive(variance, "variance")
    dim = int(_positive(dim, "dim"))
    psi = torch.as_tensor(process.psi(grid), dtype=torch.float64)
    return _unit_weight(grid, field, weights, process) * dim * v / (1 + psi * v)


def delta_pmem(ts, dim: int, m: int, n: int, *, variance: float = 1.0, field: str = "eps",
               weights=None, process: Process | None = None) -> torch.Tensor:
    """Partially memorizing (M of N points) minus memorizing excess (T,), as coded:
    W(t) d v (1 - M/N), zero when M >= N."""
    grid, process = _grid(ts), process if process is not None else VP()
    v = _positive(variance, "variance")
    dim, n = int(_positive(dim, "dim")), int(_positive(n, "n"))
    if isinstance(m, bool) or not isinstance(m, (int, float)) or m < 0:
        raise ValueError(f"m must be a non-negative number, got {m!r}")
    return _unit_weight(grid, field, weights, process) * dim * v * max(0.0, 1 - m / n)


def ground_truth_approx(mem_losses, ts, dim: int, **kwargs) -> torch.Tensor:
    """The reference's baseline (E.1): memorizing losses (T,) + delta_gen(ts, dim, **kwargs)."""
    gen = delta_gen(ts, dim, **kwargs)
    return _per_t(mem_losses, gen.numel(), "mem_losses") + gen


def partial_mem_approx(mem_losses, ts, dim: int, m: int, n: int, **kwargs) -> torch.Tensor:
    """The reference's baseline (E.1): memorizing losses (T,)
    + delta_pmem(ts, dim, m, n, **kwargs)."""
    pm = delta_pmem(ts, dim, m, n, **kwargs)
    return _per_t(mem_losses, pm.numel(), "mem_losses") + pm


def draw_subsets(n: int, m: int, count: int = 1, generator: torch.Generator | None = None) -> list:
    """`count` subsets of {0..n-1} of size min(m, n), uniform without replacement: list of (m,)
    int64."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive int, got {m!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if m >= n:
        return [torch.arange(n) for _ in range(count)]
    return [torch.randperm(n, generator=generator)[:m] for _ in range(count)]


def nn_excess(data: torch.Tensor, subset: torch.Tensor) -> float:
    """(1/N) sum_i min_{j in S} ||x_i - x_j||^2 in x0 units (members of S contribute 0).
    data: (N, *shape); subset: (M,) indices into data."""
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
        raise ValueError("data must be a tensor (N, *data_shape) with N >= 1")
    if not isinstance(subset, torch.Tensor) or subset.dim() != 1 or subset.numel() == 0:
        raise ValueError("subset must be a non-empty 1-D index tensor")
    flat = data.reshape(data.shape[0], -1)
    d = knn(flat, flat[subset.to(flat.device)], 1)[0][:, 0].double()
    return float((d * d).mean())


def instancewise_pmem_excess(data: torch.Tensor, subsets, ts, *, field: str = "eps", weights=None,
                             process: Process | None = None) -> torch.Tensor:
    """Nearest-neighbour pmem excess (T,) over the memorizing loss (SPEC E.2 reconstruction):
    W(t) (1/N) sum_{i not in S} min_{j in S} ||x_i - x_j||^2 (EPS units: psi times the x0 value).
    subsets: one (M,) index tensor for all t, or a sequence of T of them (one per t)."""
    grid, process = _grid(ts), process if process is not None else VP()
    T = grid.numel()
    if isinstance(subsets, torch.Tensor):
        subsets = [subsets] * T
    if len(subsets) != T:
        raise ValueError(f"subsets must be one index tensor or {T} of them, got {len(subsets)}")
    cache = {}
    ex = []
    for s in subsets:
        key = id(s)
        if key not in cache:
            cache[key] = nn_excess(data, s)
        ex.append(cache[key])
    return _unit_weight(grid, field, weights, process) * torch.tensor(ex, dtype=torch.float64)


def instancewise_pmem_approx(mem_losses, data, subsets, ts, **kwargs) -> torch.Tensor:
    """mem_losses (T,) + instancewise_pmem_excess(data, subsets, ts, **kwargs)."""
    ex = instancewise_pmem_excess(data, subsets, ts, **kwargs)
    return _per_t(mem_losses, ex.numel(), "mem_losses") + ex


def crossover_coded(ts, *, weighting: str = "x0", weights=None, variance: float = 1.0,
                    process: Process | None = None) -> float:
    """M*/N from the coded approximations: sum_t c_t psi v/(1+psi v) / sum_t c_t, c in x0 units.
    On the 26-point VP grid: 0.6604 (x0-uniform), 0.99998 (eps-uniform)."""
    grid, process = _grid(ts), process if process is not None else VP()
    v = _positive(variance, "variance")
    c = time_weights(grid, weighting, units="x0", weights=weights, process=process)
    if float(c.sum()) <= 0:
        raise ValueError("weights must have a positive total")
    psi = torch.as_tensor(process.psi(grid), dtype=torch.float64)
    return float((c * psi * v / (1 + psi * v)).sum() / c.sum())


def crossing(fractions: Sequence[float], gaps: Sequence[float]) -> float:
    """First f where gap(f) falls from > 0 to <= 0, linearly interpolated; NaN if it never does.
    fractions ascending (M/N), gaps = weighted pmem loss minus weighted ground-truth loss."""
    f = [float(x) for x in fractions]
    g = [float(x) for x in gaps]
    if len(f) != len(g) or not f:
        raise ValueError("fractions and gaps must be non-empty and of equal length")
    if g[0] <= 0:
        return f[0]
    for i in range(len(f) - 1):
        if g[i] > 0 >= g[i + 1]:
            return f[i] + (f[i + 1] - f[i]) * g[i] / (g[i] - g[i + 1])
    return math.nan


def scan_sizes(n: int, steps: int = 20) -> list[int]:
    """M = round(k n / steps) for k = 1..steps, deduplicated, ascending (J.4: steps of N/20)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return sorted({max(1, round(k * n / steps)) for k in range(1, steps + 1)})


def _ms(n, ms, steps):
    ms = scan_sizes(n, steps) if ms is None else sorted(int(m) for m in ms)
    if not ms or ms[0] < 1:
        raise ValueError("ms must hold model sizes >= 1")
    return ms


def crossover_instancewise(data: torch.Tensor, ts, *, variance: float = 1.0, weighting: str = "x0",
                           weights=None, ms=None, steps: int = 20, redraw_per_t: bool = False,
                           generator: torch.Generator | None = None,
                           process: Process | None = None, return_scan: bool = False):
    """M*/N where the nearest-neighbour pmem excess (E.2) equals Delta_gen, both weighted.
    data: (N, *shape) training set; M scanned over `ms` (default steps of N/steps)."""
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
        raise ValueError("data must be a tensor (N, *data_shape) with N >= 1")
    grid, process = _grid(ts), process if process is not None else VP()
    n, T = data.shape[0], grid.numel()
    dim = data[0].numel()
    c = time_weights(grid, weighting, units="x0", weights=weights, process=process)
    gen_x0 = delta_gen(grid, dim, variance=variance, field="x0", process=process)
    ms = _ms(n, ms, steps)
    gaps = []
    for m in ms:
        subsets = draw_subsets(n, m, T if redraw_per_t else 1, generator)
        subsets = subsets if redraw_per_t else subsets[0]
        ex = instancewise_pmem_excess(data, subsets, grid, field="x0", process=process)
        gaps.append(float((c * (ex - gen_x0)).sum()))
    frac = crossing([m / n for m in ms], gaps)
    return (frac, ms, gaps) if return_scan else frac


def crossover_measured(data: torch.Tensor, ground_truth, ts, *, weighting: str = "x0", weights=None,
                       ms=None, steps: int = 20, draws: int = 100, redraw_per_t: bool = True,
                       generator: torch.Generator | None = None, seed: int = 0,
                       make_partial: Callable | None = None, batch: int = 65536,
                       backend: str = "auto", precision: str = "exact",
                       return_scan: bool = False):
    """M*/N from measured train losses of the ground-truth and partially memorizing denoisers (J.4).

    data: (N, *shape); ground_truth: a denoiser predicting "x0", "eps" or "v" (its process and
    prediction are used for the pmem models too). The pmem model for size M is make_partial(m)
    if given (e.g. a PartialMemorizingDenoiser with the same process and prediction), else an
    EmpiricalDenoiser over M points drawn with `generator`; with redraw_per_t (the reference's
    evaluation) a fresh one is built for every t, otherwise one per M. The noise draws at t use
    seed + t-index for every model (common random numbers), drawn on the CPU whatever data's
    device. backend / precision go to the EmpiricalDenoiser's op. Returns M*/N (NaN if the
    scan does not cross), or (M*/N, ms, gaps) with return_scan.
    """
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
        raise ValueError("data must be a tensor (N, *data_shape) with N >= 1")
    grid = _grid(ts)
    process = getattr(ground_truth, "process", None) or VP()
    field = getattr(ground_truth, "prediction", "eps")
    if field not in ("x0", "eps", "v"):
        raise ValueError(f"ground_truth.prediction must be 'x0', 'eps' or 'v' (a DSM target), "
                         f"got {field!r}")
    n, T = data.shape[0], grid.numel()
    c = time_weights(grid, weighting, units=field, weights=weights, process=process)

    def losses(model_at):  # model_at(j) -> model for t-index j
        out = torch.empty(T, dtype=torch.float64)
        for j in range(T):
            g = torch.Generator().manual_seed(seed + j)  # CPU: the same draws on every device
            out[j] = loss_per_t(model_at(j), data, grid[j:j + 1], draws=draws, target=field,
                                generator=g, batch=batch)[0]
        return out

    def pmem(m, subset):
        if make_partial is not None:
            return make_partial(m)
        return EmpiricalDenoiser(data[subset.to(data.device)], process, field, backend=backend,
                                 precision=precision)

    gt = losses(lambda j: ground_truth)
    ms = _ms(n, ms, steps)
    gaps = []
    for m in ms:
        subsets = draw_subsets(n, m, T if redraw_per_t else 1, generator)
        models = [pmem(m, s) for s in subsets]
        lp = losses(lambda j, models=models: models[j if redraw_per_t else 0])
        gaps.append(float((c * (lp - gt)).sum()))
    frac = crossing([m / n for m in ms], gaps)
    return (frac, ms, gaps) if return_scan else frac


__all__ = ["crossing", "crossover_coded", "crossover_instancewise", "crossover_measured",
           "delta_gen", "delta_pmem", "draw_subsets", "ground_truth_approx",
           "instancewise_pmem_approx", "instancewise_pmem_excess", "nn_excess",
           "partial_mem_approx", "scan_sizes"]
