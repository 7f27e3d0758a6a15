"""What keeps a run from publishing wrong results besides verified files: one run per folder
(a lock, also across processes, that a killed run does not leave behind), kills inside a
file's write, symlinks in the run folder, and the guards on the command's numbers (ranges,
memory, divergence, --out, the order of --sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Killed
from tiny_run import TINY, TINY_ARGS, cli, one_line_error, results_of

from diffmem.experiments import budget, runner
from diffmem.experiments import gmm as gmm_kind
from diffmem.experiments import manifest as manifest_module
from diffmem.experiments.config import make_config
from diffmem.experiments.lock import LOCK_FILE, folder_lock

pytestmark = pytest.mark.usefixtures("one_thread")

GiB = 2 ** 30


@pytest.fixture
def clean(tmp_path):
    """The results folder of an uninterrupted TINY run."""
    runner.run_phase_transition(make_config(**TINY), tmp_path / "clean", quiet=True, plots=False)
    return tmp_path / "clean"


# ------------------------------------------------------------------------------------ the lock

def test_a_second_run_in_a_locked_folder_is_refused_with_the_holder_pid(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    with folder_lock(folder):
        code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--out", folder)
        assert one_line_error(code, err, "in use", f"process {os.getpid()}")
        assert not (folder / "manifest.json").exists()
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--no-refine", "--out", folder)
    assert code == 0, err


def test_the_lock_file_is_never_followed_through_a_symlink(tmp_path, capsys):
    folder, target = tmp_path / "run", tmp_path / "elsewhere"
    folder.mkdir()
    target.write_text("keep")
    (folder / LOCK_FILE).symlink_to(target)
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--out", folder)
    assert one_line_error(code, err, "lock file")
    assert target.read_text() == "keep"


CHILD = """
import json, sys, torch
from diffmem.experiments import runner
from diffmem.experiments.config import make_config
torch.set_num_threads(1)
runner.CHECKPOINT_STEPS = 7

def hook(event, value):
    if event == "checkpoint":
        print("running", flush=True)
        sys.stdin.readline()  # blocks until the test lets it go or kills it

runner.run_phase_transition(make_config(**json.loads(sys.argv[2])), sys.argv[1], quiet=True,
                            plots=False, hook=hook)
"""


def test_two_processes_on_one_folder_and_a_killed_holder(tmp_path, capsys, clean):
    """While another process runs in the folder, --resume is refused with its PID; once that
    process is killed (SIGKILL, mid-training) the lock is gone and --resume finishes the run
    with the results of an uninterrupted one."""
    folder = tmp_path / "run"
    # cwd: `python -c` puts the working directory first on the path, and a checkout's diffmem/
    # (no compiled module) must not shadow the installed package
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), json.dumps(TINY)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=tmp_path)
    try:
        assert child.stdout.readline() == "running\n"
        code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--resume", "--out", folder)
        assert one_line_error(code, err, "in use", f"process {child.pid}")
    finally:
        child.kill()
        child.wait()
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--resume", "--out", folder)
    assert code == 0, err
    assert results_of(folder) == results_of(clean)


# --------------------------------------------------------------------- kills inside a write

@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("name", ["data.npz", "models.npz", "models/M4.json", "train_state.npz",
                                  "timings.json"])
def test_a_kill_inside_a_file_write_resumes_exactly(kill_and_resume, tmp_path, monkeypatch,
                                                    name, when):
    """Killed with the file's new hash recorded as pending but the file not yet renamed into
    place (before), or renamed but not yet committed (after): the resume verifies what is
    there and ends as an uninterrupted run."""
    real, fired = manifest_module.atomic_write, []

    def write(path, content, durable=False):
        hit = Path(path) == tmp_path / "b" / name and not fired
        if hit and when == "before":
            fired.append(path)
            raise Killed
        real(path, content, durable)
        if hit:
            fired.append(path)
            raise Killed

    monkeypatch.setattr(manifest_module, "atomic_write", write)
    r = kill_and_resume(make_config(**TINY), lambda events: False,
                        spy=(gmm_kind, "train_gmm_models"), checkpoint_steps=7)
    assert len(fired) == 1 and (when == "before" or Path(name) in r.files_after_kill)


# ------------------------------------------------------------------------------ symlinks

def test_a_fresh_run_never_writes_through_a_symlink_in_its_folder(tmp_path, capsys):
    """A symlink named like a run file in a folder without a manifest: the run refuses the
    folder (its files cannot be verified) and the link's target is untouched."""
    folder, target = tmp_path / "run", tmp_path / "precious.npz"
    folder.mkdir()
    target.write_bytes(b"precious")
    (folder / "data.npz").symlink_to(target)
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--out", folder)
    assert one_line_error(code, err, "no manifest.json", "data.npz")
    assert target.read_bytes() == b"precious"


# -------------------------------------------------------------------------------- guards

@pytest.fixture
def eight_gib(monkeypatch):
    """The machine has 8 GiB available, whatever it really has."""
    monkeypatch.setattr(budget, "available_memory", lambda: 8 * GiB)


@pytest.mark.parametrize("extra, words", [
    (["--threads", "10000"], ["--threads must be in [0,"]),
    (["--threads", "-1"], ["--threads must be in [0,"]),
    (["--seed", str(2 ** 64)], ["seed must be an integer in [0,"]),
    (["--seed", "-1"], ["seed must be"]),
    (["--peak-lr", "1e300"], ["peak_lr must be a number in (0, 10]"]),
    (["--init-lr", "inf"], ["init_lr must be"]),
    (["--final-lr", "nan"], ["final_lr must be"]),
    (["--variance", "1e-300"], ["variance must be"]),
    (["--init-var", "1e-300"], ["init_var must be"]),
    (["--clip", "0"], ["clip must be"]),
    (["--ema", "1"], ["ema must be"]),
    (["--steps", str(10 ** 12)], ["steps must be an integer in [1, 1000000000]"]),
    (["--baseline-points", str(10 ** 30)], ["baseline_points", "must not exceed N"]),
    (["--out", ""], ["--out must name a folder"]),
    (["--data", "templates", "--components", "5000"], ["components must be at most 1797"]),
    (["--dim", "10000000"], ["would need about", "mostly training", "--dim"]),
    (["--draws", str(10 ** 9)], ["would need about", "--draws"]),
    (["--eval-samples", str(10 ** 12)], ["would need about", "mostly evaluation",
                                         "--eval-samples"]),
    (["--eval-draws", str(10 ** 6), "--dim", "100000"], ["mostly evaluation"]),
])
def test_out_of_range_numbers_are_refused_before_anything_is_written(extra, words, tmp_path,
                                                                     capsys, eight_gib,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default or empty --out would write
    out = ["--out", tmp_path / "run"] if "--out" not in extra else []
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, *extra, *out)
    assert one_line_error(code, err, *words), err
    assert code == 2 and list(tmp_path.iterdir()) == []


def test_memory_guards_of_sweep_and_crossover(tmp_path, capsys, eight_gib):
    """A sweep checks the memory of every configuration before running the first; crossover
    checks its own (no training)."""
    code, _, err = cli(capsys, "sweep", "--dims", f"4,{10 ** 7}", "--components", "2",
                       "--samples", "20", *TINY_ARGS[6:], "--out", tmp_path / "sw")
    assert one_line_error(code, err, "would need about")
    assert not (tmp_path / "sw").exists()
    code, _, err = cli(capsys, "crossover", "--dim", str(10 ** 8), "--out", tmp_path / "cr")
    assert one_line_error(code, err, "would need about", "mostly evaluation")


def test_memory_estimates_of_the_default_presets_fit_a_laptop(monkeypatch):
    """The estimate follows the dominant arrays: the default GMM run needs well under 1 GiB
    (a training step measured at ~10 x 10 models x 100 x 10 x 30 floats), the default
    template run a few GiB (its per-component terms), and d scales the training part
    linearly; a 1 MiB machine refuses the default run."""
    gmm_cfg, tpl_cfg = make_config(), make_config(data="templates")
    gmm_need, _ = budget.estimate(gmm_cfg, gmm_kind.KIND)
    tpl_need, _ = budget.estimate(tpl_cfg, runner.KINDS["templates"])
    assert 1e6 < gmm_need < GiB and GiB < tpl_need < 8 * GiB
    training = gmm_kind.memory(make_config(dim=60))["training"]
    assert 1.9 < training / gmm_kind.memory(gmm_cfg)["training"] <= 2
    monkeypatch.setattr(budget, "available_memory", lambda: 2 ** 20)
    with pytest.raises(budget.ConfigError, match="would need about"):
        budget.check_memory(gmm_cfg, gmm_kind.KIND)
    monkeypatch.setattr(budget, "available_memory", lambda: None)  # unknown: no refusal
    budget.check_memory(gmm_cfg, gmm_kind.KIND)


def test_the_order_of_sizes_is_not_a_change_of_settings(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    base = ["phase-transition", *TINY_ARGS, "--no-refine", "--out", folder]
    assert cli(capsys, *base, "--sizes", "4,2,20")[0] == 0
    before = results_of(folder)
    calls = []
    monkeypatch.setattr(gmm_kind, "train_gmm_models", lambda *a, **k: calls.append(a))
    code, _, err = cli(capsys, *base, "--sizes", "20,4,2", "--resume")
    assert code == 0, err
    assert calls == [] and results_of(folder) == before and before["sizes"] == [2, 4, 20]


def test_a_diverging_training_stops_with_step_loss_and_hint(tmp_path, capsys, monkeypatch):
    """From the 5th step on the loss is NaN: the run stops there (exit 1, one line) instead
    of failing later on NaN inputs."""
    from diffmem.training import gmm as training_gmm

    real, steps = training_gmm.eps_losses, []

    def losses(*args, **kwargs):
        steps.append(None)
        out = real(*args, **kwargs)
        return out * float("nan") if len(steps) >= 5 else out

    monkeypatch.setattr(training_gmm, "eps_losses", losses)
    code, _, err = cli(capsys, "phase-transition", *TINY_ARGS, "--out", tmp_path / "run")
    assert code == 1
    assert one_line_error(code, err, "diverged at step 5 of 20", "loss nan",
                          "--peak-lr (now 0.01)", "--clip (now 1000)"), err
    assert len(steps) == 5
