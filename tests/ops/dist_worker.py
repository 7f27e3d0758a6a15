"""One rank of the process groups that tests/ops/test_distributed.py starts.

    python dist_worker.py SCENARIO RANK WORLD STORE OUT

joins a gloo group through the file store STORE, runs SCENARIO (a function below) and writes
what it computed to OUT/rank<RANK>.npz (arrays) and OUT/rank<RANK>.json (error messages).
The problems are built from seeds by ``problem``, which the test calls too, so that it can
compute the single-process results on the same data.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import diffmem

TIMEOUT = datetime.timedelta(seconds=30)


def problem(seed, sizes, B=6, d=5, dtype=torch.float64, batch=(), points_batch=()):
    """Queries x (*batch, B, d), alpha and var (*batch, B), points (*points_batch, N, d) and
    bias (*points_batch, N) with N = sum(sizes), output gradients g (*batch, B, d) and h
    (*batch, B); all float64 rounded to dtype. Queries are VP-noised points."""
    gen = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    y = torch.randn(*points_batch, N, d, generator=gen, dtype=torch.float64)
    t = torch.rand(*batch, B, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    alpha = (1 - t * t).sqrt()
    j = torch.randint(0, N, (B,), generator=gen)
    x = (alpha[..., None] * y[..., j, :].expand(*batch, B, d)
         + t[..., None] * torch.randn(*batch, B, d, generator=gen, dtype=torch.float64))
    bias = torch.randn(*points_batch, N, generator=gen, dtype=torch.float64)
    g = torch.randn(*batch, B, d, generator=gen, dtype=torch.float64)
    h = torch.randn(*batch, B, generator=gen, dtype=torch.float64)
    return {k: v.to(dtype) for k, v in
            dict(x=x, alpha=alpha, var=t * t, points=y, bias=bias, g=g, h=h).items()}


def shard(t, sizes, rank, dim=-1):
    """Rank's slice along dim of a tensor split into consecutive shards of the given sizes."""
    start = sum(sizes[:rank])
    return t.narrow(dim, start, sizes[rank])


def run_softmax_mean(p, sizes, rank, masked=False, with_bias=True, **options):
    """The distributed op with gradients w.r.t. x, alpha, var, the shard and its bias;
    masked: every point of the last rank's shard gets bias = -inf."""
    x, alpha, var = (p[k].clone().requires_grad_() for k in ("x", "alpha", "var"))
    points = shard(p["points"], sizes, rank, dim=-2).clone().requires_grad_()
    bias = None
    if with_bias:
        bias = shard(p["bias"], sizes, rank).clone()
        if masked and rank == len(sizes) - 1:
            bias.fill_(-math.inf)
        bias.requires_grad_()
    mean, lse = diffmem.distributed.softmax_mean(x, points, alpha, var, bias, return_lse=True,
                                                 **options)
    ((mean * p["g"]).sum() + (lse * p["h"]).sum()).backward()
    out = dict(mean=mean, lse=lse, dx=x.grad, dalpha=alpha.grad, dvar=var.grad,
               dpoints=points.grad)
    if bias is not None:
        out["dbias"] = bias.grad
    return out


THREE_SIZES = [10, 0, 13]
TWO_SIZES = [7, 16]
NEAREST_SIZES = [6, 0, 9]


def three_ranks(rank, world):
    """Uneven shards with an empty one: float64 with bias, a fully masked shard, float32
    queries with leading batch dims, knn."""
    out = {}
    p = problem(1, THREE_SIZES)
    for k, v in run_softmax_mean(p, THREE_SIZES, rank).items():
        out[f"f64_{k}"] = v
    for k, v in run_softmax_mean(p, THREE_SIZES, rank, masked=True).items():
        out[f"masked_{k}"] = v
    p32 = problem(2, THREE_SIZES, dtype=torch.float32, batch=(2,))
    for k, v in run_softmax_mean(p32, THREE_SIZES, rank, with_bias=False,
                                 precision="fast").items():
        out[f"f32_{k}"] = v
    for k in (1, 4, 23):
        dists, idx = diffmem.distributed.knn(p["x"], shard(p["points"], THREE_SIZES, rank, -2), k)
        out[f"knn{k}_dist"], out[f"knn{k}_idx"] = dists, idx
    return out


def two_ranks(rank, world):
    """Uneven shards; per-group points and bias (leading batch dims); float32 and float64;
    mean only (no lse); knn."""
    out = {}
    p = problem(3, TWO_SIZES, batch=(2,), points_batch=(2,))
    for k, v in run_softmax_mean(p, TWO_SIZES, rank).items():
        out[f"f64_{k}"] = v
    p32 = problem(4, TWO_SIZES, dtype=torch.float32, batch=(2,), points_batch=(2,))
    for k, v in run_softmax_mean(p32, TWO_SIZES, rank).items():
        out[f"f32_{k}"] = v
    x = p32["x"].clone().requires_grad_()
    mean = diffmem.distributed.softmax_mean(x, shard(p32["points"], TWO_SIZES, rank, -2),
                                            p32["alpha"], p32["var"])
    (mean * p32["g"]).sum().backward()
    out["plain_mean"], out["plain_dx"] = mean, x.grad
    dists, idx = diffmem.distributed.knn(p["x"], shard(p["points"], TWO_SIZES, rank, -2), 3)
    out["knn_dist"], out["knn_idx"] = dists, idx
    return out


def nearest(rank, world):
    """return_nearest with and without return_lse, float64 and float32, with an empty shard;
    then return_nearest on one rank only."""
    out = {}
    for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        p = problem(5, NEAREST_SIZES, dtype=dtype)
        points = shard(p["points"], NEAREST_SIZES, rank, -2)
        bias = shard(p["bias"], NEAREST_SIZES, rank)
        mean, lse, idx, weight = diffmem.distributed.softmax_mean(
            p["x"], points, p["alpha"], p["var"], bias, return_lse=True, return_nearest=True)
        _, idx2, weight2 = diffmem.distributed.softmax_mean(
            p["x"], points, p["alpha"], p["var"], bias, return_nearest=True)
        out.update({f"{name}_mean": mean, f"{name}_lse": lse, f"{name}_idx": idx,
                    f"{name}_weight": weight, f"{name}_idx2": idx2, f"{name}_weight2": weight2})
    try:  # return_nearest on some ranks only: an error on every rank
        diffmem.distributed.softmax_mean(p["x"], points, p["alpha"], p["var"],
                                         return_nearest=rank == 2)
        errors = {"different_return_nearest": None}
    except ValueError as exc:
        errors = {"different_return_nearest": str(exc)}
    return out, errors


def bad_use(rank, world):
    """Calls that must raise on every rank; then a valid call on the same group."""
    p = problem(6, [4, 5])
    points = shard(p["points"], [4, 5], rank, -2)
    x, alpha, var = p["x"], p["alpha"], p["var"]
    sm, knn = diffmem.distributed.softmax_mean, diffmem.distributed.knn
    nan_points = points.clone()
    if rank == 1:
        nan_points[0, 0] = math.nan
    cases = {
        "different_B": lambda: sm(x[: 6 - rank], points, alpha[: 6 - rank], var[: 6 - rank]),
        "different_d": lambda: sm(x[:, : 5 - rank], points[:, : 5 - rank], alpha, var),
        "different_dtype": lambda: sm(x.float(), points.float(), alpha.float(), var.float())
        if rank == 0 else sm(x, points, alpha, var),
        "nan_on_rank_1": lambda: sm(x, nan_points, alpha, var),
        "different_function": lambda: sm(x, points, alpha, var) if rank == 0
        else knn(x, points, 2),
        "different_grads": lambda: sm(x.clone().requires_grad_(rank == 0), points, alpha, var),
        "all_masked": lambda: sm(x, points, alpha, var, torch.full(points.shape[:-1], -math.inf,
                                                                   dtype=x.dtype)),
        "knn_k_too_large": lambda: knn(x, points, 10),
        "knn_different_k": lambda: knn(x, points, 2 + rank),
        "knn_different_B": lambda: knn(x[: 6 - rank], points, 2),
    }
    errors = {}
    for name, call in cases.items():
        try:
            call()
            errors[name] = None
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    after = sm(x, points, alpha, var)
    return {"after": after}, errors


SCENARIOS = {"three_ranks": three_ranks, "two_ranks": two_ranks, "nearest": nearest,
             "bad_use": bad_use}


def main(scenario, rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        result = SCENARIOS[scenario](rank, world)
        arrays, errors = result if isinstance(result, tuple) else (result, {})
        np.savez(Path(out) / f"rank{rank}.npz",
                 **{k: v.detach().cpu().numpy() for k, v in arrays.items()})
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(errors))
        # every rank done before any tears the group down (gloo aborts a rank whose peer
        # closes the connection while it is still in flight)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    # After collectives that raised (bad_use), gloo may leave a worker thread behind whose
    # destructor aborts the interpreter's teardown; the results are written, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
