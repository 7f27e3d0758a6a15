"""The ``diffmem`` command.

    diffmem                   the built-in default: ``diffmem phase-transition`` with the default
                              preset (d=30, K=4, N=100; a few minutes on a laptop CPU)
    diffmem phase-transition  the paper's experiment on one configuration
    diffmem sweep             the phase transition over the (d, K, N) grid, or a subset
    diffmem crossover         theory-only predictions of the crossover M*/N (seconds)
    diffmem demo              the op on a memorization-style problem: accuracy of each backend and
                              precision against float64 across noise levels, then a quick benchmark
    diffmem bench ...         the comparison benchmark (see ``diffmem bench --help``)

Use ``diffmem <command> --help`` for every option.
"""

from __future__ import annotations

import argparse
import sys

from .experiments.args import OneLineParser, build_parsers, config_from_args
from .experiments.config import ConfigError

EXPERIMENTS = ("phase-transition", "sweep", "crossover")


def _fail(command: str, message: str) -> int:
    print(f"diffmem {command}: error: {message}", file=sys.stderr)
    return 2


def run_experiment(command: str, args: argparse.Namespace) -> int:
    """Run a parsed experiment command; ConfigError becomes exit code 2 (one line on stderr)."""
    threads = getattr(args, "threads", 1)
    if threads < 0:
        return _fail(command, f"--threads must be >= 0, got {threads}")
    if threads:
        import torch
        torch.set_num_threads(threads)
    try:
        if command == "phase-transition":
            from .experiments.runner import run_phase_transition

            config = config_from_args(args)
            out = args.out or f"runs/phase-transition-{config.tag()}"
            run_phase_transition(config, out, resume=args.resume, quiet=args.quiet,
                                 plots=not args.no_plots)
            print(f"results: {out}/results.json")
            return 0
        if command == "sweep":
            from .experiments.sweep import run_sweep

            return run_sweep(args)
        if command == "crossover":
            from .experiments.crossover import run_crossover

            return run_crossover(args)
    except ConfigError as e:
        return _fail(command, str(e))
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
