"""Files that survive a kill, without pickle: arrays in a .npz with their JSON metadata inside,
written atomically, and the one persister of trained models built on it.

- ``atomic_write(path, write)``: write(file) into a temporary file beside path, then
  os.replace; a kill leaves either the old file or the new one.
- ``save_npz(path, arrays, meta)`` / ``load_npz(path)``: named arrays (dtype kept) and a
  JSON-ready dict, in one .npz file (the metadata as a JSON string array).
- ``save_models(path, models)`` / ``load_models(path, model_type)``: {M: trained model} for any
  trained-model dataclass whose fields are tensors and plain scalars (TrainedGMM,
  TrainedTemplates): tensors as arrays ``<field>_<M>``, scalars in the metadata, with the type
  name checked on load. Loading gives back exactly what was saved (same values and dtypes).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import torch

MODELS_FORMAT = "diffmem.models/1"
_META = "__meta__"  # the array holding the JSON metadata


def atomic_write(path, write: Callable, binary: bool = False) -> None:
    """Call write(file) on a temporary file in path's folder (created if needed), then move it
    onto path; the temporary file is removed if write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npz(path, arrays: dict, meta: dict) -> None:
    """Atomically write arrays ({name: tensor or array}, dtypes kept) and meta (JSON-ready)."""
    out = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
           for k, v in arrays.items()}
    if _META in out:
        raise ValueError(f"{_META!r} is reserved for the metadata")
    out[_META] = np.asarray(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **out), binary=True)


def load_npz(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(arrays as tensors, metadata) of a file written by save_npz."""
    with np.load(Path(path), allow_pickle=False) as z:
        if _META not in z.files:
            raise ValueError(f"{str(path)!r} has no metadata: not written by save_npz (a run "
                             f"folder of an older diffmem?)")
        meta = json.loads(str(z[_META]))
        arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files if k != _META}
    return arrays, meta


def save_models(path, models: dict) -> None:
    """Atomically write {M: trained model} (all of one dataclass type) to a .npz file."""
    types = {type(m) for m in models.values()}
    if len(types) > 1 or not all(is_dataclass(t) for t in types):
        raise TypeError(f"models must be trained-model dataclasses of one type, got {types}")
    arrays, scalars = {}, {}
    for M, model in sorted(models.items()):
        scalars[str(M)] = {}
        for f in fields(model):
            value = getattr(model, f.name)
            if isinstance(value, torch.Tensor):
                arrays[f"{f.name}_{M}"] = value
            else:
                scalars[str(M)][f.name] = value
    name = types.pop().__name__ if types else None
    save_npz(path, arrays, {"format": MODELS_FORMAT, "type": name, "models": scalars})


def load_models(path, model_type: type) -> dict:
    """{M: model_type} from a file of save_models ({} if path does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    arrays, meta = load_npz(path)
    if meta.get("format") != MODELS_FORMAT:
        raise ValueError(f"{str(path)!r} is not a {MODELS_FORMAT} file")
    if meta["type"] not in (None, model_type.__name__):
        raise ValueError(f"{str(path)!r} holds {meta['type']} models, not {model_type.__name__}")
    out = {}
    for key, scalars in meta["models"].items():
        M = int(key)
        kw = {f.name: scalars[f.name] if f.name in scalars else arrays[f"{f.name}_{M}"]
              for f in fields(model_type)}
        out[M] = model_type(**kw)
    return out


__all__ = ["MODELS_FORMAT", "atomic_write", "load_models", "load_npz", "save_models", "save_npz"]
