"""An optional peer of the benchmark: jax.jit of the plain matmul form, when jax is installed.

It computes what torch-naive and torch-chunked compute, in one piece: logits = x (alpha / var)
y^T - alpha^2 |y|^2 / (2 var) + bias (|x|^2 cancels in the softmax), softmax over the points,
weighted sum of the points. jax is not a dependency: without it the method is skipped.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from .problems import Problem

NAME = "jax-jit"
# jax's name of the platform serving each benchmark device
_PLATFORMS = {"cpu": "cpu", "cuda": "gpu"}


def skip_reason(device: str) -> str:
    """Why the jax peer cannot run on this benchmark device ("" when it can)."""
    if importlib.util.find_spec("jax") is None:
        return "jax is not installed (optional)"
    return "" if _device(device) is not None else f"jax has no {_PLATFORMS.get(device)} device"


def _device(device: str):
    import jax

    try:
        found = jax.devices(_PLATFORMS.get(device, device))
    except RuntimeError:  # no backend for that platform
        return None
    return found[0] if found else None


@functools.cache
def _compiled():
    """The jitted mean (x, y, scale, point_scale, bias) -> (B, d); compiled once per shape."""
    import jax
    import jax.numpy as jnp

    highest = jax.lax.Precision.HIGHEST  # no reduced-precision matmuls (TF32 on GPUs)

    def mean(x, y, scale, point_scale, bias):
        term = point_scale * jnp.sum(y * y, axis=1) + bias  # (N,)
        logits = jnp.matmul(x * scale, y.T, precision=highest) + term
        return jnp.matmul(jax.nn.softmax(logits, axis=-1), y, precision=highest)

    return jax.jit(mean)


def setup(p: Problem, device: str):
    """A zero-argument call timing the jitted mean of p (its inputs moved to jax's device and
    compiled here, outside the timed call; the call blocks until the result is ready). It
    returns the mean as a jax array (row_errors converts it)."""
    import jax

    dev = _device(device)
    put = lambda t: jax.device_put(np.asarray(t.detach().cpu()), dev)  # noqa: E731
    x, y = put(p.x), put(p.y)
    bias = put(p.bias if p.bias is not None else torch.zeros(p.y.shape[0], dtype=p.y.dtype))
    scale = np.float32(p.alpha / p.var)
    point_scale = np.float32(-(p.alpha * p.alpha) / (2 * p.var))
    fn = _compiled()
    fn(x, y, scale, point_scale, bias).block_until_ready()  # compile and warm up

    def call():
        return fn(x, y, scale, point_scale, bias).block_until_ready()

    return call


__all__ = ["NAME", "setup", "skip_reason"]
