"""Where an experiment runs: device, op backend and precision, shared by every experiment
command (``--device``, ``--backend``, ``--precision``), and the record of them that goes into
each results JSON.

- ``add_runtime_options(parser)``: the three options.
- ``runtime_from_args(args)``: a validated ``Runtime``; a device that does not exist here or a
  backend that cannot run on it raises ConfigError (one line).
- ``Runtime.record()``: {"device", "device_name", "backend" (the one that runs), "precision",
  "diffmem", "commit"} for results.json.

Data, models and random draws are made on the CPU (so a seed gives the same data on every
device) and moved to ``Runtime.device`` where the heavy work runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .config import ConfigError

PRECISIONS = ("exact", "fast")


@dataclass(frozen=True)
class Runtime:
    """device: a torch device string ("cpu", "cuda", "cuda:1"); backend: "auto" or a backend
    name; precision: "exact" or "fast" (see diffmem.softmax_mean)."""

    device: str = "cpu"
    backend: str = "auto"
    precision: str = "exact"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def resolved_backend(self, dtype: torch.dtype = torch.float32,
                         point_dtype: torch.dtype | None = None) -> str:
        """The backend that runs the op for tensors of dtype on this device."""
        from ..ops import _backends

        return _backends.resolve(self.backend, self.torch_device, dtype, point_dtype)

    def record(self, dtype: torch.dtype = torch.float32) -> dict:
        """What results.json says about where the run ran."""
        from .. import __version__

        return {"device": self.device, "device_name": device_name(self.torch_device),
                "backend": self.resolved_backend(dtype), "requested_backend": self.backend,
                "precision": self.precision, "diffmem": __version__, "commit": source_commit()}


def on_device(record, device):
    """A copy of a data record (a dataclass such as GMMData or TemplateData) with every tensor
    field moved to device; the same record when it is there already."""
    device = torch.device(device)
    moves = {f.name: getattr(record, f.name).to(device) for f in dataclasses.fields(record)
             if isinstance(getattr(record, f.name), torch.Tensor)}
    if all(getattr(record, k).device == v.device for k, v in moves.items()):
        return record
    return dataclasses.replace(record, **moves)


def device_name(device: torch.device) -> str:
    """The GPU's name for a cuda device, else the CPU's (or "cpu")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


@lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the diffmem source when it runs from a checkout (editable install),
    else None (an installed copy carries only its version)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """--device, --backend and --precision."""
    from ..ops._backends import BACKENDS

    g = p.add_argument_group("where it runs")
    g.add_argument("--device", default="cpu",
                   help="torch device of the heavy work: cpu (default), cuda or cuda:K")
    g.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="softmax-mean backend (default auto: the fastest that runs on --device)")
    g.add_argument("--precision", default="exact", choices=list(PRECISIONS),
                   help="exact (default; float64-accurate to ~1e-5) or fast (matmul-form "
                        "logits)")


def runtime_from_args(args) -> Runtime:
    """The validated Runtime of parsed options (missing options take the defaults)."""
    runtime = Runtime(device=getattr(args, "device", "cpu") or "cpu",
                      backend=getattr(args, "backend", "auto") or "auto",
                      precision=getattr(args, "precision", "exact") or "exact")
    return check_runtime(runtime)


def check_runtime(runtime: Runtime) -> Runtime:
    """runtime if its device exists here and its backend runs there; ConfigError otherwise."""
    if runtime.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {runtime.precision!r}")
    try:
        device = torch.device(runtime.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device must be cpu, cuda or cuda:K, got {runtime.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:K, got {runtime.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {runtime.device}: this machine has no CUDA GPU that "
                              f"torch can use")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {runtime.device}: only {torch.cuda.device_count()} "
                              f"GPU(s) here")
    try:
        runtime.resolved_backend()
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--backend {runtime.backend} on --device {runtime.device}: "
                          f"{e}") from None
    return runtime


__all__ = ["PRECISIONS", "Runtime", "add_runtime_options", "check_runtime", "device_name",
           "on_device", "runtime_from_args", "source_commit"]
