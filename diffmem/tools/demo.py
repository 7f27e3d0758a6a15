"""``diffmem demo``: the fused op on a memorization-style problem.

It builds a training set from a Gaussian mixture, noises training points with the VP process
at several noise levels t, and evaluates the memorizing (empirical-optimal) denoiser
x0_hat = softmax_mean(x_t, data, alpha_t, sigma_t^2) with every available backend and precision.
It prints the error of each against a float64 computation and the time per call, then runs the
comparison benchmark in its quick mode.
"""

from __future__ import annotations

import math
import time

import torch

from ..ops import backends, softmax_mean

DEMO_T = (0.999, 0.7595, 0.3603, 0.1208, 0.01, 0.001)


def _mixture_data(n: int, d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """n points (n, d) from k unit-variance Gaussians with means on the sphere of radius sqrt(d)."""
    means = torch.randn(k, d, generator=gen, dtype=torch.float64)
    means *= math.sqrt(d) / means.norm(dim=1, keepdim=True)
    labels = torch.randint(0, k, (n,), generator=gen)
    return (means[labels] + torch.randn(n, d, generator=gen, dtype=torch.float64)).float()


def _time(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def accuracy_table(n: int = 20000, d: int = 64, batch: int = 256, seed: int = 0) -> list[dict]:
    """Relative error (vs float64) and time of each backend/precision at each t in DEMO_T."""
    gen = torch.Generator().manual_seed(seed)
    data = _mixture_data(n, d, 10, gen)
    names = [b for b, info in backends().items() if info["available"] and "cpu" in info["devices"]
             and b != "reference"] or ["reference"]
    rows = []
    for t in DEMO_T:
        alpha, var = math.sqrt(1 - t * t), t * t
        x0 = data[torch.randint(0, n, (batch,), generator=gen)]
        noise = torch.randn(batch, d, generator=gen, dtype=torch.float64)
        xt = (alpha * x0.double() + t * noise).float()
        ref = softmax_mean(xt[:32].double(), data.double(), alpha, var, backend="reference")
        for name in names:
            for precision in ("exact", "fast"):
                out = softmax_mean(xt, data, alpha, var, backend=name, precision=precision)
                err = float((out[:32].double() - ref).norm() / ref.norm())
                seconds = _time(lambda xt=xt, alpha=alpha, var=var, name=name, precision=precision:
                                softmax_mean(xt, data, alpha, var, backend=name,
                                             precision=precision))
                rows.append({"t": t, "backend": name, "precision": precision,
                             "rel_error": err, "ms": 1e3 * seconds,
                             "gflops": 4 * batch * n * d / seconds / 1e9})
    return rows


def run_demo(quick: bool = True) -> int:
    print("diffmem demo: the memorizing denoiser "
          "x0_hat(x_t) = softmax_mean(x_t, data, alpha, sigma^2)")
    for name, info in backends().items():
        state = "available" if info["available"] else f"unavailable ({info['reason']})"
        print(f"  backend {name:9s} {state}")
    print("\nN = 20000 training points in d = 64 (10-component mixture), 256 queries x_t = "
          "alpha x0 + t eps;\nerror = relative Frobenius error against float64 on 32 queries.")
    print(f"{'t':>7s} {'backend':>9s} {'precision':>9s} {'rel.error':>10s} {'ms':>8s} "
          f"{'GFLOP/s':>8s}")
    for row in accuracy_table():
        print(f"{row['t']:7.4f} {row['backend']:>9s} {row['precision']:>9s} "
              f"{row['rel_error']:10.2e} {row['ms']:8.2f} {row['gflops']:8.1f}")
    print("\nComparison benchmark"
          + (" (quick mode; `diffmem bench` runs the full one)" if quick else ""))
    from .bench.cli import main as bench_main

    return bench_main(["--quick"] if quick else []) or 0
