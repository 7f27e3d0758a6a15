"""Worst-case errors of each backend and precision on the input classes of the accuracy test.

    python benchmarks/accuracy_table.py [--dims 3072,12288] [--cases 6] [--backends cpu,triton]
        [--precisions exact,fast] [--budget 2e7]

For each input class of tests/ops/test_accuracy_classes.py and each d, draws seeded cases (N and B
as in the test, shrunk to the size budget), compares with the float64 reference and prints the
worst mean error (relative Frobenius) and lse error (|error| / max(1, |lse|)) as a Markdown
table. Slow emulations (Triton interpreter, CUDA host emulator) want a small --budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import diffmem

_TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(_TESTS), str(_TESTS / "ops")]
import test_accuracy_classes as classes  # noqa: E402
from conftest import lse_err, rel_fro  # noqa: E402


def worst(backend: str, precision: str, name: str, d: int, cases: int, budget: float):
    em = el = 0.0
    for i in range(cases):
        gen = torch.Generator().manual_seed(7919 * i + d)
        N = max(1, min(classes.N_MAX, int(classes._log_uniform(gen, 1.0, classes.N_MAX + 1.0))))
        B = int(torch.randint(1, classes.B_MAX + 1, (), generator=gen))
        N = max(1, min(N, int(budget // (B * d))))
        y, x, alpha, var = classes.CLASSES[name](gen, d, N, B)
        x, y, alpha, var = (t.float() for t in (x, y, alpha, var))
        mean, lse = diffmem.softmax_mean(x, y, alpha, var, backend=backend, precision=precision,
                                         return_lse=True)
        want_mean, want_lse = diffmem.softmax_mean(x.double(), y.double(), alpha.double(),
                                                   var.double(), backend="reference",
                                                   return_lse=True)
        em, el = max(em, rel_fro(mean, want_mean)), max(el, lse_err(lse, want_lse))
    return em, el


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="3072,12288")
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--backends", default="cpu")
    ap.add_argument("--precisions", default="exact,fast")
    ap.add_argument("--budget", type=float, default=2e7)
    args = ap.parse_args(argv)
    dims = [int(v) for v in args.dims.split(",")]
    cols = [(b, p, d) for b in args.backends.split(",") for p in args.precisions.split(",")
            for d in dims]
    print("| class | " + " | ".join(f"{b} {p} d={d}: mean / lse" for b, p, d in cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name in classes.CLASSES:
        cells = []
        for b, p, d in cols:
            em, el = worst(b, p, name, d, args.cases, args.budget)
            cells.append(f"{em:.1e} / {el:.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
