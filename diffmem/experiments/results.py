"""Run folders: JSON contents and atomic JSON writes, environment info, a writable folder.

Layout of a run folder (runner.py):
    manifest.json          the settings, the diffmem version and the SHA-256 of every file
                           below but the lock and the plots (manifest.py; checked on --resume)
    .diffmem.lock          held by the run in progress (lock.py)
    data.npz               the data set (GMMData / TemplateData .save)
    baselines.json         per-t baseline losses (written once)
    models.npz             trained models of every finished size (diffmem.training.store:
                           arrays <field>_<M> and JSON metadata)
    models/M<M>.json       evaluation of the trained size M (+ M<M>_<artifact>.npy, e.g. the
                           generated samples of a template model)
    train_state.npz        state of the training in progress (diffmem.training.checkpoint;
                           removed when it completes)
    timings.json           wall time per stage, summed over invocations
    results.json           everything (written last, and after each phase)
    plots/*.png            figures (if matplotlib is installed)
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write
from .config import ConfigError


def _clean(obj):
    """JSON-safe copy: tensors/arrays to lists, NaN/inf to None, int keys to str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.detach().cpu().double().tolist())
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def json_bytes(obj) -> bytes:
    """obj as indented JSON with sorted keys (NaN/inf as null; see _clean)."""
    return (json.dumps(_clean(obj), indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json(path, obj) -> None:
    """Write json_bytes(obj) atomically (diffmem.files.atomic_write)."""
    atomic_write(path, json_bytes(obj))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def environment(runtime=None) -> dict:
    """Versions (diffmem, torch, numpy, python), platform and device (runtime's, default cpu) of
    this run."""
    from .. import __version__

    return {"diffmem": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "device": runtime.device if runtime is not None else "cpu",
            "threads": torch.get_num_threads()}


def writable_folder(folder) -> Path:
    """folder, created if needed, after checking a file can be written there; ConfigError (one
    line) otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {str(folder)!r}: "
                          f"{e.strerror or e}") from None
    return folder


__all__ = ["environment", "json_bytes", "read_json", "writable_folder", "write_json"]
