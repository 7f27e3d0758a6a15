"""``diffmem bench`` (and ``python benchmarks/compare.py``): options, the header that explains
the columns, then per size the timing, the table and the CSV (rewritten after every size)."""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import torch

from ... import __version__
from . import datasets
from .datasets import DATASET_SIZES
from .methods import build_methods
from .problems import TIME_SIGMA
from .report import print_table, write_csv
from .timing import Device, run_size

SIZES = [(256, 10000, 64), (256, 100000, 64), (64, 50000, 3072), (1024, 20000, 32)]
ERROR_SIGMAS = (0.5, 0.01)  # default of --error-sigmas
DEFAULT_CSV_DIR = Path("runs") / "bench"  # relative to the working directory


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """'256,10000,64;1024,20000,32' -> [(256, 10000, 64), (1024, 20000, 32)]."""
    sizes = []
    for part in text.replace(" ", "").split(";"):
        if part:
            vals = tuple(int(v) for v in part.lower().replace("x", ",").split(","))
            if len(vals) != 3 or min(vals) < 1:
                raise argparse.ArgumentTypeError(f"a size is B,N,d (positive), got {part!r}")
            sizes.append(vals)
    return sizes


def parse_sigmas(text: str) -> list[float]:
    """'0.5,0.01' -> [0.5, 0.01]; each sigma in (0, 1) since alpha = sqrt(1 - sigma^2)."""
    sigmas = [float(v) for v in text.split(",") if v.strip()]
    if not sigmas or not all(0 < s < 1 for s in sigmas):
        raise argparse.ArgumentTypeError(f"sigmas must lie in (0, 1), got {text!r}")
    return list(dict.fromkeys(sigmas))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="diffmem bench",
        description="Time diffmem.softmax_mean against torch baselines (naive, chunked, SDPA; "
                    "jax.jit of the matmul form when jax is installed) and the bare-matmul "
                    "floor; print a table per size and write a CSV.")
    ap.add_argument("--sizes", type=parse_sizes, default=None,
                    help='sizes "B,N,d;B,N,d" (default: the four standard sizes '
                         + "; ".join(",".join(map(str, s)) for s in SIZES) + ")")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--methods", default="*",
                    help='comma-separated glob patterns of method names, e.g. '
                         '"diffmem-*,torch-naive*,matmul-floor" (default: all)')
    ap.add_argument("--include-reference", action="store_true",
                    help="also time the slow float64 'reference' backend")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: >= 1 repetition and a 0.25 s budget per method")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed repetitions per method (default 1.5, --quick 0.25)")
    ap.add_argument("--min-reps", type=int, default=None,
                    help="minimum timed repetitions (default 3, --quick 1)")
    ap.add_argument("--error-sigmas", type=parse_sigmas, default=list(ERROR_SIGMAS),
                    help="sigmas at which errors are measured (default 0.5,0.01; at these sizes "
                         "the weights are one-hot there, add 0.9 to see spread-out weights)")
    ap.add_argument("--error-rows", type=int, default=16,
                    help="rows compared with the float64 reference (default 16)")
    ap.add_argument("--max-mem-gb", type=float, default=6.0,
                    help="skip a method whose expected extra memory exceeds this (default 6)")
    ap.add_argument("--bias", action="store_true", help="add random per-point log-weights")
    ap.add_argument("--no-check-inputs", dest="check_inputs", action="store_false",
                    help="call diffmem with check_inputs=False (default: the library default, "
                         "True, whose NaN/Inf scan is part of the timed call)")
    ap.add_argument("--datasets", action="store_true",
                    help="instead: the exact forward at data-set sizes (default "
                         + "; ".join(",".join(map(str, s)) for s in DATASET_SIZES)
                         + ") with float32, bfloat16 and uint8 points, against the memory "
                         "bandwidth of a copy measured in the same run (--sizes overrides the "
                         "sizes); writes runs/bench/datasets-<device>.json")
    ap.add_argument("--time-sigma", type=float, default=TIME_SIGMA,
                    help=f"noise level of the timed inputs (default {TIME_SIGMA}: the weights are "
                         "one-hot at these sizes, so the cpu kernels skip most weighted sums; "
                         "0.9 spreads them out)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of torch and of the cpu backend (default: torch's; jax keeps "
                         "its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", type=Path, default=None,
                    help="output CSV (default benchmarks/results/compare-<device>.csv)")
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = DATASET_SIZES if args.datasets else SIZES
    if args.budget is None:
        args.budget = 0.25 if args.quick else 1.5
    if args.min_reps is None:
        args.min_reps = 1 if args.quick else 3
    if not 0.0 < args.time_sigma < 1.0:
        ap.error(f"--time-sigma must lie in (0, 1) (VP noise level), got {args.time_sigma}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.csv is None:
        args.csv = DEFAULT_CSV_DIR / f"compare-{args.device}.csv"
    return args


def main(argv=None) -> int:
    """Entry point (also for the `diffmem bench` CLI): run, print the tables, write the CSV."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available to torch", file=sys.stderr)
        return 2
    if args.datasets:
        datasets.run(args.device, args.sizes, DEFAULT_CSV_DIR / f"datasets-{args.device}.json",
                     quick=args.quick)
        return 0
    dev = Device(args.device)
    patterns = [p.strip() for p in args.methods.split(",") if p.strip()]
    methods = [m for m in build_methods(args.device, args.include_reference, args.check_inputs)
               if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]
    if not methods:
        print(f"no method matches --methods {args.methods!r}", file=sys.stderr)
        return 2
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(f"diffmem {__version__}, torch {torch.__version__}, device {args.device}{gpu}, "
          f"{torch.get_num_threads()} threads, float32")
    print(f"inputs: VP queries x = alpha*y[j] + sigma*noise, y ~ N(0, I); alpha = sqrt(1-sigma^2), "
          f"var = sigma^2 are scalars shared by all queries (keeps cdist/SDPA simple); "
          f"bias: {'N(0,1) per point' if args.bias else 'none'}; diffmem check_inputs="
          f"{args.check_inputs}")
    print(f"time: median of >= {args.min_reps} reps after 1 warmup (more while under "
          f"{args.budget} s in all), methods interleaved round-robin, "
          f"at sigma = {args.time_sigma}; "
          "GFLOP/s counts 4*B*N*d per forward")
    print("/best: time / best non-diffmem method of the same pass (fwd or fwd+bwd); "
          "/floor: time / matmul-floor (x@y.T and P@y alone)")
    sigmas = ", ".join(map(str, args.error_sigmas))
    print(f"e<sigma>: per-row ||mean - ref|| / ||ref|| over the first {args.error_rows} rows, "
          f"ref in float64; median and max over rows, at sigma {sigmas} (0 where the weights "
          "are one-hot in float32)")
    print(f"peak MB: {dev.memory_how}")
    print("bwd/fwd: (fwd+bwd - fwd) / fwd for *-backward rows (mean.sum() + lse.sum() w.r.t. "
          "x, points, alpha, var); their ms column is fwd+bwd", flush=True)
    all_rows = []
    for size in args.sizes:
        rows = run_size(size, methods, args, dev)
        all_rows += rows
        print_table(rows, args.error_sigmas)
        sys.stdout.flush()
        # Rewritten after every size, so an interrupted run keeps what it measured.
        write_csv(args.csv, all_rows, dev, args.error_sigmas, args.time_sigma)
    print(f"\nwrote {args.csv}")
    return 0


__all__ = ["SIZES", "main", "parse_args", "parse_sizes", "parse_sigmas"]


if __name__ == "__main__":
    sys.exit(main())
