"""Measurements every experiment kind shares (SPEC E.4, G.1-G.4): seeded generators, per-t
losses, their averages and units, and the memorization ratio of DDIM samples.

Every loss is per t on the 26-point grid, EPS units, shape (T,) (lists in JSON); x0-unit
values are the EPS values times (sigma/alpha)^2. Randomness comes from generators seeded by
sub_seed(seed, ...), so each quantity is reproducible independently of evaluation order.
"""

from __future__ import annotations

import hashlib

import torch

from ..diffusion.loss import loss_per_t, weighted_loss
from ..diffusion.parametrization import loss_scale
from ..diffusion.processes import VP
from ..diffusion.samplers import ddim_sample
from ..metrics import memorization_ratio
from ..ops import knn

LOSS_ROWS = 65536  # rows (samples x draws) per model call of loss_per_t (its default batch)


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


def average_baselines(baselines: dict, ts) -> dict:
    """averages() of every baseline: entries {split: losses} and {M: {split: losses}} alike."""
    out = {}
    for name, entry in baselines.items():
        if all(isinstance(v, list) for v in entry.values()):
            out[name] = {s: averages(v, ts) for s, v in entry.items()}
        else:
            out[name] = {m: {s: averages(v, ts) for s, v in per.items()}
                         for m, per in entry.items()}
    return out


def measure_losses(model, data, ts, draws, seed, *label) -> list[float]:
    """loss_per_t of model on data (EPS units, (T,) as a list), noise seeded by (seed, label)."""
    return loss_per_t(model, data, ts, draws=draws, generator=generator(seed, *label),
                      batch=LOSS_ROWS).tolist()


def sample_ratio(denoiser_x0, train, x_init, ts, threshold: float) -> dict:
    """DDIM from x_init (n, d) over ts with an x0-predicting denoiser; memorization ratio
    (d1 < threshold d2, strict) and the median d1/d2 of the samples against train (N, d)."""
    samples = ddim_sample(denoiser_x0, x_init, ts)
    ratio = memorization_ratio(samples, train, threshold)
    dist = knn(samples.reshape(samples.shape[0], -1), train.reshape(train.shape[0], -1).to(samples),
               2)[0].double()
    return {"memorization_ratio": ratio,
            "median_d1_over_d2": float((dist[:, 0] / dist[:, 1]).median())}


def final_training_loss(losses: torch.Tensor) -> float:
    """Mean of the last 5% (at least one) of a model's per-step training losses."""
    tail = losses[-max(1, len(losses) // 20):]
    return float(tail.double().mean())


__all__ = ["LOSS_ROWS", "average_baselines", "averages", "final_training_loss", "generator",
           "measure_losses", "sample_ratio", "sub_seed", "to_x0_units"]
