"""The phase-transition experiment on an isotropic Gaussian mixture (SPEC H.1, the default):
data, baselines (with the coded approximations), batched training of the learnable GMMs, and
the evaluation of one trained model; KIND plugs them into the runner."""

from __future__ import annotations

from .. import theory
from ..data import GMMData, make_gmm_data
from ..denoisers.empirical import EmpiricalDenoiser
from ..denoisers.partial import PartialMemorizingDenoiser
from ..diffusion.processes import VP
from ..metrics import learned_means_metrics
from ..training import TrainedGMM, train_gmm_models
from .evaluate import (
    LOSS_ROWS,
    averages,
    final_training_loss,
    generator,
    measure_losses,
    sample_ratio,
)
from .kind import ExperimentKind


def make_data(config) -> GMMData:
    """GMMData (train (N, d), val (V, d)) of config."""
    return make_gmm_data(config.dim, config.components, config.samples, config.seed,
                         val_samples=config.val_samples, variance=config.variance)


def evaluate_baselines(data, ts, *, sizes, draws: int, seed: int, progress=None,
                       backend: str = "auto", precision: str = "exact") -> dict:
    """Per-t train/val losses of the ground truth, memorizing and partially memorizing (each M
    in sizes, fresh subset per t) denoisers, plus the coded approximations on train:
    ground_truth_approx, partial_mem_approx and the nearest-neighbour
    partial_mem_instancewise_approx. data: GMMData (train (N, d), val (V, d)) on the device of
    the work; ts: (T,) grid; backend / precision: the op's. Returns a JSON-ready dict."""
    N, d = data.train.shape
    op = {"backend": backend, "precision": precision}
    gt = data.ground_truth(prediction="eps", **op)
    mem = EmpiricalDenoiser(data.train, VP(), "eps", **op)
    out = {"ground_truth": {}, "memorizing": {}, "partial_mem": {}, "partial_mem_approx": {},
           "partial_mem_instancewise_approx": {}}
    for split, x in (("train", data.train), ("val", data.val)):
        out["ground_truth"][split] = measure_losses(gt, x, ts, draws, seed, "gt", split)
        out["memorizing"][split] = measure_losses(mem, x, ts, draws, seed, "mem", split)
    mem_train = out["memorizing"]["train"]
    out["ground_truth_approx"] = {"train": theory.ground_truth_approx(
        mem_train, ts, d, variance=float(data.variance)).tolist()}
    for i, M in enumerate(sizes):
        pm = PartialMemorizingDenoiser(data.train, int(M), generator=generator(seed, "pmem", M),
                                       redraw_per_t=True, prediction="eps", **op)
        out["partial_mem"][str(M)] = {split: measure_losses(pm, x, ts, draws, seed, "pmem", M,
                                                            split)
                                      for split, x in (("train", data.train), ("val", data.val))}
        out["partial_mem_approx"][str(M)] = {"train": theory.partial_mem_approx(
            mem_train, ts, d, int(M), N, variance=float(data.variance)).tolist()}
        subsets = [pm.subset_at(float(t)) for t in ts]
        out["partial_mem_instancewise_approx"][str(M)] = {"train": theory.instancewise_pmem_approx(
            mem_train, data.train, subsets, ts).tolist()}
        if progress is not None:
            progress(i + 1, len(sizes))
    return out


def train(config, data, sizes, **kwargs) -> dict:
    """{M: TrainedGMM}: every size in one batched train_gmm_models call on data's device
    (kwargs: progress, backend, precision and the checkpointing arguments)."""
    return train_gmm_models(
        data.train, sizes, steps=config.steps, warmup=config.warmup, init_lr=config.init_lr,
        peak_lr=config.peak_lr, final_lr=config.final_lr, draws=config.draws, init=config.init,
        init_var=config.init_var, clip=config.clip, ema=config.ema, seed=config.seed,
        **kwargs)


def evaluate_trained(model, data, ts, *, x_init, draws: int, seed: int, threshold: float,
                     backend: str = "auto", precision: str = "exact") -> tuple[dict, dict]:
    """Everything measured on one TrainedGMM (size M): memorization ratio, learned variance,
    learned-means metrics (G.2), per-t train/val losses (EPS) and their averages; no
    artifacts. model, data and x_init on one device; backend / precision: the op's."""
    M = model.size
    op = {"backend": backend, "precision": precision}
    eps_model = model.denoiser(prediction="eps", **op)
    train_loss = measure_losses(eps_model, data.train, ts, draws, seed, "trained", M, "train")
    val_loss = measure_losses(eps_model, data.val, ts, draws, seed, "trained", M, "val")
    out = {"size": M, "variance": float(model.std) ** 2}
    out.update(sample_ratio(model.denoiser(prediction="x0", **op), data.train, x_init, ts,
                            threshold))
    out["learned_means"] = learned_means_metrics(model.means, data.means, data.train, threshold)
    out["train_loss"], out["val_loss"] = train_loss, val_loss
    out["avg_train_loss"], out["avg_val_loss"] = averages(train_loss, ts), averages(val_loss, ts)
    out["final_training_loss"] = final_training_loss(model.losses)
    return out, {}


def describe_data(config, data) -> dict:
    return {"dim": config.dim, "components": config.components, "samples": config.samples,
            "val_samples": config.val_samples, "variance": float(data.variance)}


def model_shapes(config, data, M: int) -> dict:
    """Shapes of a TrainedGMM of size M: means (M, d), losses (steps,)."""
    return {"means": (M, data.train.shape[1]), "losses": (config.steps,)}


def memory(config) -> dict:
    """Estimated bytes (float32) of the run's dominant arrays (see ExperimentKind.memory):
    a batched training step holds about 12 arrays of models x N x draws x d (measured: 8-11),
    a loss evaluation about 10 of its rows (at most LOSS_ROWS) x d."""
    d, N, V = config.dim, config.samples, config.val_samples
    initial = len(config.train_sizes())
    refined = min(N, 2 * config.coverage + 1) if config.refine else 0
    batch = max(initial, refined)  # models trained in one call
    rows = max(min(max(N, V) * config.eval_draws, LOSS_ROWS), config.eval_samples)
    return {"training": 4 * (12 * batch * N * config.draws * d + batch * config.steps),
            "evaluation": 4 * 10 * rows * d,
            "kept": 4 * ((N + V + config.components) * d
                         + (initial + refined) * (config.steps + N * d))}


KIND = ExperimentKind(
    name="gmm", data_type=GMMData, make_data=make_data, evaluate_baselines=evaluate_baselines,
    model_type=TrainedGMM, train=train, batched=True, evaluate=evaluate_trained,
    describe_data=describe_data, model_shapes=model_shapes, memory=memory)

__all__ = ["KIND", "describe_data", "evaluate_baselines", "evaluate_trained", "make_data",
           "memory", "model_shapes", "train"]
