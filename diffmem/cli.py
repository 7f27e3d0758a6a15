"""The ``diffmem`` command.

    diffmem                   the built-in default: ``diffmem phase-transition`` with the default
                              preset (d=30, K=4, N=100; a few minutes on a laptop CPU)
    diffmem phase-transition  the paper's experiment on one configuration
    diffmem sweep             the phase transition over the (d, K, N) grid, or a subset
    diffmem crossover         theory-only predictions of the crossover M*/N (seconds)
    diffmem memorize          memorizing, partially memorizing and generalizing denoisers
                              sampled on a real data set (default: scikit-learn's digits)
    diffmem demo              the op on a memorization-style problem: accuracy of each backend and
                              precision against float64 across noise levels, then a quick benchmark
    diffmem bench ...         the comparison benchmark (see ``diffmem bench --help``)

Use ``diffmem <command> --help`` for every option.
"""

from __future__ import annotations

import argparse
import sys

from .experiments.args import (
    OneLineParser,
    build_parsers,
    check_threads,
    config_from_args,
    out_folder,
)
from .experiments.config import ConfigError, make_config
from .experiments.memorize_config import add_memorize_parser
from .training import TrainingDiverged

EXPERIMENTS = ("phase-transition", "sweep", "crossover", "memorize")


def _fail(command: str, message: str) -> int:
    print(f"diffmem {command}: error: {message}", file=sys.stderr)
    return 2


def _diverged(e: TrainingDiverged, args: argparse.Namespace) -> str:
    """The divergence message with the options that control it and their values."""
    preset = make_config(args.preset, data=args.data)
    lr = args.peak_lr if args.peak_lr is not None else preset.peak_lr
    clip = args.clip if args.clip is not None else preset.clip
    return f"{e}: --peak-lr (now {lr:g}) or --clip (now {clip:g})"


def run_experiment(command: str, args: argparse.Namespace) -> int:
    """Run a parsed experiment command. One line on stderr and a non-zero exit code for what
    stops it: ConfigError (bad settings or run folder, a folder in use, a run too large for
    memory) 2, a diverging training 1, running out of memory anyway 1, an interrupt 130."""
    try:
        threads = check_threads(getattr(args, "threads", 1))
        if threads:
            import torch
            torch.set_num_threads(threads)
        if command == "phase-transition":
            from .experiments.runner import run_phase_transition
            from .experiments.runtime import runtime_from_args

            runtime = runtime_from_args(args)
            config = config_from_args(args)
            out = out_folder(args, f"runs/phase-transition-{config.tag()}")
            run_phase_transition(config, out, resume=args.resume, quiet=args.quiet,
                                 plots=not args.no_plots, runtime=runtime)
            print(f"results: {out / 'results.json'}")
            return 0
        if command == "sweep":
            from .experiments.sweep import run_sweep

            return run_sweep(args)
        if command == "crossover":
            from .experiments.crossover import run_crossover

            return run_crossover(args)
        if command == "memorize":
            from .experiments.memorize import run_memorize

            return run_memorize(args)
    except ConfigError as e:
        return _fail(command, str(e))
    except TrainingDiverged as e:
        _fail(command, _diverged(e, args))
        return 1
    except MemoryError:
        _fail(command, "out of memory: lower --dim, --samples, --draws or --eval-draws")
        return 1
    except KeyboardInterrupt:
        print(f"diffmem {command}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    raise ValueError(f"unknown command {command!r}")


def _demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo

    return run_demo(quick=not args.full)


def _bench(rest: list[str]) -> int:
    from .tools.bench.cli import main as bench_main

    return bench_main(rest) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineParser(prog="diffmem", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    build_parsers(sub)
    add_memorize_parser(sub)
    demo = sub.add_parser("demo", help="accuracy across noise levels and a quick benchmark")
    demo.add_argument("--full", action="store_true",
                      help="run the full benchmark, not the quick one")
    sub.add_parser("bench", help="the comparison benchmark; options: diffmem bench --help",
                   add_help=False)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["phase-transition", *argv]  # the default command
    args = parser.parse_args(argv)
    if args.command in EXPERIMENTS:
        return run_experiment(args.command, args)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
