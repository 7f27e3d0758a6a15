"""Do the experiments give the same results on a GPU as on the CPU? Runs a small
phase-transition and a small ``diffmem memorize`` once with --device cpu and once with
--device cuda (auto backend, exact precision), then compares the results JSONs: memorization
ratios and copy counts must be equal, losses and distances equal up to the op's exact-mode
bound. Exit status 1 when a check fails, 0 otherwise.

    python benchmarks/device_agreement.py --out DIR [--device cuda]

On a machine without a GPU it stops with a one-line message (exit 2); ``--device cpu`` compares
the CPU with itself (a check of this script).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from diffmem.cli import main as diffmem_main

PHASE = ["phase-transition", "--dim", "10", "--components", "2", "--samples", "20",
         "--val-samples", "10", "--eval-samples", "50", "--steps", "600", "--warmup", "60",
         "--draws", "4", "--eval-draws", "4", "--baseline-step", "10", "--no-refine",
         "--quiet", "--no-plots"]
MEMORIZE = ["memorize", "--num-samples", "32", "--steps", "30", "--quiet", "--no-plots"]
LOSS_RTOL = 1e-4  # exact mode: 1e-5 relative per op call, summed over a few calls


def _run(args: list[str], out: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    code = diffmem_main([*args, "--out", str(out)])
    if code != 0:
        raise SystemExit(f"diffmem {args[0]} --out {out} failed with exit code {code}")
    name = "results.json"
    return json.loads((out / name).read_text()), time.perf_counter() - start


def _close(a, b, rtol: float) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)


def compare_phase(cpu: dict, gpu: dict) -> list[str]:
    """Failed checks between two phase-transition results."""
    bad = []
    for m, c in cpu["trained"].items():
        g = gpu["trained"][m]
        if c["memorization_ratio"] != g["memorization_ratio"]:
            bad.append(f"M={m}: ratio {c['memorization_ratio']} (cpu) != "
                       f"{g['memorization_ratio']} (gpu)")
        for key in ("train_loss", "val_loss"):
            if not _close(c[key], g[key], LOSS_RTOL):
                bad.append(f"M={m}: {key} differs beyond {LOSS_RTOL:g}")
    if cpu["transition"] != gpu["transition"]:
        bad.append(f"transition {cpu['transition']} != {gpu['transition']}")
    return bad


def compare_memorize(cpu: dict, gpu: dict) -> list[str]:
    """Failed checks between two memorize results."""
    bad = []
    for name, c in cpu["denoisers"].items():
        g = gpu["denoisers"][name]
        for key in ("memorization_ratio", "distinct_copied", "copies_outside_points"):
            if c.get(key) != g.get(key):
                bad.append(f"{name}: {key} {c.get(key)} (cpu) != {g.get(key)} (gpu)")
        if not _close(c["median_d1_over_d2"], g["median_d1_over_d2"], LOSS_RTOL):
            bad.append(f"{name}: median d1/d2 differs beyond {LOSS_RTOL:g}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the four runs")
    ap.add_argument("--device", default="cuda", help="the GPU device to compare (default cuda)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("device_agreement: error: no CUDA GPU here", file=sys.stderr)
        return 2
    failed = []
    for label, command, compare in (("phase-transition", PHASE, compare_phase),
                                    ("memorize", MEMORIZE, compare_memorize)):
        cpu, t_cpu = _run([*command, "--device", "cpu"], args.out / f"{label}-cpu")
        gpu, t_gpu = _run([*command, "--device", args.device], args.out / f"{label}-gpu")
        bad = compare(cpu, gpu)
        print(f"{label}: cpu {t_cpu:.1f} s, {args.device} {t_gpu:.1f} s "
              f"({gpu['runtime']['device_name']}, backend {gpu['runtime']['backend']}): "
              f"{'agree' if not bad else f'{len(bad)} differences'}")
        for line in bad[:20]:
            print("   ", line)
        failed += bad
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
