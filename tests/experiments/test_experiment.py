"""The experiment commands: end-to-end run on a tiny configuration (JSON schema, plots),
resume after a simulated kill, the transition rule, the memorization-ratio pipeline, and
one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_run import TINY, TINY_ARGS

from diffmem import EmpiricalDenoiser, make_gmm_data, time_grid
from diffmem.cli import main
from diffmem.experiments import gmm as gmm_kind
from diffmem.experiments.config import ConfigError, make_config
from diffmem.experiments.evaluate import sample_ratio
from diffmem.experiments.runner import run_phase_transition
from diffmem.experiments.transition import (
    crossing_point,
    isotonic,
    locate_transition,
    refinement_sizes,
)

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


TOP_KEYS = {"schema", "config", "environment", "grid", "x0_scale", "data", "baselines",
            "baseline_averages", "trained", "sizes", "fractions", "memorization_ratio",
            "variance", "transition", "predictions", "timings"}
MODEL_KEYS = {"size", "variance", "memorization_ratio", "median_d1_over_d2", "learned_means",
              "train_loss", "val_loss", "avg_train_loss", "avg_val_loss", "final_training_loss"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_end_to_end_cli(tmp_path):
    out = tmp_path / "run"
    assert main(["phase-transition", *TINY_ARGS, "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert TOP_KEYS <= set(r)
    assert r["schema"] == "diffmem.phase_transition/1"
    assert r["config"]["samples"] == 20 and len(r["grid"]) == 26
    assert {"diffmem", "torch", "python", "device"} <= set(r["environment"])
    assert r["sizes"] == sorted(r["sizes"]) and set(range(2, 21, 2)) <= set(r["sizes"])
    for M in r["sizes"]:
        m = r["trained"][str(M)]
        assert MODEL_KEYS <= set(m) and len(m["train_loss"]) == 26 and len(m["val_loss"]) == 26
        assert 0 <= m["memorization_ratio"] <= 1 and set(m["avg_train_loss"]) == {"eps", "x0"}
    b = r["baselines"]
    for name in ("ground_truth", "memorizing"):
        assert len(b[name]["train"]) == 26 and len(b[name]["val"]) == 26
    assert set(b["partial_mem"]) == {"10", "20"} and len(b["ground_truth_approx"]["train"]) == 26
    tr = r["transition"]
    assert tr["start"] <= tr["end"] and {"initial_sizes", "refined_sizes", "delta"} <= set(tr)
    p = r["predictions"]
    assert p["weighting"] == "x0" and abs(p["coded"] - 0.6604) < 1e-3
    assert 0 < p["instancewise"] <= 1.5
    # the untrained-like PMEM model with M = N memorizes (few steps at a small lr)
    assert r["trained"]["20"]["memorization_ratio"] == 1.0
    if HAVE_MPL:
        for name in ("memorization_ratio.png", "variance.png", "learned_means_distances.png",
                     "train_loss_avg.png", "val_loss_0_360.png"):
            assert (out / "plots" / name).stat().st_size > 1000
    else:
        pytest.skip("matplotlib is not installed: plot files not checked")


# Trained learnable models (not only baselines) go through the transition: d = 10, K = 2 well
# separated components, N = 20, the default preset's optimizer shortened to 2,000 steps. Over
# seeds 1-8 the smallest model (M = 2) learns a variance 0.65-1.03 and memorizes nothing, M = N
# keeps a variance < 0.02 and memorizes every sample, and rho = 0.5 falls at 0.78-0.84 N.
TRAINED_ARGS = ["--dim", "10", "--components", "2", "--samples", "20", "--val-samples", "10",
                "--eval-samples", "50", "--steps", "2000", "--warmup", "200", "--draws", "4",
                "--eval-draws", "4", "--baseline-step", "10", "--quiet", "--no-plots"]


def test_trained_models_go_from_generalizing_to_memorizing(tmp_path):
    out = tmp_path / "run"
    assert main(["phase-transition", *TRAINED_ARGS, "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    smallest, full = r["trained"][str(min(r["sizes"]))], r["trained"]["20"]
    assert min(r["sizes"]) == 2 and smallest["variance"] > 0.3 and full["variance"] < 0.05
    assert smallest["memorization_ratio"] <= 0.1      # generalizes: samples far from the data
    assert full["memorization_ratio"] >= 0.9          # memorizes: samples on training points
    assert smallest["median_d1_over_d2"] > 0.5 > 0.2 > full["median_d1_over_d2"]
    assert 0.6 <= r["transition"]["midpoint_fraction"] <= 0.95


def _sizes_and_steps(calls):
    """(sizes, resumed-from step or None) of each train_gmm_models call."""
    return [(list(args[1]), None if kw["resume_state"] is None else kw["resume_state"]["step"])
            for args, kw in calls]


def test_resume_after_kill_matches_uninterrupted(kill_and_resume):
    config = make_config(**TINY)

    def third_evaluation(events):
        return events[-1][0] == "evaluated" and [e for e, _ in events].count("evaluated") == 3

    r = kill_and_resume(config, third_evaluation, spy=(gmm_kind, "train_gmm_models"))
    finished = {int(p.stem[1:]) for p in r.files_after_kill
                if p.parent == Path("models") and p.suffix == ".json"}
    assert len(finished) == 3
    phase1 = set(config.train_sizes())
    trained_sizes = [sizes for sizes, _ in _sizes_and_steps(r.train_calls)]
    assert all(not (set(s) & phase1) for s in trained_sizes)  # phase 1 was not retrained
    evaluated = {v for e, v in r.events_after_resume if e == "evaluated"}
    assert not (evaluated & finished)                          # finished models not re-evaluated


@pytest.mark.parametrize("phase", [1, 2])
def test_resume_mid_training_phase_matches_uninterrupted(kill_and_resume, phase):
    """A kill inside a training phase loses only the steps since its last checkpoint: the
    resumed run continues from the saved state and ends with the same results."""
    config = make_config(**TINY)

    def second_checkpoint_of_phase(events):  # steps = 20: checkpoints at 7, 14
        event, value = events[-1]
        return event == "checkpoint" and events.count(("trained", 1)) == phase - 1 and value == 14

    r = kill_and_resume(config, second_checkpoint_of_phase, spy=(gmm_kind, "train_gmm_models"),
                        checkpoint_steps=7)
    assert Path("train_state.npz") in r.files_after_kill
    calls = _sizes_and_steps(r.train_calls)
    assert calls[0][1] == 14 and all(step is None for _, step in calls[1:])
    assert (calls[0][0] == config.train_sizes()) == (phase == 1)
    assert not (r.folder / "train_state.npz").exists()
    assert not (r.folder / "train_state.json").exists()


def test_resume_requires_same_settings(tmp_path):
    run_phase_transition(make_config(**TINY), tmp_path, quiet=True, plots=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_phase_transition(make_config(**TINY), tmp_path, quiet=True, plots=False)
    with pytest.raises(ConfigError, match="settings differ"):
        run_phase_transition(make_config(**{**TINY, "steps": 21}), tmp_path, resume=True,
                             quiet=True, plots=False)


def test_transition_rule_and_refinement():
    sizes = [10, 20, 30, 40, 50]
    assert locate_transition(sizes, [0, 0.05, 0.5, 0.95, 1], 0.1) == (20, 40)
    # rho never crosses delta from below (reference bug): defaults, no crash
    assert locate_transition(sizes, [0.5, 0.6, 0.7, 0.95, 1], 0.1) == (10, 40)
    assert locate_transition(sizes, [0, 0, 0, 0, 0], 0.1) == (10, 50)
    assert locate_transition([40, 10, 30, 20, 50], [0.95, 0, 0.5, 0.05, 1]) == (20, 40)
    assert refinement_sizes(20, 40) == [20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40]
    assert refinement_sizes(20, 25) == [20, 21, 22, 23, 24, 25]
    assert crossing_point(sizes, [0, 0, 0.4, 0.6, 1]) == pytest.approx(35.0)
    assert math.isnan(crossing_point(sizes, [0, 0, 0, 0, 0]))
    assert isotonic([0, 0.5, 0.2, 0.6, 1]) == pytest.approx([0, 0.35, 0.35, 0.6, 1])


def test_memorization_ratio_pipeline_separates_generalizing_and_memorizing():
    """The measurement behind the curve: DDIM samples of the ground truth are not memorized
    (ratio ~0) and those of the memorizing denoiser are (ratio 1), SPEC J.5."""
    data = make_gmm_data(10, 3, 40, 0)
    x = torch.randn(30, 10, generator=torch.Generator().manual_seed(1))
    ts = time_grid()
    gt = sample_ratio(data.ground_truth(prediction="x0"), data.train, x, ts, 1 / 3)
    mem = sample_ratio(EmpiricalDenoiser(data.train), data.train, x, ts, 1 / 3)
    assert gt["memorization_ratio"] <= 0.05 and mem["memorization_ratio"] == 1.0
    assert gt["median_d1_over_d2"] > 0.5 > 0.01 > mem["median_d1_over_d2"]


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset"),
    (["phase-transition", "--samples", "55"], "divisible by 10"),
    (["phase-transition", "--sizes", "-5"], "sizes must be"),
    (["phase-transition", "--sizes", "0,5"], "sizes must be"),
    (["phase-transition", "--steps", "0"], "steps must be"),
    (["phase-transition", "--warmup", "50", "--steps", "10"], "warmup"),
    (["phase-transition", "--steps", "x"], "invalid int"),
    (["phase-transition", "--data", "images"], "invalid choice"),
    (["crossover", "--data", "templates", "--no-measured"], "nothing to predict"),
    (["phase-transition", "--out", "/proc/diffmem-no-such-dir"], "cannot write"),
    (["sweep", "--shard", "2/2"], "shard"),
    (["sweep", "--dims", "30,a"], "integers"),
    (["crossover", "--dim", "-1"], "dim must be"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders would land here
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err


def test_unwritable_out_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = main(["phase-transition", *TINY_ARGS, "--out", str(locked / "run")])
        if code == 0:  # running as root: permissions are not enforced
            pytest.skip("permissions not enforced for this user")
        assert code == 2 and "cannot write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_crossover_command(tmp_path, capsys):
    out = tmp_path / "cr"
    assert main(["crossover", "--dim", "6", "--components", "2", "--samples", "20",
                 "--no-measured", "--out", str(out)]) == 0
    r = json.loads((out / "crossover.json").read_text())
    assert abs(r["predictions"]["coded"] - 0.6604) < 1e-3 and r["predictions"]["measured"] is None
    assert "coded" in capsys.readouterr().out


def test_sweep_subset_with_shards(tmp_path, capsys):
    base = ["sweep", "--dims", "4", "--components", "2", "--samples", "20,30", *TINY_ARGS[6:],
            "--no-refine", "--no-plots", "--out", str(tmp_path)]
    assert main([*base, "--shard", "0/2"]) == 0
    assert main([*base, "--shard", "1/2"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["samples"] for r in summary["rows"]] == [20, 30]
    assert "d4-K2-N20" in capsys.readouterr().out
