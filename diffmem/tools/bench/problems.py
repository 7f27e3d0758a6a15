"""The benchmark's inputs and its float64 reference: VP-process queries around Gaussian points
(the same points, indices and noise for any sigma), and per-row errors against float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

TIME_SIGMA = 0.5


@dataclass
class Problem:
    """One set of inputs: queries x (B, d), points y (N, d), scalar alpha and var, optional bias."""

    x: torch.Tensor
    y: torch.Tensor
    alpha: float
    var: float
    sigma: float
    bias: torch.Tensor | None = None


def make_problem(B, N, d, sigma, *, device="cpu", seed=0, bias=False) -> Problem:
    """VP-process queries around random points; the same points, indices and noise for any sigma."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(N, d, generator=gen)
    j = torch.randint(N, (B,), generator=gen)
    noise = torch.randn(B, d, generator=gen)
    b = torch.randn(N, generator=gen) if bias else None
    alpha = math.sqrt(1.0 - sigma * sigma)
    x = alpha * y[j] + sigma * noise
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Problem(to(x), to(y), alpha, sigma * sigma, sigma, to(b))


def reference_mean(p: Problem, rows: int) -> torch.Tensor:
    """float64 mean of the first `rows` queries over all points.

    Uses the expansion ||x||^2 - 2 alpha x.y + alpha^2 ||y||^2 in float64: its logit error is
    about 1e-16 * ||x||^2 / var, below 1e-8 for every size here, far under float32 error.
    """
    x, y = p.x[:rows].double(), p.y.double()
    dist = (x * x).sum(1, keepdim=True) - 2 * p.alpha * (x @ y.T) + p.alpha**2 * (y * y).sum(1)
    logits = -dist / (2 * p.var)
    if p.bias is not None:
        logits = logits + p.bias.double()
    return torch.softmax(logits, -1) @ y


def row_errors(out, ref: torch.Tensor) -> tuple[float, float]:
    """Median and max over rows of ||out_row - ref_row|| / ||ref_row||; out a tensor or an
    array of another framework (a jax peer's result)."""
    if not isinstance(out, torch.Tensor):
        out = torch.tensor(np.asarray(out), device=ref.device)
    out = out[: ref.shape[0]].double()
    err = (out - ref).norm(dim=1) / ref.norm(dim=1)
    return err.median().item(), err.max().item()


__all__ = ["TIME_SIGMA", "Problem", "make_problem", "reference_mean", "row_errors"]
