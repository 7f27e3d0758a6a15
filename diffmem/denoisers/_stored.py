"""Training points as stored: float tensors, or codes with an affine map.

Image data sets are uint8 codes, value = scale * code + offset (scale a positive number, offset
a number or one value per feature). The memorizing denoisers take such data directly and never
materialize a float copy of the set: since

    ||x - alpha (scale c + offset)||^2 = ||(x - alpha offset) - (alpha scale) c||^2,

the softmax over the values is the softmax over the codes with the query shifted by
alpha * offset (one float32 rounding, like rounding the query itself) and alpha scaled by
scale; the mean maps back by the same affine map and lse is unchanged. softmax_mean reads the
codes in their own bytes (see diffmem.softmax_mean: uint8, float16 and bfloat16 points).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from ..ops import softmax_mean


def check_affine(data: torch.Tensor, scale, offset) -> tuple[float | None, torch.Tensor | None]:
    """Validated (scale, offset) for data (N, *shape): scale None or a finite number > 0;
    offset None, a finite number, or a tensor of prod(shape) or shape values (one per
    feature). Returns scale as float and offset as a float tensor (D,) or 0-d (or None)."""
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real) or not (
                math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
        scale = float(scale)
    if offset is None:
        return scale, None
    D = math.prod(data.shape[1:])
    if isinstance(offset, Real) and not isinstance(offset, bool):
        offset_t = torch.tensor(float(offset), dtype=torch.float64)
    elif isinstance(offset, torch.Tensor) and offset.is_floating_point() and (
            offset.dim() == 0 or offset.numel() == D):
        offset_t = offset.detach().to(torch.float64).reshape(-1 if offset.dim() else ())
    else:
        raise ValueError(f"offset must be None, a number or a float tensor of {D} values (one "
                         f"per feature), got {offset!r}")
    if not bool(torch.isfinite(offset_t).all()):
        raise ValueError("offset must be finite")
    return scale, offset_t.to(data.device)


def stored_posterior(x: torch.Tensor, points: torch.Tensor, alpha, var, *, scale=None,
                     offset=None, bias=None, backend="auto", precision="exact",
                     return_lse=True, return_nearest=False, op=softmax_mean):
    """(mean (B, D), lse (B,) or None without return_lse[, nearest_idx, nearest_weight]) of the
    softmax over the values scale * points + offset (see the module doc) for queries x (B, D);
    alpha, var as in softmax_mean; op: softmax_mean or a function with its signature
    (diffmem.distributed.softmax_mean for points sharded over processes)."""
    s = 1.0 if scale is None else scale
    a, xq = alpha, x
    if scale is not None or offset is not None:
        a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(
            float(alpha), dtype=x.dtype, device=x.device)
        if offset is not None:
            a64 = a.double()
            shift = (a64[..., None] if a64.dim() else a64) * offset
            xq = (x.double() - shift).to(x.dtype)
        a = a * s
    out = op(xq, points, a, var, bias, backend=backend, precision=precision,
             return_lse=return_lse, return_nearest=return_nearest)
    out = (out,) if isinstance(out, torch.Tensor) else out
    if not return_lse:  # the lse slot stays, empty
        out = (out[0], None, *out[1:])
    mean = out[0] if scale is None else out[0] * s
    if offset is not None:
        mean = mean + offset.to(mean.dtype)
    return (mean, *out[1:])
