"""Backend registry and call-time selection.

A backend is a module with these functions over the canonical layout of _canonical.py:

    forward(x, points, alpha, var, bias, precision, plan=None, nearest=False)
        -> mean (G, B, d), lse (G, B), lse64 (G, B)
           [+ top_idx (G, B, K) int64, top_logit (G, B, K) float64 with a plan or nearest]
    backward(x, points, alpha, var, bias, mean, lse64, grad_mean, grad_lse, needs, precision)
        -> (dx, dpoints, dalpha, dvar, dbias), dense, None where needs[i] is False
    knn(queries, points, k) -> dist (G, B, k), idx (G, B, k) int64

Exact mode's plan and its top lists are described in _exact.py. Without a plan, ``nearest``
asks for the top list of the largest exact logit alone (K = 1; the float64 kernels and the
reference). Points may come in a storage dtype (uint8, float16, bfloat16) with float32 queries
where the backend lists it in ``point_dtypes``: computed as if converted to float32 first; the
gradient w.r.t. such points is returned in float32 (the op casts it).

lse64 is lse in float64 (weights recomputed from a rounded lse would not sum to one when |lse|
is large); outputs are allocated with _alloc.new_output. BACKENDS says where each one runs.
``backend="auto"`` (or the environment variable DIFFMEM_BACKEND) picks, for CUDA tensors: cuda,
then triton, then reference; for CPU tensors: cpu, then reference.
An explicitly requested backend that cannot run the call is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _cuda
from ._extension import cpu_extension_status


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str  # module path, imported on first use
    status: Callable[[], tuple[bool, str]]  # (available, reason why not); probes on first call
    devices: Callable[[], tuple[str, ...]]  # device types it runs on
    dtypes: tuple[torch.dtype, ...]
    # storage dtypes the points may have with float32 queries (see _canonical.py)
    point_dtypes: tuple[torch.dtype, ...] = ()


def _always() -> tuple[bool, str]:
    return True, ""


@functools.cache
def _triton_module() -> tuple[ModuleType | None, str]:
    """The Triton kernels, imported on first use (importing diffmem does not import Triton)."""
    try:
        return importlib.import_module("diffmem.ops._triton"), ""
    except ImportError as exc:
        return None, f"triton kernels could not be loaded ({exc})"


def _triton_status() -> tuple[bool, str]:
    mod, reason = _triton_module()
    return (False, reason) if mod is None else mod.status()


def _triton_devices() -> tuple[str, ...]:
    # Under TRITON_INTERPRET=1 Triton kernels run on CPU tensors (slowly): used by the tests.
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _everywhere() -> tuple[str, ...]:
    return ("cpu", "cuda")


def _cpu_only() -> tuple[str, ...]:
    return ("cpu",)


_F32_F64 = (torch.float32, torch.float64)
_COMPACT = (torch.uint8, torch.float16, torch.bfloat16)

BACKENDS: dict[str, BackendSpec] = {
    "reference": BackendSpec("reference", "diffmem.ops._reference", _always, _everywhere, _F32_F64,
                               _COMPACT),
    "cpu": BackendSpec("cpu", "diffmem.ops._cpu", cpu_extension_status, _cpu_only, _F32_F64,
                       _COMPACT),
    "triton": BackendSpec("triton", "diffmem.ops._triton", _triton_status, _triton_devices,
                          (torch.float32,), _COMPACT),
    # the CUDA module is loaded on first use; its host-emulator build runs on CPU tensors
    "cuda": BackendSpec("cuda", "diffmem.ops._cuda", _cuda.status, _cuda.devices, (torch.float32,),
                        _COMPACT),
}

_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def backends() -> dict[str, dict]:
    """What each backend is: available or not (and why), devices and dtypes it serves."""
    report = {}
    for name, spec in BACKENDS.items():
        ok, reason = spec.status()
        report[name] = {
            "available": ok,
            "reason": "" if ok else reason,
            "devices": list(spec.devices()),
            "dtypes": [str(t).removeprefix("torch.") for t in spec.dtypes],
            "point_dtypes": [str(t).removeprefix("torch.") for t in spec.point_dtypes],
        }
    return report


def _can_run(spec: BackendSpec, device: torch.device, dtype: torch.dtype,
             point_dtype: torch.dtype | None) -> str:
    """Empty string when spec can run this call, else the reason."""
    ok, reason = spec.status()
    if not ok:
        return reason
    if device.type not in spec.devices():
        return f"it runs on {', '.join(spec.devices())} tensors, not {device.type}"
    if dtype not in spec.dtypes:
        return f"it supports {', '.join(str(t) for t in spec.dtypes)}, not {dtype}"
    if point_dtype not in (None, dtype) and point_dtype not in spec.point_dtypes:
        stored = ", ".join(str(t) for t in spec.point_dtypes) or "none"
        return f"it takes points of the queries' dtype or of {stored}, not {point_dtype}"
    return ""


def check_name(requested: object) -> None:
    """A backend argument is "auto" or a known name (availability is checked by resolve)."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(
            f"unknown backend {requested!r}; expected 'auto' or one of {', '.join(BACKENDS)}")


def resolve(requested: str, device: torch.device, dtype: torch.dtype,
            point_dtype: torch.dtype | None = None) -> str:
    """The backend name that runs a call with tensors on device/dtype and points stored as
    point_dtype (None: dtype) (see module doc).

    Called inside the custom ops (eagerly, also under torch.compile), so probing a backend on
    first use, which may import it, never happens in a traced region.
    """
    check_name(requested)
    name = requested
    if name == "auto":
        name = os.environ.get("DIFFMEM_BACKEND", "auto") or "auto"
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if not _can_run(BACKENDS[candidate], device, dtype, point_dtype):
                return candidate
        return "reference"
    if name not in BACKENDS:
        source = "backend" if requested != "auto" else "DIFFMEM_BACKEND"
        raise ValueError(
            f"unknown {source} {name!r}; expected 'auto' or one of {', '.join(BACKENDS)}"
        )
    reason = _can_run(BACKENDS[name], device, dtype, point_dtype)
    if reason:
        raise RuntimeError(f"backend {name!r} cannot run this call: {reason}")
    return name


def module(name: str) -> ModuleType:
    return importlib.import_module(BACKENDS[name].module)
