"""Time one training step of the learnable GMMs at one thread, with a per-phase breakdown.

Two configurations (float32, d = 30, K = 4 data, N = 100 training points):

- ``single``: one model of M = 50 components, 100 noise draws per point (the paper's draws);
- ``batched``: the default phase-transition run, sizes 10, 20, ..., 100 as one padded
  LearnableGMM, 10 draws per point.

For each it reports the CPU time (``time.process_time``, which a shared machine disturbs less
than wall time) of a whole ``train_gmm_models`` step, averaged over a short run, with the part
spent in the cpu backend's kernels (the rest is the overhead around them), and of the phases of
one step done by hand the way the loop does them: the noise draws, the forward
(``eps_losses``), the backward, the optimizer step and the divergence check.

    python benchmarks/training_step.py [--steps 200] [--repeat 3] [--config single|batched|all]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffmem.data.gmm import make_gmm_data
from diffmem.denoisers.learnable import LearnableGMM, initialize
from diffmem.diffusion.processes import VP, time_grid
from diffmem.ops import _cpu
from diffmem.training import train_gmm_models
from diffmem.training.common import check_finite, model_seed
from diffmem.training.gmm import eps_losses
from diffmem.training.optim import ReferenceOptimizer

CONFIGS = {
    "single": dict(sizes=[50], draws=100),
    "batched": dict(sizes=list(range(10, 101, 10)), draws=10),
}


def _data(seed: int = 1) -> torch.Tensor:
    return make_gmm_data(30, 4, 100, seed, val_samples=1).train


def _cpu_seconds(fn, repeat: int) -> float:
    """Smallest CPU time of fn() over repeat calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


class _KernelClock:
    """CPU seconds spent inside the cpu backend's forward and backward (the compiled kernels
    and their thin marshalling), accumulated while installed."""

    def __init__(self):
        self.seconds = 0.0
        self.saved = (_cpu.forward, _cpu.backward)

    def _timed(self, fn):
        def inner(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start
        return inner

    def __enter__(self):
        _cpu.forward, _cpu.backward = (self._timed(fn) for fn in self.saved)
        return self

    def __exit__(self, *exc):
        _cpu.forward, _cpu.backward = self.saved


def whole_step(data, sizes, draws, steps: int, repeat: int) -> tuple[float, float]:
    """CPU seconds per step of train_gmm_models (its setup included, spread over the steps)
    and the part of it spent in the kernels, from the fastest of repeat runs."""
    def run():
        train_gmm_models(data, sizes, steps=steps, warmup=steps // 10, draws=draws, clip=1e3,
                         peak_lr=1.5e-2, final_lr=1e-5, ema=0.99)
    run()  # warm up (extension load, allocator)
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        with _KernelClock() as clock:
            total = _cpu_seconds(run, 1)
        best = min(best, (total / steps, clock.seconds / steps))
    return best


def phases(data, sizes, draws, steps: int, repeat: int) -> dict[str, float]:
    """CPU seconds per step of each phase, from `steps` hand-made steps of the loop."""
    N, d = data.shape
    G, M_max = len(sizes), max(sizes)
    gens = [torch.Generator().manual_seed(model_seed(0, M)) for M in sizes]
    means = data.new_zeros(G, M_max, d)
    mask = torch.zeros(G, M_max, dtype=torch.bool)
    stds = []
    for g, (M, gen) in enumerate(zip(sizes, gens)):
        mu, std = initialize("pmem", M, generator=gen, data=data)
        means[g, :M], means[g, M:] = mu, mu[0]
        mask[g, :M] = True
        stds.append(std)
    model = LearnableGMM(means, torch.tensor(stds), mask=mask, process=VP(), prediction="eps")
    opt = ReferenceOptimizer([model.means, model.std], 1e-4, clip=1e3, per_model=True)
    grid = time_grid().to(data.dtype)
    idx = torch.empty(G, N, dtype=torch.long)
    noise = torch.empty(G, N, draws, d, dtype=data.dtype)
    totals = dict.fromkeys(("draws", "forward", "backward", "optimizer", "check"), float("inf"))
    for _ in range(repeat + 1):  # the first round warms up
        spent = dict.fromkeys(totals, 0.0)
        for k in range(steps):
            t0 = time.process_time()
            for g, gen in enumerate(gens):
                idx[g].random_(0, grid.numel(), generator=gen)
                noise[g].normal_(generator=gen)
            t1 = time.process_time()
            opt.zero_grad()
            losses = eps_losses(model, data, grid[idx], noise, check_inputs=False)
            t2 = time.process_time()
            losses.sum().backward()
            t3 = time.process_time()
            opt.step()
            t4 = time.process_time()
            check_finite(k + 1, steps, sizes, losses, (model.means, model.std))
            t5 = time.process_time()
            for name, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                spent[name] += dt
        totals = {name: min(totals[name], spent[name] / steps) for name in totals}
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timed run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (the fastest counts)")
    parser.add_argument("--config", choices=(*CONFIGS, "all"), default="all")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = _data()
    names = list(CONFIGS) if args.config == "all" else [args.config]
    for name in names:
        cfg = CONFIGS[name]
        G, M = len(cfg["sizes"]), max(cfg["sizes"])
        flops = 2 * 3 * G * data.shape[0] * cfg["draws"] * M * data.shape[1] * 2
        step, kernels = whole_step(data, cfg["sizes"], cfg["draws"], args.steps, args.repeat)
        parts = phases(data, cfg["sizes"], cfg["draws"], args.steps, args.repeat)
        print(f"{name}: G={G} M_max={M} draws={cfg['draws']} (~{flops / 1e9:.2f} GFLOP/step): "
              f"{step * 1e3:.3f} ms CPU per train_gmm_models step, {kernels * 1e3:.3f} ms of it "
              f"in the cpu backend's kernels, {(step - kernels) * 1e3:.3f} ms around them")
        print("  one step by hand:")
        for phase, seconds in parts.items():
            print(f"  {phase:10s} {seconds * 1e3:8.3f} ms")
        print(f"  {'sum':10s} {sum(parts.values()) * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
