"""The manifest of a run folder (manifest.json): the run's full settings, the diffmem version
that wrote it and the SHA-256 of every file the run wrote there, so that ``--resume`` reuses
only files it can verify.

A file is written in two atomic steps: its new hash is recorded as pending beside the old one,
then the file is renamed into place; the next save of the manifest commits it. A kill at any
moment leaves a file whose content matches one of the hashes on record, so it still verifies.
The manifest itself is flushed to the disk on every save (a lost manifest loses the run).

- ``Manifest.start(folder, config, resume)``: a fresh manifest, or the folder's own one checked
  against the settings asked for (RunFolderError with one line otherwise).
- ``manifest.write(name, data)`` / ``remove(name)``: record a file's new content / removal.
- ``manifest.verified(name)``: the file's bytes if they match the record, None if the run never
  wrote it, Unverified (naming the file and the problem) otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..files import atomic_write, sha256
from .config import ConfigError, ExperimentConfig
from .results import json_bytes

MANIFEST = "manifest.json"
FORMAT = "diffmem.run/1"
# what a run writes; one of these without a manifest is a run folder whose files cannot be
# verified (config.json: the settings file of run folders before manifests; stages: the
# samples of diffmem memorize)
RUN_FILES = ("data.npz", "baselines.json", "models.npz", "train_state.npz", "timings.json",
             "results.json", "config.json", "models", "stages")
_HASH = re.compile(r"[0-9a-f]{64}")


class RunFolderError(ConfigError):
    """A run folder that cannot be used as asked; the message is one line naming the file."""


class Unverified(Exception):
    """A file of the run folder that cannot be reused: str() is '<name>: <problem>'."""

    def __init__(self, name: str, problem: str, missing: bool = False):
        super().__init__(f"{name}: {problem}")
        self.name, self.problem, self.missing = name, problem, missing


def _version() -> str:
    from .. import __version__

    return __version__


def _settings_differ(saved: ExperimentConfig, config: ExperimentConfig) -> list[str]:
    a, b = saved.to_dict(), config.to_dict()
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class Manifest:
    """The manifest of one run folder (see the module docstring)."""

    def __init__(self, folder, config: ExperimentConfig, version: str | None = None,
                 files: dict | None = None, pending: dict | None = None):
        self.folder, self.config = Path(folder), config
        self.version = _version() if version is None else version
        self.files, self.pending = dict(files or {}), dict(pending or {})

    # -- reading and starting

    @classmethod
    def read(cls, folder, config_type=ExperimentConfig) -> Manifest:
        """The folder's manifest, its settings read as config_type (a dataclass with to_dict
        and from_dict); RunFolderError if it cannot be read or is not one."""
        path = Path(folder) / MANIFEST
        where = f"{str(path)!r}"
        try:
            d = json.loads(path.read_bytes())
        except OSError as e:
            raise RunFolderError(f"{where} cannot be read: {e.strerror or e}") from None
        except ValueError as e:
            raise RunFolderError(f"{where} is damaged (not JSON: {e}); its folder's files cannot "
                                 f"be verified: start the run in a new --out") from None
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, not {FORMAT!r}")
            files, pending = d["files"], d.get("pending", {})
            for table in (files, pending):
                if not isinstance(table, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and _HASH.fullmatch(v)
                        for k, v in table.items()):
                    raise ValueError("its file table is not {name: sha256}")
            if not isinstance(d["diffmem"], str) or not isinstance(d["config"], dict):
                raise ValueError("it lacks the diffmem version or the settings")
            config = config_type.from_dict(d["config"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise RunFolderError(f"{where} is damaged ({e}); its folder's files cannot be "
                                 f"verified: start the run in a new --out") from None
        return cls(folder, config, d["diffmem"], files, pending)

    @classmethod
    def start(cls, folder, config, resume: bool) -> Manifest:
        """The manifest for a run of config (an ExperimentConfig, or any settings dataclass
        with to_dict and from_dict) in folder: a new one when the folder holds no run
        (or one that recorded no file yet), else, with resume, the folder's own one after
        checking its version and settings. RunFolderError (one line) otherwise."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.exists() and not path.is_symlink():
            found = [n for n in RUN_FILES if (folder / n).exists() or (folder / n).is_symlink()]
            if found:
                raise RunFolderError(
                    f"{str(folder)!r} holds run files ({', '.join(found)}) but no {MANIFEST}, so "
                    f"they cannot be verified: move them away or choose another --out")
            return cls(folder, config).save()
        saved = cls.read(folder, type(config))
        if not saved.files and not saved.pending:  # nothing was recorded: nothing to keep
            return cls(folder, config).save()
        if not resume:
            raise RunFolderError(f"{str(folder)!r} already holds a run; pass --resume to "
                                 f"continue it or choose another --out")
        if saved.version != _version():
            raise RunFolderError(f"{str(path)!r}: the run was written by diffmem "
                                 f"{saved.version}, this is {_version()}: resume it with that "
                                 f"version or start it in a new --out")
        diff = _settings_differ(saved.config, config)
        if diff:
            raise RunFolderError(f"--resume: settings differ from the run in {str(folder)!r} "
                                 f"({MANIFEST}): {diff}")
        return saved

    # -- recording files

    def save(self) -> Manifest:
        """Write the manifest (durably): files written so far as committed."""
        atomic_write(self.folder / MANIFEST, json_bytes({
            "format": FORMAT, "diffmem": self.version, "config": self.config.to_dict(),
            "files": self.files, "pending": self.pending}), durable=True)
        return self

    def write(self, name: str, data: bytes) -> None:
        """Write data to folder/name atomically and record its hash (see the module docstring)."""
        digest = sha256(data)
        self.pending[name] = digest
        self.save()
        atomic_write(self.folder / name, data)
        self.files[name] = self.pending.pop(name)  # on disk at the next save

    def remove(self, name: str) -> None:
        """Drop name from the record, then delete the file."""
        if self.files.pop(name, None) is not None or self.pending.pop(name, None) is not None:
            self.save()
        (self.folder / name).unlink(missing_ok=True)

    def recorded(self, name: str) -> str | None:
        """The committed hash of name, or None."""
        return self.files.get(name)

    def verified(self, name: str) -> bytes | None:
        """The bytes of folder/name if they match a recorded hash; None if the run never wrote
        it (neither recorded nor present); Unverified otherwise."""
        hashes = {h for h in (self.files.get(name), self.pending.get(name)) if h}
        path = self.folder / name
        if not path.exists() and not path.is_symlink():
            if hashes:
                raise Unverified(name, "is missing", missing=True)
            return None
        if not hashes:
            raise Unverified(name, f"is not recorded in {MANIFEST}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise Unverified(name, f"cannot be read ({e.strerror or e})") from None
        if sha256(data) not in hashes:
            what = "is empty" if not data else "differs from what this run wrote"
            raise Unverified(name, f"{what} (SHA-256 mismatch)")
        return data


__all__ = ["FORMAT", "MANIFEST", "Manifest", "RUN_FILES", "RunFolderError", "Unverified"]
