"""What the data sets share: .npz files without pickle, and argument checks."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import torch


class NpzRecord:
    """Mixin for dataclasses of tensors and scalars: save() to and load() from a .npz file.

    Subclasses list their scalar fields and types in SCALARS (e.g. {"seed": int}).
    """

    SCALARS: dict = {}

    def save(self, path) -> None:
        """Write every field to a .npz file (no pickle)."""
        arrays = {}
        for f in fields(self):
            value = getattr(self, f.name)
            is_tensor = isinstance(value, torch.Tensor)
            arrays[f.name] = value.cpu().numpy() if is_tensor else np.asarray(value)
        with open(Path(path), "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path):
        """Read a file written by save()."""
        with np.load(Path(path), allow_pickle=False) as z:
            missing = {f.name for f in fields(cls)} - set(z.files)
            if missing:
                raise ValueError(f"path {str(path)!r} lacks {cls.__name__} fields "
                                 f"{sorted(missing)}")
            kw = {f.name: torch.from_numpy(z[f.name].copy()) for f in fields(cls)}
        for name, kind in cls.SCALARS.items():
            kw[name] = kind(kw[name])
        return cls(**kw)


def int_at_least(value, name: str, minimum: int = 1) -> int:
    """value if it is an int >= minimum, else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
