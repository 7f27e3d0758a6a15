"""``diffmem crossover``: theory-only predictions of M*/N for one configuration, in seconds.

coded (closed form, no data), instance-wise (nearest-neighbour excess on generated training
data) and measured (Monte-Carlo losses of the ground truth and partially memorizing denoisers;
the slowest, skip with --no-measured). Colored templates (--data templates) have only the
measured one: the coded and instance-wise closed forms are GMM theory. Writes
out/crossover.json and prints a table.
"""

from __future__ import annotations

import time

import torch

from ..diffusion.processes import time_grid
from .args import out_folder
from .budget import check_memory
from .config import ConfigError, make_config
from .predictions import predict
from .results import environment, writable_folder, write_json
from .runner import kind_for


def _text(value, skipped: bool, samples: int) -> str:
    if value is None:
        return "skipped" if skipped else "n/a (GMM theory)"
    if value != value:
        return "no crossing in the scanned sizes"
    return f"{value:.4f}  (M* = {value * samples:.1f})"


def run_crossover(args) -> int:
    """Handler of the crossover subcommand (args from experiments.args); returns the exit code."""
    values = {k: getattr(args, k, None) for k in ("data", "dim", "components", "samples", "seed",
                                                  "val_samples", "variance", "eval_draws")}
    config = make_config(args.preset, sizes=[1], **values)  # sizes: not used here
    if config.data == "templates" and args.no_measured:
        raise ConfigError("--no-measured leaves nothing to predict for --data templates: its only "
                          "crossover is the measured one (coded and instance-wise are GMM theory)")
    kind = kind_for(config)
    check_memory(config, kind, training=False)
    out = writable_folder(out_folder(args, f"runs/crossover-{config.tag()}"))
    t0 = time.perf_counter()
    data = kind.make_data(config)
    ts = time_grid(dtype=torch.float64)
    pred = predict(data, ts, seed=config.seed, measured=not args.no_measured,
                   draws=config.eval_draws, weighting=args.weighting, theory_note=kind.theory_note)
    result = {"schema": "diffmem.crossover/1", "config": config.to_dict(), "predictions": pred,
              "environment": environment(), "seconds": time.perf_counter() - t0}
    write_json(out / "crossover.json", result)
    print(f"predicted M*/N for {config.tag()} ({args.weighting}-uniform weighting):")
    for k in ("coded", "instancewise", "measured"):
        print(f"  {k:<13} {_text(pred.get(k), args.no_measured, config.samples)}")
    print(f"written: {out / 'crossover.json'} ({result['seconds']:.1f} s)")
    return 0


__all__ = ["run_crossover"]
