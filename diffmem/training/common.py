"""What the training loops share: argument checks, the per-model seed and the divergence
check."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch


def check_int(value, name: str, minimum: int = 0) -> int:
    """value if it is an int >= minimum; TypeError / ValueError naming the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_number(value, name: str, low: float = -math.inf, high: float = math.inf,
                 open_low: bool = False) -> float:
    """float(value) if it is a number in [low, high] ((low, high] with open_low)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (low < value if open_low else low <= value) or not value <= high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")
    return value


def check_sizes(sizes) -> list[int]:
    """A non-empty sequence of distinct model sizes M >= 1, as a list."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise TypeError("sizes must be a non-empty sequence of ints")
    sizes = [check_int(M, "sizes[i]", 1) for M in sizes]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must be distinct, got {sizes}")
    return sizes


def model_seed(seed: int, M: int) -> int:
    """A 63-bit seed that depends only on (seed, M)."""
    digest = hashlib.sha256(f"diffmem.train:{seed}:{M}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TrainingDiverged(RuntimeError):
    """A training loss or parameter became NaN or infinite; step (1-based), size M and loss
    say where."""

    def __init__(self, step: int, steps: int, size: int, loss: float):
        self.step, self.steps, self.size, self.loss = step, steps, size, loss
        what = (f"loss {loss:g}" if not math.isfinite(loss) else
                f"non-finite parameters (loss {loss:g})")
        super().__init__(f"training diverged at step {step} of {steps}: the model of size "
                         f"M={size} reached {what}; lower the peak learning rate or the gradient "
                         f"clipping norm")


def check_finite(step: int, steps: int, sizes: Sequence[int], losses: torch.Tensor,
                 params) -> None:
    """Raise TrainingDiverged if losses (one per size, this step's) or any of params (tensors
    with a leading model dimension of len(sizes), or shared by one model) is not finite.
    Reads only: the run's numbers do not change."""
    losses = losses.detach().reshape(-1)
    bad = ~torch.isfinite(losses)
    for p in params:
        finite = torch.isfinite(p.detach())
        bad = bad | ~(finite.reshape(len(sizes), -1).all(1) if len(sizes) > 1 else finite.all())
    if bool(bad.any()):
        g = int(bad.nonzero()[0, 0]) if bad.numel() > 1 else 0
        raise TrainingDiverged(step, steps, sizes[g], float(losses[g if losses.numel() > 1 else 0]))


__all__ = ["TrainingDiverged", "check_finite", "check_int", "check_number", "check_sizes",
           "model_seed"]
