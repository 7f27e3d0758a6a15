"""Command-line arguments of the experiments: the options of ``diffmem phase-transition``,
``diffmem sweep`` and ``diffmem crossover``, and the ExperimentConfig they describe. Parsing
only: diffmem/cli.py dispatches the parsed commands.

Bad input exits with code 2 and one line on stderr ("diffmem <command>: error: ..."), never a
traceback.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .config import GRIDS, PRESETS, ConfigError, ExperimentConfig, make_config
from .crossover_vs_n import MEASURE_DRAWS, MEASURE_POINTS
from .runtime import add_runtime_options

_D = ExperimentConfig()


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a single line (no usage block) and exit code 2."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0]}\n")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard i/n needs n >= 1 and 0 <= i < n, got {text!r}")
    return i, n


def add_common(p: argparse.ArgumentParser, sweep: bool = False,
               sample_list: bool = False) -> None:
    """Options shared by the experiment commands (data, configuration, output, where it runs);
    sample_list: --samples takes a comma-separated list (crossover)."""
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", default="default", metavar="NAME",
                   help=f"hyperparameter preset: {', '.join(sorted(PRESETS))} (default: default = "
                        f"quick d=30 K=4 N=100 run; paper = SPEC F.5: 50,000 steps, warmup 5,000, "
                        f"lr 0->1e-3->1e-6, 100 draws)")
    g.add_argument("--data", choices=["gmm", "templates"], default="gmm",
                   help="data: isotropic GMM (default) or colored templates (--dim, --dims are "
                        "then the image side, images dim x dim x 3; template presets: clip 1e3, "
                        "ema 0.1)")
    if not sweep:
        g.add_argument("--dim", type=int, help=f"data dimension d (default {_D.dim})")
        g.add_argument("--components", type=int,
                       help=f"mixture components K (default {_D.components})")
        if sample_list:
            g.add_argument("--samples", type=_int_list, metavar="N[,N,...]",
                           help=f"training points N (default {_D.samples}); several, e.g. "
                                f"100,1000,10000: the crossover as N grows")
        else:
            g.add_argument("--samples", type=int,
                           help=f"training points N (default {_D.samples})")
    g.add_argument("--seed", type=int, help=f"random seed (default {_D.seed})")
    g.add_argument("--val-samples", type=int, help=f"validation points (default {_D.val_samples})")
    g.add_argument("--variance", type=float,
                   help=f"ground-truth variance sigma0^2, for templates the color variance "
                        f"(default {_D.variance})")
    _add_run_options(g, threads_default=1)
    add_runtime_options(p)


def _add_run_options(g, threads_default: int) -> None:
    """--out, --resume, --quiet and --threads, in the argument group g."""
    g.add_argument("--out", metavar="DIR", help="output folder (default runs/<command>-<config>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out: finished stages and models are not recomputed")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    why = ("1: these small batched problems run fastest on one thread, far faster on a busy "
           "machine; 0 = torch's default" if threads_default == 1 else "0: torch's default")
    g.add_argument("--threads", type=int, default=threads_default,
                   help=f"torch CPU threads (default {why})")


def add_common_output(p: argparse.ArgumentParser, threads_default: int = 1) -> None:
    """The output options of an experiment command outside the phase-transition family:
    --out, --resume, --quiet, --threads and --no-plots."""
    g = p.add_argument_group("output")
    _add_run_options(g, threads_default)
    g.add_argument("--no-plots", action="store_true", help="write no PNG files")


def add_training(p: argparse.ArgumentParser) -> None:
    """Training and evaluation hyperparameters (SPEC F.5, G); unset ones come from the preset."""
    t = p.add_argument_group("training (defaults from --preset; shown: the default preset, "
                                 "whose steps, draws, warmup and eval-draws scale with N above "
                                 "N = 200: N = 1000 takes 3000 steps of 1 draw)")
    t.add_argument("--steps", type=int,
                   help=f"optimizer steps, full batch (default {_D.steps}; paper 50000)")
    t.add_argument("--warmup", type=int, help=f"warmup steps (default {_D.warmup}; paper 5000)")
    t.add_argument("--init-lr", type=float, help=f"initial lr (default {_D.init_lr})")
    t.add_argument("--peak-lr", type=float, help=f"peak lr (default {_D.peak_lr}; paper 1e-3)")
    t.add_argument("--final-lr", type=float, help=f"final lr (default {_D.final_lr}; paper 1e-6)")
    t.add_argument("--draws", type=int,
                   help=f"noise draws per sample per step (default {_D.draws}; paper 100)")
    t.add_argument("--init-var", type=float, help=f"PMEM init variance (default {_D.init_var})")
    t.add_argument("--clip", type=float, help=f"gradient clipping norm (default {_D.clip:g})")
    t.add_argument("--ema", type=float, help=f"EMA of the updates (default {_D.ema})")
    t.add_argument("--sizes", type=_int_list, metavar="M,M,...",
                   help="trained sizes M (default range(N/10, N+1, N/10))")
    t.add_argument("--no-refine", dest="refine", action="store_false", default=None,
                   help="do not refine the sizes around the transition")
    t.add_argument("--delta", type=float, help=f"transition threshold delta (default {_D.delta})")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-samples", type=int,
                   help=f"DDIM samples for the memorization ratio (default {_D.eval_samples})")
    e.add_argument("--eval-draws", type=int,
                   help=f"noise draws per sample for per-t losses (default {_D.eval_draws})")
    e.add_argument("--threshold", type=float, help="memorized iff d1 < threshold d2 (default 1/3)")
    e.add_argument("--baseline-step", type=int,
                   help="partially memorizing baseline sizes range(s, N+1, s)")
    e.add_argument("--baseline-points", type=int,
                   help=f"else about this many baseline sizes in steps of N/points (default "
                        f"{_D.baseline_points}; paper preset 0 = every max(N//100, 1))")
    e.add_argument("--no-plots", action="store_true", help="write no PNG files")


_FIELDS = ("data", "dim", "components", "samples", "seed", "val_samples", "variance", "steps",
           "warmup", "init_lr", "peak_lr", "final_lr", "draws", "init_var", "clip", "ema", "sizes",
           "refine", "delta", "eval_samples", "eval_draws", "threshold", "baseline_step",
           "baseline_points")


def config_from_args(args, **fixed) -> ExperimentConfig:
    """The validated ExperimentConfig of parsed options (fixed values override them)."""
    values = {k: getattr(args, k, None) for k in _FIELDS}
    values.update(fixed)
    return make_config(args.preset, **values)


def out_folder(args, default: str) -> Path:
    """The output folder of parsed options: --out, or default when it is not given;
    ConfigError if --out is given empty."""
    if args.out is None:
        return Path(default)
    if not args.out.strip():
        raise ConfigError("--out must name a folder, got an empty string")
    return Path(args.out)


def check_threads(threads: int) -> int:
    """threads if it lies in [0, the CPUs of this machine]; ConfigError otherwise."""
    cpus = os.cpu_count() or 1
    if not 0 <= threads <= cpus:
        raise ConfigError(f"--threads must be in [0, {cpus}] (0: torch's default, at most the "
                          f"{cpus} CPUs of this machine), got {threads}")
    return threads


def build_parsers(sub) -> None:
    """Add the three experiment subcommands to an argparse subparsers object."""
    pt = sub.add_parser("phase-transition", help="the paper's experiment on one configuration",
                        description="Train the learnable GMM for a grid of sizes M, measure the "
                                    "memorization ratio and losses, locate the transition and "
                                    "compare with the predicted crossover M*/N.")
    add_common(pt)
    add_training(pt)
    sw = sub.add_parser("sweep", help="phase transition over many (d, K, N) configurations",
                        description="The 64-configuration sweep (or a subset): one result folder "
                                    "per configuration and a summary table. With --data templates: "
                                    "image side x K x N, by default the 8 configurations "
                                    "{10,15} x {3,6} x {50,100}.")
    grid = lambda kind, i: ",".join(map(str, GRIDS[kind][i]))  # noqa: E731
    sw.add_argument("--dims", type=_int_list,
                    help=f"d values (default {grid('gmm', 0)}; templates: image sides "
                         f"{grid('templates', 0)})")
    sw.add_argument("--components", type=_int_list,
                    help=f"K values (default {grid('gmm', 1)}; templates: {grid('templates', 1)})")
    sw.add_argument("--samples", type=_int_list,
                    help=f"N values (default {grid('gmm', 2)}; templates: {grid('templates', 2)})")
    sw.add_argument("--shard", type=_shard, metavar="i/n",
                    help="run only configurations with index %% n == i (default 0/1, or "
                         "RANK/WORLD_SIZE when launched by torchrun)")
    add_common(sw, sweep=True)
    add_training(sw)
    cr = sub.add_parser("crossover", help="theory-only crossover predictions M*/N (seconds)",
                        description="Coded, instance-wise and measured (skip with --no-measured) "
                                    "predictions of M*/N under x0-uniform weighting; colored "
                                    "templates (--data templates) have only the measured one. "
                                    "Several --samples (e.g. 100,1000,10000): the three for each "
                                    "N, the measured one on --measure-points points with its "
                                    "standard error, one resumable stage per N, a JSON and a "
                                    "plot of M*/N against N.")
    add_common(cr, sample_list=True)
    cr.add_argument("--no-measured", action="store_true", help="skip the measured-loss prediction")
    cr.add_argument("--eval-draws", type=int,
                    help=f"noise draws per sample for measured losses (default 100; with several "
                         f"N: {MEASURE_DRAWS})")
    cr.add_argument("--measure-points", type=int, default=MEASURE_POINTS, metavar="P",
                    help=f"with several N: the measured crossover on P random training points "
                         f"(default {MEASURE_POINTS}; all when N <= P)")
    cr.add_argument("--no-plots", action="store_true",
                    help="with several N: no crossover_vs_n.png")
    cr.add_argument("--weighting", choices=["x0", "eps", "v", "score"], default="x0",
                    help="time weighting of the losses (default x0-uniform)")


__all__ = ["OneLineParser", "add_common", "add_common_output", "add_training", "build_parsers",
           "check_threads", "config_from_args", "out_folder"]
