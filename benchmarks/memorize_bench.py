"""``diffmem memorize`` at CIFAR-10 size: a Gaussian mixture of N = 50,000 points in d = 3072,
stored as float32 and as uint8 codes, and the time per DDIM step of the memorizing denoiser
(and of the true mixture, for scale).

    python benchmarks/memorize_bench.py [--samples 50000] [--dim 3072] [--num-samples 16]
                                        [--steps 5] [--threads 2] [--device cpu]

Each storage is one ``diffmem memorize --data gmm`` run in a temporary folder (no partially
memorizing denoisers); the table goes to stdout and one JSON row per storage, with the runtime
record (device, backend, commit), is appended to runs/bench/memorize.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from diffmem.cli import main as diffmem_main

RESULTS = Path("runs/bench/memorize.jsonl")


def run_one(args, storage: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="memorize-bench-") as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        code = diffmem_main([
            "memorize", "--data", "gmm", "--samples", str(args.samples), "--dim", str(args.dim),
            "--components", str(args.components), "--storage", storage, "--fractions", "",
            "--num-samples", str(args.num_samples), "--steps", str(args.steps),
            "--threads", str(args.threads), "--device", args.device, "--no-plots",
            "--out", str(out)])
        if code:
            raise SystemExit(code)
        results = json.loads((out / "results.json").read_text())
    dens = results["denoisers"]
    return {"storage": storage, "N": args.samples, "d": args.dim,
            "num_samples": args.num_samples, "steps": args.steps, "threads": args.threads,
            "memorizing_s_per_step": dens["memorizing"]["seconds_per_step"],
            "memorizing_cpu_s_per_step": dens["memorizing"]["cpu_seconds_per_step"],
            "true_mixture_s_per_step": dens["generalizing_true_mixture"]["seconds_per_step"],
            "true_mixture_cpu_s_per_step":
                dens["generalizing_true_mixture"]["cpu_seconds_per_step"],
            "memorization_ratio": dens["memorizing"]["memorization_ratio"],
            "run_seconds": time.perf_counter() - start, "runtime": results["runtime"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--components", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    rows = [run_one(args, storage) for storage in ("float32", "uint8")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    print(f"diffmem memorize, gmm N = {args.samples}, d = {args.dim}, {args.num_samples} "
          f"samples, {args.steps} DDIM steps, {args.threads} threads, {args.device} "
          f"({rows[0]['runtime']['backend']} backend)")
    print("| storage | memorizing: s per step | CPU s | true mixture: s per step | CPU s | "
          "ratio | run s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['storage']} | {r['memorizing_s_per_step']:.3f} | "
              f"{r['memorizing_cpu_s_per_step']:.3f} | "
              f"{r['true_mixture_s_per_step']:.4f} | {r['true_mixture_cpu_s_per_step']:.4f} | "
              f"{r['memorization_ratio']:.2f} | "
              f"{r['run_seconds']:.0f} |")
    wall, cpu = (rows[1][k] / rows[0][k] for k in ("memorizing_s_per_step",
                                                    "memorizing_cpu_s_per_step"))
    print(f"uint8 / float32 time per step: {wall:.2f} (wall), {cpu:.2f} (CPU)")
    print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
