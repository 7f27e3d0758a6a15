"""Loading the compiled extension and explaining its absence."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import ModuleType


def _build_info() -> dict:
    path = Path(__file__).resolve().parent.parent / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=None)
def _try_load() -> tuple[ModuleType | None, str]:
    try:
        from diffmem import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        reason = _build_info().get("cpu_reason") or (
            f"the compiled module diffmem._C could not be imported ({exc}); reinstall with a "
            "C++ compiler available"
        )
        return None, reason
    return _C, ""


def cpu_extension_status() -> tuple[bool, str]:
    """(available, reason why not)."""
    module, reason = _try_load()
    return module is not None, reason


def load_cpu_extension() -> ModuleType:
    module, reason = _try_load()
    if module is None:
        raise RuntimeError(f"the cpu backend is unavailable: {reason}")
    return module


def cuda_reason() -> str:
    return _build_info().get("cuda_reason") or "the CUDA module is not part of this build"
