"""diffmem.distributed on 2 and 3 gloo processes of this machine: every rank gets the
single-process results (mean, lse, knn, nearest point) and gradients (x, alpha, var on every
rank; each shard's part of the points' and bias' gradients), with uneven shards, an empty shard
and a fully masked one; bad use raises on every rank instead of hanging.

Each test starts one process group (tests/ops/dist_worker.py, one subprocess per rank, joined
through a file store) that runs several checks and writes its results as .npz and .json.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_worker import NEAREST_SIZES, THREE_SIZES, TWO_SIZES, problem, shard
from ranks import rank_log_tails, wait_for_ranks
from test_merge import dense_nearest

import diffmem

WORKER = Path(__file__).with_name("dist_worker.py")
HARD_LIMIT_S = 90  # the whole group, start to finish

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available")


def run_group(scenario: str, world: int, tmp_path: Path):
    """Run scenario on `world` ranks; returns per rank (arrays dict, errors dict)."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(r), str(world),
                               str(tmp_path / "store"), str(out)],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    failed = wait_for_ranks(procs, logs, HARD_LIMIT_S)
    if failed:
        pytest.fail(f"{scenario}: ranks failed or hung (limit {HARD_LIMIT_S} s)\n"
                    f"{rank_log_tails(tmp_path, failed)}")
    results = []
    for r in range(world):
        with np.load(out / f"rank{r}.npz") as f:
            arrays = {k: torch.from_numpy(f[k]) for k in f.files}
        results.append((arrays, json.loads((out / f"rank{r}.json").read_text())))
    return results


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def single_process(p, masked_from=None, with_bias=True, **options):
    """The unsplit op on all the points, with the gradients the workers compute."""
    leaves = {k: p[k].clone().requires_grad_() for k in ("x", "alpha", "var", "points", "bias")}
    bias = leaves["bias"]
    if masked_from is not None:
        bias = torch.cat([bias[..., :masked_from],
                          torch.full_like(bias[..., masked_from:], -math.inf)], dim=-1)
    mean, lse = diffmem.softmax_mean(leaves["x"], leaves["points"], leaves["alpha"],
                                     leaves["var"], bias if with_bias else None, return_lse=True,
                                     **options)
    ((mean * p["g"]).sum() + (lse * p["h"]).sum()).backward()
    out = dict(mean=mean, lse=lse, dx=leaves["x"].grad, dalpha=leaves["alpha"].grad,
               dvar=leaves["var"].grad, dpoints=leaves["points"].grad)
    if with_bias:
        out["dbias"] = leaves["bias"].grad
    return out


def check_softmax_mean(results, prefix, want, sizes, tol):
    """Replicated outputs equal the single-process ones on every rank; each rank's shard
    gradients are its slice of the single-process ones (an empty shard: (..., 0, d))."""
    for rank, (got, _) in enumerate(results):
        for name in ("mean", "lse", "dx", "dalpha", "dvar"):
            assert got[f"{prefix}_{name}"].shape == want[name].shape, (rank, name)
            assert rel(got[f"{prefix}_{name}"], want[name]) <= tol, (rank, prefix, name)
        for name, dim in (("dpoints", -2), ("dbias", -1)):
            if name not in want:
                continue
            part = shard(want[name], sizes, rank, dim)
            assert got[f"{prefix}_{name}"].shape == part.shape, (rank, name)
            if part.numel():
                assert rel(got[f"{prefix}_{name}"], part) <= tol, (rank, prefix, name)
        assert torch.isfinite(got[f"{prefix}_dpoints"]).all()


def check_knn(results, key, queries, points, k):
    want_d, want_i = diffmem.knn(queries, points, k)
    for got, _ in results:
        assert torch.equal(got[f"{key}_idx"], want_i), key
        torch.testing.assert_close(got[f"{key}_dist"], want_d, rtol=1e-12, atol=0)


def test_three_ranks_with_an_empty_and_a_masked_shard(tmp_path):
    results = run_group("three_ranks", 3, tmp_path)
    p = problem(1, THREE_SIZES)
    check_softmax_mean(results, "f64", single_process(p), THREE_SIZES, 1e-10)
    masked = single_process(p, masked_from=sum(THREE_SIZES[:2]))
    check_softmax_mean(results, "masked", masked, THREE_SIZES, 1e-10)
    assert (results[2][0]["masked_dbias"] == 0).all()
    p32 = problem(2, THREE_SIZES, dtype=torch.float32, batch=(2,))
    want = single_process(p32, with_bias=False, precision="fast")
    check_softmax_mean(results, "f32", want, THREE_SIZES, 2e-5)
    for k in (1, 4, 23):
        check_knn(results, f"knn{k}", p["x"], p["points"], k)


def test_two_ranks_with_batched_points(tmp_path):
    results = run_group("two_ranks", 2, tmp_path)
    p = problem(3, TWO_SIZES, batch=(2,), points_batch=(2,))
    check_softmax_mean(results, "f64", single_process(p), TWO_SIZES, 1e-10)
    p32 = problem(4, TWO_SIZES, dtype=torch.float32, batch=(2,), points_batch=(2,))
    check_softmax_mean(results, "f32", single_process(p32), TWO_SIZES, 2e-5)
    x = p32["x"].clone().requires_grad_()
    mean = diffmem.softmax_mean(x, p32["points"], p32["alpha"], p32["var"])
    (mean * p32["g"]).sum().backward()
    for got, _ in results:
        assert rel(got["plain_mean"], mean) <= 2e-6 and rel(got["plain_dx"], x.grad) <= 2e-5
    check_knn(results, "knn", p["x"], p["points"], 3)


def test_return_nearest(tmp_path):
    """The global nearest point and its weight (the local op's return_nearest=True merged);
    return_nearest on one rank only raises on every rank."""
    results = run_group("nearest", 3, tmp_path)
    for name, dtype, tol in (("f64", torch.float64, 1e-10), ("f32", torch.float32, 1e-5)):
        p = problem(5, NEAREST_SIZES, dtype=dtype)
        mean, lse = diffmem.softmax_mean(p["x"], p["points"], p["alpha"], p["var"], p["bias"],
                                         return_lse=True)
        idx, weight, _ = dense_nearest(*(p[k].double() for k in ("x", "points", "alpha", "var",
                                                                 "bias")))
        for got, _ in results:
            assert rel(got[f"{name}_mean"], mean) <= tol and rel(got[f"{name}_lse"], lse) <= tol
            assert got[f"{name}_idx"].dtype == torch.int64
            assert got[f"{name}_weight"].dtype == dtype
            for suffix in ("", "2"):
                assert torch.equal(got[f"{name}_idx{suffix}"], idx), name
                assert rel(got[f"{name}_weight{suffix}"], weight) <= tol, name
    for _, errors in results:
        assert "return_nearest (rank 0: 0, rank 1: 0, rank 2: 1)" in errors[
            "different_return_nearest"]


BAD_USE = {  # case: (what every rank raises, words in the message of the rank(s) named)
    "different_B": ("ValueError", "number of queries B (rank 0: 6, rank 1: 5)"),
    "different_d": ("ValueError", "feature dimension d (rank 0: 5, rank 1: 4)"),
    "different_dtype": ("ValueError", "dtype (rank 0: torch.float32, rank 1: torch.float64)"),
    "nan_on_rank_1": ("ValueError", None),
    "different_function": ("ValueError", "the function called"),
    "different_grads": ("ValueError", "require gradients"),
    "all_masked": ("ValueError", "masks out every point"),
    "knn_k_too_large": ("ValueError", "k <= N = 9"),
    "knn_different_k": ("ValueError", "on k (rank 0: 2, rank 1: 3)"),
    "knn_different_B": ("ValueError", "number of queries B"),
}


def test_bad_use_raises_on_every_rank(tmp_path):
    results = run_group("bad_use", 2, tmp_path)
    for rank, (_, errors) in enumerate(results):
        assert set(errors) == set(BAD_USE)
        for case, (kind, words) in BAD_USE.items():
            message = errors[case]
            assert message is not None, (rank, case)
            assert message.startswith(kind + ":"), (rank, case, message)
            if words is not None:
                assert words in message, (rank, case, message)
        nan_message = errors["nan_on_rank_1"]
        assert ("points contains NaN" if rank == 1 else "invalid input on rank(s) [1]") in (
            nan_message)
    # The group still works after the errors.
    p = problem(6, [4, 5])
    want = diffmem.softmax_mean(p["x"], p["points"], p["alpha"], p["var"])
    for arrays, _ in results:
        assert rel(arrays["after"], want) <= 1e-12
