"""The benchmark's output: a table per size on stdout (with the speed-ups of the diffmem rows)
and every row in a CSV file."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import torch

from ...files import atomic_write
from .timing import Device, Row


def _fmt(v, spec, width):
    return ("-" if v is None else format(v, spec)).rjust(width)


def print_table(rows: list[Row], sigmas, out=sys.stdout):
    """One size: a line per method that ran, then the skipped ones grouped by reason."""
    B, N, d = rows[0].B, rows[0].N, rows[0].d
    print(f"\n(B, N, d) = ({B}, {N}, {d})   forward = {4 * B * N * d / 1e9:.2f} GFLOP", file=out)
    err_head = "".join(f" {f'e{s:g} med':>9} {f'e{s:g} max':>9}" for s in sigmas)
    head = (f"{'method':<32} {'ms':>9} {'GFLOP/s':>8} {'/best':>6} {'/floor':>6}{err_head} "
            f"{'peak MB':>8} {'bwd/fwd':>7}")
    print(head, file=out)
    print("-" * len(head), file=out)
    skipped: dict[str, list[str]] = {}
    for r in rows:
        if r.status != "ok":
            skipped.setdefault(r.status, []).append(r.method)
            continue
        errs = "".join(f" {_fmt(v, '.1e', 9)}" for s in sigmas for v in r.err.get(s, (None, None)))
        peak = None if r.peak_bytes is None else r.peak_bytes / 2**20
        print(f"{r.method:<32} {r.median_s * 1e3:>9.2f} {_fmt(r.gflops, '.1f', 8)} "
              f"{_fmt(r.ratio_best, '.2f', 6)} {_fmt(r.ratio_floor, '.2f', 6)}{errs} "
              f"{_fmt(peak, '.1f', 8)} {_fmt(r.bwd_over_fwd, '.2f', 7)}", file=out)
    for status, names in skipped.items():
        print(f"  {status.split(':')[0]} {', '.join(names)}:{status.split(':', 1)[1]}", file=out)
    _print_speedups(rows, out)


def _print_speedups(rows: list[Row], out):
    """A line per diffmem row: speedup (time ratio) over the best baseline and naive-direct."""
    done = [r for r in rows if r.median_s is not None]
    for backward in (False, True):
        base = [r for r in done if r.kind == "baseline" and r.backward == backward]
        if not base:
            continue
        best = min(base, key=lambda r: r.median_s)
        direct = next((r for r in base if r.method == "torch-naive-direct"), None)
        for r in done:
            if r.kind == "diffmem" and r.backward == backward:
                line = (f"  {r.method}: speedup {best.median_s / r.median_s:.2f}x over the best "
                        f"baseline ({best.method})")
                if direct is not None:
                    line += f", {direct.median_s / r.median_s:.2f}x over torch-naive-direct"
                print(line, file=out)


def write_csv(path: Path, rows: list[Row], dev: Device, sigmas, time_sigma: float):
    """Write all rows to path atomically (diffmem.files.atomic_write); time_sigma: the noise
    level of the timed inputs."""
    ms = lambda s: None if s is None else round(s * 1e3, 4)  # noqa: E731
    text = io.StringIO(newline="")
    err_fields = [f"err_sigma{s:g}_{k}" for s in sigmas for k in ("median", "max")]
    fields = ["device", "B", "N", "d", "time_sigma", "method", "kind", "pass", "status",
              "median_ms", "min_ms", "reps", "gflops", "ratio_best", "ratio_floor",
              "ratio_naive_direct", "fwd_ms", "bwd_over_fwd", *err_fields,
              "peak_extra_mb", "threads", "torch", "memory_measured_by"]
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    for r in rows:
        errs = {f"err_sigma{s:g}_{k}": r.err.get(s, (None, None))[i]
                for s in sigmas for i, k in enumerate(("median", "max"))}
        w.writerow({
            "device": dev.name, "B": r.B, "N": r.N, "d": r.d, "time_sigma": time_sigma,
            "method": r.method,
            "kind": r.kind, "pass": "fwd+bwd" if r.backward else "fwd",
            "status": r.status, "median_ms": ms(r.median_s), "min_ms": ms(r.min_s),
            "reps": r.reps, "gflops": r.gflops, "ratio_best": r.ratio_best,
            "ratio_floor": r.ratio_floor, "ratio_naive_direct": r.ratio_direct,
            "fwd_ms": ms(r.fwd_s), "bwd_over_fwd": r.bwd_over_fwd,
            **errs,
            "peak_extra_mb": None if r.peak_bytes is None else r.peak_bytes / 2**20,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "memory_measured_by": dev.memory_how,
        })
    atomic_write(path, text.getvalue().encode())


__all__ = ["print_table", "write_csv"]
