"""The phase-transition experiment on one configuration (the paper's main experiment).

run_phase_transition(config, out): data -> baselines -> predicted crossovers -> train all sizes
M batched -> evaluate each M -> locate the transition (delta rule) -> train and evaluate the
refinement sizes -> results.json (+ plots). Every stage is checkpointed in the run folder
(see results.py), so resume=True recomputes nothing that finished; a killed run loses at most
the stage in progress: one model's evaluation, or the training steps since the last training
checkpoint (every CHECKPOINT_SECONDS of wall time, or CHECKPOINT_STEPS steps if set; the
colored-template run checkpoints the same way, see checkpointing()).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..diffusion.processes import time_grid
from ..training import train_gmm_models
from .config import ConfigError, ExperimentConfig
from .datasets import load_or_make_data
from .evaluate import averages, evaluate_baselines, evaluate_trained, generator, to_x0_units
from .predictions import predict
from .progress import Progress
from .results import (check_writable, environment, load_models, load_train_state, read_json,
                      remove_train_state, save_models, save_train_state, write_json)
from .transition import crossing_point, isotonic, locate_transition, refinement_sizes

SCHEMA = "diffmem.phase_transition/1"
CHECKPOINT_SECONDS = 30.0  # wall time between training checkpoints
CHECKPOINT_STEPS = 0       # also checkpoint every this many steps (0: off; tests set it)


def _prepare_folder(config: ExperimentConfig, out: Path, resume: bool) -> None:
    try:
        check_writable(out)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {str(out)!r}: {e.strerror or e}") from None
    cfg_path = out / "config.json"
    if cfg_path.exists():
        if not resume:
            raise ConfigError(f"{str(out)!r} already holds a run; pass --resume to continue it "
                              f"or choose another --out")
        saved = ExperimentConfig.from_dict(read_json(cfg_path))
        if saved != config:
            diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
            raise ConfigError(f"--resume: settings differ from the run in {str(out)!r}: {diff}")
    else:
        write_json(cfg_path, config.to_dict())


class _Timings:
    """Wall times per stage, persisted in timings.json so resumed runs keep earlier ones."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.values = read_json(path) if resume and path.exists() else {}

    def add(self, key: str, seconds: float) -> None:
        self.values[key] = self.values.get(key, 0.0) + seconds
        write_json(self.path, self.values)


def checkpointing(out: Path, sizes: list[int], resume: bool, hook) -> dict:
    """Keyword arguments that make a training call on `sizes` resumable in run folder out:
    checkpoint (writes train_state.npz/.json, then hook("checkpoint", step)), checkpoint_every,
    checkpoint_seconds and resume_state (the saved state of these sizes when resuming, else
    None; a checkpoint of other sizes is stale and ignored)."""
    state = load_train_state(out) if resume else None
    if state is not None and state.get("sizes") != list(sizes):
        state = None

    def checkpoint(s):
        save_train_state(out, s)
        if hook is not None:
            hook("checkpoint", s["step"])

    return {"checkpoint": checkpoint, "checkpoint_every": CHECKPOINT_STEPS,
            "checkpoint_seconds": CHECKPOINT_SECONDS, "resume_state": state}


def record_training(timings, label: str, seconds: float, steps: int, models: int) -> None:
    """Add one training call to the timings: its wall time and steps x models it ran."""
    timings.add(f"{label}_train", seconds)
    timings.add("train_steps_x_models", steps * models)
    timings.add("train_seconds_total", seconds)


def _train_phase(config, data, sizes, out, models, timings, progress, label, resume, hook):
    """Train the sizes not yet in models (one batched call, continuing from the phase's
    training checkpoint on resume), save them, return the new ones."""
    todo = sorted(m for m in sizes if m not in models)
    if not todo:
        return []
    ck = checkpointing(out, todo, resume, hook)
    state = ck["resume_state"]
    progress.note(f"{label}: training sizes {todo} ({config.steps} steps, {config.draws} draws)"
                  + (f", resuming at step {state['step']}" if state is not None else ""))
    t0 = time.perf_counter()
    trained = train_gmm_models(
        data.train, todo, steps=config.steps, warmup=config.warmup, init_lr=config.init_lr,
        peak_lr=config.peak_lr, final_lr=config.final_lr, draws=config.draws, init=config.init,
        init_var=config.init_var, clip=config.clip, ema=config.ema, seed=config.seed,
        progress=progress.task(f"{label} training ({len(todo)} models)", zero_based=True), **ck)
    seconds = time.perf_counter() - t0
    models.update(trained)
    save_models(out / "models.npz", models)
    remove_train_state(out)
    run = config.steps - (state["step"] if state is not None else 0)  # steps this call ran
    record_training(timings, label, seconds, run, len(todo))
    return todo


def _evaluate_sizes(config, data, ts, x_init, models, evals, out, timings, progress, hook):
    todo = sorted(m for m in models if m not in evals)
    task = progress.task(f"evaluating {len(todo)} models")
    for i, M in enumerate(todo):
        path = out / "models" / f"M{M}.json"
        t0 = time.perf_counter()
        evals[M] = evaluate_trained(models[M], data, ts, x_init=x_init, draws=config.eval_draws,
                                    seed=config.seed, threshold=config.threshold)
        write_json(path, evals[M])
        timings.add("evaluate_models", time.perf_counter() - t0)
        task(i + 1, len(todo))
        if hook is not None:
            hook("evaluated", M)


def _load_evals(out: Path, resume: bool) -> dict:
    evals = {}
    if resume and (out / "models").is_dir():
        for p in (out / "models").glob("M*.json"):
            r = read_json(p)
            evals[int(r["size"])] = r
    return evals


def _assemble(config, data, ts, baselines, predictions, evals, transition, timings) -> dict:
    sizes = sorted(evals)
    N = config.samples
    ratios = [evals[m]["memorization_ratio"] for m in sizes]
    base_avg = {}
    for name in ("ground_truth", "memorizing", "ground_truth_approx"):
        base_avg[name] = {s: averages(v, ts) for s, v in baselines[name].items()}
    for name in ("partial_mem", "partial_mem_approx", "partial_mem_instancewise_approx"):
        base_avg[name] = {m: {s: averages(v, ts) for s, v in per.items()}
                          for m, per in baselines[name].items()}
    # rho = 0.5 on the monotone (isotonic) fit of the noisy ratios; the raw first crossing too
    mid = crossing_point(sizes, isotonic(ratios), 0.5) if sizes else float("nan")
    raw_mid = crossing_point(sizes, ratios, 0.5) if sizes else float("nan")
    tr = dict(transition)
    if sizes:
        start, end = locate_transition(sizes, ratios, config.delta)
        tr.update(start=start, end=end, start_fraction=start / N, end_fraction=end / N,
                  midpoint=mid, midpoint_fraction=mid / N, first_half_crossing_fraction=raw_mid / N,
                  isotonic_ratio=isotonic(ratios))
    return {
        "schema": SCHEMA, "config": config.to_dict(), "environment": environment(),
        "grid": ts.tolist(), "x0_scale": to_x0_units([1.0] * len(ts), ts),
        "data": {"dim": config.dim, "components": config.components, "samples": N,
                 "val_samples": config.val_samples, "variance": float(data.variance)},
        "baselines": baselines, "baseline_averages": base_avg,
        "trained": {str(m): evals[m] for m in sizes},
        "sizes": sizes, "fractions": [m / N for m in sizes], "memorization_ratio": ratios,
        "variance": [evals[m]["variance"] for m in sizes],
        "transition": tr, "predictions": predictions, "timings": dict(timings.values),
    }


def cached_baselines(evaluate, data, ts, config: ExperimentConfig, out: Path, resume: bool,
                     progress, timings) -> dict:
    """Baseline losses from out/baselines.json when resuming, else evaluate(...) and save them."""
    base_path = out / "baselines.json"
    if resume and base_path.exists():
        return read_json(base_path)
    t0 = time.perf_counter()
    progress.note(f"baselines: ground truth, memorizing, {len(config.baseline_sizes())} "
                  f"partially memorizing sizes")
    baselines = evaluate(data, ts, sizes=config.baseline_sizes(), draws=config.eval_draws,
                         seed=config.seed, progress=progress.task("baselines"))
    write_json(base_path, baselines)
    timings.add("baselines", time.perf_counter() - t0)
    return baselines


def begin_run(config, out: Path, resume: bool, quiet: bool, baseline_fn) -> SimpleNamespace:
    """The common start of a phase-transition run: folder, progress, timings, data, the t grid,
    the (cached) baselines from baseline_fn and the predicted crossovers."""
    progress = Progress(quiet)
    _prepare_folder(config, out, resume)
    timings = _Timings(out / "timings.json", resume)
    t_start = time.perf_counter()
    progress.note(f"phase-transition {config.tag()} (preset {config.preset}) -> {out}")
    data = load_or_make_data(config, out, resume)
    ts = time_grid(dtype=torch.float64)
    baselines = cached_baselines(baseline_fn, data, ts, config, out, resume, progress, timings)
    t0 = time.perf_counter()
    predictions = predict(data, ts, seed=config.seed, baselines=baselines)
    timings.add("predictions", time.perf_counter() - t0)
    progress.note("predicted M*/N (x0-uniform): coded {coded:.3f}, instance-wise "
                  "{instancewise:.3f}, measured {measured:.3f}".format(
                      **{k: (predictions[k] if predictions[k] is not None else float("nan"))
                         for k in ("coded", "instancewise", "measured")}))
    return SimpleNamespace(progress=progress, timings=timings, t_start=t_start, data=data, ts=ts,
                           baselines=baselines, predictions=predictions)


def run_two_phases(config, evals: dict, out: Path, progress, hook, t_start: float, *, train,
                   evaluate, assemble) -> dict:
    """The two training phases of SPEC G.5, shared by the GMM and template experiments.

    Trains and evaluates config.train_sizes(), locates the transition with the delta rule,
    then (config.refine) trains and evaluates the refinement sizes around it. train(sizes,
    phase_name) and evaluate() fill evals {M: metrics with "memorization_ratio"};
    assemble(transition) builds the results dict, written to out/results.json after each phase.
    """
    initial = config.train_sizes()
    train(initial, "phase 1")
    if hook is not None:
        hook("trained", 1)
    evaluate()
    ratios = [evals[m]["memorization_ratio"] for m in initial]
    start, end = locate_transition(initial, ratios, config.delta)
    transition = {"delta": config.delta, "initial_sizes": initial, "initial_start": start,
                  "initial_end": end, "refined_sizes": []}
    progress.note("memorization ratio: " + ", ".join(f"M={m}: {r:.2f}" for m, r in
                                                     zip(initial, ratios)))
    write_json(out / "results.json", assemble(transition))
    if config.refine:
        new = [m for m in refinement_sizes(start, end, config.coverage) if m not in initial]
        transition["refined_sizes"] = new
        if new:
            progress.note(f"transition between M={start} and M={end}; refining with {new}")
            train(new, "phase 2")
            if hook is not None:
                hook("trained", 2)
            evaluate()
    results = assemble(transition)
    results["timings"]["last_invocation_seconds"] = time.perf_counter() - t_start
    write_json(out / "results.json", results)
    tr = results["transition"]
    progress.note(f"transition: start M={tr['start']} ({tr['start_fraction']:.2f} N), end "
                  f"M={tr['end']} ({tr['end_fraction']:.2f} N), rho=0.5 at "
                  f"{tr['midpoint_fraction']:.3f} N")
    return results


def run_phase_transition(config: ExperimentConfig, out, *, resume: bool = False,
                         quiet: bool = False, plots: bool = True, hook=None) -> dict:
    """Run (or resume) the experiment for config in folder out; returns the results dict that is
    also written to out/results.json. hook(event, value), if given, is called after each
    checkpoint ("checkpoint" training step, "trained" phase index, "evaluated" M) -- tests use
    it to simulate a kill."""
    if config.data == "templates":
        from .templates_run import run_templates
        return run_templates(config, out, resume=resume, quiet=quiet, plots=plots, hook=hook)
    out = Path(out)
    run = begin_run(config, out, resume, quiet, evaluate_baselines)
    progress, timings, data, ts = run.progress, run.timings, run.data, run.ts
    baselines, predictions, t_start = run.baselines, run.predictions, run.t_start

    x_init = torch.randn(config.eval_samples, config.dim, generator=generator(config.seed, "x_init"),
                         dtype=data.train.dtype)
    models = load_models(out / "models.npz", data.train.dtype) if resume else {}
    evals = _load_evals(out, resume)
    evals = {m: r for m, r in evals.items() if m in models}

    results = run_two_phases(
        config, evals, out, progress, hook, t_start,
        train=lambda sizes, phase: _train_phase(config, data, sizes, out, models, timings,
                                                progress, phase, resume, hook),
        evaluate=lambda: _evaluate_sizes(config, data, ts, x_init, models, evals, out, timings,
                                         progress, hook),
        assemble=lambda tr: _assemble(config, data, ts, baselines, predictions, evals, tr,
                                      timings))
    if plots:
        from .plots import plot_run
        made = plot_run(results, out / "plots")
        progress.note(f"plots: {len(made)} files in {out / 'plots'}" if made else
                      "plots skipped (matplotlib is not installed)")
    return results


__all__ = ["SCHEMA", "run_phase_transition"]
