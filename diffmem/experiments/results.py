"""Run folders: atomic JSON writes, trained-model checkpoints (.npz, no pickle), environment info.

Layout of a run folder:
    config.json            the ExperimentConfig (checked on --resume)
    data.npz               the data set (GMMData.save)
    baselines.json         per-t baseline losses (written once)
    models.npz             trained parameters of every finished size: means_<M> (M, d),
                           std_<M> (), losses_<M> (steps,)
    models/M<M>.json       evaluation of the trained size M
    train_state.npz/.json  state of the training phase (GMM) or model (templates) in progress
                           (tensors / scalars; removed when it completes)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=1, sort_keys=True, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path):
    with open(path) as f:
        return json.load(f)


def _atomic_npz(path: Path, arrays: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_train_state(folder, state: dict) -> None:
    """Write a train_gmm_models checkpoint: tensors (dtype kept) to train_state.npz, the rest
    to train_state.json (written second; both carry the step, see load_train_state)."""
    folder = Path(folder)
    arrays = {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
    arrays["_step"] = np.asarray(state["step"])
    _atomic_npz(folder / "train_state.npz", arrays)
    write_json(folder / "train_state.json",
               {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})


def load_train_state(folder) -> dict | None:
    """The checkpoint of save_train_state, or None if absent or the two files disagree (a kill
    between the two writes)."""
    folder = Path(folder)
    npz, js = folder / "train_state.npz", folder / "train_state.json"
    if not (npz.exists() and js.exists()):
        return None
    state = read_json(js)
    with np.load(npz, allow_pickle=False) as z:
        if int(z["_step"]) != state.get("step"):
            return None
        state.update({k: torch.from_numpy(z[k].copy()) for k in z.files if k != "_step"})
    return state


def remove_train_state(folder) -> None:
    """Delete the training checkpoint (the phase completed)."""
    for name in ("train_state.json", "train_state.npz"):
        Path(folder, name).unlink(missing_ok=True)


def save_models(path, models: dict) -> None:
    """Atomically write {M: TrainedGMM} as .npz: means_<M> (M, d), std_<M> (), losses_<M> (steps,)."""
    path = Path(path)
    arrays = {}
    for M, r in sorted(models.items()):
        arrays[f"means_{M}"] = r.means.detach().cpu().double().numpy()
        arrays[f"std_{M}"] = np.asarray(float(r.std))
        arrays[f"losses_{M}"] = r.losses.detach().cpu().double().numpy()
    _atomic_npz(path, arrays)


def load_models(path, dtype=torch.float32) -> dict:
    """Inverse of save_models: {M: TrainedGMM} (empty if the file does not exist)."""
    from ..training.gmm import TrainedGMM

    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            if key.startswith("means_"):
                M = int(key[len("means_"):])
                out[M] = TrainedGMM(M, torch.from_numpy(z[key].copy()).to(dtype),
                                    float(z[f"std_{M}"]),
                                    torch.from_numpy(z[f"losses_{M}"].copy()).to(dtype))
    return out


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


__all__ = ["check_writable", "environment", "load_models", "load_train_state", "read_json",
           "remove_train_state", "save_models", "save_train_state", "write_json"]
