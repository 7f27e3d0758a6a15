"""One run at a time in a run folder: an OS-level lock (flock) on folder/.diffmem.lock, held
for the whole run. The operating system drops it when its process ends, however it ends, so a
killed run leaves no stale lock. The holder writes its PID into the file for the refusal
message."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".diffmem.lock"


class FolderInUse(ConfigError):
    """Another process holds the run folder's lock; the message names its PID."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process"


@contextmanager
def folder_lock(folder):
    """Hold the lock of run folder `folder` (which must exist) for the with-block; FolderInUse
    at once if another process holds it."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot open the lock file {str(path)!r}: {e.strerror or e}") from None
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(f"{str(folder)!r} is in use by a diffmem run of {_holder(fd)}: "
                              f"wait for it to end or choose another --out") from None
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        if held:
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


__all__ = ["FolderInUse", "LOCK_FILE", "folder_lock"]
