"""diffmem.distributed.softmax_mean on gloo ranks, each holding an equal shard of the points,
against one process holding them all (part of ``diffmem bench --datasets``).

    python benchmarks/distributed_bench.py [--quick] [--size B,N,d] [--world 2] [--backward]
    python -m diffmem.tools.bench.sharded ...   (the same)

starts its ranks itself (subprocesses joined through a file store), then times the single
process. Ranks use --rank-threads threads each (default 1) and the single process
--single-threads (default 2): on a 2-core machine both use the same cores. Times are medians
over --reps repetitions after a warm-up; a rank's time is the slowest rank's (all_reduce MAX).
Appends a JSON row to runs/bench/distributed-cpu.jsonl (relative to the working directory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ...ops import distributed as sharded_ops
from ...ops import softmax_mean

DEFAULT_SIZE = (16, 50000, 3072)
QUICK_SIZE = (16, 5000, 512)
RESULTS = Path("runs") / "bench" / "distributed-cpu.jsonl"


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        B, N, d = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--size must be B,N,d (three integers), got {text!r}") from None
    return B, N, d


def shard_bounds(N: int, world: int) -> list[tuple[int, int]]:
    return [(N * r // world, N * (r + 1) // world) for r in range(world)]


def make_points(N: int, d: int, bounds: list[tuple[int, int]], which: list[int], seed: int):
    """The rows of the given shards of an (N, d) float32 standard normal set; each shard is
    drawn from its own seed, so a rank and the single process see the same rows."""
    parts = []
    for s in which:
        start, stop = bounds[s]
        gen = torch.Generator().manual_seed(seed * 1000 + s)
        parts.append(torch.randn(stop - start, d, generator=gen))
    return torch.cat(parts)


def make_queries(B: int, d: int, seed: int, t: float = 0.5):
    """VP queries at noise t around fresh (held-out) standard normal points."""
    gen = torch.Generator().manual_seed(seed + 7)
    alpha = (1 - t * t) ** 0.5
    x = alpha * torch.randn(B, d, generator=gen) + t * torch.randn(B, d, generator=gen)
    return x, alpha, t * t


def time_calls(call, reps: int, sync=lambda: None) -> list[float]:
    """Seconds per call, after one warm-up call."""
    call()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def step(fn, x, points, alpha, var, backward: bool, **options):
    """One forward (and backward w.r.t. x and the points) of fn."""
    if not backward:
        with torch.no_grad():
            fn(x, points, alpha, var, **options)
        return
    xg, pg = x.clone().requires_grad_(), points.clone().requires_grad_()
    fn(xg, pg, alpha, var, **options).sum().backward()


def run_rank(args) -> None:
    torch.set_num_threads(args.rank_threads)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(minutes=10))
    B, N, d = args.size
    points = make_points(N, d, shard_bounds(N, args.world), [args.rank], args.seed)
    x, alpha, var = make_queries(B, d, args.seed)
    result = {}
    for backward in ([False, True] if args.backward else [False]):
        times = []
        for t in time_calls(lambda b=backward: step(sharded_ops.softmax_mean, x,
                                                    points, alpha, var, b,
                                                    precision=args.precision),
                            args.reps, sync=dist.barrier):
            slowest = torch.tensor([t], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times.append(float(slowest))
        result["fwd_bwd" if backward else "fwd"] = times
    if args.rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run_ranks(args) -> dict:
    """Start the ranks (this script with --rank) and return rank 0's timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        common = [sys.executable, "-m", "diffmem.tools.bench.sharded",
                  "--size", ",".join(map(str, args.size)),
                  "--world", str(args.world), "--reps", str(args.reps),
                  "--rank-threads", str(args.rank_threads), "--precision", args.precision,
                  "--seed", str(args.seed), "--store", str(Path(tmp) / "store"), "--out",
                  str(out)] + (["--backward"] if args.backward else [])
        procs = [subprocess.Popen(common + ["--rank", str(r)]) for r in range(args.world)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a rank failed (exit codes {codes})")
        return json.loads(out.read_text())


def run_single(args) -> dict:
    torch.set_num_threads(args.single_threads)
    B, N, d = args.size
    points = make_points(N, d, shard_bounds(N, args.world), list(range(args.world)), args.seed)
    x, alpha, var = make_queries(B, d, args.seed)
    result = {}
    for backward in ([False, True] if args.backward else [False]):
        result["fwd_bwd" if backward else "fwd"] = time_calls(
            lambda b=backward: step(softmax_mean, x, points, alpha, var, b,
                                    precision=args.precision), args.reps)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffmem.tools.bench.sharded",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=None,
                    help=f"B,N,d (default {','.join(map(str, DEFAULT_SIZE))}; --quick "
                         f"{','.join(map(str, QUICK_SIZE))})")
    ap.add_argument("--quick", action="store_true", help="the small size")
    ap.add_argument("--world", type=int, default=2, help="number of ranks (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    ap.add_argument("--rank-threads", type=int, default=1, help="threads per rank (default 1)")
    ap.add_argument("--single-threads", type=int, default=2,
                    help="threads of the single process (default 2)")
    ap.add_argument("--precision", default="exact", choices=("exact", "fast"))
    ap.add_argument("--backward", action="store_true",
                    help="also time forward + backward (gradients w.r.t. x and the points)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"rows appended (default {RESULTS})")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    if args.rank is not None:
        run_rank(args)
        return 0

    B, N, d = args.size
    print(f"diffmem.distributed.softmax_mean, (B, N, d) = ({B}, {N}, {d}) float32 "
          f"{args.precision}: {args.world} gloo ranks x {args.rank_threads} thread(s), each "
          f"N/{args.world} points, against 1 process x {args.single_threads} threads; median of "
          f"{args.reps} after a warm-up", flush=True)
    ranks = run_ranks(args)
    single = run_single(args)
    row = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__, "B": B, "N": N, "d": d, "precision": args.precision,
           "world": args.world, "rank_threads": args.rank_threads,
           "single_threads": args.single_threads, "reps": args.reps}
    for key, label in (("fwd", "forward"), ("fwd_bwd", "forward + backward")):
        if key not in ranks:
            continue
        t_dist, t_single = statistics.median(ranks[key]), statistics.median(single[key])
        print(f"{label:>20}: {args.world} ranks {t_dist * 1e3:9.1f} ms | 1 process "
              f"{t_single * 1e3:9.1f} ms | single / distributed {t_single / t_dist:5.2f}")
        row.update({f"{key}_ranks_ms": t_dist * 1e3, f"{key}_single_ms": t_single * 1e3})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"appended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
