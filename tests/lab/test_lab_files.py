"""The laboratory's files and its training guards: every writer is atomic and never writes
through a symlink, .npz bytes depend only on the data, damaged models and training states are
refused with a clear error (the run untouched), and a diverging training stops at once
without changing the numbers of a normal one."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from diffmem import make_gmm_data
from diffmem.experiments.results import write_json
from diffmem.files import atomic_write, npy_bytes, npz_bytes, sha256
from diffmem.training import (
    BadTrainingState,
    TrainedGMM,
    TrainingDiverged,
    load_models,
    save_models,
    train_gmm_models,
    train_template_model,
)
from diffmem.training import gmm as training_gmm
from diffmem.training.checkpoint import pack_state, save_state, unpack_state
from diffmem.training.common import check_finite

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(steps=6, warmup=1, draws=2, peak_lr=1e-2, seed=3)


def _data():
    return make_gmm_data(3, 2, 12, 0, val_samples=2)


def _models():
    return train_gmm_models(_data().train, [2, 4], **{**KW, "steps": 2})


WRITERS = {
    "atomic_write": lambda p: atomic_write(p, b"new"),
    "GMMData.save": lambda p: _data().save(p),
    "save_models": lambda p: save_models(p, _models()),
    "save_state": lambda p: save_state(p.parent, {"step": 1, "x": torch.zeros(2)}),
    "write_json": lambda p: write_json(p, {"a": 1}),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_writers_replace_a_symlink_and_never_touch_its_target(writer, tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    path = tmp_path / ("train_state.npz" if writer == "save_state" else "file")
    path.symlink_to(target)
    WRITERS[writer](path)
    assert target.read_bytes() == b"precious"
    assert not path.is_symlink() and path.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "data.npz"
    path.write_bytes(b"old")

    def half(f):
        f.write(b"new, half written")
        raise KeyboardInterrupt  # a kill signal arriving mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["data.npz"]
    atomic_write(tmp_path / "sub" / "new.bin", b"x", durable=True)  # folder made, fsynced
    assert (tmp_path / "sub" / "new.bin").read_bytes() == b"x"


def test_npz_bytes_depend_only_on_the_arrays():
    arrays = {"a": np.arange(6.0).reshape(2, 3), "s": np.asarray("text"), "n": np.int64(3)}
    first = npz_bytes(arrays)
    assert npz_bytes(dict(arrays)) == first and sha256(first) == sha256(npz_bytes(arrays))
    with np.load(io.BytesIO(first), allow_pickle=False) as z:
        assert np.array_equal(z["a"], arrays["a"]) and str(z["s"]) == "text" and z["n"] == 3
    assert npz_bytes({"a": np.zeros(2)}) != npz_bytes({"a": np.ones(2)})
    with pytest.raises(ValueError):
        npy_bytes(np.array([{}], dtype=object))  # no pickle
    data = _data()
    assert data.to_bytes() == _data().to_bytes()  # same seed, same bytes, same hash
    back = type(data).load(data.to_bytes())
    assert torch.equal(back.train, data.train) and back.seed == data.seed


def test_damaged_models_are_refused(tmp_path):
    path = tmp_path / "models.npz"
    good = _models()
    save_models(path, good)
    assert torch.equal(load_models(path.read_bytes(), TrainedGMM)[4].means, good[4].means)
    bad = {M: TrainedGMM(m.size, m.means.clone(), m.std, m.losses) for M, m in good.items()}
    bad[4].means[0, 0] = float("nan")
    save_models(path, bad)
    with pytest.raises(ValueError, match="model M=4 has non-finite means"):
        load_models(path, TrainedGMM)
    save_models(path, {**good, 5: good[4]})  # stored under 5, says size 4
    with pytest.raises(ValueError, match="says size 4"):
        load_models(path, TrainedGMM)
    with pytest.raises(Exception):  # noqa: B017 (a truncated zip: numpy's own error)
        load_models(path.read_bytes()[:200], TrainedGMM)


def _saved_state():
    saved = []
    train_gmm_models(_data().train, [2, 4], checkpoint=saved.append, checkpoint_every=3, **KW)
    return unpack_state(pack_state(saved[0]))  # through the file format


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update(losses=s["losses"][:, :-1]), "'losses' has shape"),
    (lambda s: s["means"].__setitem__((0, 0, 0), float("nan")), "'means' holds non-finite"),
    (lambda s: s.update(step=99), "step must be an int in"),
    (lambda s: s.pop("opt.v1"), "lacks the tensor 'opt.v1'"),
    (lambda s: s.update(generators=torch.zeros_like(s["generators"])), "bad generator state"),
])
def test_a_damaged_training_state_is_refused(damage, message):
    """The undamaged state (through the file format) resumes exactly; each damage is refused
    with BadTrainingState naming the entry."""
    state = _saved_state()
    straight = train_gmm_models(_data().train, [2, 4], **KW)
    resumed = train_gmm_models(_data().train, [2, 4], resume_state=dict(state), **KW)
    assert torch.equal(resumed[4].means, straight[4].means)
    assert torch.equal(resumed[4].losses, straight[4].losses)
    damage(state)
    with pytest.raises(BadTrainingState, match=message):
        train_gmm_models(_data().train, [2, 4], resume_state=state, **KW)


def test_check_finite_names_step_size_and_loss():
    ok = torch.ones(2)
    check_finite(3, 9, [2, 4], ok, [torch.zeros(2, 4, 3), torch.ones(2)])
    with pytest.raises(TrainingDiverged, match="step 3 of 9: the model of size M=4 reached "
                                               "loss inf") as info:
        check_finite(3, 9, [2, 4], torch.tensor([1.0, float("inf")]), [torch.zeros(2, 4, 3)])
    assert (info.value.step, info.value.size) == (3, 4)
    means = torch.zeros(2, 4, 3)
    means[0, 1, 2] = float("nan")
    with pytest.raises(TrainingDiverged, match="M=2 reached non-finite parameters"):
        check_finite(1, 9, [2, 4], ok, [means])
    with pytest.raises(TrainingDiverged, match="M=5 reached loss nan"):
        check_finite(2, 9, [5], torch.tensor(float("nan")), [torch.zeros(5, 3, 3)])


def test_the_divergence_check_changes_no_number(monkeypatch):
    checked = train_gmm_models(_data().train, [2, 4], **KW)
    monkeypatch.setattr(training_gmm, "check_finite", lambda *a: None)
    unchecked = train_gmm_models(_data().train, [2, 4], **KW)
    for M in (2, 4):
        assert torch.equal(checked[M].means, unchecked[M].means)
        assert torch.equal(checked[M].losses, unchecked[M].losses)
        assert checked[M].std == unchecked[M].std


def test_template_training_stops_when_it_diverges(monkeypatch):
    from diffmem.data.templates import make_template_data
    from diffmem.training import templates as training_templates

    data = make_template_data(2, 8, 3, size=4, val_samples=2)
    real, calls = training_templates.dsm_loss, []

    def loss(*args, **kwargs):
        calls.append(None)
        out = real(*args, **kwargs)
        return out * float("inf") if len(calls) == 3 else out

    monkeypatch.setattr(training_templates, "dsm_loss", loss)
    with pytest.raises(TrainingDiverged, match="step 3 of 5: the model of size M=3"):
        train_template_model(data, 3, steps=5, warmup=1, draws=2, seed=1)
    assert len(calls) == 3
