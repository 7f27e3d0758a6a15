"""pytest-benchmark suite: diffmem.softmax_mean (forward, backward) and diffmem.knn vs torch.

Run it with (the normal `pytest` / `pytest tests` run does not collect benchmarks/):

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --bench-reference   # + float64 backend (minutes)
    pytest benchmarks/ --benchmark-only -k "knn or B256"    # a subset

Every available diffmem backend, with both precisions, shares a group with the torch-naive
baselines of the same pass, device and size, so the report's relative columns are ratios
against baselines measured in the same run. Unavailable backends are skipped with the reason
diffmem.backends() gives. Inputs are the VP-process queries of diffmem/tools/bench/problems.py
(sigma = 0.5).
"""

from __future__ import annotations

import pytest
import torch

import diffmem
from diffmem.tools.bench.methods import backward_setup, diffmem_forward, torch_naive
from diffmem.tools.bench.problems import make_problem

pytest.importorskip("pytest_benchmark")

SIZES = [(256, 10000, 64), (64, 5000, 3072)]
KNN_SIZE = (50, 20000, 64)
SIGMA = 0.5
ROUNDS = 5  # timed rounds after one warmup round
SLOW = {"reference"}  # one round, no warmup: seconds per call
PRECISIONS = ("exact", "fast")
BACKENDS = list(diffmem.backends())
BASELINE_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _size_id(size):
    return "B{}-N{}-d{}".format(*size)


def _device_for(backend: str, request) -> str:
    """The device a backend runs on here; skips the test when it cannot run."""
    info = diffmem.backends()[backend]
    if not info["available"]:
        pytest.skip(f"backend {backend!r} unavailable: {info['reason']}")
    if backend == "reference" and not request.config.getoption("--bench-reference"):
        pytest.skip("reference backend is slow; pass --bench-reference")
    if "cuda" in info["devices"] and torch.cuda.is_available() and backend != "reference":
        return "cuda"
    if "cpu" in info["devices"] and backend != "triton":  # Triton on CPU = test interpreter
        return "cpu"
    pytest.skip(f"backend {backend!r} runs on {info['devices']}, none usable here")


def _run(benchmark, call, device: str, group: str, flops: float, slow: bool = False):
    """Benchmark call (synchronized on CUDA) in `group`; returns the last result."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        out = call()
        sync()
        return out

    benchmark.group = group
    benchmark.extra_info["gflop_per_call"] = flops / 1e9
    return benchmark.pedantic(timed, rounds=1 if slow else ROUNDS,
                              warmup_rounds=0 if slow else 1, iterations=1)


def _problem(size, device):
    B, N, d = size
    return make_problem(B, N, d, SIGMA, device=device)


def _group(kind, device, size):
    return f"{kind} {device} {_size_id(size)}"


# ----------------------------------------------------------------------------------------------
# softmax_mean forward


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(benchmark, request, backend, precision, size):
    if backend == "reference" and precision == "fast":
        pytest.skip("the reference backend ignores precision")
    device = _device_for(backend, request)
    p = _problem(size, device)
    mean = _run(
        benchmark,
        lambda: diffmem.softmax_mean(p.x, p.y, p.alpha, p.var, backend=backend,
                                     precision=precision),
        device, _group("forward", device, size), 4 * p.x.numel() * p.y.shape[0],
        slow=backend in SLOW)
    assert mean.shape == p.x.shape


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("direct", [False, True], ids=["mm", "direct"])
@pytest.mark.parametrize("device", BASELINE_DEVICES)
def test_forward_torch_naive(benchmark, device, direct, size):
    """cdist (mm or direct-difference mode) -> softmax -> matmul, materializing B x N."""
    p = _problem(size, device)
    mean = _run(benchmark, lambda: torch_naive(p.x, p.y, p.alpha, p.var, direct=direct),
                device, _group("forward", device, size), 4 * p.x.numel() * p.y.shape[0])
    assert mean.shape == p.x.shape


# ----------------------------------------------------------------------------------------------
# softmax_mean forward + backward of mean.sum() + lse.sum() w.r.t. x, points, alpha and var


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward(benchmark, request, backend, precision, size):
    if backend == "reference" and precision == "fast":
        pytest.skip("the reference backend ignores precision")
    device = _device_for(backend, request)
    p = _problem(size, device)
    _run(benchmark, backward_setup(diffmem_forward(backend, precision))(p), device,
         _group("fwd+bwd", device, size), 4 * p.x.numel() * p.y.shape[0],
         slow=backend in SLOW)


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
@pytest.mark.parametrize("device", BASELINE_DEVICES)
def test_backward_torch_naive(benchmark, device, size):
    """torch-naive (with logsumexp for lse) under autograd."""
    p = _problem(size, device)
    forward = lambda *args: torch_naive(*args, with_lse=True)  # noqa: E731
    _run(benchmark, backward_setup(forward)(p), device, _group("fwd+bwd", device, size),
         4 * p.x.numel() * p.y.shape[0])


# ----------------------------------------------------------------------------------------------
# knn, k = 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn(benchmark, request, backend):
    device = _device_for(backend, request)
    p = _problem(KNN_SIZE, device)
    dist, idx = _run(benchmark, lambda: diffmem.knn(p.x, p.y, k=2, backend=backend), device,
                     _group("knn", device, KNN_SIZE), 3 * p.x.numel() * p.y.shape[0],
                     slow=backend in SLOW)
    assert idx.shape == (p.x.shape[0], 2)


@pytest.mark.parametrize("direct", [False, True], ids=["mm", "direct"])
@pytest.mark.parametrize("device", BASELINE_DEVICES)
def test_knn_torch_cdist_topk(benchmark, device, direct):
    """torch.cdist then topk(2); the direct-difference mode gives exact distances like knn."""
    p = _problem(KNN_SIZE, device)
    mode = "donot_use_mm_for_euclid_dist" if direct else "use_mm_for_euclid_dist_if_necessary"

    def call():
        return torch.cdist(p.x, p.y, compute_mode=mode).topk(2, dim=1, largest=False)

    dist, idx = _run(benchmark, call, device, _group("knn", device, KNN_SIZE),
                     3 * p.x.numel() * p.y.shape[0])
    assert idx.shape == (p.x.shape[0], 2)
