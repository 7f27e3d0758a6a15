"""Triton backend: fused softmax-weighted mean (forward and backward) and exact knn on GPU.

Same contract as ``_reference.py`` over the canonical layout of ``_canonical.py``; float32 only,
except that points may be stored as uint8, float16 or bfloat16 (each load converts them to
float32: the results are those of the points converted to float32, bit for bit).
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (slow; used by the tests).
Kernel families: _forward.py, _backward.py, _knn.py; launch plans and autotuning: _config.py.

Precision (measured under TRITON_INTERPRET=1, float64 oracle):
    exact  per query, the form exact mode's plan chose (diffmem/ops/_exact.py): fp32 direct
           differences with FMA and variance-shifted squared distances, or the expansion around
           the points' centre (queries far from the points); float32 chains of at most 16
           features summed in float64, logits in float64 up to the exp. The forward reports
           each query's top 4 logits, which the host corrects in float64 (mean, lse, and the
           backward's logits of those points). Within the README's bound (mean 1e-5, lse 1e-4,
           gradients 3e-5) on the randomized input classes of tests/test_accuracy_classes.py;
           direct form only (before the plan), VP queries: mean <= 2.5e-6 relative, lse <= 2e-7
           over t in [0.001, 0.999], offsets 0 and 1000, d up to 3072.
    fast   logits from the expansion around the points' mean with tl.dot ("tf32x3" on GPU).
           The interpreter's tl.dot is numpy fp32, so only the fp32 expansion error is measured:
           mean ~1e-7 but the lse error grows like eps |x - alpha c| |y - c| / var; at d = 30:
           lse 1e-6 (t = 0.5), 6e-6 (0.2), 1e-4 (0.05), 3e-3 (0.01), 0.4 (0.001).
    gradients  the backward centres the points and renormalises its recomputed weights (see
           _backward.py), so neither the offset nor the saved lse's error reaches them. exact:
           <= 1e-6 relative (interpreter; d <= 67, t in [0.001, 0.999], offsets 0 and 1000), and
           <= 1.3e-5 on an H200 up to d = 3072. fast: dx, dalpha, dvar as exact; dpoints and
           dbias as exact at t >= 0.3603, but at small t they still carry the expansion's logit
           error (per-point and per-query kernels see logits differing by it, or near-tied points
           get their weight split unevenly): H200, d = 3, offset 1000: 1e-5 (t = 0.05), 8e-2
           (t = 0.001); at d = 3072, t = 0.001 the logits overflow (NaN). Use "exact" at t < 0.05.
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here tells the registry that triton is missing)

from . import _config
from ._backward import backward
from ._forward import forward
from ._knn import knn

__all__ = ["status", "forward", "backward", "knn", "EXACT_PLAN", "takes_plan"]

# The kernels take exact mode's per-query plan and report the top logits (see _exact.py).
EXACT_PLAN = True


def takes_plan(precision: str, B: int, d: int) -> bool:
    """Calls whose kernels compute exact logits take exact mode's plan: precision="exact", or the
    few-query forward (exact logits whatever the precision)."""
    return precision == "exact" or _config.few_queries(B)


def status() -> tuple[bool, str]:
    """(True, "") when the kernels can run: a CUDA device, or TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    if torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device is available (TRITON_INTERPRET=1 runs the kernels on CPU, slowly)"
