"""Run folders: atomic JSON writes, environment info, a writability check.

Layout of a run folder (runner.py):
    config.json            the ExperimentConfig (checked on --resume)
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

from ..training.store import atomic_write


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


def write_json(path, obj) -> None:
    """Write obj as JSON atomically (temp file in the same folder + os.replace)."""
    def write(f):
        json.dump(_clean(obj), f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")

    atomic_write(path, write)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def environment() -> dict:
    """Versions (diffmem, torch, numpy, python), platform and device of this run."""
    from .. import __version__

    return {"diffmem": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "device": "cpu", "threads": torch.get_num_threads()}


def check_writable(folder) -> Path:
    """Create folder if needed and check a file can be written there; OSError otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    return folder


__all__ = ["check_writable", "environment", "read_json", "write_json"]
