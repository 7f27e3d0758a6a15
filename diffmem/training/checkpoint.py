"""Checkpointing a training loop: when to hand out its state, what the state holds, how to
restore it, and its file in a run folder.

- ``Checkpointer``: decides when a loop checkpoints (every n steps and/or every s seconds).
- ``training_state`` / ``load_training_state``: a loop's state after some steps (parameters,
  optimizer, generators, losses so far) as tensors and plain scalars, and its restoration into
  a freshly built loop; a run resumed from it ends exactly as an uninterrupted one.
- ``pack_state`` / ``unpack_state``: that state as the bytes of a .npz file (tensors as
  arrays, scalars as JSON metadata); ``save_state`` / ``load_state`` / ``remove_state``: as
  ``train_state.npz`` in a folder (one atomic file).
- ``BadTrainingState``: a state that does not fit the run it is given to (wrong sizes,
  settings, shapes or non-finite values); nothing of the run is changed then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..files import atomic_write
from .common import check_int, check_number
from .store import load_npz, pack_npz

STATE_FILE = "train_state.npz"


class Checkpointer:
    """When a training loop hands out its state: checkpoint(state) after every `every`-th step
    and/or once `seconds` of wall time passed since the last call, never after the last step
    (checkpoint None: never)."""

    def __init__(self, checkpoint: Callable[[dict], None] | None, every: int = 0,
                 seconds: float | None = None):
        if checkpoint is not None and not callable(checkpoint):
            raise TypeError("checkpoint must be callable or None")
        self.checkpoint, self.every = checkpoint, check_int(every, "checkpoint_every")
        self.seconds = (None if seconds is None else
                        check_number(seconds, "checkpoint_seconds", 0.0))
        self.last = time.monotonic()

    def due(self, done: int, steps: int) -> bool:
        """Whether to checkpoint after `done` of `steps` steps."""
        if self.checkpoint is None or done >= steps:
            return False
        return bool((self.every and done % self.every == 0) or
                    (self.seconds is not None and time.monotonic() - self.last >= self.seconds))

    def save(self, state: dict) -> None:
        self.checkpoint(state)
        self.last = time.monotonic()


def training_state(step, sizes, steps, seed, params, opt, gens, history) -> dict:
    """State of a training loop after `step` steps: scalars (step, steps, seed, sizes) and cloned
    tensors: each of params ({name: tensor}, e.g. means (G, M, d) and std (G,)), losses
    (history[..., :step]), generators (G, bytes) and opt.<name> (ReferenceOptimizer.state())."""
    state = {"step": step, "steps": steps, "seed": seed, "sizes": list(sizes),
             "losses": history[..., :step].clone(),
             "generators": torch.stack([gen.get_state() for gen in gens])}
    state.update({name: p.detach().clone() for name, p in params.items()})
    state.update({f"opt.{k}": v for k, v in opt.state().items()})
    return state


class BadTrainingState(ValueError):
    """A training state that cannot continue this run; the message says why."""


def _check_state(state, sizes, steps, seed, params, opt, gens, history) -> int:
    """The step to continue at, after checking every entry of state against the run."""
    if not isinstance(state, dict):
        raise TypeError("resume_state must be a dict from a checkpoint")
    found = (state.get("sizes"), state.get("steps"), state.get("seed"))
    if found != (list(sizes), steps, seed):
        raise BadTrainingState(f"resume_state is for sizes, steps, seed = {found}, "
                               f"not {(list(sizes), steps, seed)}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise BadTrainingState(f"resume_state step must be an int in [0, {steps}], got {step!r}")
    want = {name: tuple(p.shape) for name, p in params.items()}
    want["losses"] = tuple(history[..., :step].shape)
    want.update({f"opt.{k}": tuple(v.shape) for k, v in opt.state().items()})
    want["generators"] = (len(gens), gens[0].get_state().numel())
    for name, shape in want.items():
        value = state.get(name)
        if not isinstance(value, torch.Tensor):
            raise BadTrainingState(f"resume_state lacks the tensor {name!r}")
        if tuple(value.shape) != shape:
            raise BadTrainingState(f"resume_state {name!r} has shape {tuple(value.shape)}, "
                                   f"expected {shape}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise BadTrainingState(f"resume_state {name!r} holds non-finite values")
    for s in state["generators"]:
        try:
            torch.Generator().set_state(s.to(torch.uint8).clone())
        except (RuntimeError, ValueError, TypeError) as e:
            raise BadTrainingState(f"resume_state holds a bad generator state ({e})") from None
    return step


def load_training_state(state, sizes, steps, seed, params, opt, gens, history) -> int:
    """Restore a training_state into a freshly built run (params, opt, gens, history are
    updated in place); returns the step to continue at. Every entry is checked first
    (BadTrainingState, the run unchanged)."""
    step = _check_state(state, sizes, steps, seed, params, opt, gens, history)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    history[..., :step] = state["losses"]
    opt.load_state({k[4:]: v for k, v in state.items() if k.startswith("opt.")})
    for gen, s in zip(gens, state["generators"]):
        gen.set_state(s.to(torch.uint8).clone())  # a fresh tensor: views with an offset crash
    return step


def pack_state(state: dict) -> bytes:
    """The .npz file of a training_state (tensors with their dtypes, the other entries as
    metadata)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return pack_npz(tensors, {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)})


def unpack_state(source) -> dict:
    """The training_state of pack_state's bytes (or of a path to them)."""
    tensors, state = load_npz(source)
    state.update(tensors)
    return state


def save_state(folder, state: dict) -> None:
    """Write a training_state to folder/train_state.npz (tensors with their dtypes, the other
    entries as metadata)."""
    atomic_write(Path(folder) / STATE_FILE, pack_state(state))


def load_state(folder) -> dict | None:
    """The state of save_state, or None if folder holds none."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    return unpack_state(path)


def remove_state(folder) -> None:
    """Delete the training state (the training it belongs to completed)."""
    (Path(folder) / STATE_FILE).unlink(missing_ok=True)


__all__ = ["BadTrainingState", "Checkpointer", "STATE_FILE", "load_state", "load_training_state",
           "pack_state", "remove_state", "save_state", "training_state", "unpack_state"]
