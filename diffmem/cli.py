"""The ``diffmem`` command.

    diffmem            the built-in default: ``diffmem demo``
    diffmem demo       the op on a memorization-style problem: accuracy of each backend and
                       precision against float64 across noise levels, then a quick benchmark
    diffmem bench ...  the comparison benchmark (see ``diffmem bench --help``)
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(quick=not args.full)


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(rest) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="diffmem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="accuracy across noise levels and a quick benchmark")
    demo.add_argument("--full", action="store_true", help="run the full benchmark, not the quick one")
    sub.add_parser("bench", help="the comparison benchmark; options: diffmem bench --help",
                   add_help=False)
    if argv and argv[0] == "bench":
        return _bench(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        if args.command is None:
            args.full = False
        return _demo(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
