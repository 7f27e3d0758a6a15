"""Compare diffmem.softmax_mean with plain-torch ways of computing the same softmax-weighted mean.

For each size (B, N, d) it times, in one run and on the same inputs:

* ``diffmem-<backend>-<precision>``: every available diffmem backend serving the device, both
  precisions ("reference" only with --include-reference: it is slow);
* ``torch-naive``: torch.cdist (default mm mode) squared -> logits -> softmax -> matmul;
* ``torch-naive-direct``: the same with cdist's direct-difference mode;
* ``torch-chunked``: a loop over point chunks with an online (max, sum, acc) merge, matmul form;
* ``sdpa-fold``: scaled_dot_product_attention with the per-point term folded into an extra
  dimension of q and k;
* ``sdpa-mask``: scaled_dot_product_attention with the per-point term as a (1, N) attn_mask;
* ``matmul-floor``: the two bare products x @ y.T and P @ y of the same shapes (a floor, not a
  competitor);
* ``*-backward``: forward + backward of mean.sum() + lse.sum() w.r.t. x, points, alpha and var,
  for each diffmem backend/precision and for torch-naive under autograd.

It prints, per size, the median time, GFLOP/s (4*B*N*d per forward), the ratio to the best
non-diffmem method and to the floor, the per-row relative error against float64 at sigma = 0.5
and 0.01 (median and max over rows), and the peak extra memory; and it writes the table to a CSV.

Inputs are VP-process queries: points y ~ N(0, I), x = alpha*y[j] + sigma*noise with random j,
alpha = sqrt(1 - sigma^2), var = sigma^2. Timing uses sigma = 0.5. alpha and var are scalars
shared by all queries, so that the cdist/SDPA baselines stay simple.

Timing: one warmup call each, then the methods of a size run round-robin (so the load of a
shared machine falls on all of them alike) until each has >= 3 repetitions and, within
--budget seconds, up to 100; the median is reported. Peak memory on CPU is the RSS high-water
of one further call (reset through /proc/self/clear_refs), so it counts C++ allocations too;
on CUDA it is torch.cuda.max_memory_allocated.

Usage (``diffmem bench ...`` and ``python benchmarks/compare.py ...`` are the same):
    python benchmarks/compare.py                      # the four standard sizes, CPU
    python benchmarks/compare.py --quick --sizes "256,10000,64;1024,20000,32"
    python benchmarks/compare.py --device cuda --methods "diffmem-*,sdpa-*,matmul-floor"
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import fnmatch
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import diffmem

SIZES = [(256, 10000, 64), (256, 100000, 64), (64, 50000, 3072), (1024, 20000, 32)]
TIME_SIGMA = 0.5
ERROR_SIGMAS = (0.5, 0.01)  # default of --error-sigmas
PRECISIONS = ("exact", "fast")
CHUNK_ELEMENTS = 1 << 22  # logits per chunk of torch-chunked (16 MiB in float32)
DEFAULT_CSV_DIR = Path("runs") / "bench"  # relative to the working directory


# ----------------------------------------------------------------------------------------------
# Inputs and the float64 reference


@dataclass
class Problem:
    """One set of inputs: queries x (B, d), points y (N, d), scalar alpha and var, optional bias."""

    x: torch.Tensor
    y: torch.Tensor
    alpha: float
    var: float
    sigma: float
    bias: Optional[torch.Tensor] = None


def make_problem(B, N, d, sigma, *, device="cpu", seed=0, bias=False) -> Problem:
    """VP-process queries around random points; the same points, indices and noise for any sigma."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(N, d, generator=gen)
    j = torch.randint(N, (B,), generator=gen)
    noise = torch.randn(B, d, generator=gen)
    b = torch.randn(N, generator=gen) if bias else None
    alpha = math.sqrt(1.0 - sigma * sigma)
    x = alpha * y[j] + sigma * noise
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Problem(to(x), to(y), alpha, sigma * sigma, sigma, to(b))


def reference_mean(p: Problem, rows: int) -> torch.Tensor:
    """float64 mean of the first `rows` queries over all points.

    Uses the expansion ||x||^2 - 2 alpha x.y + alpha^2 ||y||^2 in float64: its logit error is
    about 1e-16 * ||x||^2 / var, below 1e-8 for every size here, far under float32 error.
    """
    x, y = p.x[:rows].double(), p.y.double()
    dist = (x * x).sum(1, keepdim=True) - 2 * p.alpha * (x @ y.T) + p.alpha**2 * (y * y).sum(1)
    logits = -dist / (2 * p.var)
    if p.bias is not None:
        logits = logits + p.bias.double()
    return torch.softmax(logits, -1) @ y


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Median and max over rows of ||out_row - ref_row|| / ||ref_row||."""
    out = out[: ref.shape[0]].double()
    err = (out - ref).norm(dim=1) / ref.norm(dim=1)
    return err.median().item(), err.max().item()


# ----------------------------------------------------------------------------------------------
# Baselines (all compute the same mean, in the inputs' dtype)


def _point_term(y, alpha, var, bias):
    """The per-point logit term -alpha^2 ||y||^2 / (2 var) + bias, shape (N,).

    vector_norm reduces without the N x d temporary that (y * y).sum(1) would allocate.
    """
    t = torch.linalg.vector_norm(y, dim=1).square() * (-(alpha * alpha) / (2 * var))
    return t if bias is None else t + bias


def torch_naive(x, y, alpha, var, bias=None, *, direct=False, with_lse=False):
    """cdist -> squared -> logits -> softmax -> matmul, materializing the B x N logits.

    Uses ||x - alpha y|| = alpha ||x / alpha - y|| so as not to copy the points.
    """
    mode = "donot_use_mm_for_euclid_dist" if direct else "use_mm_for_euclid_dist_if_necessary"
    logits = torch.cdist(x / alpha, y, compute_mode=mode).square() * (-(alpha * alpha) / (2 * var))
    if bias is not None:
        logits = logits + bias
    mean = torch.softmax(logits, -1) @ y
    return (mean, torch.logsumexp(logits, -1)) if with_lse else mean


def torch_chunked(x, y, alpha, var, bias=None):
    """Online softmax over chunks of points, logits by the matmul form (||x||^2 cancels)."""
    B, d = x.shape
    N = y.shape[0]
    step = max(1, min(N, CHUNK_ELEMENTS // B))
    q = x * (alpha / var)
    term = _point_term(y, alpha, var, bias)
    m = x.new_full((B,), -math.inf)
    s = x.new_zeros(B)
    acc = x.new_zeros(B, d)
    for start in range(0, N, step):
        yc = y[start : start + step]
        logits = torch.addmm(term[start : start + step], q, yc.T)
        m_new = torch.maximum(m, logits.amax(1))
        scale = torch.exp(m - m_new)
        w = logits.sub_(m_new[:, None]).exp_()
        s = s * scale + w.sum(1)
        acc = torch.addmm(acc * scale[:, None], w, yc)
        m = m_new
    return acc / s[:, None]


def sdpa_fold(x, y, alpha, var, bias=None):
    """SDPA with q' = [alpha x / var, 1], k' = [y, point term], v = y and scale 1."""
    q = torch.cat([x * (alpha / var), x.new_ones(x.shape[0], 1)], 1)
    k = torch.cat([y, _point_term(y, alpha, var, bias)[:, None]], 1)
    return F.scaled_dot_product_attention(q[None], k[None], y[None], scale=1.0)[0]


def sdpa_mask(x, y, alpha, var, bias=None):
    """SDPA with q = alpha x / var, k = v = y, scale 1 and the point term as a (1, N) mask."""
    mask = _point_term(y, alpha, var, bias)[None]
    return F.scaled_dot_product_attention(
        (x * (alpha / var))[None], y[None], y[None], attn_mask=mask, scale=1.0
    )[0]


# ----------------------------------------------------------------------------------------------
# Methods: a setup turns a Problem into a zero-argument call (setup allocations count as memory)


@dataclass
class Method:
    name: str
    kind: str  # "diffmem", "baseline" or "floor"
    setup: Callable[[Problem], Callable[[], Optional[torch.Tensor]]]
    mem: Callable[[int, int, int], int]  # expected peak extra bytes, to skip what cannot fit
    backward: bool = False
    setup_fwd: Optional[Callable] = None  # backward rows: forward only of the same function
    skip: str = ""  # reason it cannot run here


def _scalar(value: float, like: torch.Tensor, grad: bool = False) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device, requires_grad=grad)


def backward_setup(forward):
    """fwd+bwd of mean.sum() + lse.sum() w.r.t. x, points, alpha, var; forward -> (mean, lse)."""

    def setup(p):
        leaves = [p.x.detach().requires_grad_(), p.y.detach().requires_grad_(),
                  _scalar(p.alpha, p.x, True), _scalar(p.var, p.x, True)]

        def call():
            for t in leaves:
                t.grad = None
            mean, lse = forward(*leaves, p.bias)
            (mean.sum() + lse.sum()).backward()

        return call

    return setup


def forward_setup(forward):
    """The forward of a backward row alone, without autograd, for the bwd/fwd ratio."""

    def setup(p):
        alpha, var = _scalar(p.alpha, p.x), _scalar(p.var, p.x)

        def call():
            with torch.no_grad():
                return forward(p.x, p.y, alpha, var, p.bias)[0]

        return call

    return setup


def _simple(fn, **kw):
    """Setup for a baseline fn(x, y, alpha, var, bias) taking the scalars as floats."""
    return lambda p: (lambda: fn(p.x, p.y, p.alpha, p.var, p.bias, **kw))


def _floor_setup(p):
    """x @ y.T and P @ y into preallocated outputs, P a fixed B x N matrix of weights."""
    B, N = p.x.shape[0], p.y.shape[0]
    scores = p.x.new_empty(B, N)
    probs = p.x.new_full((B, N), 1.0 / N)
    out = p.x.new_empty(B, p.x.shape[1])

    def call():
        torch.mm(p.x, p.y.T, out=scores)
        return torch.mm(probs, p.y, out=out)

    return call


def diffmem_forward(backend, precision, check_inputs=True):
    """(x, y, alpha, var, bias) -> (mean, lse) with one diffmem backend and precision."""

    def forward(x, y, alpha, var, bias):
        return diffmem.softmax_mean(x, y, alpha, var, bias, backend=backend, precision=precision,
                                    return_lse=True, check_inputs=check_inputs)

    return forward


def build_methods(device: str, include_reference: bool, check_inputs: bool = True) -> list[Method]:
    """Every method for this device, with a skip reason on those that cannot run."""
    methods = []
    f32 = 4
    for backend, info in diffmem.backends().items():
        skip = ""
        if not info["available"]:
            skip = f"backend unavailable: {info['reason']}"
        elif device not in info["devices"]:
            skip = f"backend runs on {', '.join(info['devices'])}, not {device}"
        elif backend == "reference" and not include_reference:
            skip = "slow float64 oracle; pass --include-reference"
        elif backend == "triton" and device == "cpu":
            skip = "Triton on CPU is the test-only interpreter"
        precisions = ("exact",) if backend == "reference" else PRECISIONS  # reference ignores it
        small = (lambda B, N, d: 256 << 20) if backend == "reference" else (
            lambda B, N, d: 4 * (B + N) * d * f32)
        for precision in precisions:
            name = f"diffmem-{backend}-{precision}"
            fwd = diffmem_forward(backend, precision, check_inputs)
            methods.append(Method(
                name, "diffmem",
                lambda p, b=backend, pr=precision: (
                    lambda: diffmem.softmax_mean(p.x, p.y, p.alpha, p.var, p.bias, backend=b,
                                                 precision=pr, check_inputs=check_inputs)),
                small, skip=skip))
            methods.append(Method(name + "-backward", "diffmem", backward_setup(fwd), small,
                                  backward=True, setup_fwd=forward_setup(fwd), skip=skip))
    bn = lambda k: (lambda B, N, d: k * B * N * f32)  # noqa: E731
    naive_lse = lambda *a: torch_naive(*a, with_lse=True)  # noqa: E731
    methods += [
        Method("torch-naive", "baseline", _simple(torch_naive), bn(4)),
        Method("torch-naive-direct", "baseline", _simple(torch_naive, direct=True), bn(4)),
        Method("torch-chunked", "baseline", _simple(torch_chunked),
               lambda B, N, d: 3 * CHUNK_ELEMENTS * f32 + 4 * (B + N) * d * f32),
        Method("sdpa-fold", "baseline", _simple(sdpa_fold), bn(4)),
        Method("sdpa-mask", "baseline", _simple(sdpa_mask), bn(4)),
        Method("matmul-floor", "floor", _floor_setup, bn(2)),
        Method("torch-naive-backward", "baseline", backward_setup(naive_lse), bn(10),
               backward=True, setup_fwd=forward_setup(naive_lse)),
    ]
    return methods


# ----------------------------------------------------------------------------------------------
# Timing and memory


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

    def peak_extra(self, call: Callable[[], object]) -> tuple[object, Optional[float]]:
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


# ----------------------------------------------------------------------------------------------
# Running and reporting


@dataclass
class Row:
    B: int
    N: int
    d: int
    method: str
    kind: str
    backward: bool
    status: str = "ok"
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    reps: int = 0
    fwd_s: Optional[float] = None  # backward rows: forward alone
    err: dict = field(default_factory=dict)  # sigma -> (median, max)
    peak_bytes: Optional[float] = None
    ratio_best: Optional[float] = None
    ratio_floor: Optional[float] = None
    ratio_direct: Optional[float] = None

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
    """Time all methods interleaved at sigma 0.5, then per method: errors and peak memory."""
    B, N, d = size
    problems = {s: make_problem(B, N, d, s, device=dev.name, seed=args.seed, bias=args.bias)
                for s in {TIME_SIGMA, *args.error_sigmas}}
    refs = {s: reference_mean(problems[s], args.error_rows) for s in args.error_sigmas}
    p_time = problems[TIME_SIGMA]
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
    _collect(entries, refs.get(TIME_SIGMA))
    del entries  # frees the floor's buffers and all outputs before measuring memory

    # Sigmas needing one more call each; the first such call also measures the peak memory.
    extra = [s for s in args.error_sigmas if s != TIME_SIGMA] or [TIME_SIGMA]
    for m, row in zip(methods, rows):
        if row.status != "ok":
            continue
        try:
            for i, s in enumerate(extra if _has_error(row) else extra[:1]):
                call = lambda p=problems[s]: m.setup(p)()  # noqa: E731 (setup counts as memory)
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


def _collect(entries: list[Timed], ref: Optional[torch.Tensor]):
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
            e.row.err[TIME_SIGMA] = row_errors(e.out, ref)


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


def write_csv(path: Path, rows: list[Row], dev: Device, sigmas):
    """Write all rows to path atomically (temporary file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ms = lambda s: None if s is None else round(s * 1e3, 4)  # noqa: E731
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            err_fields = [f"err_sigma{s:g}_{k}" for s in sigmas for k in ("median", "max")]
            fields = ["device", "B", "N", "d", "method", "kind", "pass", "status", "median_ms",
                      "min_ms", "reps", "gflops", "ratio_best", "ratio_floor",
                      "ratio_naive_direct", "fwd_ms", "bwd_over_fwd", *err_fields,
                      "peak_extra_mb", "threads", "torch", "memory_measured_by"]
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                errs = {f"err_sigma{s:g}_{k}": r.err.get(s, (None, None))[i]
                        for s in sigmas for i, k in enumerate(("median", "max"))}
                w.writerow({
                    "device": dev.name, "B": r.B, "N": r.N, "d": r.d, "method": r.method,
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
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
        description="Time diffmem.softmax_mean against torch baselines (naive, chunked, SDPA) "
                    "and the bare-matmul floor; print a table per size and write a CSV.")
    ap.add_argument("--sizes", type=parse_sizes, default=SIZES,
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", type=Path, default=None,
                    help="output CSV (default benchmarks/results/compare-<device>.csv)")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 0.25 if args.quick else 1.5
    if args.min_reps is None:
        args.min_reps = 1 if args.quick else 3
    if args.csv is None:
        args.csv = DEFAULT_CSV_DIR / f"compare-{args.device}.csv"
    return args


def main(argv=None) -> int:
    """Entry point (also for the `diffmem bench` CLI): run, print the tables, write the CSV."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available to torch", file=sys.stderr)
        return 2
    dev = Device(args.device)
    patterns = [p.strip() for p in args.methods.split(",") if p.strip()]
    methods = [m for m in build_methods(args.device, args.include_reference, args.check_inputs)
               if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]
    if not methods:
        print(f"no method matches --methods {args.methods!r}", file=sys.stderr)
        return 2
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(f"diffmem {diffmem.__version__}, torch {torch.__version__}, device {args.device}{gpu}, "
          f"{torch.get_num_threads()} threads, float32")
    print(f"inputs: VP queries x = alpha*y[j] + sigma*noise, y ~ N(0, I); alpha = sqrt(1-sigma^2), "
          f"var = sigma^2 are scalars shared by all queries (keeps cdist/SDPA simple); "
          f"bias: {'N(0,1) per point' if args.bias else 'none'}; diffmem check_inputs="
          f"{args.check_inputs}")
    print(f"time: median of >= {args.min_reps} reps after 1 warmup (more while under "
          f"{args.budget} s in all), methods interleaved round-robin, at sigma = {TIME_SIGMA}; "
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
        write_csv(args.csv, all_rows, dev, args.error_sigmas)
    print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
