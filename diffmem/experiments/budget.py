"""A run's memory, checked before anything is allocated: the kind's estimate of its dominant
arrays (ExperimentKind.memory) against the memory this machine has available, so that a run
that cannot fit stops at once with the options to lower instead of dying half-way."""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError

OPTIONS = {  # what to lower when a part of the estimate is too large
    "training": "--dim, --samples, --draws or the number of --sizes",
    "evaluation": "--dim, --samples, --val-samples, --eval-draws or --eval-samples",
    "kept": "--steps, --dim or --samples",
}


def estimate(config, kind, training: bool = True) -> tuple[int, str]:
    """(bytes, the largest part) of a run of config: what it keeps plus its largest transient
    stage (training, when training is True, or evaluation)."""
    parts = dict(kind.memory(config))
    if not training:
        parts.pop("training")
    stage = max((k for k in parts if k != "kept"), key=parts.get)
    return parts["kept"] + parts[stage], max(("kept", stage), key=parts.get)


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def available_memory() -> int | None:
    """Bytes of memory available to this process now: the least of the system's available
    memory and the room left under a cgroup limit; None when neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        found.append(max(limit - used, 0))
    return min(found) if found else None


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.3g} GiB"


def check_memory(config, kind, training: bool = True) -> None:
    """ConfigError (one line naming the options to lower) if the estimate exceeds the
    available memory."""
    need, part = estimate(config, kind, training)
    have = available_memory()
    if have is not None and need > have:
        raise ConfigError(f"this run would need about {_gib(need)} of memory (mostly {part}), "
                          f"more than the {_gib(have)} available: lower {OPTIONS[part]}")


__all__ = ["OPTIONS", "available_memory", "check_memory", "estimate"]
