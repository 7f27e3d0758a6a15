"""Progress lines with elapsed time and estimates on stderr (throttled)."""

from __future__ import annotations

import sys
import time


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Prints '[label] k/n  elapsed  eta' to a stream at most every `every` seconds.

    quiet=True prints nothing but warnings. note() prints a line unconditionally, warn() even
    when quiet.
    """

    def __init__(self, quiet: bool = False, every: float = 5.0, stream=None):
        self.quiet, self.every = quiet, every
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self._last = 0.0

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"[{fmt_seconds(time.perf_counter() - self.t0)}] {text}", file=self.stream,
                  flush=True)

    def warn(self, text: str) -> None:
        """A line that is printed even when quiet: something was not as expected."""
        print(f"[{fmt_seconds(time.perf_counter() - self.t0)}] warning: {text}", file=self.stream,
              flush=True)

    def task(self, label: str, zero_based: bool = False):
        """A callback (k, n, *_) for a sub-task: k finished units of n (k + 1 if zero_based,
        as train_gmm_models reports its 0-based step)."""
        start = time.perf_counter()

        def update(k: int, n: int, *_):
            now = time.perf_counter()
            done = k + 1 if zero_based else k
            if self.quiet or (now - self._last < self.every and done < n):
                return
            self._last = now
            el = now - start
            eta = el / done * (n - done) if done else float("nan")
            eta_s = fmt_seconds(eta) if done else "?"
            print(f"[{fmt_seconds(now - self.t0)}] {label}: {done}/{n} ({100 * done / n:.0f}%), "
                  f"{fmt_seconds(el)} elapsed, ~{eta_s} left", file=self.stream, flush=True)

        return update


__all__ = ["Progress", "fmt_seconds"]
