"""Shared fixtures: the device under test, the backends to test, and VP-process test cases.

DIFFMEM_TEST_DEVICE=cuda runs the suite on CUDA tensors (on a machine with a GPU). Triton runs
on CPU tensors only under TRITON_INTERPRET=1, and the CUDA kernels only in a build with
DIFFMEM_CUDA_EMULATE=ON (host emulator), both with small shapes.
"""

from __future__ import annotations

import os

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


def pytest_report_header(config):
    return (f"diffmem {diffmem.__file__} device={DEVICE} backends={BACKENDS} "
            f"triton_interpret={INTERPRETED}")
