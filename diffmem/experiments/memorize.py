"""``diffmem memorize``: the memorizing, partially memorizing and generalizing denoisers of one
data set, sampled by DDIM from the same seeded noise, and how much each one copies.

Denoisers (``Spec``): the empirical denoiser over all N points ("memorizing"), the empirical
denoiser over a seeded random subset of M = round(f N) points for each fraction f
("partial_<f>", as PartialMemorizingDenoiser with a fixed subset), and the generalizing
baseline: the true mixture for gmm data, else a Gaussian fitted to the data
(diffmem.denoisers.gaussian).

Per denoiser (one stage, saved atomically as stages/<name>.npz and recorded in the manifest, so
``--resume`` skips it): the samples, the distances d1 <= d2 of each to its two nearest training
points and the index of the nearest (diffmem.knn on the stored codes), the memorization ratio
(d1 < threshold d2), the distinct training points the copies copy and how many lie outside the
denoiser's own points (none can), and the op's nearest point: ``return_nearest`` in the last
DDIM step (the denoiser's call at the second-to-last time of the grid, whose mean makes the
final sample), i.e. the training point that step copies and its softmax weight, from the same
pass as the mean. Also the median wall time of a denoiser call (one sampling step; on rank 0,
and per rank) and its median process CPU time (all threads; steadier on a shared machine).

Processes (processes.py): under torchrun the samples are split over the ranks and gathered
(every rank holds the data), or with --shard-points each rank loads only its rows of the data
and every denoiser call and the knn go through diffmem.distributed. Both give the
single-process results up to float32 rounding. Only rank 0 writes.
"""

from __future__ import annotations

import io
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.gmm import make_gmm_data
from ..data.images import (
    ImageSet,
    ImageSetError,
    load_array_set,
    load_digits_set,
    load_folder_set,
    quantize_uint8,
)
from ..denoisers.empirical import EmpiricalDenoiser
from ..denoisers.gaussian import fit_gaussian
from ..denoisers.partial import subset_indices
from ..diffusion.processes import VP, time_grid
from ..diffusion.samplers import ddim_sample
from ..files import npz_bytes
from ..metrics import memorized
from ..ops import distributed as dist_ops
from ..ops import knn
from .args import check_threads, out_folder
from .budget import available_memory
from .config import ConfigError
from .evaluate import generator, sub_seed
from .lock import folder_lock
from .manifest import Manifest, Unverified
from .memorize_config import MemorizeConfig, config_from_args
from .plots import plot_sample_pairs
from .processes import Processes, start_processes
from .progress import Progress
from .results import environment, json_bytes, writable_folder
from .runtime import Runtime, runtime_from_args

SCHEMA = "diffmem.memorize/1"
T_MAX = 0.999
SHOWN = 8  # samples per denoiser in plots/samples.png
NEAREST_SOURCE = ("return_nearest of the denoiser's softmax-mean call in the last DDIM step "
                  "(t = the grid's second-to-last time): the training point that step copies "
                  "and its softmax weight, from the pass that makes the final sample")


@dataclass
class Spec:
    """One denoiser of the run: name, kind ("memorizing", "partial", "generalizing"), its
    points (sorted global indices, None for all) and fraction M/N (None for the baseline)."""

    name: str
    kind: str
    subset: torch.Tensor | None = None
    fraction: float | None = None

    @property
    def stage(self) -> str:
        return f"stages/{self.name}.npz"


class ShardedEmpirical(EmpiricalDenoiser):
    """The empirical denoiser of a set sharded over processes: data is this rank's shard (may
    be empty); x0 and the nearest point (global index) are over the whole set."""

    op = staticmethod(dist_ops.softmax_mean)
    min_points = 0


# ---------------------------------------------------------------------------------------------
# Data


def load_data(config: MemorizeConfig, rows) -> tuple[ImageSet, object]:
    """This rank's rows of the data set and the true denoiser (gmm data; else None)."""
    if config.data == "digits":
        return load_digits_set(rows), None
    if config.data == "gmm":
        need = 8 * config.samples * config.dim
        have = available_memory()
        if have is not None and need > have:
            raise ConfigError(f"--data gmm with N = {config.samples}, d = {config.dim} needs "
                              f"about {need / 2 ** 30:.3g} GiB, more than the "
                              f"{have / 2 ** 30:.3g} GiB available: lower --samples or --dim")
        gmm = make_gmm_data(config.dim, config.components, config.samples, config.seed,
                            val_samples=1)
        train, scale, offset = gmm.train, None, None
        if config.storage == "uint8":
            train, scale, offset = quantize_uint8(train)
        start, stop = rows(config.samples)
        codes = train[start:stop].clone()
        del train
        return (ImageSet(codes, config.samples, start, None, scale, offset, "gmm"),
                gmm.ground_truth(VP(), "x0"))
    path = Path(config.data)
    if path.is_dir():
        return load_folder_set(path, rows), None
    return load_array_set(path, config.array, rows), None


def specs_for(config: MemorizeConfig, total: int, has_truth: bool) -> list[Spec]:
    out = [Spec("memorizing", "memorizing")]
    for f in config.fractions:
        m = min(max(1, round(f * total)), total)
        out.append(Spec(f"partial_{f:g}", "partial",
                        subset_indices(total, m, sub_seed(config.seed, "subset", f)), f))
    out.append(Spec("generalizing_" + ("true_mixture" if has_truth else "gaussian"),
                    "generalizing"))
    return out


# ---------------------------------------------------------------------------------------------
# One stage: sample with one denoiser and measure


class _Traced:
    """An x0 model for ddim_sample that times each call; for denoisers that report it
    (nearest_fn (x, t) -> (x0, idx, weight)), the last of `calls` calls also gives the nearest
    point (the other calls run fn alone, in the requested precision)."""

    process, prediction = VP(), "x0"

    def __init__(self, fn, nearest_fn, calls: int, procs: Processes, tick):
        self.fn, self.nearest_fn, self.calls = fn, nearest_fn, calls
        self.procs, self.tick = procs, tick
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.idx = self.weight = None

    def __call__(self, x, t):
        last = self.nearest_fn is not None and len(self.seconds) == self.calls - 1
        self.procs.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.nearest_fn(x, t) if last else self.fn(x, t)
        self.procs.sync()
        self.seconds.append(time.perf_counter() - t0)
        self.cpu_seconds.append(time.process_time() - c0)
        if last:
            out, self.idx, self.weight = out
        self.tick(len(self.seconds))
        return out


@dataclass
class Context:
    config: MemorizeConfig
    runtime: Runtime
    procs: Processes
    shard_points: bool
    data: ImageSet
    truth: object
    x_init: torch.Tensor
    ts: list
    progress: Progress


def _knn_stored(ctx: Context, samples: torch.Tensor):
    """Distances (n, 2) (float64) and indices (n, 2) of each sample's two nearest training
    points, read as stored: for codes, knn of (x - offset) / scale, distances times scale."""
    d = ctx.data
    q = samples if d.scale is None else ((samples.double() - d.offset) / d.scale).float()
    if ctx.shard_points:
        dist, idx = dist_ops.knn(q, d.codes, 2, backend=ctx.runtime.backend)
    else:
        dist, idx = knn(q, d.codes, 2, backend=ctx.runtime.backend)
    return dist.double() * (1.0 if d.scale is None else d.scale), idx


def _model(ctx: Context, spec: Spec):
    """(x0 function (x, t) -> x0, and for denoisers over points the function (x, t) -> (x0,
    nearest idx, weight), else None)."""
    d, r = ctx.data, ctx.runtime
    if spec.kind == "generalizing":
        if ctx.truth is not None:
            model = ctx.truth.to(ctx.procs.device)
        else:
            reduce = ctx.procs.sum if ctx.shard_points else (lambda t: t)
            model = fit_gaussian(d.codes.cpu(), scale=d.scale, offset=d.offset, total=d.total,
                                 seed=sub_seed(ctx.config.seed, "gaussian"),
                                 reduce=reduce).to(ctx.procs.device)
        return model, None
    points = d.codes
    if spec.subset is not None:
        local = spec.subset
        if ctx.shard_points:
            keep = (local >= d.start) & (local < d.start + d.codes.shape[0])
            local = local[keep] - d.start
        points = d.codes[local.to(d.codes.device)]
    cls = ShardedEmpirical if ctx.shard_points else EmpiricalDenoiser
    den = cls(points, VP(), "x0", scale=d.scale, offset=d.offset, backend=r.backend,
              precision=r.precision)
    return den.x0, den.x0_nearest


def run_stage(ctx: Context, spec: Spec) -> dict | None:
    """Sample with spec's denoiser and measure; the stage's arrays on rank 0 (None elsewhere)."""
    procs, cfg = ctx.procs, ctx.config
    t0 = time.perf_counter()
    fn, nearest_fn = _model(ctx, spec)
    reports = nearest_fn is not None
    x = ctx.x_init
    if procs.distributed and not ctx.shard_points:
        lo, hi = procs.rows(cfg.num_samples)
        x = x[lo:hi]
    label = f"{spec.name}: DDIM steps"
    tick = ctx.progress.task(label)
    traced = _Traced(fn, nearest_fn, len(ctx.ts) - 1, procs, lambda k: tick(k, cfg.steps))
    samples = ddim_sample(traced, x, ctx.ts)
    n = samples.shape[0]
    if reports:
        idx, weight = traced.idx.cpu(), traced.weight.double().cpu()
        if spec.subset is not None:
            idx = spec.subset[idx]
    else:
        idx = torch.full((n,), -1, dtype=torch.int64)
        weight = torch.full((n,), math.nan, dtype=torch.float64)
    step = torch.tensor([float(np.median(traced.seconds)), float(np.median(traced.cpu_seconds))],
                        dtype=torch.float64)[None]
    if procs.distributed:
        step = procs.gather_rows(step)
    if procs.distributed and not ctx.shard_points:
        samples = procs.gather_rows(samples)
        idx, weight = procs.gather_rows(idx), procs.gather_rows(weight)
        if not procs.main:
            return None
    dist, nn = _knn_stored(ctx, samples)
    shown = nn[:SHOWN, 0].cpu()
    local = shown - ctx.data.start
    mine = (local >= 0) & (local < ctx.data.codes.shape[0])
    nearest_images = torch.zeros(shown.shape[0], ctx.data.dim, dtype=torch.float64)
    nearest_images[mine] = ctx.data.values(local[mine].to(ctx.data.codes.device)).cpu()
    if ctx.shard_points:
        nearest_images = procs.sum(nearest_images)
    if not procs.main:
        return None
    return {"samples": samples.float().cpu().numpy(), "d1": dist[:, 0].cpu().numpy(),
            "d2": dist[:, 1].cpu().numpy(), "knn_idx": nn[:, 0].cpu().numpy(),
            "op_idx": idx.numpy(), "op_weight": weight.numpy(),
            "nearest_images": nearest_images.numpy(), "step_seconds": step[:, 0].numpy(),
            "step_cpu_seconds": step[:, 1].numpy(),
            "wall_seconds": np.float64(time.perf_counter() - t0)}


# ---------------------------------------------------------------------------------------------
# Results


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    return {"min": float(values.min()), "median": float(np.median(values)),
            "mean": float(values.mean()), "max": float(values.max())}


def summarize(spec: Spec, arrays: dict, config: MemorizeConfig, total: int) -> dict:
    """The results.json entry of one denoiser from its stage's arrays."""
    d1, d2 = torch.from_numpy(arrays["d1"]), torch.from_numpy(arrays["d2"])
    copies = memorized(torch.stack([d1, d2], 1), config.threshold).numpy()
    copied = arrays["knn_idx"][copies]
    own = None if spec.subset is None else spec.subset.numpy()
    outside = 0 if own is None else int((~np.isin(copied, own)).sum())
    out = {"kind": spec.kind, "points": total if spec.kind == "memorizing" else (
               None if own is None else int(own.size)),
           "fraction": 1.0 if spec.kind == "memorizing" else spec.fraction,
           "memorization_ratio": float(copies.mean()),
           "memorized_samples": int(copies.sum()),
           "distinct_copied": int(np.unique(copied).size),
           "copies_outside_points": outside if spec.kind != "generalizing" else None,
           "median_d1_over_d2": float(np.median(arrays["d1"] / arrays["d2"])),
           "seconds_per_step": float(arrays["step_seconds"][0]),
           "seconds_per_step_ranks": arrays["step_seconds"].tolist(),
           "cpu_seconds_per_step": float(arrays["step_cpu_seconds"][0]),
           "stage_seconds": float(arrays["wall_seconds"]),
           "samples_file": spec.stage}
    if spec.kind != "generalizing":
        idx, weight = arrays["op_idx"], arrays["op_weight"]
        out["nearest"] = {
            "agrees_with_knn": float((idx == arrays["knn_idx"]).mean()),
            "distinct": int(np.unique(idx).size),
            "outside_points": 0 if own is None else int((~np.isin(idx, own)).sum()),
            "weight": _stats(weight)}
    return out


def _check_stage(arrays: dict, config: MemorizeConfig, dim: int) -> None:
    n = config.num_samples
    want = {"samples": (n, dim), "d1": (n,), "d2": (n,), "knn_idx": (n,), "op_idx": (n,),
            "op_weight": (n,)}
    for key, shape in want.items():
        if key not in arrays or arrays[key].shape != shape:
            raise ValueError(f"{key} is missing or not of shape {shape}")
    for key in ("nearest_images", "step_seconds", "step_cpu_seconds", "wall_seconds"):
        if key not in arrays:
            raise ValueError(f"{key} is missing")
    if not np.isfinite(arrays["samples"]).all():
        raise ValueError("its samples are not finite")


def _read_stage(manifest: Manifest, spec: Spec, config, dim: int, progress) -> dict | None:
    """The verified arrays of a finished stage, or None (with a warning if it was damaged)."""
    try:
        data = manifest.verified(spec.stage)
        if data is None:
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        _check_stage(arrays, config, dim)
        return arrays
    except Unverified as e:
        problem = str(e)
    except (OSError, ValueError) as e:
        problem = f"{spec.stage}: {e}"
    progress.warn(f"{problem}; sampling {spec.name} again")
    return None


def _data_record(d: ImageSet) -> dict:
    return {"source": d.source, "points": d.total, "dim": d.dim,
            "shape": list(d.shape) if d.shape else None,
            "storage": str(d.codes.dtype).removeprefix("torch."), "scale": d.scale,
            "offset": d.offset}


def _plot(stages: dict, specs: list[Spec], data: ImageSet, folder: Path,
          progress: Progress) -> list[str]:
    """plots/samples.png for image data of 1 or 3 channels (a note otherwise)."""
    if data.shape is None or data.shape[2] not in (1, 3):
        progress.note("no sample grid: the data are not images of 1 or 3 channels")
        return []
    rows = []
    for spec in specs:
        a = stages[spec.name]
        k = a["nearest_images"].shape[0]
        rows.append((spec.name, a["samples"][:k].reshape(k, *data.shape),
                     a["nearest_images"].reshape(k, *data.shape), a["d1"][:k] / a["d2"][:k]))
    lo, hi = (-1.0, 1.0) if data.scale is not None else (
        min(float(r[2].min()) for r in rows), max(float(r[2].max()) for r in rows))
    return plot_sample_pairs(rows, folder / "plots" / "samples.png", lo, hi)


# ---------------------------------------------------------------------------------------------
# The command


def _start_folder(config, out: Path, resume: bool, stack: ExitStack) -> Manifest:
    writable_folder(out)
    stack.enter_context(folder_lock(out))
    return Manifest.start(out, config, resume)


def run_memorize(args) -> int:
    """Handler of ``diffmem memorize`` (args from memorize_config); returns the exit code.
    ConfigError (one line) for bad settings, data or folders."""
    threads = check_threads(args.threads)
    if threads:
        torch.set_num_threads(threads)
    config = config_from_args(args)
    runtime = runtime_from_args(args)
    procs = start_processes(runtime.device)
    try:
        return _run(config, runtime, procs, args)
    finally:
        procs.close()


def _run(config: MemorizeConfig, runtime: Runtime, procs: Processes, args) -> int:
    shard = bool(args.shard_points) and procs.distributed
    progress = Progress(quiet=args.quiet or not procs.main)
    out = out_folder(args, f"runs/memorize-{config.tag()}")
    with ExitStack() as stack:
        error, manifest = None, None
        if procs.main:
            try:
                manifest = _start_folder(config, out, args.resume, stack)
            except ConfigError as e:
                error = e
        procs.agree(error)
        error = None
        try:
            data, truth = load_data(config, procs.rows if shard else (lambda n: (0, n)))
        except ImageSetError as e:
            error = ConfigError(str(e))
        except ConfigError as e:
            error = e
        if procs.distributed and not shard and config.num_samples < procs.world and not error:
            error = ConfigError(f"--num-samples ({config.num_samples}) must be at least the "
                                f"number of processes ({procs.world}) to split the samples")
        procs.agree(error)
        data.codes = data.codes.to(procs.device)
        specs = specs_for(config, data.total, truth is not None)
        mode = "points" if shard else "samples" if procs.distributed else "single"
        shape = "x".join(map(str, data.shape)) if data.shape else f"d = {data.dim}"
        progress.note(f"memorize {config.data}: N = {data.total} points ({shape}, "
                      f"{_data_record(data)['storage']}), {config.num_samples} samples x "
                      f"{config.steps} DDIM steps, {procs.world} process(es)"
                      + (f", split by {mode}" if procs.distributed else ""))
        stages = {}
        if procs.main and args.resume:
            for spec in specs:
                found = _read_stage(manifest, spec, config, data.dim, progress)
                if found is not None:
                    stages[spec.name] = found
        done = procs.broadcast_flags([s.name in stages for s in specs])
        x_init = torch.randn(config.num_samples, data.dim,
                             generator=generator(config.seed, "x_init")).to(procs.device)
        ts = time_grid(config.t_min, T_MAX, config.steps + 1).tolist()
        ctx = Context(config, runtime, procs, shard, data, truth, x_init, ts, progress)
        for spec, finished in zip(specs, done):
            if finished:
                progress.note(f"{spec.name}: finished in an earlier run, skipped")
                continue
            what = ("all N" if spec.kind == "memorizing" else f"M = {len(spec.subset)}"
                    if spec.subset is not None else "baseline")
            progress.note(f"{spec.name} ({what}): sampling")
            arrays = run_stage(ctx, spec)
            if procs.main:
                manifest.write(spec.stage, npz_bytes(arrays))
                stages[spec.name] = arrays
        if not procs.main:
            return 0
        results = {
            "schema": SCHEMA, "config": config.to_dict(), "runtime": runtime.record(),
            "environment": environment(), "data": _data_record(data),
            "processes": {"world": procs.world, "split": mode},
            "grid": {"steps": config.steps, "t_max": T_MAX, "t_min": config.t_min,
                     "last_denoising_t": ts[-2]},
            "nearest_source": NEAREST_SOURCE,
            "denoisers": {s.name: summarize(s, stages[s.name], config, data.total)
                          for s in specs}}
        results["plots"] = [] if args.no_plots else [
            str(Path(p).relative_to(out)) for p in
            _plot(stages, specs, data, out, progress)]
        manifest.write("results.json", json_bytes(results))
    for name, r in results["denoisers"].items():
        progress.note(f"{name}: memorization ratio {r['memorization_ratio']:.2f}, "
                      f"{r['distinct_copied']} distinct points copied, "
                      f"{r['seconds_per_step'] * 1e3:.1f} ms per step")
    print(f"results: {out / 'results.json'}")
    return 0


__all__ = ["SCHEMA", "Spec", "load_data", "run_memorize", "specs_for", "summarize"]
