"""``diffmem crossover --samples N1,N2,...``: the three predicted crossovers M*/N for each N of a
list, one stage per N saved atomically (out/stages/N<N>.json; --resume skips finished ones),
then out/crossover_vs_n.json (all N) and out/crossover_vs_n.png (M*/N against N, log x).

- coded: the closed form (the same for every N).
- instance-wise: nearest-neighbour excess over the full training set (knn; fine at N = 1e5).
- measured: the weighted train-loss gap between the partially memorizing denoiser (M of the N
  points, a fresh subset per t) and the ground truth, measured on a random subset of P training
  points (--measure-points) with R noise draws each. See measured_subsampled for its standard
  error.

Data are generated on the CPU (same seed, same data on every device) and moved to the runtime's
device, where the losses run with its backend and precision.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from .. import theory
from ..data import make_gmm_data
from ..denoisers.empirical import EmpiricalDenoiser
from ..diffusion.loss import time_weights
from ..diffusion.processes import VP, time_grid
from .config import ConfigError
from .evaluate import generator
from .progress import Progress
from .results import read_json, writable_folder, write_json
from .runtime import Runtime

SCHEMA = "diffmem.crossover_vs_n/1"
MEASURE_POINTS = 256  # default P: query points of the measured crossover
MEASURE_DRAWS = 8     # default R: noise draws per query point and t
ROWS = 4096           # query rows (points x draws) per denoiser call


def per_point_losses(model, x0: torch.Tensor, t: float, eps: torch.Tensor) -> torch.Tensor:
    """EPS-unit DSM loss of each point (P,), float64, averaged over its R draws.
    x0: (P, d) on the model's device; eps: (P, R, d) noise (any device)."""
    P, R, d = eps.shape
    x0r = x0.unsqueeze(1).expand(P, R, d).reshape(P * R, d)
    eps = eps.reshape(P * R, d).to(x0)
    out = torch.empty(P * R, dtype=torch.float64, device=x0.device)
    for s in range(0, P * R, ROWS):
        x_t = VP().noise(x0r[s:s + ROWS], t, eps[s:s + ROWS])
        err = model(x_t, t) - eps[s:s + ROWS]
        out[s:s + ROWS] = err.double().pow(2).sum(-1)
    return out.reshape(P, R).mean(1).cpu()


def crossing_se(fractions, gaps, gap_se) -> tuple[float, float | None]:
    """(M*/N, its standard error): the first crossing of the mean gaps (theory.crossing) and,
    by the delta method, the gap's SE at the crossing (interpolated between the two bracketing
    sizes) over the magnitude of the gap's slope there. (NaN, None) if the gaps do not cross;
    SE None if the crossing is at the first size (no slope to its left)."""
    frac = theory.crossing(fractions, gaps)
    if frac != frac or gaps[0] <= 0:  # no crossing, or at the first size
        return frac, None
    for i in range(len(fractions) - 1):
        if gaps[i] > 0 >= gaps[i + 1]:
            f0, f1 = fractions[i], fractions[i + 1]
            w = (frac - f0) / (f1 - f0)
            se = (1 - w) * gap_se[i] + w * gap_se[i + 1]
            slope = (gaps[i + 1] - gaps[i]) / (f1 - f0)
            return frac, se / abs(slope)
    return frac, None


def measured_subsampled(train: torch.Tensor, ground_truth, ts, *, points: int, draws: int,
                        seed: int, weighting: str = "x0", backend: str = "auto",
                        precision: str = "exact", steps: int = 20, progress=None) -> dict:
    """The measured crossover estimated on P = min(points, N) random training points.

    train: (N, d) on the device of the work; ground_truth: its EPS denoiser; backend /
    precision go to the op of every partially memorizing denoiser. For every t on the grid
    one noise draw eps (P, R, d) made on the CPU serves every model (common random numbers);
    the partially memorizing denoiser for size M (M = N/steps, 2N/steps, ..., N) is the
    EmpiricalDenoiser of M training points, a fresh subset per t. Per query point i the
    weighted gap is g_i(M) = sum_t c_t (l_pmem(x_i, t) - l_gt(x_i, t)); the gap is its mean
    over the P points, with standard error std_i(g_i(M)) / sqrt(P): the points and their
    noise are independent given the subsets, so this is the Monte-Carlo error of the point
    and noise sampling (with P = N it overstates the error, as the points are then the whole
    set). The crossover is where the mean gap crosses zero, its SE the gap's SE there over
    the slope (crossing_se). Returns {"fraction", "se", "points", "draws", "sizes", "gaps",
    "gap_se"}."""
    N, d = train.shape
    P = min(int(points), N)
    grid = torch.as_tensor(ts, dtype=torch.float64)
    c = time_weights(grid, weighting, units="eps")
    query = torch.randperm(N, generator=generator(seed, "measure-points"))[:P].sort().values
    x0 = train[query.to(train.device)]
    ms = theory.scan_sizes(N, steps)
    noise = generator(seed, "measure-noise")
    eps = [torch.randn(P, draws, d, generator=noise, dtype=train.dtype) for _ in range(len(grid))]
    gt = [per_point_losses(ground_truth, x0, float(t), eps[j]) for j, t in enumerate(grid)]
    subsets = generator(seed, "measure-subsets")
    gaps, gap_se = [], []
    for k, m in enumerate(ms):
        g = torch.zeros(P, dtype=torch.float64)
        for j, t in enumerate(grid.tolist()):
            subset = theory.draw_subsets(N, m, 1, subsets)[0].to(train.device)
            model = EmpiricalDenoiser(train[subset], VP(), "eps", backend=backend,
                                      precision=precision)
            g += c[j] * (per_point_losses(model, x0, t, eps[j]) - gt[j])
        gaps.append(float(g.mean()))
        gap_se.append(float(g.std() / math.sqrt(P)) if P > 1 else float("nan"))
        if progress is not None:
            progress(k + 1, len(ms))
    frac, se = crossing_se([m / N for m in ms], gaps, gap_se)
    return {"fraction": frac, "se": se, "points": P, "draws": draws, "sizes": ms, "gaps": gaps,
            "gap_se": gap_se}


def instancewise_with_progress(train, ts, *, variance: float, weighting: str, seed: int,
                              steps: int = 20, progress=None) -> tuple[float, list, list]:
    """theory.crossover_instancewise(..., return_scan=True) with the subsets of predictions.py
    (generator(seed, "instancewise")), one size M at a time so that progress(k, n) reports
    (the sizes draw their subsets from the generator in the same order: same result)."""
    gen, N = generator(seed, "instancewise"), train.shape[0]
    ms, gaps = theory.scan_sizes(N, steps), []
    for k, m in enumerate(ms):
        gaps += theory.crossover_instancewise(train, ts, variance=variance, weighting=weighting,
                                              ms=[m], generator=gen, return_scan=True)[2]
        if progress is not None:
            progress(k + 1, len(ms))
    return theory.crossing([m / N for m in ms], gaps), ms, gaps


def predict_for_n(config, runtime: Runtime, *, points: int, draws: int, weighting: str,
                  measured: bool, progress: Progress) -> dict:
    """One stage: the three predictions of M*/N for config (its samples = N) with timings."""
    N = config.samples
    data = make_gmm_data(config.dim, config.components, N, config.seed,
                         val_samples=config.val_samples, variance=config.variance)
    train = data.train.to(runtime.torch_device)
    ts = time_grid(dtype=torch.float64)
    v = float(data.variance)
    out, seconds = {"samples": N}, {}
    t0 = time.perf_counter()
    out["coded"] = theory.crossover_coded(ts, weighting=weighting, variance=v)
    t1 = time.perf_counter()
    out["instancewise"], ms, gaps = instancewise_with_progress(
        train, ts, variance=v, weighting=weighting, seed=config.seed,
        progress=progress.task(f"N={N} instance-wise"))
    out["instancewise_scan"] = {"sizes": ms, "gaps": gaps}
    seconds["instancewise"] = time.perf_counter() - t1
    progress.note(f"N={N}: coded {out['coded']:.4f}, instance-wise {out['instancewise']:.4f} "
                  f"({seconds['instancewise']:.1f} s)")
    if measured:
        t2 = time.perf_counter()
        gt = data.ground_truth(prediction="eps", backend=runtime.backend,
                               precision=runtime.precision).to(runtime.torch_device)
        m = measured_subsampled(train, gt, ts, points=points, draws=draws, seed=config.seed,
                                weighting=weighting, backend=runtime.backend,
                                precision=runtime.precision,
                                progress=progress.task(f"N={N} measured"))
        out["measured"], out["measured_se"] = m.pop("fraction"), m.pop("se")
        out["measured_scan"] = m
        seconds["measured"] = time.perf_counter() - t2
        se = "n/a" if out["measured_se"] is None else f"{out['measured_se']:.4f}"
        progress.note(f"N={N}: measured {out['measured']:.4f} +- {se} "
                      f"({seconds['measured']:.1f} s)")
    else:
        out["measured"] = out["measured_se"] = None
    seconds["total"] = time.perf_counter() - t0
    out["seconds"] = seconds
    return out


def _stage_settings(config, points, draws, weighting, measured) -> dict:
    """What a finished stage must match to be reused (not the device, backend or precision:
    a stage from another device agrees up to the precision and is kept)."""
    c = config.to_dict()
    keep = ("data", "dim", "components", "seed", "variance", "val_samples")
    return {**{k: c[k] for k in keep}, "measure_points": points, "measure_draws": draws,
            "weighting": weighting, "measured": measured}


def run_crossover_vs_n(config, samples: list[int], out, runtime: Runtime, *, points: int,
                       draws: int, weighting: str, measured: bool, resume: bool,
                       quiet: bool, plots: bool) -> dict:
    """Every N of samples as a stage (out/stages/N<N>.json), then out/crossover_vs_n.json and
    the plot. With resume a finished stage of the same settings is read, not recomputed."""
    if config.data != "gmm":
        raise ConfigError("--samples with several N is for --data gmm (the coded and "
                          "instance-wise closed forms are GMM theory)")
    out = writable_folder(out)
    progress = Progress(quiet)
    settings = _stage_settings(config, points, draws, weighting, measured)
    rows = []
    for N in samples:
        path = out / "stages" / f"N{N}.json"
        if resume and path.exists():
            try:
                stage = read_json(path)
            except (OSError, ValueError):
                stage = None
            if stage is not None and stage.get("settings") == settings:
                progress.note(f"N={N}: finished earlier, read from {path}")
                rows.append(stage["result"])
                continue
            progress.warn(f"{path}: other settings or unreadable; computing N={N} again")
        progress.note(f"N={N}: predicting M*/N on {runtime.device}")
        result = predict_for_n(dataclasses.replace(config, samples=N), runtime, points=points,
                               draws=draws, weighting=weighting, measured=measured,
                               progress=progress)
        write_json(path, {"schema": SCHEMA + "/stage", "settings": settings,
                          "runtime": runtime.record(), "result": result})
        rows.append(result)
    summary = {"schema": SCHEMA, "settings": settings, "runtime": runtime.record(),
               "samples": list(samples), "rows": rows}
    write_json(out / "crossover_vs_n.json", summary)
    if plots:
        from .plots import plot_crossover_vs_n
        plot_crossover_vs_n(rows, out / "crossover_vs_n.png",
                            title=f"d={config.dim} K={config.components} ({weighting}-uniform)")
    return summary


def format_rows(rows: list[dict]) -> str:
    f = lambda v: "    -   " if v is None or v != v else f"{v:8.4f}"  # noqa: E731
    lines = ["       N    coded   inst.   measured  (SE)     seconds", "-" * 56]
    for r in rows:
        se = r.get("measured_se")
        lines.append(f"{r['samples']:>8} {f(r['coded'])} {f(r['instancewise'])} "
                     f"{f(r['measured'])}  ({'-' if se is None else f'{se:.4f}'})  "
                     f"{r['seconds']['total']:8.1f}")
    return "\n".join(lines)


__all__ = ["MEASURE_DRAWS", "MEASURE_POINTS", "crossing_se", "format_rows",
           "instancewise_with_progress", "measured_subsampled", "per_point_losses",
           "predict_for_n", "run_crossover_vs_n"]
