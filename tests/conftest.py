"""Shared fixtures: the device under test, the backends to test, VP-process test cases, and a
run of the phase-transition experiment killed and resumed (``kill_and_resume``).

DIFFMEM_TEST_DEVICE=cuda runs the suite on CUDA tensors (on a machine with a GPU). Triton runs
on CPU tensors only under TRITON_INTERPRET=1, and the CUDA kernels only in a build with
DIFFMEM_CUDA_EMULATE=ON (host emulator), both with small shapes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import diffmem

DEVICE = torch.device(os.environ.get("DIFFMEM_TEST_DEVICE", "cpu"))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# The 26-point VP grid of the paper: t from 0.999 down to 0.001.
T_GRID = [0.999 - i * (0.998 / 25) for i in range(26)]


def available_backends() -> list[str]:
    report = diffmem.backends()
    return [name for name, info in report.items()
            if info["available"] and DEVICE.type in info["devices"]]


BACKENDS = available_backends()
# The CUDA kernels' host-emulator build (DIFFMEM_CUDA_EMULATE=ON) runs on CPU tensors, slowly.
CUDA_EMULATED = DEVICE.type == "cpu" and "cuda" in BACKENDS
# Backends fast enough for large shapes (the Triton interpreter and the CUDA emulator are not).
FAST_BACKENDS = [b for b in BACKENDS
                 if not (b == "triton" and INTERPRETED) and not (b == "cuda" and CUDA_EMULATED)]


def supports(backend: str, dtype: torch.dtype) -> bool:
    return str(dtype).removeprefix("torch.") in diffmem.backends()[backend]["dtypes"]


def supports_points(backend: str, dtype: torch.dtype) -> bool:
    """Whether backend takes points stored as dtype (uint8, float16, bfloat16) with float32
    queries."""
    return str(dtype).removeprefix("torch.") in diffmem.backends()[backend]["point_dtypes"]


def vp_case(batch=(), B=5, N=7, d=3, t=0.5, offset=0.0, seed=0, dtype=torch.float32,
            per_query_t=False, scale=1.0):
    """Points y ~ N(offset, scale^2 I) and VP queries x = alpha y[j] + t eps.

    Returns x (*batch, B, d), y (*batch, N, d), alpha and var (*batch, B) or floats.
    With per_query_t, each query gets its own t cycling over T_GRID.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(*batch, N, d, generator=gen, dtype=torch.float64) * scale + offset
    y = y.to(dtype)
    if per_query_t:
        ts = torch.tensor([T_GRID[i % len(T_GRID)] for i in range(B)], dtype=torch.float64)
        ts = ts.expand(*batch, B)
    else:
        ts = torch.full((*batch, B), float(t), dtype=torch.float64)
    alpha = (1 - ts * ts).sqrt()
    j = torch.randint(0, N, (*batch, B), generator=gen)
    src = torch.gather(y.double(), -2, j[..., None].expand(*batch, B, d))
    eps = torch.randn(*batch, B, d, generator=gen, dtype=torch.float64)
    x = (alpha[..., None] * src + ts[..., None] * eps).to(dtype)
    alpha, var = alpha.to(dtype), (ts * ts).to(dtype)
    return (x.to(DEVICE), y.to(DEVICE), alpha.to(DEVICE), var.to(DEVICE))


def oracle(x, y, alpha, var, bias=None):
    """Naive float64 mean and lse (materializes B x N); differentiable by torch autograd."""
    x, y = x.double(), y.double()
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
    var = torch.as_tensor(var, dtype=torch.float64, device=x.device)
    alpha = alpha.expand(x.shape[:-1]) if alpha.dim() == 0 else alpha.double()
    var = var.expand(x.shape[:-1]) if var.dim() == 0 else var.double()
    diff = x[..., :, None, :] - alpha[..., :, None, None] * y[..., None, :, :]
    logits = -(diff * diff).sum(-1) / (2 * var[..., :, None])
    if bias is not None:
        logits = logits + bias.double()[..., None, :]
    return torch.softmax(logits, -1) @ y, torch.logsumexp(logits, -1)


def rel_fro(a, b) -> float:
    """||a - b||_F / ||b||_F in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def lse_err(lse, ref) -> float:
    """max |lse - ref| / max(1, |ref|)."""
    lse, ref = lse.double(), ref.double()
    return float(((lse - ref).abs() / ref.abs().clamp_min(1.0)).max())


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every backend output starts as NaN, so unwritten elements fail the comparisons."""
    from diffmem.ops._alloc import poisoned_outputs

    with poisoned_outputs():
        yield


@pytest.fixture
def one_thread():
    """Tiny problems run fastest on one thread (and a busy machine makes more threads thrash)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def strip_volatile(results: dict) -> dict:
    """A results dict without the parts that differ between identical runs."""
    return {k: v for k, v in results.items() if k not in ("timings", "environment")}


class Killed(Exception):
    """Raised from a run's hook to simulate a kill at that point."""


@dataclass
class Resumed:
    """What kill_and_resume saw: the uninterrupted results, the resumed ones, the run folder,
    the events before the kill, the files the kill left, the calls of the spied training
    function during the resume (each (args, kwargs)) and the events of the resume."""

    full: dict
    resumed: dict
    folder: Path
    events_before_kill: list
    files_after_kill: set
    train_calls: list
    events_after_resume: list


@pytest.fixture
def kill_and_resume(tmp_path, monkeypatch):
    """run(config, kill_when, spy=(module, name), checkpoint_steps=None) -> Resumed.

    Runs config uninterrupted (folder a), then again in folder b with a hook that raises Killed
    as soon as kill_when(events so far) is true (events are (name, value) pairs, see
    run_phase_transition), with training checkpoints every checkpoint_steps steps if given;
    then resumes b with the training function module.name spied on. Checks that the kill
    happened and that the resumed results (returned and on disk) equal the uninterrupted ones
    up to timings and environment.
    """
    from diffmem.experiments import runner

    def run(config, kill_when, *, spy, checkpoint_steps=None) -> Resumed:
        full = runner.run_phase_transition(config, tmp_path / "a", quiet=True, plots=False)
        if checkpoint_steps is not None:
            monkeypatch.setattr(runner, "CHECKPOINT_STEPS", checkpoint_steps)
        folder, before = tmp_path / "b", []

        def hook(event, value):
            before.append((event, value))
            if kill_when(before):
                raise Killed

        with pytest.raises(Killed):
            runner.run_phase_transition(config, folder, quiet=True, plots=False, hook=hook)
        files = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
        module, name = spy
        real, calls, after = getattr(module, name), [], []

        def spied(*args, **kwargs):
            calls.append((args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spied)
        resumed = runner.run_phase_transition(config, folder, resume=True, quiet=True,
                                              plots=False, hook=lambda e, v: after.append((e, v)))
        assert strip_volatile(resumed) == strip_volatile(full)
        on_disk = [json.loads((tmp_path / f / "results.json").read_text()) for f in ("a", "b")]
        assert strip_volatile(on_disk[1]) == strip_volatile(on_disk[0])
        return Resumed(full, resumed, folder, before, files, calls, after)

    return run


def pytest_report_header(config):
    return (f"diffmem {diffmem.__file__} device={DEVICE} backends={BACKENDS} "
            f"triton_interpret={INTERPRETED}")
