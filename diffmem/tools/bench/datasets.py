"""``diffmem bench --datasets``: softmax_mean at data-set sizes (CIFAR-10-like N = 50,000,
d = 3072, and one query over 200,000 points) with the points stored as float32, bfloat16 and
uint8, against the machine's memory bandwidth measured in the same run (a STREAM-like copy);
then the op sharded over 2 gloo ranks against one process (sharded.py).

Per case: the median time of the exact forward, its GFLOP/s (4 B N d), the rate at which it
reads the points (N d bytes-per-value / time) and that rate over the copy's bandwidth.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ... import __version__
from ...files import atomic_write
from ...ops import softmax_mean
from . import sharded

DATASET_SIZES = [(16, 50000, 3072), (256, 50000, 3072), (1, 200000, 3072)]
POINT_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)
SIGMA = 0.5


@dataclass
class Case:
    B: int
    N: int
    d: int
    points_dtype: str
    ms: float
    gflops: float
    points_gbps: float
    of_copy: float  # points_gbps / the copy bandwidth


def _median_time(call, device: str, budget: float, min_reps: int) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call()
    sync()
    times: list[float] = []
    while len(times) < min_reps or sum(times) < budget:
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str = "cpu", gib: float = 1.0, budget: float = 2.0) -> float:
    """GB/s of ``dst.copy_(src)`` over two float32 buffers of ``gib`` GiB each, counting the
    bytes read and written (STREAM's copy convention)."""
    n = int(gib * (1 << 30)) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), device, budget, 5)
    return 2 * n * 4 / seconds / 1e9


def _inputs(B, N, d, dtype, device, seed=0):
    """Gaussian points in the storage dtype (uint8: codes 128 + 32 y) and VP queries around
    them, in the stored values' units."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(N, d, generator=gen)
    scale = 1.0
    if dtype == torch.uint8:
        y = (128 + 32 * y).round().clamp(0, 255)
        scale = 32.0
    points = y.to(dtype)
    del y
    j = torch.randint(N, (B,), generator=gen)
    alpha = math.sqrt(1 - SIGMA**2)
    x = alpha * points[j].float() + SIGMA * scale * torch.randn(B, d, generator=gen)
    return x.to(device), points.to(device), alpha, (SIGMA * scale) ** 2


def run_case(B, N, d, dtype, device, copy_gbps, budget=1.5, min_reps=3) -> Case:
    x, points, alpha, var = _inputs(B, N, d, dtype, device)
    seconds = _median_time(lambda: softmax_mean(x, points, alpha, var), device, budget,
                           min_reps)
    gbps = N * d * points.element_size() / seconds / 1e9
    return Case(B, N, d, str(dtype).removeprefix("torch."), seconds * 1e3,
                4 * B * N * d / seconds / 1e9, gbps, gbps / copy_gbps)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(payload, indent=1).encode())


def run(device: str, sizes, out: Path, quick: bool = False,
        distributed: bool = True) -> list[Case]:
    """Measure the copy bandwidth, then every (size, points dtype); print a table; write JSON
    (after every case, atomically); then (cpu) time the op on 2 gloo ranks against one process
    (sharded.py)."""
    budget, reps = (0.3, 1) if quick else (1.5, 3)
    copy_gbps = copy_bandwidth(device, 0.25 if quick else 1.0, budget)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"diffmem {__version__}, torch {torch.__version__}, device {name}, "
          f"{torch.get_num_threads()} threads; exact forward, sigma {SIGMA}")
    print(f"memory bandwidth (copy, read + write): {copy_gbps:.1f} GB/s")
    head = (f"{'(B, N, d)':<20} {'points':<9} {'ms':>9} {'GFLOP/s':>8} {'points GB/s':>11} "
            f"{'/copy':>6}")
    print(head + "\n" + "-" * len(head), flush=True)
    cases: list[Case] = []
    for B, N, d in sizes:
        for dtype in POINT_DTYPES:
            c = run_case(B, N, d, dtype, device, copy_gbps, budget, reps)
            cases.append(c)
            print(f"{str((B, N, d)):<20} {c.points_dtype:<9} {c.ms:>9.1f} {c.gflops:>8.1f} "
                  f"{c.points_gbps:>11.1f} {c.of_copy:>6.2f}", flush=True)
            _write_json(out, {"device": name, "threads": torch.get_num_threads(),
                              "version": __version__, "copy_gbps": copy_gbps,
                              "cases": [asdict(k) for k in cases]})
    print(f"\nwrote {out}")
    if device == "cpu" and distributed:
        print("\nthe same op sharded over 2 gloo ranks (diffmem.distributed), float32 points:",
              flush=True)
        sharded.main(["--quick"] if quick else [])
    return cases


__all__ = ["DATASET_SIZES", "POINT_DTYPES", "Case", "copy_bandwidth", "run", "run_case"]
