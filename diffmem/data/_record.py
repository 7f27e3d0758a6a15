"""What the data sets share: .npz files without pickle, and argument checks."""

from __future__ import annotations

import io
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write, npz_bytes


class NpzRecord:
    """Mixin for dataclasses of tensors and scalars: to_bytes() / save() as a .npz file and
    load() from one.

    Subclasses list their scalar fields and types in SCALARS (e.g. {"seed": int}).
    """

    SCALARS: dict = {}

    def to_bytes(self) -> bytes:
        """The .npz file of every field (no pickle; the same data give the same bytes)."""
        arrays = {}
        for f in fields(self):
            value = getattr(self, f.name)
            is_tensor = isinstance(value, torch.Tensor)
            arrays[f.name] = value.cpu().numpy() if is_tensor else np.asarray(value)
        return npz_bytes(arrays)

    def save(self, path) -> None:
        """Write to_bytes() to path atomically (never through a symlink at path)."""
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, source):
        """Read a file written by save(): a path, or the file's bytes."""
        name = "the given bytes" if isinstance(source, bytes) else repr(str(source))
        src = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
        with np.load(src, allow_pickle=False) as z:
            missing = {f.name for f in fields(cls)} - set(z.files)
            if missing:
                raise ValueError(f"{name} lacks {cls.__name__} fields {sorted(missing)}")
            kw = {f.name: torch.from_numpy(z[f.name].copy()) for f in fields(cls)}
        for key, kind in cls.SCALARS.items():
            if kw[key].dim() != 0:
                raise ValueError(f"{name}: {cls.__name__}.{key} must be a scalar, "
                                 f"got shape {tuple(kw[key].shape)}")
            kw[key] = kind(kw[key])
        return cls(**kw)


def int_at_least(value, name: str, minimum: int = 1) -> int:
    """value if it is an int >= minimum, else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
