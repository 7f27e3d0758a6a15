"""The phase-transition experiment on one configuration (the paper's main experiment), for
every kind of data.

run_phase_transition(config, out): start of run (folder, data, baselines, predicted
crossovers) -> phase 1: train the sizes M, evaluate each, locate the transition (delta rule)
-> phase 2: train and evaluate the refinement sizes around it -> results.json (+ plots). The
steps that depend on the data come from the configuration's ExperimentKind (KINDS: gmm.py,
templates.py); everything else is here, once.

Every stage is checkpointed in the run folder (see results.py), so resume=True recomputes
nothing that finished; a killed run loses at most the stage in progress: one model's
evaluation, or the training steps since the last training checkpoint (every
CHECKPOINT_SECONDS of wall time, or CHECKPOINT_STEPS steps if set). Every file goes through
the folder's manifest (manifest.py), and a resumed run reuses only what verifies (reuse.py);
the folder is locked for the whole run (lock.py), and a run that would not fit in memory
stops before it starts (budget.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..diffusion.processes import time_grid
from ..files import npy_bytes
from ..training.checkpoint import STATE_FILE, BadTrainingState, pack_state
from ..training.store import models_bytes
from . import gmm, reuse, templates
from .budget import check_memory
from .config import ConfigError, ExperimentConfig
from .evaluate import average_baselines, generator, to_x0_units
from .kind import ExperimentKind
from .lock import folder_lock
from .manifest import Manifest
from .predictions import predict
from .progress import Progress
from .results import environment, json_bytes, writable_folder
from .runtime import Runtime, on_device
from .transition import crossing_point, isotonic, locate_transition, refinement_sizes

SCHEMA = "diffmem.phase_transition/1"
CHECKPOINT_SECONDS = 30.0  # wall time between training checkpoints
CHECKPOINT_STEPS = 0       # also checkpoint every this many steps (0: off; tests set it)
KINDS: dict[str, ExperimentKind] = {k.name: k for k in (gmm.KIND, templates.KIND)}


def kind_for(config: ExperimentConfig) -> ExperimentKind:
    """The ExperimentKind of config.data."""
    try:
        return KINDS[config.data]
    except KeyError:
        raise ConfigError(f"data must be one of {sorted(KINDS)}, got {config.data!r}") from None


# ---------------------------------------------------------------------------------------------
# Start of a run


class Timings:
    """Wall times per stage, persisted in timings.json so resumed runs keep earlier ones."""

    def __init__(self, manifest: Manifest, values: dict):
        self.manifest, self.values = manifest, dict(values)

    def add(self, **seconds: float) -> None:
        """Add seconds (or counts) to the named stages; one write of timings.json."""
        for key, value in seconds.items():
            self.values[key] = self.values.get(key, 0.0) + value
        self.manifest.write(reuse.TIMINGS, json_bytes(self.values))


@dataclass
class Run:
    """One run in progress: its settings, folder (and its manifest) and everything measured so
    far."""

    config: ExperimentConfig
    kind: ExperimentKind
    out: Path
    manifest: Manifest
    resume: bool
    hook: object
    progress: Progress
    timings: Timings
    t_start: float
    runtime: Runtime = field(default_factory=Runtime)
    data: object = None
    ts: torch.Tensor = None
    baselines: dict = None
    predictions: dict = None
    x_init: torch.Tensor = None
    models: dict = field(default_factory=dict)  # {M: trained model}
    evals: dict = field(default_factory=dict)   # {M: metrics of models[M]}

    def event(self, name: str, value) -> None:
        if self.hook is not None:
            self.hook(name, value)


def cached_baselines(run: Run) -> dict:
    """Baseline losses from baselines.json when resuming and it verifies, else measured and
    saved there."""
    config, progress = run.config, run.progress
    if run.resume:
        found = reuse.baselines(run.manifest, config, progress.warn)
        if found is not None:
            return found
    t0 = time.perf_counter()
    progress.note(f"baselines: ground truth, memorizing, {len(config.baseline_sizes())} "
                  f"partially memorizing sizes")
    baselines = run.kind.evaluate_baselines(run.data, run.ts, sizes=config.baseline_sizes(),
                                            draws=config.eval_draws, seed=config.seed,
                                            progress=progress.task("baselines"), **op_options(run))
    run.manifest.write(reuse.BASELINES, json_bytes(baselines))
    run.timings.add(baselines=time.perf_counter() - t0)
    return json.loads(json_bytes(baselines))  # as a resumed run reads it


def op_options(run: Run) -> dict:
    """backend= and precision= of the run's op calls."""
    return {"backend": run.runtime.backend, "precision": run.runtime.precision}


def begin_run(config: ExperimentConfig, out, resume: bool, quiet: bool, hook=None,
              runtime: Runtime | None = None) -> Run:
    """The start of a run in folder out (existing, writable, and locked by the caller): the
    manifest, progress, timings, data, the t grid, the (cached) baselines, the predicted
    crossovers, the DDIM starting noise, and on resume the saved models and evaluations, each
    verified (reuse.py). Data and the starting noise are made on the CPU and moved to
    runtime's device (default: the CPU)."""
    kind, out = kind_for(config), Path(out)
    progress = Progress(quiet)
    manifest = Manifest.start(out, config, resume)
    warn = progress.warn
    run = Run(config, kind, out, manifest, resume, hook, progress,
              Timings(manifest, reuse.timings(manifest, warn) if resume else {}),
              time.perf_counter(), runtime if runtime is not None else Runtime())
    device = run.runtime.device
    progress.note(f"phase-transition {config.tag()} (preset {config.preset}) -> {out}"
                  + ("" if device == "cpu" else f" on {device}"))
    if resume:
        run.data = reuse.data(manifest, kind, config, warn)
    else:
        run.data = kind.make_data(config)
        manifest.write(reuse.DATA, run.data.to_bytes())
    run.data = on_device(run.data, device)
    run.ts = time_grid(dtype=torch.float64)
    run.baselines = cached_baselines(run)
    t0 = time.perf_counter()
    run.predictions = predict(run.data, run.ts, seed=config.seed, baselines=run.baselines,
                              theory_note=kind.theory_note)
    run.timings.add(predictions=time.perf_counter() - t0)
    progress.note("predicted M*/N (x0-uniform): coded {coded:.3f}, instance-wise "
                  "{instancewise:.3f}, measured {measured:.3f}".format(
                      **{k: (run.predictions[k] if run.predictions[k] is not None else float("nan"))
                         for k in ("coded", "instancewise", "measured")}))
    train = run.data.train
    run.x_init = torch.randn(config.eval_samples, *train.shape[1:],
                             generator=generator(config.seed, "x_init"),
                             dtype=train.dtype).to(train.device)
    if resume:
        run.models = reuse.models(manifest, kind, config, run.data, warn)
        run.evals = reuse.evaluations(manifest, kind, run.models, warn)
    return run


# ---------------------------------------------------------------------------------------------
# Training and evaluating sizes


def checkpointing(run: Run, sizes: list[int]) -> dict:
    """Keyword arguments that make a training call on `sizes` resumable in the run folder:
    checkpoint (writes train_state.npz, then hook("checkpoint", step)), checkpoint_every,
    checkpoint_seconds and resume_state (the saved state of these sizes when resuming and it
    verifies, else None; a checkpoint of other sizes is stale and ignored)."""
    state = reuse.training_state(run.manifest, sizes, run.progress.warn) if run.resume else None

    def checkpoint(s):
        run.manifest.write(STATE_FILE, pack_state(s))
        run.event("checkpoint", s["step"])

    return {"checkpoint": checkpoint, "checkpoint_every": CHECKPOINT_STEPS,
            "checkpoint_seconds": CHECKPOINT_SECONDS, "resume_state": state}


def record_training(timings: Timings, label: str, seconds: float, steps: int,
                    models: int) -> None:
    """Add one training call to the timings: its wall time and steps x models it ran."""
    timings.add(**{f"{label}_train": seconds, "train_steps_x_models": steps * models,
                   "train_seconds_total": seconds})


def _train(run: Run, group: list[int], label: str, what: str, ck: dict) -> tuple[dict, int]:
    """(run.kind.train on group, the step it started at); a saved state that does not fit the
    training (BadTrainingState) is dropped with a warning and the training starts from its
    first step."""
    task = lambda: run.progress.task(f"{label} training {what}", zero_based=True)  # noqa: E731
    state = ck["resume_state"]
    start = state["step"] if state is not None else 0
    if start:
        run.progress.note(f"{label}: {what} resumes at step {start}")
    try:
        return run.kind.train(run.config, run.data, group, progress=task(), **op_options(run),
                              **ck), start
    except BadTrainingState as e:
        if state is None:
            raise
        run.progress.warn(f"{STATE_FILE}: {e}; {what} trains again from its first step")
        run.manifest.remove(STATE_FILE)
        return run.kind.train(run.config, run.data, group, progress=task(), **op_options(run),
                              **{**ck, "resume_state": None}), 0


def train_sizes(run: Run, sizes: list[int], label: str) -> None:
    """Train the sizes not yet in run.models (all in one call for a batched kind, else one
    after another), each call resumable from the run folder's training checkpoint; save
    models.npz after each call. Events: "checkpoint" step, "saved" M."""
    config, progress = run.config, run.progress
    todo = sorted(m for m in sizes if m not in run.models)
    if not todo:
        return
    groups = [todo] if run.kind.batched else [[m] for m in todo]
    progress.note(f"{label}: training sizes {todo} ({config.steps} steps, {config.draws} draws"
                  + ("" if run.kind.batched else ", one after another") + ")")
    for group in groups:
        what = f"M={group[0]}" if len(group) == 1 else f"{len(group)} models"
        t0 = time.perf_counter()
        trained, start = _train(run, group, label, what, checkpointing(run, group))
        seconds = time.perf_counter() - t0
        run.models.update(trained)
        run.manifest.write(reuse.MODELS, models_bytes(run.models))
        run.manifest.remove(STATE_FILE)
        record_training(run.timings, label, seconds, config.steps - start, len(group))
        for M in group:
            run.event("saved", M)


def evaluate_sizes(run: Run) -> None:
    """Evaluate every model not yet evaluated; save models/M<M>.json (and its artifacts) each.
    Event: "evaluated" M."""
    config = run.config
    todo = sorted(m for m in run.models if m not in run.evals)
    task = run.progress.task(f"evaluating {len(todo)} models")
    for i, M in enumerate(todo):
        t0 = time.perf_counter()
        model = on_device(run.models[M], run.runtime.device)
        metrics, artifacts = run.kind.evaluate(model, run.data, run.ts, x_init=run.x_init,
                                               draws=config.eval_draws, seed=config.seed,
                                               threshold=config.threshold, **op_options(run))
        record, *names = reuse.evaluation_files(run.kind, M)
        for name, artifact in zip(names, run.kind.artifacts):
            run.manifest.write(name, npy_bytes(artifacts[artifact].cpu().numpy()))
        content = json_bytes(metrics)
        run.manifest.write(record, content)
        run.evals[M] = json.loads(content)  # as a resumed run reads it
        run.timings.add(evaluate_models=time.perf_counter() - t0)
        task(i + 1, len(todo))
        run.event("evaluated", M)


# ---------------------------------------------------------------------------------------------
# Results


def assemble(run: Run, transition: dict) -> dict:
    """The results dict of everything measured so far (schema SCHEMA)."""
    config, evals, ts = run.config, run.evals, run.ts
    sizes, N = sorted(evals), config.samples
    ratios = [evals[m]["memorization_ratio"] for m in sizes]
    tr = dict(transition)
    if sizes:
        # rho = 0.5 on the monotone (isotonic) fit of the noisy ratios; the raw first crossing too
        start, end = locate_transition(sizes, ratios, config.delta)
        mid = crossing_point(sizes, isotonic(ratios), 0.5)
        raw_mid = crossing_point(sizes, ratios, 0.5)
        tr.update(start=start, end=end, start_fraction=start / N, end_fraction=end / N,
                  midpoint=mid, midpoint_fraction=mid / N, first_half_crossing_fraction=raw_mid / N,
                  isotonic_ratio=isotonic(ratios))
    return {
        "schema": SCHEMA, "config": config.to_dict(), "environment": environment(run.runtime),
        "runtime": run.runtime.record(),
        "grid": ts.tolist(), "x0_scale": to_x0_units([1.0] * len(ts), ts),
        "data": run.kind.describe_data(config, run.data),
        "baselines": run.baselines, "baseline_averages": average_baselines(run.baselines, ts),
        "trained": {str(m): evals[m] for m in sizes},
        "sizes": sizes, "fractions": [m / N for m in sizes], "memorization_ratio": ratios,
        "variance": [evals[m]["variance"] for m in sizes],
        "transition": tr, "predictions": run.predictions, "timings": dict(run.timings.values),
    }


def run_two_phases(run: Run) -> dict:
    """The two training phases of SPEC G.5.

    Trains and evaluates config.train_sizes(), locates the transition with the delta rule,
    then (config.refine) trains and evaluates the refinement sizes around it; results.json is
    written after each phase. Events: "trained" phase index.
    """
    config, progress = run.config, run.progress
    initial = config.train_sizes()
    train_sizes(run, initial, "phase 1")
    run.event("trained", 1)
    evaluate_sizes(run)
    ratios = [run.evals[m]["memorization_ratio"] for m in initial]
    start, end = locate_transition(initial, ratios, config.delta)
    transition = {"delta": config.delta, "initial_sizes": initial, "initial_start": start,
                  "initial_end": end, "refined_sizes": []}
    progress.note("memorization ratio: " + ", ".join(f"M={m}: {r:.2f}" for m, r in
                                                     zip(initial, ratios)))
    run.manifest.write("results.json", json_bytes(assemble(run, transition)))
    if config.refine:
        new = [m for m in refinement_sizes(start, end, config.coverage) if m not in initial]
        transition["refined_sizes"] = new
        if new:
            progress.note(f"transition between M={start} and M={end}; refining with {new}")
            train_sizes(run, new, "phase 2")
            run.event("trained", 2)
            evaluate_sizes(run)
    results = assemble(run, transition)
    results["timings"]["last_invocation_seconds"] = time.perf_counter() - run.t_start
    run.manifest.write("results.json", json_bytes(results))
    tr = results["transition"]
    progress.note(f"transition: start M={tr['start']} ({tr['start_fraction']:.2f} N), end "
                  f"M={tr['end']} ({tr['end_fraction']:.2f} N), rho=0.5 at "
                  f"{tr['midpoint_fraction']:.3f} N")
    return results


def run_phase_transition(config: ExperimentConfig, out, *, resume: bool = False,
                         quiet: bool = False, plots: bool = True, hook=None,
                         runtime: Runtime | None = None) -> dict:
    """Run (or resume) the experiment for config in folder out; returns the results dict that is
    also written to out/results.json. hook(event, value), if given, is called after each
    checkpoint ("checkpoint" training step, "saved" M: a model trained and saved, "trained"
    phase index, "evaluated" M) -- tests use it to simulate a kill. runtime: where the heavy
    work runs (device, op backend and precision; default: the CPU, auto, exact). It is not part
    of the run's identity: a run may be resumed on another device or backend, and its results
    then agree with an uninterrupted run up to the precision (float32 op results and
    summation order differ across backends, the random draws do not).

    Before anything is written: ConfigError if the run would not fit in memory or out is not
    writable; FolderInUse if another process runs in out. A training that diverges raises
    TrainingDiverged."""
    kind = kind_for(config)
    check_memory(config, kind)
    out = writable_folder(out)
    with folder_lock(out):
        run = begin_run(config, out, resume, quiet, hook, runtime)
        results = run_two_phases(run)
        if plots:
            from .plots import plot_run

            made = plot_run(results, run.out / "plots")
            if run.kind.plots is not None:
                made += run.kind.plots(results, run.out)
            run.progress.note(f"plots: {len(made)} files in {run.out / 'plots'}" if made else
                              "plots skipped (matplotlib is not installed)")
        run.manifest.save()
    return results


__all__ = ["CHECKPOINT_SECONDS", "CHECKPOINT_STEPS", "KINDS", "SCHEMA", "Run", "begin_run",
           "kind_for", "run_phase_transition"]
