"""Loading the compiled extension and explaining its absence."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType


def _build_info() -> dict:
    """CPU_REASON / CUDA_REASON from the module CMake writes at build time (absent if unbuilt)."""
    try:
        info = importlib.import_module("diffmem._build_info")
    except ImportError:
        return {}
    return {"cpu_reason": info.CPU_REASON, "cuda_reason": info.CUDA_REASON}


_loaded: list[tuple[ModuleType | None, str]] = []  # filled on first use


def _try_load() -> tuple[ModuleType | None, str]:
    if not _loaded:
        try:
            from diffmem import _C  # type: ignore[attr-defined]

            _loaded.append((_C, ""))
        except ImportError as exc:
            reason = _build_info().get("cpu_reason") or _shadowed_reason() or (
                f"the compiled module diffmem._C could not be imported ({exc}); reinstall "
                "with a C++ compiler available"
            )
            _loaded.append((None, reason))
    return _loaded[0]


def _shadowed_reason() -> str:
    """Explain a source checkout imported in place of an installed copy that has diffmem._C."""
    from importlib import metadata

    here = Path(__file__).resolve().parent.parent
    try:
        dist = metadata.distribution("diffmem")
    except metadata.PackageNotFoundError:
        return ""
    for f in dist.files or []:
        if f.parent.name == "diffmem" and f.name.startswith("_C."):
            installed = Path(dist.locate_file(f)).resolve().parent
            if installed != here:
                return (f"diffmem was imported from {here}, a source checkout without the compiled "
                        f"module, instead of the installed copy in {installed}: run Python from "
                        "outside the checkout, run the tests with `pytest` (not `python -m "
                        "pytest`), or install in editable mode (`pip install -e .`)")
    return ""


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
