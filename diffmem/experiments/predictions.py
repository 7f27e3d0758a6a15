"""Predicted crossover M*/N of one configuration, three ways (SPEC E.3, J.4), x0-uniform weighting.
Data that the closed forms do not describe (colored templates: they are GMM theory) get only the
measured one.

- coded: the closed forms (independent of the data): 0.6604 on the 26-point grid.
- instancewise: nearest-neighbour pmem excess of the training set against Delta_gen.
- measured: measured train losses of the partially memorizing baselines against the ground truth
  (from an evaluate_baselines result, or measured here with theory.crossover_measured).
"""

from __future__ import annotations

import torch

from .. import theory
from ..diffusion.loss import time_weights
from .evaluate import generator


def measured_from_baselines(baselines: dict, ts, samples: int, weighting: str = "x0") -> dict:
    """M*/N where the weighted pmem train loss falls to the ground truth's, from evaluate_baselines
    output (EPS-unit losses). Returns {"fraction", "sizes", "gaps"} (fraction None if no
    crossing)."""
    c = time_weights(ts, weighting, units="eps")
    gt = torch.tensor(baselines["ground_truth"]["train"], dtype=torch.float64)
    sizes = sorted(int(m) for m in baselines["partial_mem"])
    gaps = [float((c * (torch.tensor(baselines["partial_mem"][str(m)]["train"],
                                     dtype=torch.float64) - gt)).sum()) for m in sizes]
    frac = theory.crossing([m / samples for m in sizes], gaps)
    return {"fraction": frac, "sizes": sizes, "gaps": gaps}


def predict(data, ts, *, seed: int, baselines: dict | None = None, measured: bool = True,
            draws: int = 100, weighting: str = "x0", theory_note: str | None = None,
            backend: str = "auto", precision: str = "exact") -> dict:
    """{"weighting", "coded", "instancewise", "measured"} predictions of M*/N for data (train
    (N, ...), ground_truth()). With a theory_note (the closed forms do not apply to this data,
    e.g. colored templates) coded and instance-wise are None and "note" says why. measured comes
    from baselines when given, else is measured here with theory.crossover_measured (None if
    not measured) on data's device with the op's backend and precision."""
    N = data.train.shape[0]
    out = {"weighting": weighting}
    if theory_note is not None:
        out.update(coded=None, instancewise=None, note=theory_note)
    else:
        out["coded"] = theory.crossover_coded(ts, weighting=weighting,
                                              variance=float(data.variance))
        frac, ms, gaps = theory.crossover_instancewise(
            data.train, ts, variance=float(data.variance), weighting=weighting,
            generator=generator(seed, "instancewise"), return_scan=True)
        out["instancewise"] = frac
        out["instancewise_scan"] = {"sizes": ms, "gaps": gaps}
    if baselines is not None:
        scan = measured_from_baselines(baselines, ts, N, weighting)
        out["measured"], out["measured_scan"] = scan["fraction"], {"sizes": scan["sizes"],
                                                                   "gaps": scan["gaps"]}
    elif measured:
        gt = data.ground_truth(prediction="eps").to(data.train.device)
        if hasattr(gt, "backend"):  # a denoiser on the op (the GMM; templates are closed form)
            gt.backend, gt.precision = backend, precision
        frac, ms, gaps = theory.crossover_measured(
            data.train, gt, ts, weighting=weighting, draws=draws,
            generator=generator(seed, "measured"), seed=seed, return_scan=True,
            backend=backend, precision=precision)
        out["measured"], out["measured_scan"] = frac, {"sizes": ms, "gaps": gaps}
    else:
        out["measured"] = None
    return out


__all__ = ["measured_from_baselines", "predict"]
