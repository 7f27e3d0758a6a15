"""Timing one size: every method's calls interleaved round-robin, then each method's errors
against float64 and its peak extra memory (cpu: RSS high-water; cuda: the allocator's peak);
the results are Rows with the time ratios filled in."""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .problems import make_problem, reference_mean, row_errors


class Device:
    """Synchronization and peak-memory measurement for cpu or cuda."""

    def __init__(self, name: str):
        self.name = name
        if name == "cuda":
            self.memory_how = ("torch.cuda.max_memory_allocated() during one call (after "
                               "warmup) minus memory_allocated() before it")
        elif self._can_reset_rss_peak():
            self.memory_how = ("process RSS high-water (VmHWM, reset via /proc/self/clear_refs "
                               "after gc + malloc_trim) during one call after warmup, minus RSS "
                               "before it; counts all allocations, including C++ kernels'")
        else:
            self.memory_how = "not measured (/proc/self/clear_refs is not writable here)"

    def sync(self):
        if self.name == "cuda":
            torch.cuda.synchronize()

    @staticmethod
    def _can_reset_rss_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def peak_extra(self, call: Callable[[], object]) -> tuple[object, float | None]:
        """Run call once; return its result and the peak extra memory in bytes (None if n/a)."""
        gc.collect()
        if self.name == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = call()
            self.sync()
            return out, float(torch.cuda.max_memory_allocated() - base)
        if not self.memory_how.startswith("process RSS"):
            return call(), None
        try:
            ctypes.CDLL(None).malloc_trim(0)  # return freed heap pages, so reuse shows as growth
        except (OSError, AttributeError):
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = self._status_kb("VmRSS")
        out = call()
        return out, float(self._status_kb("VmHWM") - base) * 1024


@dataclass
class Timed:
    """One call being timed for a row (or, with fwd_only, the forward alone of a backward row)."""

    row: Row
    call: Callable[[], object]
    fwd_only: bool = False
    times: list = field(default_factory=list)
    out: object = None


def time_interleaved(entries: list[Timed], dev: Device, budget: float, min_reps: int,
                     max_reps: int = 100):
    """Warm every call up once, then time them round-robin until each has its repetitions.

    A call keeps getting repetitions while it has fewer than min_reps, or while its timed total
    is under `budget` seconds and it has fewer than max_reps. Interleaving the methods spreads
    the load of a shared machine evenly over them, so their ratios are steadier than with
    back-to-back series. A call that raises marks its row as an error and stops.
    """
    for e in entries:
        _attempt(e, dev)
    while True:
        pending = [e for e in entries if e.row.status == "ok" and (
            len(e.times) < min_reps or (sum(e.times) < budget and len(e.times) < max_reps))]
        if not pending:
            return
        for e in pending:
            t0 = time.perf_counter()
            if _attempt(e, dev):
                e.times.append(time.perf_counter() - t0)


def _attempt(e: Timed, dev: Device) -> bool:
    try:
        e.out = e.call()
        dev.sync()
        return True
    except Exception as exc:  # report and keep going: one broken method must not hide the rest
        _fail(e.row, exc)
        return False


def _fail(row: Row, exc: Exception):
    row.status = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]


@dataclass
class Row:
    B: int
    N: int
    d: int
    method: str
    kind: str
    backward: bool
    status: str = "ok"
    median_s: float | None = None
    min_s: float | None = None
    reps: int = 0
    fwd_s: float | None = None  # backward rows: forward alone
    err: dict = field(default_factory=dict)  # sigma -> (median, max)
    peak_bytes: float | None = None
    ratio_best: float | None = None
    ratio_floor: float | None = None
    ratio_direct: float | None = None

    @property
    def gflops(self):
        if self.median_s is None or self.backward:
            return None
        return 4 * self.B * self.N * self.d / self.median_s / 1e9

    @property
    def bwd_over_fwd(self):
        if not self.backward or self.median_s is None or not self.fwd_s:
            return None
        return (self.median_s - self.fwd_s) / self.fwd_s


def run_size(size, methods, args, dev: Device) -> list[Row]:
    """Time all methods interleaved at args.time_sigma, then per method: errors and peak
    memory."""
    B, N, d = size
    t_sigma = args.time_sigma
    problems = {s: make_problem(B, N, d, s, device=dev.name, seed=args.seed, bias=args.bias)
                for s in {t_sigma, *args.error_sigmas}}
    refs = {s: reference_mean(problems[s], args.error_rows) for s in args.error_sigmas}
    p_time = problems[t_sigma]
    rows, entries = [], []
    for m in methods:
        row = Row(B, N, d, m.name, m.kind, m.backward)
        rows.append(row)
        need = m.mem(B, N, d)
        if m.skip:
            row.status = f"skipped: {m.skip}"
        elif need > args.max_mem_gb * 2**30:
            row.status = f"skipped: needs ~{need / 2**30:.1f} GiB > --max-mem-gb {args.max_mem_gb}"
        else:
            entries.append(Timed(row, m.setup(p_time)))
            if m.backward:
                entries.append(Timed(row, m.setup_fwd(p_time), fwd_only=True))
    print(f"  {size}: timing {len(entries)} calls interleaved", file=sys.stderr, flush=True)
    time_interleaved(entries, dev, args.budget, args.min_reps)
    _collect(entries, t_sigma, refs.get(t_sigma))
    del entries  # frees the floor's buffers and all outputs before measuring memory

    # Sigmas needing one more call each; the first such call also measures the peak memory.
    extra = [s for s in args.error_sigmas if s != t_sigma] or [t_sigma]
    for m, row in zip(methods, rows):
        if row.status != "ok":
            continue
        try:
            for i, s in enumerate(extra if _has_error(row) else extra[:1]):
                call = lambda p=problems[s], m=m: m.setup(p)()  # noqa: E731 (setup counts as memory)
                if i == 0:
                    out, row.peak_bytes = dev.peak_extra(call)
                else:
                    out = call()
                if _has_error(row):
                    row.err[s] = row_errors(out, refs[s])
                del out
        except Exception as exc:
            _fail(row, exc)
        print(f"  {size}  {m.name:<32} {row.status if row.status != 'ok' else _ms(row.median_s)}",
              file=sys.stderr, flush=True)
    _ratios(rows)
    return rows


def _collect(entries: list[Timed], sigma: float, ref: torch.Tensor | None):
    """Store the timings (and the error at the timing sigma when ref is given) in the rows."""
    for e in entries:
        if e.row.status != "ok":
            continue
        if e.fwd_only:
            e.row.fwd_s = statistics.median(e.times)
            continue
        e.row.median_s, e.row.min_s = statistics.median(e.times), min(e.times)
        e.row.reps = len(e.times)
        if _has_error(e.row) and ref is not None:
            e.row.err[sigma] = row_errors(e.out, ref)


def _has_error(row: Row) -> bool:
    """Rows whose output is a mean to compare with the reference."""
    return not row.backward and row.kind != "floor"


def _ratios(rows: list[Row]):
    """Fill time ratios to the best baseline (same pass), to the floor and to naive-direct."""
    done = [r for r in rows if r.median_s is not None]
    floor = next((r.median_s for r in done if r.kind == "floor"), None)
    direct = next((r.median_s for r in done if r.method == "torch-naive-direct"), None)
    for backward in (False, True):
        same = [r for r in done if r.backward == backward]
        base = [r.median_s for r in same if r.kind == "baseline"]
        best = min(base) if base else None
        for r in same:
            r.ratio_best = r.median_s / best if best else None
            if not backward:
                r.ratio_floor = r.median_s / floor if floor else None
                r.ratio_direct = r.median_s / direct if direct else None


def _ms(s):
    return "" if s is None else f"{s * 1e3:.1f} ms"


__all__ = ["Device", "Row", "Timed", "run_size", "time_interleaved"]
