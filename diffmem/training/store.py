"""Files that survive a kill, without pickle: arrays in a .npz with their JSON metadata inside,
written atomically (diffmem.files), and the one persister of trained models built on it.

- ``pack_npz(arrays, meta)`` / ``save_npz(path, arrays, meta)`` / ``load_npz(source)``: named
  arrays (dtype kept) and a JSON-ready dict, in one .npz file (the metadata as a JSON string
  array); the same arrays and metadata give the same bytes.
- ``models_bytes(models)`` / ``save_models(path, models)`` / ``load_models(source,
  model_type)``: {M: trained model} for any trained-model dataclass whose fields are tensors
  and plain scalars (TrainedGMM, TrainedTemplates): tensors as arrays ``<field>_<M>``, scalars
  in the metadata, with the type name checked on load. Loading gives back exactly what was
  saved (same values and dtypes) and refuses models with non-finite values.

A source is a path or a file's bytes.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write, npz_bytes

MODELS_FORMAT = "diffmem.models/1"
_META = "__meta__"  # the array holding the JSON metadata


def _name(source) -> str:
    return "the given bytes" if isinstance(source, bytes) else repr(str(source))


def pack_npz(arrays: dict, meta: dict) -> bytes:
    """The .npz file of arrays ({name: tensor or array}, dtypes kept) and meta (JSON-ready)."""
    out = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
           for k, v in arrays.items()}
    if _META in out:
        raise ValueError(f"{_META!r} is reserved for the metadata")
    out[_META] = np.asarray(json.dumps(meta, sort_keys=True))
    return npz_bytes(out)


def save_npz(path, arrays: dict, meta: dict) -> None:
    """Atomically write pack_npz(arrays, meta) to path."""
    atomic_write(path, pack_npz(arrays, meta))


def load_npz(source) -> tuple[dict[str, torch.Tensor], dict]:
    """(arrays as tensors, metadata) of a file written by save_npz."""
    src = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    with np.load(src, allow_pickle=False) as z:
        if _META not in z.files:
            raise ValueError(f"{_name(source)} has no metadata: not written by save_npz (a run "
                             f"folder of an older diffmem?)")
        meta = json.loads(str(z[_META]))
        arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files if k != _META}
    if not isinstance(meta, dict):
        raise ValueError(f"{_name(source)}: its metadata is not a JSON object")
    return arrays, meta


def models_bytes(models: dict) -> bytes:
    """The .npz file of {M: trained model} (all of one dataclass type)."""
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
    return pack_npz(arrays, {"format": MODELS_FORMAT, "type": name, "models": scalars})


def save_models(path, models: dict) -> None:
    """Atomically write models_bytes(models) to path."""
    atomic_write(path, models_bytes(models))


def _finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def load_models(source, model_type: type) -> dict:
    """{M: model_type} from a file of save_models ({} if the path does not exist); ValueError
    if the file holds other models, misses a field or holds non-finite values."""
    if not isinstance(source, bytes) and not Path(source).exists():
        return {}
    arrays, meta = load_npz(source)
    name = _name(source)
    if meta.get("format") != MODELS_FORMAT or not isinstance(meta.get("models"), dict):
        raise ValueError(f"{name} is not a {MODELS_FORMAT} file")
    if meta.get("type") not in (None, model_type.__name__):
        raise ValueError(f"{name} holds {meta['type']} models, not {model_type.__name__}")
    out = {}
    for key, scalars in meta["models"].items():
        try:
            M = int(key)
            kw = {f.name: scalars[f.name] if f.name in scalars else arrays[f"{f.name}_{M}"]
                  for f in fields(model_type)}
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{name}: model {key!r} is incomplete ({e})") from None
        if kw.get("size", M) != M:
            raise ValueError(f"{name}: model {key!r} says size {kw['size']!r}")
        bad = [k for k, v in kw.items() if not _finite(v)]
        if bad:
            raise ValueError(f"{name}: model M={M} has non-finite {', '.join(bad)}")
        out[M] = model_type(**kw)
    return out


__all__ = ["MODELS_FORMAT", "load_models", "load_npz", "models_bytes", "pack_npz", "save_models",
           "save_npz"]
