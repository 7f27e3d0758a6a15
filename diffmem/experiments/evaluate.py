"""Evaluating baselines and trained models of one configuration (SPEC E.4, G.1-G.4).

Every loss is per t on the 26-point grid, EPS units, shape (T,) (lists in JSON); x0-unit
values are the EPS values times (sigma/alpha)^2. Randomness comes from generators seeded by
sub_seed(seed, ...), so each quantity is reproducible independently of evaluation order.
"""

from __future__ import annotations

import hashlib

import torch

from .. import theory
from ..denoisers.empirical import EmpiricalDenoiser
from ..denoisers.partial import PartialMemorizingDenoiser
from ..diffusion.loss import loss_per_t, weighted_loss
from ..diffusion.parametrization import loss_scale
from ..diffusion.processes import VP
from ..diffusion.samplers import ddim_sample
from ..metrics import learned_means_metrics, memorization_ratio
from ..ops import knn


def sub_seed(seed: int, *parts) -> int:
    """A 63-bit seed determined by seed and the labels in parts."""
    text = ":".join(["diffmem.experiments", str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *parts) -> torch.Generator:
    return torch.Generator().manual_seed(sub_seed(seed, *parts))


def to_x0_units(losses, ts) -> list[float]:
    """EPS-unit per-t losses (T,) -> x0 units (times (sigma/alpha)^2)."""
    scale = torch.as_tensor(loss_scale("eps", "x0", ts, VP()), dtype=torch.float64)
    return (torch.as_tensor(losses, dtype=torch.float64) * scale).tolist()


def averages(losses, ts) -> dict:
    """Uniform averages over t of per-t EPS losses (T,), in EPS and x0 units."""
    return {"eps": weighted_loss(losses, ts, "eps", units="eps"),
            "x0": weighted_loss(losses, ts, "x0", units="eps")}


def _losses(model, data, ts, draws, seed, *label) -> list[float]:
    return loss_per_t(model, data, ts, draws=draws, generator=generator(seed, *label)).tolist()


def evaluate_baselines(data, ts, *, sizes, draws: int, seed: int, progress=None) -> dict:
    """Per-t train/val losses of the ground truth, memorizing and partially memorizing (each M
    in sizes, fresh subset per t) denoisers, plus the coded approximations on train:
    ground_truth_approx, partial_mem_approx and the nearest-neighbour partial_mem_instancewise_approx.
    data: GMMData (train (N, d), val (V, d)); ts: (T,) grid. Returns a JSON-ready dict."""
    N, d = data.train.shape
    gt = data.ground_truth(prediction="eps")
    mem = EmpiricalDenoiser(data.train, VP(), "eps")
    out = {"ground_truth": {}, "memorizing": {}, "partial_mem": {}, "partial_mem_approx": {},
           "partial_mem_instancewise_approx": {}}
    for split, x in (("train", data.train), ("val", data.val)):
        out["ground_truth"][split] = _losses(gt, x, ts, draws, seed, "gt", split)
        out["memorizing"][split] = _losses(mem, x, ts, draws, seed, "mem", split)
    mem_train = out["memorizing"]["train"]
    out["ground_truth_approx"] = {"train": theory.ground_truth_approx(
        mem_train, ts, d, variance=float(data.variance)).tolist()}
    for i, M in enumerate(sizes):
        pm = PartialMemorizingDenoiser(data.train, int(M), generator=generator(seed, "pmem", M),
                                       redraw_per_t=True, prediction="eps")
        out["partial_mem"][str(M)] = {split: _losses(pm, x, ts, draws, seed, "pmem", M, split)
                                      for split, x in (("train", data.train), ("val", data.val))}
        out["partial_mem_approx"][str(M)] = {"train": theory.partial_mem_approx(
            mem_train, ts, d, int(M), N, variance=float(data.variance)).tolist()}
        subsets = [pm.subset_at(float(t)) for t in ts]
        out["partial_mem_instancewise_approx"][str(M)] = {"train": theory.instancewise_pmem_approx(
            mem_train, data.train, subsets, ts).tolist()}
        if progress is not None:
            progress(i + 1, len(sizes))
    return out


def sample_ratio(denoiser_x0, train, x_init, ts, threshold: float) -> dict:
    """DDIM from x_init (n, d) over ts with an x0-predicting denoiser; memorization ratio
    (d1 < threshold d2, strict) and the median d1/d2 of the samples against train (N, d)."""
    samples = ddim_sample(denoiser_x0, x_init, ts)
    ratio = memorization_ratio(samples, train, threshold)
    dist = knn(samples.reshape(samples.shape[0], -1), train.reshape(train.shape[0], -1).to(samples),
               2)[0].double()
    return {"memorization_ratio": ratio,
            "median_d1_over_d2": float((dist[:, 0] / dist[:, 1]).median())}


def evaluate_trained(model, data, ts, *, x_init, draws: int, seed: int, threshold: float) -> dict:
    """Everything measured on one TrainedGMM (size M): memorization ratio, learned variance,
    learned-means metrics (G.2), per-t train/val losses (EPS) and their averages."""
    M = model.size
    eps_model = model.denoiser(prediction="eps")
    train = _losses(eps_model, data.train, ts, draws, seed, "trained", M, "train")
    val = _losses(eps_model, data.val, ts, draws, seed, "trained", M, "val")
    out = {"size": M, "variance": float(model.std) ** 2}
    out.update(sample_ratio(model.denoiser(prediction="x0"), data.train, x_init, ts, threshold))
    out["learned_means"] = learned_means_metrics(model.means, data.means, data.train, threshold)
    out["train_loss"], out["val_loss"] = train, val
    out["avg_train_loss"], out["avg_val_loss"] = averages(train, ts), averages(val, ts)
    tail = model.losses[-max(1, len(model.losses) // 20):]
    out["final_training_loss"] = float(tail.double().mean())
    return out


__all__ = ["averages", "evaluate_baselines", "evaluate_trained", "generator", "sample_ratio",
           "sub_seed", "to_x0_units"]
