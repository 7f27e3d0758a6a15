"""Locating the memorization phase transition and refining around it (SPEC G.5).

Pure functions on (sizes, ratios); no training here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def locate_transition(sizes: Sequence[int], ratios: Sequence[float], delta: float = 0.1):
    """(start, end) of the transition from sizes M_1 < ... < M_n and memorization ratios rho_i.

    start = first M_i with rho_i < delta <= rho_{i+1}; end = first M_{i+1} with
    rho_i < 1 - delta <= rho_{i+1}; defaults M_1 and M_n. Unlike the reference this does not
    fail when rho never crosses delta from below (e.g. rho >= delta already at M_1).
    """
    pairs = sorted(zip((int(m) for m in sizes), (float(r) for r in ratios)))
    if not pairs:
        raise ValueError("need at least one size")
    ms = [m for m, _ in pairs]
    rs = [r for _, r in pairs]
    start = end = None
    for i in range(len(ms) - 1):
        if start is None and rs[i] < delta <= rs[i + 1]:
            start = ms[i]
        if end is None and rs[i] < 1 - delta <= rs[i + 1]:
            end = ms[i + 1]
    start = ms[0] if start is None else start
    end = ms[-1] if end is None else end
    if end < start:  # non-monotone ratios: keep a valid interval
        start, end = min(start, end), max(start, end)
    return start, end


def refinement_sizes(start: int, end: int, coverage: int = 10) -> list[int]:
    """range(start, end + 1, max((end - start) // coverage, 1))."""
    step = max((end - start) // coverage, 1)
    return list(range(start, end + 1, step))


def isotonic(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators), same length as values."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    out: list[float] = []
    for m, c in blocks:
        out.extend([m] * int(c))
    return out


def crossing_point(sizes: Sequence[int], ratios: Sequence[float], level: float = 0.5) -> float:
    """First M where rho rises through `level` (linear interpolation), NaN if it never does."""
    pairs = sorted(zip((int(m) for m in sizes), (float(r) for r in ratios)))
    if pairs and pairs[0][1] >= level:
        return float(pairs[0][0])
    for (m0, r0), (m1, r1) in zip(pairs, pairs[1:]):
        if r0 < level <= r1:
            return m0 + (m1 - m0) * (level - r0) / (r1 - r0)
    return math.nan


__all__ = ["crossing_point", "isotonic", "locate_transition", "refinement_sizes"]
