"""The phase-transition experiment on colored templates (SPEC C.7, F.5 colored, G.1-G.5, H.2, I).

config.dim is the image side (images dim x dim x 3). Baselines: ground truth, memorizing and
partially memorizing; one LearnableColoredTemplates per size M, trained one after another
(each resumable mid-model); per model the memorization ratio of DDIM samples, the learned
variance color_std^2, learned-means metrics and losses, and a grid of generated samples
(models/M<M>_samples.npy, (n_show, C, H, W), plotted as plots/generated_samples.png). The GMM
closed-form (coded, instance-wise) crossovers do not apply here and are reported as None with
a note. KIND plugs these steps into the runner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.templates import TemplateData, make_template_data
from ..denoisers.empirical import EmpiricalDenoiser
from ..denoisers.partial import PartialMemorizingDenoiser
from ..diffusion.processes import VP
from ..diffusion.samplers import ddim_sample
from ..metrics import learned_means_metrics, memorization_ratio, nearest_two
from ..training import TrainedTemplates, train_template_model
from .evaluate import LOSS_ROWS, averages, final_training_loss, generator, measure_losses
from .kind import ExperimentKind

SHOWN_SAMPLES = 9  # generated samples kept per M for the sample grid (SPEC I)
THEORY_NOTE = ("coded and instance-wise crossovers are GMM theory and do not apply to colored "
               "templates; measured = where the weighted pmem train loss meets the ground-truth "
               "template denoiser's")


def make_data(config) -> TemplateData:
    """TemplateData (train (N, 3, dim, dim)) of config."""
    return make_template_data(config.components, config.samples, config.seed, size=config.dim,
                              color_var=config.variance, val_samples=config.val_samples)


def evaluate_baselines(data: TemplateData, ts, *, sizes, draws: int, seed: int,
                       progress=None, backend: str = "auto", precision: str = "exact") -> dict:
    """Per-t train/val EPS losses (T,) of the ground-truth template denoiser, the memorizing
    and the partially memorizing denoisers (each M in sizes, fresh subset per t); backend /
    precision: the op's (the template denoisers are closed forms without it)."""
    op = {"backend": backend, "precision": precision}
    gt = data.ground_truth(prediction="eps")
    mem = EmpiricalDenoiser(data.train, VP(), "eps", **op)
    splits = (("train", data.train), ("val", data.val))
    out = {"ground_truth": {}, "memorizing": {}, "partial_mem": {}}
    for split, x in splits:
        out["ground_truth"][split] = measure_losses(gt, x, ts, draws, seed, "gt", split)
        out["memorizing"][split] = measure_losses(mem, x, ts, draws, seed, "mem", split)
    for i, M in enumerate(sizes):
        pm = PartialMemorizingDenoiser(data.train, int(M), generator=generator(seed, "pmem", M),
                                       redraw_per_t=True, prediction="eps", **op)
        out["partial_mem"][str(M)] = {s: measure_losses(pm, x, ts, draws, seed, "pmem", M, s)
                                      for s, x in splits}
        if progress is not None:
            progress(i + 1, len(sizes))
    return out


def train(config, data, sizes, *, backend: str = "auto", precision: str = "exact",
          **kwargs) -> dict:
    """{M: TrainedTemplates} for sizes (the runner passes one size at a time; kwargs: progress
    and the checkpointing arguments; backend and precision are unused: the template model is a
    closed form without the op)."""
    return {M: train_template_model(
        data, M, steps=config.steps, warmup=config.warmup, init_lr=config.init_lr,
        peak_lr=config.peak_lr, final_lr=config.final_lr, draws=config.draws,
        init_var=config.init_var, clip=config.clip, ema=config.ema, seed=config.seed, **kwargs)
        for M in sizes}


def evaluate_model(model: TrainedTemplates, data: TemplateData, ts, *, x_init, draws: int,
                   seed: int, threshold: float, backend: str = "auto",
                   precision: str = "exact") -> tuple[dict, dict]:
    """Memorization ratio of DDIM samples from x_init (n, C, H, W), learned variance, learned
    means metrics (G.2), per-t losses; returns (JSON-ready dict, {"samples": the first
    SHOWN_SAMPLES generated samples}). backend and precision are unused (closed forms)."""
    M = model.size
    eps_model = model.denoiser(prediction="eps")
    train_loss = measure_losses(eps_model, data.train, ts, draws, seed, "trained", M, "train")
    val_loss = measure_losses(eps_model, data.val, ts, draws, seed, "trained", M, "val")
    samples = ddim_sample(model.denoiser(prediction="x0"), x_init, ts)
    dist = nearest_two(samples, data.train).double()
    true_means = data.color_means[:, :, None, None] * data.templates[:, None]
    out = {"size": M, "variance": model.variance,
           "memorization_ratio": memorization_ratio(samples, data.train, threshold),
           "median_d1_over_d2": float((dist[:, 0] / dist[:, 1]).median()),
           "learned_means": learned_means_metrics(model.means(), true_means, data.train,
                                                  threshold),
           "train_loss": train_loss, "val_loss": val_loss,
           "avg_train_loss": averages(train_loss, ts), "avg_val_loss": averages(val_loss, ts)}
    out["final_training_loss"] = final_training_loss(model.losses)
    return out, {"samples": samples[:SHOWN_SAMPLES].double()}


def describe_data(config, data) -> dict:
    C, H, W = data.train.shape[1:]
    return {"kind": "templates", "image_shape": [C, H, W], "dim": C * H * W,
            "components": config.components, "samples": config.samples,
            "val_samples": config.val_samples, "color_var": float(data.color_var),
            "variance": float(data.color_var)}


def model_shapes(config, data, M: int) -> dict:
    """Shapes of a TrainedTemplates of size M: templates (M, H, W), color_means (M, C), losses
    (steps,)."""
    C = data.color_means.shape[1]
    return {"templates": (M, *data.templates.shape[1:]), "color_means": (M, C),
            "losses": (config.steps,)}


def memory(config) -> dict:
    """Estimated bytes (float32) of the run's dominant arrays (see ExperimentKind.memory). The
    per-component Woodbury terms make them grow with the components: a training step of a
    size-M model holds about 16 + 3 M arrays of N x draws x d (measured: 16 + 2.6 M), a loss
    evaluation about 16 + M of its rows (at most LOSS_ROWS) x d; M up to N."""
    d, N, V = 3 * config.dim ** 2, config.samples, config.val_samples
    M = max(N, config.components)
    rows = max(min(max(N, V) * config.eval_draws, LOSS_ROWS), config.eval_samples)
    models = len(config.train_sizes()) + (min(N, 2 * config.coverage + 1) if config.refine else 0)
    return {"training": 4 * (16 + 3 * M) * N * config.draws * d,
            "evaluation": 4 * (16 + M) * rows * d,
            "kept": 4 * (N + V) * d + models * (8 * config.steps + 4 * N * d)}


def plot_samples_grid(results: dict, out) -> list[str]:
    """plots/generated_samples.png from the saved samples of every model."""
    from .plots import plot_samples

    out = Path(out)
    samples = {m: torch.from_numpy(np.load(out / "models" / f"M{m}_samples.npy",
                                           allow_pickle=False)) for m in results["sizes"]}
    return plot_samples(samples, out / "plots")


KIND = ExperimentKind(
    name="templates", data_type=TemplateData, make_data=make_data,
    evaluate_baselines=evaluate_baselines, model_type=TrainedTemplates, train=train,
    batched=False, evaluate=evaluate_model, describe_data=describe_data,
    model_shapes=model_shapes, memory=memory, artifacts=("samples",), theory_note=THEORY_NOTE,
    plots=plot_samples_grid)

__all__ = ["KIND", "SHOWN_SAMPLES", "THEORY_NOTE", "describe_data", "evaluate_baselines",
           "evaluate_model", "make_data", "memory", "model_shapes", "train"]
