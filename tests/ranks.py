"""Helpers for tests that start several processes (gloo ranks) and wait for them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_ranks(procs: list[subprocess.Popen], logs, limit_s: float) -> list[tuple[int, int]]:
    """Wait for every process, all together at most limit_s seconds; kill the ones still running,
    close the log files, and return (rank, exit code) of each rank that failed or hung."""
    deadline = time.monotonic() + limit_s
    try:
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]


def rank_log_tails(folder: Path, failed: list[tuple[int, int]], chars: int = 3000) -> str:
    """The end of rank{r}.log in folder for each failed (rank, exit code)."""
    return "\n".join(f"--- rank {r} (exit {rc}):\n" + (folder / f"rank{r}.log").read_text()[-chars:]
                     for r, rc in failed)
