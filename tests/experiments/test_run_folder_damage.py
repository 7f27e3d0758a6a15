"""--resume on a damaged run folder: every kind of file the run writes, damaged every way
(truncated, garbled, empty, missing, wrongly shaped or edited, NaN, from a run of another
seed, replaced by a symlink). Each case ends either in a one-line error with a non-zero exit,
or, where the file can be recomputed, in a warning naming it and exactly the results of a
clean run. Then the checks behind the hashes (content against the settings, with the
manifest's hash forged to match) and the folder-level refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_run import TINY, TINY_ARGS, cli, one_line_error, results_of

from diffmem.experiments import runner
from diffmem.experiments.config import make_config
from diffmem.experiments.manifest import MANIFEST
from diffmem.files import npz_bytes, sha256

STATE = "train_state.npz"


class Killed(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


def _kill_at_step_14(event, value):
    if event == "checkpoint" and value == 14:
        raise Killed


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Run folders made once: "clean" and "seed2" (seeds 1 and 2, finished), "killed" and
    "killed2" (seeds 1 and 2, killed in phase 1 after the checkpoint at step 14 of 20)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runner, "CHECKPOINT_STEPS", 7)
            for seed, suffix in ((1, ""), (2, "2")):
                config = make_config(**{**TINY, "seed": seed})
                runner.run_phase_transition(config, root / ("clean" if seed == 1 else "seed2"),
                                            quiet=True, plots=False)
                with pytest.raises(Killed):
                    runner.run_phase_transition(config, root / f"killed{suffix}", quiet=True,
                                                plots=False, hook=_kill_at_step_14)
    finally:
        torch.set_num_threads(threads)
    assert (root / "killed" / STATE).exists() and (root / "killed2" / STATE).exists()
    return root


def _edit_npz(path: Path, edit) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    edit(arrays)
    path.write_bytes(npz_bytes(arrays))


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    new = edit(obj)
    obj = obj if new is None else new
    path.write_text(json.dumps(obj))  # NaN written as the token NaN, which json reads back


def _set(obj, keys, value):
    for k in keys[:-1]:
        obj = obj[k]
    obj[keys[-1]] = value


# per file: (wrongly shaped or edited, NaN) as edits of its content
EDITS = {
    "data.npz": (lambda a: a.update(train=a["train"][:-1]),
                 lambda a: a["train"].__setitem__((0, 0), np.nan)),
    "models.npz": (lambda a: a.update(means_4=a["means_4"][:, :-1]),
                   lambda a: a["means_4"].__setitem__((0, 0), np.nan)),
    STATE: (lambda a: a.update(losses=a["losses"][:, :-1]),
            lambda a: a["means"].__setitem__((0, 0, 0), np.nan)),
    "baselines.json": (lambda b: _set(b, ["ground_truth", "train"], b["ground_truth"]["train"][1:]),
                       lambda b: _set(b, ["ground_truth", "train", 0], float("nan"))),
    "models/M4.json": (lambda r: _set(r, ["memorization_ratio"], 0.5),
                       lambda r: _set(r, ["variance"], float("nan"))),
    "timings.json": (lambda t: [], lambda t: _set(t, ["baselines"], float("nan"))),
    "results.json": (lambda r: _set(r, ["sizes"], []), lambda r: _set(r, ["fractions", 0], None)),
    MANIFEST: (lambda m: _set(m, ["files"], []), lambda m: _set(m, ["config", "seed"], None)),
}


def damage(folder: Path, name: str, how: str, other: Path) -> None:
    """Damage folder/name the way `how` says (other: the same run's folder for seed 2)."""
    path = folder / name
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "garbled":
        middle = slice(len(raw) // 3, 2 * len(raw) // 3)
        path.write_bytes(raw[:middle.start] + bytes(b ^ 0xA5 for b in raw[middle]) +
                         raw[middle.stop:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    elif how in ("wrong_shape", "nan"):
        edit = EDITS[name][how == "nan"]
        (_edit_npz if name.endswith(".npz") else _edit_json)(path, edit)
    elif how == "other_seed":
        shutil.copyfile(other / name, path)
    elif how == "symlink":
        path.unlink()
        path.symlink_to(other / name)
    else:
        raise ValueError(how)


HOWS = ["truncated", "garbled", "empty", "missing", "wrong_shape", "nan", "other_seed",
        "symlink"]
# file -> (folder it is damaged in, what a resume does: "recomputed" (a warning naming the
# file, then the clean results), "error" (one line naming the file), "ignored" (the clean
# results, no warning: the file is only an output))
CASES = {
    "data.npz": ("clean", "recomputed"),
    "baselines.json": ("clean", "recomputed"),
    "timings.json": ("clean", "recomputed"),
    "models/M4.json": ("clean", "recomputed"),
    STATE: ("killed", "recomputed"),
    "models.npz": ("clean", "error"),
    MANIFEST: ("clean", "error"),
    "results.json": ("clean", "ignored"),
}


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("name", list(CASES))
def test_resume_on_a_damaged_file(folders, tmp_path, capsys, name, how):
    source, outcome = CASES[name]
    folder = tmp_path / "run"
    shutil.copytree(folders / source, folder)
    other = folders / ("killed2" if name == STATE else "seed2")
    target_before = (other / name).read_bytes()
    damage(folder, name, how, other)
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--resume", "--out", folder)
    assert (other / name).read_bytes() == target_before  # a symlink's target is never written
    if outcome == "error" and not (name == "models.npz" and how == "missing"):
        assert one_line_error(code, err, name), err
        return
    assert code == 0, err
    assert results_of(folder) == results_of(folders / "clean")
    if outcome == "recomputed" or name == "models.npz":
        assert f"warning: {name}" in err, err
    else:
        assert err == ""
    assert not (folder / name).is_symlink()


def test_resume_with_other_settings_on_a_folder_without_manifest(folders, tmp_path, capsys):
    """The settings file gone, a resume asking for seed 2 must not label seed-1 results."""
    folder = tmp_path / "run"
    shutil.copytree(folders / "clean", folder)
    (folder / MANIFEST).unlink()
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--seed", "2", "--resume",
                       "--out", folder)
    assert one_line_error(code, err, "no manifest.json", "cannot be verified")
    assert results_of(folder)["config"]["seed"] == 1


def _forge(folder: Path, name: str) -> None:
    """Make the manifest's hash of name match its (damaged) content."""
    path = folder / MANIFEST
    m = json.loads(path.read_text())
    m["files"][name] = sha256((folder / name).read_bytes())
    m["pending"].pop(name, None)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("name, how, outcome", [
    ("data.npz", "other_seed", "data made again"),          # recorded hash is seed 2's now
    ("models.npz", "nan", "non-finite"),
    ("models.npz", "wrong_shape", "shape"),
    (STATE, "wrong_shape", "warning"),                       # the truncated loss history
    (STATE, "nan", "warning"),
    ("baselines.json", "wrong_shape", "warning"),
    ("models/M4.json", "nan", "warning"),
    ("timings.json", "wrong_shape", "warning"),
])
def test_content_checks_behind_the_hashes(folders, tmp_path, capsys, name, how, outcome):
    """With the manifest forged to match a damaged file, its content is still checked against
    the settings: an error, or a recompute with a warning; never the damaged values."""
    source = "killed" if name == STATE else "clean"
    folder = tmp_path / "run"
    shutil.copytree(folders / source, folder)
    damage(folder, name, how, folders / "seed2")
    _forge(folder, name)
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--resume", "--out", folder)
    if outcome == "warning":
        assert code == 0 and f"warning: {name}" in err, err
        assert results_of(folder) == results_of(folders / "clean")
    else:
        assert one_line_error(code, err, name, outcome), err


def test_a_manifest_of_another_version_or_settings_is_refused(folders, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(folders / "clean", folder)
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--steps", "21", "--resume",
                       "--out", folder)
    assert one_line_error(code, err, "settings differ", "steps")
    _edit_json(folder / MANIFEST, lambda m: _set(m, ["diffmem"], "0.0.1"))
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--resume", "--out", folder)
    assert one_line_error(code, err, "written by diffmem 0.0.1")


def test_a_folder_whose_run_recorded_nothing_does_not_block_a_new_run(tmp_path, capsys):
    """A run that failed before writing any file leaves a manifest with no files: a plain
    rerun, even with other settings, starts afresh."""
    from diffmem.experiments.manifest import Manifest

    folder = tmp_path / "run"
    folder.mkdir()
    Manifest(folder, make_config(**{**TINY, "seed": 5})).save()
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--no-refine", "--out", folder)
    assert code == 0, err
    assert results_of(folder)["config"]["seed"] == 1


TEMPLATES = dict(data="templates", dim=5, components=2, samples=20, val_samples=10,
                 eval_samples=6, steps=6, warmup=1, draws=2, eval_draws=2, baseline_step=10,
                 sizes=[4, 10, 20], refine=False)


@pytest.mark.parametrize("how", ["garbled", "missing", "nan"])
def test_a_damaged_template_sample_grid_is_evaluated_again(tmp_path, capsys, how):
    """A template model's saved samples (an evaluation artifact) are verified like its record:
    damaged, the model is evaluated again and the results are those of the clean run."""
    config = make_config(**TEMPLATES)
    clean, folder = tmp_path / "clean", tmp_path / "run"
    runner.run_phase_transition(config, clean, quiet=True, plots=False)
    shutil.copytree(clean, folder)
    name = "models/M10_samples.npy"
    if how == "nan":
        samples = np.load(folder / name)
        samples[0, 0, 0, 0] = np.nan
        np.save(folder / name, samples)
    else:
        damage(folder, name, how, clean)
    capsys.readouterr()
    runner.run_phase_transition(config, folder, resume=True, quiet=True, plots=False)
    assert f"warning: {name}" in capsys.readouterr().err
    assert results_of(folder) == results_of(clean)
    assert np.array_equal(np.load(folder / name), np.load(clean / name))
