"""The phase-transition experiment on colored templates (SPEC C.7, F.5 colored, G.1-G.5, I).

run_templates(config, out): template data (config.dim = image side, C = 3) -> baselines (ground
truth, memorizing, partially memorizing) -> measured-loss crossover -> train one
LearnableColoredTemplates per size M -> memorization ratio of DDIM samples, learned variance
color_std^2, losses -> transition (delta rule) and refinement -> results.json, plots and a
grid of generated samples per M. The GMM closed-form (coded, instance-wise) crossovers do not
apply here and are reported as None with a note.

Checkpoints in the run folder: data.npz, baselines.json, train_state.npz/.json (the model in
training, every CHECKPOINT_SECONDS; removed when it is saved), models.npz (after every trained
M), models/M<M>.json and models/M<M>_samples.npy (n_show, C, H, W), results.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.templates import TemplateData
from ..denoisers.empirical import EmpiricalDenoiser
from ..denoisers.partial import PartialMemorizingDenoiser
from ..diffusion.processes import VP
from ..diffusion.samplers import ddim_sample
from ..metrics import learned_means_metrics, memorization_ratio, nearest_two
from ..training.templates import TrainedTemplates, train_template_model
from .evaluate import _losses, averages, generator, to_x0_units
from .results import _atomic_npz, environment, read_json, remove_train_state, write_json
from .transition import crossing_point, isotonic, locate_transition

SHOWN_SAMPLES = 9  # generated samples kept per M for the sample grid (SPEC I)


def evaluate_template_baselines(data: TemplateData, ts, *, sizes, draws: int, seed: int,
                                progress=None) -> dict:
    """Per-t train/val EPS losses (T,) of the ground-truth template denoiser, the memorizing
    and the partially memorizing denoisers (each M in sizes, fresh subset per t)."""
    gt = data.ground_truth(prediction="eps")
    mem = EmpiricalDenoiser(data.train, VP(), "eps")
    splits = (("train", data.train), ("val", data.val))
    out = {"ground_truth": {}, "memorizing": {}, "partial_mem": {}}
    for split, x in splits:
        out["ground_truth"][split] = _losses(gt, x, ts, draws, seed, "gt", split)
        out["memorizing"][split] = _losses(mem, x, ts, draws, seed, "mem", split)
    for i, M in enumerate(sizes):
        pm = PartialMemorizingDenoiser(data.train, int(M), generator=generator(seed, "pmem", M),
                                       redraw_per_t=True, prediction="eps")
        out["partial_mem"][str(M)] = {s: _losses(pm, x, ts, draws, seed, "pmem", M, s)
                                      for s, x in splits}
        if progress is not None:
            progress(i + 1, len(sizes))
    return out


def evaluate_template_model(model: TrainedTemplates, data: TemplateData, ts, *, x_init,
                            draws: int, seed: int, threshold: float) -> tuple[dict, torch.Tensor]:
    """Memorization ratio of DDIM samples from x_init (n, C, H, W), learned variance, learned
    means metrics (G.2), per-t losses; returns (JSON-ready dict, the generated samples)."""
    M = model.size
    eps_model = model.denoiser(prediction="eps")
    train = _losses(eps_model, data.train, ts, draws, seed, "trained", M, "train")
    val = _losses(eps_model, data.val, ts, draws, seed, "trained", M, "val")
    samples = ddim_sample(model.denoiser(prediction="x0"), x_init, ts)
    dist = nearest_two(samples, data.train).double()
    true_means = data.color_means[:, :, None, None] * data.templates[:, None]
    out = {"size": M, "variance": model.variance,
           "memorization_ratio": memorization_ratio(samples, data.train, threshold),
           "median_d1_over_d2": float((dist[:, 0] / dist[:, 1]).median()),
           "learned_means": learned_means_metrics(model.means(), true_means, data.train,
                                                  threshold),
           "train_loss": train, "val_loss": val,
           "avg_train_loss": averages(train, ts), "avg_val_loss": averages(val, ts)}
    tail = model.losses[-max(1, len(model.losses) // 20):]
    out["final_training_loss"] = float(tail.double().mean())
    return out, samples


def save_template_models(path: Path, models: dict) -> None:
    """{M: TrainedTemplates} -> .npz: templates_<M> (M, H, W), color_means_<M> (M, C),
    color_std_<M> (), losses_<M> (steps,)."""
    arrays = {}
    for M, r in sorted(models.items()):
        arrays[f"templates_{M}"] = r.templates.double().numpy()
        arrays[f"color_means_{M}"] = r.color_means.double().numpy()
        arrays[f"color_std_{M}"] = np.asarray(float(r.color_std))
        arrays[f"losses_{M}"] = r.losses.double().numpy()
    _atomic_npz(path, arrays)


def load_template_models(path: Path, dtype=torch.float32) -> dict:
    """Inverse of save_template_models ({} if the file does not exist)."""
    if not path.exists():
        return {}
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            if key.startswith("templates_"):
                M = int(key[len("templates_"):])
                out[M] = TrainedTemplates(
                    M, torch.from_numpy(z[key].copy()).to(dtype),
                    torch.from_numpy(z[f"color_means_{M}"].copy()).to(dtype),
                    float(z[f"color_std_{M}"]), torch.from_numpy(z[f"losses_{M}"].copy()))
    return out


def _train(config, data, sizes, out, models, timings, progress, label, resume, hook) -> None:
    """Train the sizes not yet in models one after another, each resumable mid-model from the
    run folder's training checkpoint; save models.npz after each."""
    from .phase_transition import checkpointing, record_training

    todo = sorted(m for m in sizes if m not in models)
    if todo:
        progress.note(f"{label}: training sizes {todo} ({config.steps} steps, {config.draws} "
                      f"draws, one after another)")
    for M in todo:
        ck = checkpointing(out, [M], resume, hook)
        start = ck["resume_state"]["step"] if ck["resume_state"] is not None else 0
        if start:
            progress.note(f"{label}: M={M} resumes at step {start}")
        t0 = time.perf_counter()
        models[M] = train_template_model(
            data, M, steps=config.steps, warmup=config.warmup, init_lr=config.init_lr,
            peak_lr=config.peak_lr, final_lr=config.final_lr, draws=config.draws,
            init_var=config.init_var, clip=config.clip, ema=config.ema, seed=config.seed,
            progress=progress.task(f"{label} training M={M}", zero_based=True), **ck)
        save_template_models(out / "models.npz", models)
        remove_train_state(out)
        record_training(timings, label, time.perf_counter() - t0, config.steps - start, 1)
        if hook is not None:
            hook("saved", M)


def _evaluate(config, data, ts, x_init, models, evals, out, timings, progress, hook) -> None:
    todo = sorted(m for m in models if m not in evals)
    task = progress.task(f"evaluating {len(todo)} models")
    for i, M in enumerate(todo):
        t0 = time.perf_counter()
        evals[M], samples = evaluate_template_model(models[M], data, ts, x_init=x_init,
                                                    draws=config.eval_draws, seed=config.seed,
                                                    threshold=config.threshold)
        (out / "models").mkdir(exist_ok=True)
        np.save(out / "models" / f"M{M}_samples.npy",
                samples[:SHOWN_SAMPLES].double().numpy(), allow_pickle=False)
        write_json(out / "models" / f"M{M}.json", evals[M])
        timings.add("evaluate_models", time.perf_counter() - t0)
        task(i + 1, len(todo))
        if hook is not None:
            hook("evaluated", M)


def _assemble(config, data, ts, baselines, predictions, evals, transition, timings) -> dict:
    from .phase_transition import SCHEMA

    sizes, N = sorted(evals), config.samples
    ratios = [evals[m]["memorization_ratio"] for m in sizes]
    base_avg = {name: {s: averages(v, ts) for s, v in baselines[name].items()}
                for name in ("ground_truth", "memorizing")}
    base_avg["partial_mem"] = {m: {s: averages(v, ts) for s, v in per.items()}
                               for m, per in baselines["partial_mem"].items()}
    tr = dict(transition)
    if sizes:
        start, end = locate_transition(sizes, ratios, config.delta)
        mid, raw = (crossing_point(sizes, isotonic(ratios), 0.5),
                    crossing_point(sizes, ratios, 0.5))
        tr.update(start=start, end=end, start_fraction=start / N, end_fraction=end / N,
                  midpoint=mid, midpoint_fraction=mid / N, first_half_crossing_fraction=raw / N,
                  isotonic_ratio=isotonic(ratios))
    C, H, W = data.train.shape[1:]
    return {
        "schema": SCHEMA, "config": config.to_dict(), "environment": environment(),
        "grid": ts.tolist(), "x0_scale": to_x0_units([1.0] * len(ts), ts),
        "data": {"kind": "templates", "image_shape": [C, H, W], "dim": C * H * W,
                 "components": config.components, "samples": N,
                 "val_samples": config.val_samples, "color_var": float(data.color_var),
                 "variance": float(data.color_var)},
        "baselines": baselines, "baseline_averages": base_avg,
        "trained": {str(m): evals[m] for m in sizes},
        "sizes": sizes, "fractions": [m / N for m in sizes], "memorization_ratio": ratios,
        "variance": [evals[m]["variance"] for m in sizes],
        "transition": tr, "predictions": predictions, "timings": dict(timings.values),
    }


def run_templates(config, out, *, resume: bool = False, quiet: bool = False, plots: bool = True,
                  hook=None) -> dict:
    """Run (or resume) the colored-template experiment in folder out; returns the results dict
    (also out/results.json). hook(event, value): "checkpoint" step (the training state of the
    model in progress saved), "saved" M (a model trained and saved), "trained" phase,
    "evaluated" M."""
    from .phase_transition import begin_run, run_two_phases

    out = Path(out)
    run = begin_run(config, out, resume, quiet, evaluate_template_baselines)
    progress, timings, data, ts = run.progress, run.timings, run.data, run.ts
    baselines, predictions, t_start = run.baselines, run.predictions, run.t_start

    x_init = torch.randn(config.eval_samples, *data.train.shape[1:],
                         generator=generator(config.seed, "x_init"), dtype=data.train.dtype)
    models = load_template_models(out / "models.npz", data.train.dtype) if resume else {}
    evals = {}
    if resume and (out / "models").is_dir():
        for p in (out / "models").glob("M*.json"):
            r = read_json(p)
            if int(r["size"]) in models and (out / "models" / f"M{r['size']}_samples.npy").exists():
                evals[int(r["size"])] = r

    results = run_two_phases(
        config, evals, out, progress, hook, t_start,
        train=lambda sizes, phase: _train(config, data, sizes, out, models, timings, progress,
                                          phase, resume, hook),
        evaluate=lambda: _evaluate(config, data, ts, x_init, models, evals, out, timings,
                                   progress, hook),
        assemble=lambda tr: _assemble(config, data, ts, baselines, predictions, evals, tr,
                                      timings))
    if plots:
        from .plots import plot_run, plot_samples

        samples = {m: torch.from_numpy(np.load(out / "models" / f"M{m}_samples.npy",
                                               allow_pickle=False)) for m in results["sizes"]}
        made = plot_run(results, out / "plots") + plot_samples(samples, out / "plots")
        progress.note(f"plots: {len(made)} files in {out / 'plots'}" if made else
                      "plots skipped (matplotlib is not installed)")
    return results


__all__ = ["evaluate_template_baselines", "evaluate_template_model", "load_template_models",
           "run_templates", "save_template_models"]
