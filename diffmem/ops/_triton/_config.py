"""Launch plans for the Triton kernels: block sizes, work splits and autotuning candidates.

Vocabulary shared by all kernels:
    BB  queries per program (or per query tile, in the point-gradient kernel)
    BN  points per tile (or per program, in the point-gradient kernel)
    BD  feature chunk: distances and accumulators are processed BD features at a time. When
        d <= BD (SINGLE_D) accumulators live in registers; otherwise each program streams its
        own rows of the (B, d) or (N, d) accumulator through global memory, chunk by chunk
        ("split-d" path; the rows belong to one program, so there is no race and no atomic).
    split
        work split along the streamed dimension (points for the forward, knn and query-gradient
        kernels; queries for the point-gradient kernel) across programs, merged afterwards
        (flash-decoding style). Chosen from the shape so that small batches fill the GPU.
    few
        forward with at most FEW_QUERIES queries per group (sampling a few images at a time):
        exact logits whatever the precision (tl.dot needs 16 rows; at a few queries the kernel
        is bound by reading the points anyway), BB = the queries rounded up to a power of 2
        (at least 2), wide point tiles and many splits; fixed blocks, no autotuning.

Under TRITON_INTERPRET=1 one fixed configuration is used (no autotuning). ``force`` pins any of
block_b / block_n / block_d / split, for tests that must exercise the split paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from triton.runtime import Autotuner

from .. import _host
from .._gpu_common import work_split

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Dot-product precision of precision="fast". "tf32x3" (three TF32 products) keeps the expansion
# at about fp32 accuracy while still using tensor cores; plain "tf32" has a 2^-11 relative
# input rounding, too coarse for the centred expansion at moderate noise.
FAST_DOT = "tf32x3"

# Queries per group up to which the forward takes the few-query plan.
FEW_QUERIES = _host.FEW_QUERIES

# Pinned by tests (block_b, block_n, block_d, split, split_b; few: whether the forward takes the
# few-query plan); forced blocks bypass autotuning, also on a GPU. Used to reach the split-N
# merge, the chunked split-d and the few-query paths on small shapes.
_forced = _host.Pins({"block_b", "block_n", "block_d", "split", "split_b", "few"})
force = _forced.force


@dataclass(frozen=True)
class Plan:
    """How to launch one kernel. blocks is None when the autotuner picks BB/BN/num_warps."""

    block_d: int
    num_d: int
    split: int
    blocks: dict | None  # {"BB": .., "BN": .., "num_warps": .., "num_stages": ..}
    few: bool = False  # the few-query forward: exact logits whatever the precision

    @property
    def single_d(self) -> bool:
        return self.num_d == 1


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _block_d(d: int, fast: bool, on_gpu: bool) -> int:
    if not on_gpu:  # interpreter: big chunks mean fewer (slow) Python-level iterations
        bd = min(_pow2(d), 64)
        return max(bd, 16) if fast else bd
    if fast:  # 2-D tl.dot tiles; K must be >= 16
        return max(16, _pow2(d)) if d <= 64 else 32
    # exact: 3-D (BB, BN, BD) difference tiles; keep BD small, registers in the single-d case
    return _pow2(d) if d <= 16 else 16


def few_queries(B: int) -> bool:
    """Whether the forward takes the few-query plan (exact logits whatever the precision)."""
    return bool(_forced.get("few", B <= FEW_QUERIES))


def plan(kind: str, G: int, B: int, N: int, d: int, fast: bool, device: torch.device) -> Plan:
    """Plan for kind in {"forward", "query_grad", "point_grad", "knn"}.

    For "point_grad" the roles swap: programs own BN points and stream over queries, so the
    split is along B.
    """
    on_gpu = device.type == "cuda" and not INTERPRETED
    few = kind == "forward" and few_queries(B)
    fast = fast and not few
    # Only the forward is 2-D in fast mode; the gradient kernels always build (BB, BN, BD)
    # difference tiles, so they take the exact chunk (at least 16, for the fast logits' tl.dot).
    bd = _block_d(d, fast and kind == "forward", on_gpu)
    if fast and kind in ("query_grad", "point_grad"):
        bd = max(bd, 16)
    bd = _forced.get("block_d") or bd
    num_d = triton.cdiv(d, bd)
    few_bb = min(16, max(2, _pow2(B)))
    if few:
        split = _forced.get("split") or work_split(G * triton.cdiv(B, few_bb), N, B, d, device,
                                                   blocks_per_sm=4, min_items=256)
        # One (BB, BN, BD) difference tile within the exact forward's register budget (64).
        bn = min(128, 64 * 128 // (few_bb * bd)) if on_gpu else 16
        blocks = {"BB": _forced.get("block_b", few_bb), "BN": _forced.get("block_n", bn),
                  "num_warps": 4, "num_stages": 2 if num_d == 1 and on_gpu else 1}
        return Plan(block_d=bd, num_d=num_d, split=split, blocks=blocks, few=True)
    nominal = 32  # rows per program assumed when choosing the split before autotuning
    if kind == "point_grad":
        split = _forced.get("split_b") or work_split(G * triton.cdiv(N, nominal), B, N, d, device)
    else:
        split = _forced.get("split") or work_split(G * triton.cdiv(B, nominal), N, B, d, device)
    blocks = None
    if not on_gpu or "block_b" in _forced or "block_n" in _forced:
        small = 16
        blocks = {
            "BB": _forced.get("block_b", small),
            "BN": _forced.get("block_n", small),
            "num_warps": 4,
            "num_stages": 1,
        }
    return Plan(block_d=bd, num_d=num_d, split=split, blocks=blocks)


# The configuration the autotuner chose first for each kernel and launch key (see run_kernel).
_chosen: dict = {}


def run_kernel(kernel, grid, args: tuple, constexprs: dict, tuned_on: tuple) -> None:
    """kernel[grid](*args, **constexprs) for a kernel with fixed blocks (in constexprs) or an
    autotuned one (triton.autotune).

    tuned_on: the values of the autotuner's key arguments that are not constexprs. Triton's
    autotuner also keys on every argument's dtype; here the configuration it chose first for a
    launch key (tuned_on and the constexprs) serves every later launch with that key, whatever
    the dtypes. Point tiles of another size round differently, so this is what keeps points
    stored as uint8, float16 or bfloat16 giving the bits of the same points in float32.
    """
    if not isinstance(kernel, Autotuner):
        kernel[grid](*args, **constexprs)
        return
    key = (id(kernel), tuned_on, tuple(sorted(constexprs.items())))
    chosen = _chosen.get(key)
    if chosen is None:
        kernel[grid](*args, **constexprs)
        _chosen[key] = kernel.best_config
    else:
        kernel.fn[grid](*args, **constexprs, **chosen.all_kwargs())


def autotune_configs(fast: bool, block_d: int, single_d: bool,
                     budget: int = 64) -> list[triton.Config]:
    """At most two candidates per kernel so the first call (compile + tune) stays short.

    fast=True only for the 2-D (tl.dot) forward; kernels with 3-D difference tiles pass False.
    budget: fp32 elements per thread of the largest live tiles (3-D: one (BB, BN, BD) tile; the
    gradient kernels hold several and pass 32). Checked for sm_90 with ptxas: within these
    budgets the forward kernels compile without spills.
    """
    if fast:
        prefs = [(64, 64, 8), (64, 32, 4), (128, 64, 8), (32, 32, 4)]
    else:
        prefs = [(32, 32, 4), (16, 32, 4), (32, 32, 8), (64, 32, 8), (16, 32, 8), (16, 16, 4)]
    chosen = []
    for bb, bn, warps in prefs:
        threads = 32 * warps
        if fast:  # logits and their partial sum, both operands, the register accumulator
            live = 2 * bb * bn + (bb + bn) * block_d + (bb * block_d if single_d else 0)
        else:
            live = bb * bn * block_d
        if live > budget * threads:
            continue
        chosen.append(triton.Config({"BB": bb, "BN": bn}, num_warps=warps,
                                    num_stages=2 if single_d else 1))
        if len(chosen) == 2:
            break
    if not chosen:
        chosen.append(triton.Config({"BB": 16, "BN": 16}, num_warps=4, num_stages=1))
    return chosen
