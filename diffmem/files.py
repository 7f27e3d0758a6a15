"""How the library writes files: atomically, never through a symlink, with contents that
depend only on the data (so equal data give equal bytes and equal hashes).

- ``atomic_write(path, content, durable=False)``: the bytes (or what write(file) writes) go to
  a temporary file in path's folder, then renamed onto path. A kill leaves either the old file
  or the new one, never a truncated one; a symlink at path is replaced by the new file, its
  target is never touched. durable=True also flushes the file to the disk before the rename,
  so that it survives a power loss too.
- ``npz_bytes(arrays)`` / ``npy_bytes(array)``: .npz / .npy contents without pickle and without
  timestamps (``numpy.load`` reads them).
- ``sha256(data)``: the hex content hash of bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _umask() -> int:
    """The process's umask, read without changing it where the system tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give a new file


def atomic_write(path, content: bytes | Callable, durable: bool = False) -> None:
    """Write content (bytes, or a function write(binary file)) to path atomically; path's folder
    is created if needed; the temporary file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)  # replaces a symlink itself, not its target
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def npy_bytes(array) -> bytes:
    """The .npy file of one array (no pickle: object arrays raise ValueError)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict) -> bytes:
    """The .npz file of {name: array}, uncompressed, members in the given order with a fixed
    date, so that it depends on the arrays only."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy_bytes(array))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    """Hex SHA-256 of data."""
    return hashlib.sha256(data).hexdigest()


__all__ = ["atomic_write", "npy_bytes", "npz_bytes", "sha256"]
