"""``diffmem crossover``: theory-only predictions of M*/N for one configuration, in seconds.

coded (closed form, no data), instance-wise (nearest-neighbour excess on generated training
data) and measured (Monte-Carlo losses of the ground truth and partially memorizing denoisers;
the slowest, skip with --no-measured). Writes out/crossover.json and prints a table.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data import make_gmm_data
from ..diffusion.processes import time_grid
from .config import ConfigError, make_config
from .predictions import predict
from .results import check_writable, environment, write_json


def run_crossover(args) -> int:
    """Handler of the crossover subcommand (args from experiments.cli); returns the exit code."""
    values = {k: getattr(args, k, None) for k in ("data", "dim", "components", "samples", "seed",
                                                  "val_samples", "variance", "eval_draws")}
    config = make_config(args.preset, sizes=[1], **values)  # sizes: not used here
    if config.data != "gmm":
        raise ConfigError("--data templates is not implemented yet for crossover; use gmm")
    out = Path(args.out or f"runs/crossover-{config.tag()}")
    try:
        check_writable(out)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {str(out)!r}: {e.strerror or e}") from None
    t0 = time.perf_counter()
    data = make_gmm_data(config.dim, config.components, config.samples, config.seed,
                         val_samples=config.val_samples, variance=config.variance)
    ts = time_grid(dtype=torch.float64)
    pred = predict(data, ts, seed=config.seed, measured=not args.no_measured,
                   draws=config.eval_draws, weighting=args.weighting)
    result = {"schema": "diffmem.crossover/1", "config": config.to_dict(), "predictions": pred,
              "environment": environment(), "seconds": time.perf_counter() - t0}
    write_json(out / "crossover.json", result)
    print(f"predicted M*/N for {config.tag()} ({args.weighting}-uniform weighting):")
    for k in ("coded", "instancewise", "measured"):
        v = pred.get(k)
        text = "skipped" if v is None else f"{v:.4f}  (M* = {v * config.samples:.1f})"
        print(f"  {k:<13} {text}")
    print(f"written: {out / 'crossover.json'} ({result['seconds']:.1f} s)")
    return 0


__all__ = ["run_crossover"]
