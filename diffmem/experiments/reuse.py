"""What a resumed run takes from its folder, each file verified before use: its bytes against
the manifest's hash, its content against the settings asked for.

A file that fails and can be recomputed is recomputed, with a warning naming the file and what
was wrong: the data (made again from the settings, and accepted only if it equals the data the
run used), the baselines, the timings, the evaluations of single models, the training state.
The trained models, which only training can recompute, stop the run with a one-line
RunFolderError saying how to recover instead (unless the file was deleted, which asks for
their training again).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import torch

from ..files import sha256
from ..training.checkpoint import STATE_FILE, unpack_state
from ..training.store import load_models
from .manifest import Manifest, RunFolderError, Unverified

DATA, BASELINES, MODELS, TIMINGS = "data.npz", "baselines.json", "models.npz", "timings.json"
GRID_SIZE = 26


def _parse(name: str, raw: bytes, parse):
    """parse(raw); any failure becomes Unverified (untrusted bytes fail in many ways)."""
    try:
        return parse(raw)
    except Exception as e:  # noqa: BLE001
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Unverified(name, f"is damaged ({text})") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_data(data, config) -> None:
    checks = [(int(data.seed) == config.seed, f"holds the data of seed {data.seed}"),
              (data.train.shape[0] == config.samples, f"holds {data.train.shape[0]} samples"),
              (data.val.shape[0] == config.val_samples,
               f"holds {data.val.shape[0]} validation samples"),
              (bool(torch.isfinite(data.train).all()) and bool(torch.isfinite(data.val).all()),
               "holds non-finite samples")]
    for ok, problem in checks:
        if not ok:
            raise Unverified(DATA, f"{problem}, not what the settings make")


def data(manifest: Manifest, kind, config, warn):
    """The run's data set: the folder's data.npz if it verifies, else made from the settings
    (and written); RunFolderError if the made data differ from the data the run recorded."""
    try:
        raw = manifest.verified(DATA)
        if raw is not None:
            found = _parse(DATA, raw, kind.data_type.load)
            _check_data(found, config)
            return found
    except Unverified as e:
        warn(f"{e}; made again from the settings")
    made = kind.make_data(config)
    content = made.to_bytes()
    used = manifest.recorded(DATA)
    if used is not None and sha256(content) != used:
        raise RunFolderError(f"{str(manifest.folder / DATA)!r}: the data made again from the "
                             f"settings differ from the data this run used, so it cannot be "
                             f"continued: start the run in a new --out")
    manifest.write(DATA, content)
    return made


def _check_baselines(b, config) -> None:
    if not isinstance(b, dict):
        raise ValueError("not a JSON object")
    for name in ("ground_truth", "memorizing"):
        for split in ("train", "val"):
            losses = b[name][split]
            if len(losses) != GRID_SIZE or not all(_number(v) for v in losses):
                raise ValueError(f"{name}.{split} is not {GRID_SIZE} numbers")
    if set(b["partial_mem"]) != {str(m) for m in config.baseline_sizes()}:
        raise ValueError("its partially memorizing sizes are not the settings' ones")


def baselines(manifest: Manifest, config, warn) -> dict | None:
    """The saved baseline losses if they verify, else None (to be measured again)."""
    try:
        raw = manifest.verified(BASELINES)
        if raw is None:
            return None
        found = _parse(BASELINES, raw, json.loads)
        _parse(BASELINES, found, lambda b: _check_baselines(b, config))
        return found
    except Unverified as e:
        warn(f"{e}; measured again")
        return None


def timings(manifest: Manifest, warn) -> dict:
    """The saved timings if they verify, else {} (earlier timings are dropped)."""
    try:
        raw = manifest.verified(TIMINGS)
        if raw is None:
            return {}
        found = _parse(TIMINGS, raw, json.loads)
        if not isinstance(found, dict) or not all(_number(v) for v in found.values()):
            raise Unverified(TIMINGS, "is damaged (not {stage: seconds})")
        return found
    except Unverified as e:
        warn(f"{e}; earlier timings are dropped")
        return {}


def _check_models(models: dict, kind, config, data) -> None:
    for M, model in models.items():
        if not 1 <= M <= config.samples:
            raise ValueError(f"it holds a model of size {M}, outside [1, N={config.samples}]")
        for field, shape in kind.model_shapes(config, data, M).items():
            found = tuple(getattr(model, field).shape)
            if found != tuple(shape):
                raise ValueError(f"model M={M} has {field} of shape {found}, expected "
                                 f"{tuple(shape)}")


def models(manifest: Manifest, kind, config, data, warn) -> dict:
    """{M: trained model} of the folder's models.npz if it verifies; {} if the run saved none,
    or the file was deleted (with a warning); RunFolderError otherwise."""
    try:
        raw = manifest.verified(MODELS)
    except Unverified as e:
        if e.missing:
            warn(f"{e}; its models are trained again")
            return {}
        raise RunFolderError(f"{str(manifest.folder / e.name)!r} {e.problem}: restore it, or "
                             f"delete it to train its models again") from None
    if raw is None:
        return {}
    try:
        found = load_models(raw, kind.model_type)
        _check_models(found, kind, config, data)
    except Exception as e:  # noqa: BLE001
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunFolderError(f"{str(manifest.folder / MODELS)!r} is damaged ({text}): delete it "
                             f"to train its models again") from None
    return found


def evaluation_files(kind, M: int) -> list[str]:
    """The files of model M's evaluation: models/M<M>.json first, then its artifacts."""
    return [f"models/M{M}.json"] + [f"models/M{M}_{a}.npy" for a in kind.artifacts]


def _check_evaluation(r, M: int) -> None:
    if not isinstance(r, dict) or r.get("size") != M:
        raise ValueError(f"not the evaluation of M={M}")
    ratio, variance = r.get("memorization_ratio"), r.get("variance")
    if not _number(ratio) or not 0 <= ratio <= 1 or not _number(variance):
        raise ValueError("its memorization ratio or variance is not a valid number")


def _load_artifact(raw: bytes) -> np.ndarray:
    a = np.load(io.BytesIO(raw), allow_pickle=False)
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise ValueError("not an array of finite numbers")
    return a


def evaluations(manifest: Manifest, kind, models: dict, warn) -> dict:
    """{M: saved evaluation} for the models whose evaluation files all verify; a damaged one is
    dropped with a warning (evaluated again)."""
    out = {}
    for M in sorted(models):
        record, *artifacts = evaluation_files(kind, M)
        try:
            raw = manifest.verified(record)
            if raw is None:
                continue  # not evaluated yet
            found = _parse(record, raw, json.loads)
            _parse(record, found, lambda r, M=M: _check_evaluation(r, M))
            for name in artifacts:
                art = manifest.verified(name)
                if art is None:
                    raise Unverified(name, "is missing")
                _parse(name, art, _load_artifact)
            out[M] = found
        except Unverified as e:
            warn(f"{e}; M={M} is evaluated again")
    return out


def training_state(manifest: Manifest, sizes: list[int], warn) -> dict | None:
    """The saved state of the training of `sizes` if it verifies, else None (a state of other
    sizes is stale and ignored)."""
    try:
        raw = manifest.verified(STATE_FILE)
        if raw is None:
            return None
        state = _parse(STATE_FILE, raw, unpack_state)
    except Unverified as e:
        warn(f"{e}; not used: the training it saved starts again from its first step")
        return None
    return state if state.get("sizes") == list(sizes) else None


__all__ = ["BASELINES", "DATA", "MODELS", "TIMINGS", "baselines", "data", "evaluation_files",
           "evaluations", "models", "timings", "training_state"]
