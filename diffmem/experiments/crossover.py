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
from .config import ConfigError, ExperimentConfig, make_config
from .crossover_vs_n import MEASURE_DRAWS, format_rows, run_crossover_vs_n
from .predictions import predict
from .results import environment, writable_folder, write_json
from .runner import kind_for
from .runtime import on_device, runtime_from_args


def _text(value, skipped: bool, samples: int) -> str:
    if value is None:
        return "skipped" if skipped else "n/a (GMM theory)"
    if value != value:
        return "no crossing in the scanned sizes"
    return f"{value:.4f}  (M* = {value * samples:.1f})"


def run_crossover(args) -> int:
    """Handler of the crossover subcommand (args from experiments.args); returns the exit code.
    Several --samples: the crossover as N grows (crossover_vs_n.py)."""
    runtime = runtime_from_args(args)
    samples = args.samples if args.samples is not None else [None]
    values = {k: getattr(args, k, None) for k in ("data", "dim", "components", "seed",
                                                  "val_samples", "variance", "eval_draws")}
    if values["eval_draws"] is None:  # the measured loss's own default, whatever N is
        values["eval_draws"] = ExperimentConfig.eval_draws
    # sizes: not used here
    configs = [make_config(args.preset, sizes=[1], samples=n, **values) for n in samples]
    if len(configs) > 1:
        return _crossover_vs_n(args, configs, runtime)
    config = configs[0]
    if config.data == "templates" and args.no_measured:
        raise ConfigError("--no-measured leaves nothing to predict for --data templates: its only "
                          "crossover is the measured one (coded and instance-wise are GMM theory)")
    kind = kind_for(config)
    check_memory(config, kind, training=False)
    out = writable_folder(out_folder(args, f"runs/crossover-{config.tag()}"))
    t0 = time.perf_counter()
    data = on_device(kind.make_data(config), runtime.device)
    ts = time_grid(dtype=torch.float64)
    pred = predict(data, ts, seed=config.seed, measured=not args.no_measured,
                   draws=config.eval_draws, weighting=args.weighting, theory_note=kind.theory_note,
                   backend=runtime.backend, precision=runtime.precision)
    result = {"schema": "diffmem.crossover/1", "config": config.to_dict(), "predictions": pred,
              "environment": environment(runtime), "runtime": runtime.record(),
              "seconds": time.perf_counter() - t0}
    write_json(out / "crossover.json", result)
    print(f"predicted M*/N for {config.tag()} ({args.weighting}-uniform weighting):")
    for k in ("coded", "instancewise", "measured"):
        print(f"  {k:<13} {_text(pred.get(k), args.no_measured, config.samples)}")
    print(f"written: {out / 'crossover.json'} ({result['seconds']:.1f} s)")
    return 0


def _crossover_vs_n(args, configs, runtime) -> int:
    """crossover --samples N1,N2,...: one stage per N, a JSON of all and a plot."""
    first, samples = configs[0], [c.samples for c in configs]
    if len(set(samples)) != len(samples):
        raise ConfigError(f"--samples must not repeat a value, got {samples}")
    if args.measure_points < 2:
        raise ConfigError(f"--measure-points must be at least 2, got {args.measure_points}")
    draws = args.eval_draws if args.eval_draws is not None else MEASURE_DRAWS
    out = out_folder(args, f"runs/crossover-vs-n-{first.data}-d{first.dim}-K{first.components}-"
                           f"s{first.seed}")
    summary = run_crossover_vs_n(first, samples, out, runtime, points=args.measure_points,
                                 draws=draws, weighting=args.weighting,
                                 measured=not args.no_measured, resume=args.resume,
                                 quiet=args.quiet, plots=not args.no_plots)
    print(f"predicted M*/N for d={first.dim} K={first.components} as N grows "
          f"({args.weighting}-uniform weighting):")
    print(format_rows(summary["rows"]))
    print(f"written: {out / 'crossover_vs_n.json'}")
    return 0


__all__ = ["run_crossover"]
