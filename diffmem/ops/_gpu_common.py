"""Host-side pieces shared by the GPU backends (triton and cuda): layout, centring, work splits
and the float64 lse. Pure torch, so either backend works without the other's package.
"""

from __future__ import annotations

import torch

from ._canonical import COMPACT_POINT_DTYPES
from ._host import group_stride, groupwise  # noqa: F401  (re-exported for the GPU backends)

# Largest partial-result buffer a split may allocate, in elements (256 MiB of float32).
MAX_PARTIAL_ELEMENTS = 1 << 26
# Largest chunk of points converted to float32 at once by point_mean, in elements (16 MiB).
MEAN_CHUNK_ELEMENTS = 1 << 22


def check_float32(*tensors, backend: str, points=None) -> None:
    """The GPU kernels compute in float32; the registry only routes float32 calls to them.

    points (optional) may also be stored as uint8, float16 or bfloat16 (COMPACT_POINT_DTYPES):
    the kernels convert each value to float32 as they read it.
    """
    for t in tensors:
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"the {backend} backend supports float32 only, got {t.dtype}")
    if points is not None and points.dtype != torch.float32 \
            and points.dtype not in COMPACT_POINT_DTYPES:
        raise TypeError(f"the {backend} backend takes float32 points or uint8, float16, "
                        f"bfloat16 ones, got {points.dtype}")


def point_mean(points: torch.Tensor) -> torch.Tensor:
    """Mean over the points of each group, (G, N, d) -> (G, d) float32.

    The same bits whatever dtype the points are stored in: rows are converted to float32 in
    chunks of at most MEAN_CHUNK_ELEMENTS (a bounded buffer, never a float copy of a larger
    point set) and float32 points take the same chunks, so both reduce equal float32 tensors.
    One chunk is points.float().mean(1).
    """
    G, N, d = points.shape
    step = max(1, MEAN_CHUNK_ELEMENTS // max(1, G * d))
    if step >= N:
        return points.float().mean(dim=1)
    total = None
    for start in range(0, N, step):
        part = points[:, start:start + step].float().contiguous().sum(dim=1)
        total = part if total is None else total + part
    return total / N


def first_rows(points: torch.Tensor) -> torch.Tensor:
    """Each group's first point as float32 rows (G, d) (group stride 0 when the groups share
    their points): a centre row for kernels that read their centre as float32. Float32 points
    are returned as they are (row 0 of each group is read in place)."""
    if points.dtype == torch.float32:
        return points
    if points.shape[0] > 1 and points.stride(0) == 0:
        return points[:1, 0].float().expand(points.shape[0], -1)
    return points[:, 0].float()


def centred_shift(x, points, alpha, var):
    """Centre c (G or 1, d) of each group's points and kq = ||x - alpha c||^2 / (2 var), (G, B).

    precision="fast" computes logits from the expansion around c and leaves out the per-query
    constant kq; lse subtracts it at the end. c is the points' mean in float32 (point_mean),
    the same for points stored in a compact dtype and for the same points in float32.
    """
    if points.shape[0] > 1 and points.stride(0) == 0:
        c = point_mean(points[:1]).expand(points.shape[0], -1)
    else:
        c = point_mean(points)
    xc = torch.addcmul(x, alpha[:, :, None], c[:, None, :], value=-1.0)
    kq = (xc * xc).sum(-1) / (2.0 * var)
    return c, kq.contiguous()


def logit_shift(fast: bool, d: int, kq: torch.Tensor | None):
    """What the kernels' logits carry on top of the true ones: d / 2 (exact) or kq (fast)."""
    return kq.double() if fast else 0.5 * d


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def work_split(programs: int, stream_len: int, rows: int, d: int, device: torch.device,
               blocks_per_sm: int = 2, min_items: int = 128, max_split: int = 1024,
               sms: int | None = None) -> int:
    """Split the streamed dimension when `programs` blocks are too few to fill the GPU.

    Aims at blocks_per_sm blocks on each of the device's multiprocessors (or `sms` of them),
    keeps >= min_items streamed items per split, at most max_split splits, and the partial
    buffer (split x rows x d) under MAX_PARTIAL_ELEMENTS. CPU tensors (the interpreter and
    the emulator) are never split.
    """
    if device.type != "cuda" and sms is None:
        return 1
    target = blocks_per_sm * (sms or num_sms(device))
    if programs >= target:
        return 1
    split = -(-target // programs)
    split = min(split, max(1, stream_len // min_items), max_split)
    split = min(split, max(1, MAX_PARTIAL_ELEMENTS // max(1, rows * d)))
    return max(1, split)


def reduce_partials(buf: torch.Tensor) -> torch.Tensor:
    """Sum a (split, ...) partial buffer in a fixed order (deterministic)."""
    return buf[0] if buf.shape[0] == 1 else buf.sum(0)


def merge_knn_partials(dist: torch.Tensor, idx: torch.Tensor, k: int):
    """(split, G, B, k) per-split top-k lists -> (G, B, k) distances and indices.

    With one split the lists are final (distances already square-rooted by the kernel).
    Otherwise they hold squared distances; splits are in index order and a stable sort keeps
    ties on the lower index.
    """
    S, G, B, _ = dist.shape
    if S == 1:
        return dist[0], idx[0]
    dist = dist.permute(1, 2, 0, 3).reshape(G, B, S * k)
    idx = idx.permute(1, 2, 0, 3).reshape(G, B, S * k)
    dist, order = torch.sort(dist, dim=-1, stable=True)
    return dist[..., :k].sqrt(), torch.gather(idx, -1, order[..., :k])
