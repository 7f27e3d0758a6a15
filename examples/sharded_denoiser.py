"""The empirical denoiser of a training set split over processes, checked against one process.

    torchrun --nproc_per_node 2 examples/sharded_denoiser.py

Two patterns:

- point sharding (diffmem.distributed): every rank holds the same queries and a disjoint shard
  of the training set (shards in rank order make up the whole set); every rank gets the
  denoiser over the whole set, its nearest neighbours, and gradients;
- query sharding: every rank holds all the points and its own queries; plain
  diffmem.softmax_mean per rank, and an all_reduce of the gradients of anything shared (as
  DistributedDataParallel does).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import diffmem


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's shard of n items: consecutive, sizes differing by at most 1."""
    return n * rank // world, n * (rank + 1) // world


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else (
        torch.device("cpu"))
    if backend == "nccl":
        torch.cuda.set_device(device)

    # The training set. Here every rank draws it from the same seed to check the result
    # against one process; a real run would load only its rows (np.load(..., mmap_mode="r")).
    N, d, B, t = 20000, 64, 256, 0.8
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(N, d, generator=gen).to(device)
    start, stop = shard_range(N, rank, world)
    shard = data[start:stop]
    alpha, var = (1 - t * t) ** 0.5, t * t
    x_t = (alpha * data[:B] + t * torch.randn(B, d, generator=gen).to(device)).requires_grad_()

    # Point sharding: the denoiser over the whole set on every rank.
    diffmem.distributed.softmax_mean(x_t.detach(), shard, alpha, var)  # warm-up (first use)
    begin = time.perf_counter()
    x0_hat, lse = diffmem.distributed.softmax_mean(x_t, shard, alpha, var, return_lse=True)
    dist_d, dist_i = diffmem.distributed.knn(x0_hat.detach(), shard, k=2)
    x0_hat.square().sum().backward()  # every rank computes the same loss
    elapsed = time.perf_counter() - begin

    # The same in one process, for the comparison.
    x_ref = x_t.detach().clone().requires_grad_()
    ref, ref_lse = diffmem.softmax_mean(x_ref, data, alpha, var, return_lse=True)
    ref_d, ref_i = diffmem.knn(x0_hat.detach(), data, k=2)
    ref.square().sum().backward()
    if rank == 0:
        print(f"{world} ranks ({backend}), N = {N} points in d = {d}, {B} queries at t = {t}; "
              f"shard of rank 0: rows {start}..{stop - 1}")
        print(f"point sharding: {elapsed * 1e3:.1f} ms for mean, lse, knn and the backward")
        print(f"  mean: relative difference to one process {rel(x0_hat, ref):.1e}")
        print(f"  lse: max difference {(lse - ref_lse).abs().max().item():.1e} "
              f"(|lse| up to {lse.abs().max().item():.0f})")
        print(f"  gradient w.r.t. x_t: relative difference {rel(x_t.grad, x_ref.grad):.1e}")
        print(f"  knn: indices equal {torch.equal(dist_i, ref_i)}, "
              f"distances equal {torch.equal(dist_d, ref_d)}")

    # Query sharding: every rank denoises its own queries against all the points, here with
    # learnable points (e.g. a mixture's means) whose gradient is summed over the ranks.
    means = data[:500].clone().requires_grad_()
    mine = x_t.detach()[start * B // N: stop * B // N]  # this rank's queries
    out = diffmem.softmax_mean(mine, means, alpha, var)
    out.square().sum().backward()
    dist.all_reduce(means.grad)  # the gradient of the sum of all ranks' losses
    ref_means = data[:500].clone().requires_grad_()
    diffmem.softmax_mean(x_t.detach(), ref_means, alpha, var).square().sum().backward()
    if rank == 0:
        print(f"query sharding: {len(mine)} of {B} queries on rank 0; gradient w.r.t. the "
              f"shared points: relative difference {rel(means.grad, ref_means.grad):.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
