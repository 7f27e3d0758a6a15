"""Host rules shared by every kernel backend (cpu, triton, cuda): layout of the tensors handed
to the kernels, raw pointers, precision codes, the few-query threshold of the GPU forwards and
the launch choices tests may pin. Pure torch; each backend's module keeps only its own
marshalling.
"""

from __future__ import annotations

import contextlib

import torch

# Precision codes of the compiled kernels.
PRECISION_CODES = {"exact": 0, "fast": 1}
# Queries per group up to which the GPU forwards take their few-query kernels (exact logits
# whatever the precision: there the points' memory traffic, not arithmetic, sets the time).
FEW_QUERIES = 16


def ptr(t: torch.Tensor | None) -> int:
    """Address of a tensor's first element for the compiled kernels; 0 for an absent input."""
    return 0 if t is None else t.data_ptr()


def group_stride(t: torch.Tensor | None) -> int:
    """Element stride between groups of a canonical tensor (0 when shared or G == 1)."""
    if t is None or t.shape[0] == 1:
        return 0
    return t.stride(0)


def groupwise(t: torch.Tensor | None) -> torch.Tensor | None:
    """Make each group contiguous, keeping a stride-0 group dimension shared (never copied)."""
    if t is None:
        return None
    if t.shape[0] > 1 and t.stride(0) == 0:
        one = t[:1]
        return t if one.is_contiguous() else one.contiguous().expand(t.shape)
    if t.shape[0] == 1 or t.stride(0) == 0:
        return t if t[0].is_contiguous() else t.contiguous()
    return t.contiguous()


class Pins:
    """Launch choices of one backend pinned by tests (splits, blocks, which kernel): read with
    ``get`` / ``in``, set for a block with ``force(**choices)`` (None leaves a choice free)."""

    def __init__(self, allowed):
        self.allowed = frozenset(allowed)
        self.values: dict = {}

    def get(self, key, default=None):
        return self.values.get(key, default)

    def __contains__(self, key) -> bool:
        return key in self.values

    @contextlib.contextmanager
    def force(self, **choices):
        unknown = set(choices) - self.allowed
        if unknown:
            raise ValueError(f"unknown launch choices {sorted(unknown)}; "
                             f"allowed: {sorted(self.allowed)}")
        previous = dict(self.values)
        self.values.update({k: v for k, v in choices.items() if v is not None})
        try:
            yield
        finally:
            self.values.clear()
            self.values.update(previous)
