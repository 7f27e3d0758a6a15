"""The colored-template phase-transition run (--data templates): tiny end-to-end run through the
CLI (results.json, plots, sample grid), resume after a simulated kill (between models and in
the middle of one), template presets, and deterministic, resumable training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffmem.cli import main
from diffmem.data.templates import make_template_data
from diffmem.experiments import sweep
from diffmem.experiments import templates as templates_kind
from diffmem.experiments.config import GRIDS, make_config
from diffmem.training import train_template_model

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
TINY = dict(data="templates", dim=6, components=2, samples=20, val_samples=10, eval_samples=6,
            steps=6, warmup=1, draws=2, eval_draws=2, baseline_step=10, sizes=[4, 10, 20])
TINY_ARGS = ["--data", "templates", "--dim", "6", "--components", "2", "--samples", "20",
             "--val-samples", "10", "--eval-samples", "6", "--steps", "6", "--warmup", "1",
             "--draws", "2", "--eval-draws", "2", "--baseline-step", "10", "--sizes", "4,10,20",
             "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_templates_end_to_end_cli(tmp_path):
    out = tmp_path / "run"
    assert main(["phase-transition", *TINY_ARGS, "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["data"]["kind"] == "templates" and r["data"]["image_shape"] == [3, 6, 6]
    assert r["config"]["clip"] == 1e3 and r["config"]["ema"] == 0.1
    assert {4, 10, 20} <= set(r["sizes"]) and len(r["memorization_ratio"]) == len(r["sizes"])
    for M in r["sizes"]:
        m = r["trained"][str(M)]
        assert 0 <= m["memorization_ratio"] <= 1 and m["variance"] > 0
        assert len(m["train_loss"]) == 26 and len(m["val_loss"]) == 26
        assert "learned_means" in m
    assert set(r["baselines"]["partial_mem"]) == {"10", "20"}
    p = r["predictions"]
    assert p["coded"] is None and p["instancewise"] is None and "measured" in p and p["note"]
    assert r["trained"]["20"]["memorization_ratio"] == 1.0  # barely trained PMEM with M = N
    if HAVE_MPL:
        for name in ("memorization_ratio.png", "variance.png", "generated_samples.png",
                     "train_loss_avg.png"):
            assert (out / "plots" / name).stat().st_size > 1000


def _sizes_and_steps(calls):
    """(M, resumed-from step or None) of each train_template_model call."""
    return [(args[1], None if kw["resume_state"] is None else kw["resume_state"]["step"])
            for args, kw in calls]


def test_templates_resume_after_kill(kill_and_resume):
    config = make_config(**TINY)

    def second_evaluation(events):
        return [e for e, _ in events].count("evaluated") == 2

    r = kill_and_resume(config, second_evaluation, spy=(templates_kind, "train_template_model"))
    trained = [M for M, _ in _sizes_and_steps(r.train_calls)]
    assert not set(trained) & set(config.train_sizes())


def test_templates_resume_mid_model_matches_uninterrupted(kill_and_resume):
    """A kill while a model trains loses only the steps since its last checkpoint: the resumed
    run continues that model from the saved state and ends with the same results."""
    config = make_config(**TINY)

    def mid_second_model(events):  # steps = 6: checkpoints at 2, 4
        event, value = events[-1]
        return event == "checkpoint" and value == 4 and ("saved", 4) in events

    r = kill_and_resume(config, mid_second_model, spy=(templates_kind, "train_template_model"),
                        checkpoint_steps=2)
    assert Path("train_state.npz") in r.files_after_kill
    calls = _sizes_and_steps(r.train_calls)
    assert calls[0] == (10, 4) and all(step is None for _, step in calls[1:])
    assert 4 not in [M for M, _ in calls]                      # the saved model is not retrained
    assert not (r.folder / "train_state.npz").exists()


def test_train_template_model_resumes_exactly():
    """4 steps, checkpoint, then a new call from that state equals 7 steps straight."""
    data = make_template_data(2, 12, 3, size=5, val_samples=2)
    kw = dict(steps=7, warmup=1, draws=2, peak_lr=1e-3, seed=7)
    straight = train_template_model(data, 5, **kw)
    saved = []
    train_template_model(data, 5, checkpoint=saved.append, checkpoint_every=2, **kw)
    assert [s["step"] for s in saved] == [2, 4, 6] and saved[1]["losses"].shape == (4,)
    resumed = train_template_model(data, 5, resume_state=saved[1], **kw)
    assert torch.equal(resumed.templates, straight.templates)
    assert torch.equal(resumed.color_means, straight.color_means)
    assert resumed.color_std == straight.color_std and torch.equal(resumed.losses, straight.losses)
    with pytest.raises(ValueError, match="resume_state is for"):
        train_template_model(data, 6, resume_state=saved[1], **kw)


def test_templates_crossover_command(tmp_path, capsys):
    """Only the measured crossover applies to templates; over seeds 1-3 this tiny configuration
    gives 0.80-0.88."""
    out = tmp_path / "cr"
    assert main(["crossover", "--data", "templates", "--dim", "5", "--components", "2",
                 "--samples", "20", "--eval-draws", "4", "--out", str(out)]) == 0
    r = json.loads((out / "crossover.json").read_text())
    p = r["predictions"]
    assert r["config"]["data"] == "templates" and p["coded"] is None and p["instancewise"] is None
    assert 0.6 < p["measured"] < 1.0 and p["note"] and len(p["measured_scan"]["sizes"]) == 20
    text = capsys.readouterr().out
    assert "n/a (GMM theory)" in text and "measured      0." in text


def test_templates_sweep_with_shards(tmp_path, capsys):
    base = ["sweep", "--data", "templates", "--dims", "5", "--components", "2", "--samples",
            "20,30", *TINY_ARGS[8:], "--no-refine", "--no-plots", "--out", str(tmp_path)]
    assert main([*base, "--shard", "0/2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["templates-d5-K2-N20-s1"]
    assert main([*base, "--shard", "1/2"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"] == "templates"
    assert [(r["data"], r["samples"]) for r in summary["rows"]] == [("templates", 20),
                                                                     ("templates", 30)]
    assert all(r["coded"] is None and r["measured"] is not None for r in summary["rows"])
    r = json.loads((tmp_path / "templates-d5-K2-N30-s1" / "results.json").read_text())
    assert r["data"]["image_shape"] == [3, 5, 5] and r["sizes"] == [4, 10, 20]
    assert "d5-K2-N30" in capsys.readouterr().out


def test_sweep_grid_defaults_follow_the_data(tmp_path, monkeypatch):
    """Without --dims/--components/--samples the template sweep runs its own 2 x 2 x 2 grid."""
    ran = []
    monkeypatch.setattr(sweep, "run_phase_transition",
                        lambda config, folder, **kw: ran.append(config.tag()))
    assert main(["sweep", "--data", "templates", "--quiet", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    dims, ks, ns = GRIDS["templates"]
    assert ran == [f"templates-d{d}-K{k}-N{n}-s1" for d in dims for k in ks for n in ns]


def test_templates_presets():
    c = make_config(data="templates")
    assert (c.dim, c.components, c.clip, c.ema, c.init_var) == (15, 6, 1e3, 0.1, 1e-6)
    p = make_config("paper", data="templates")
    assert (p.steps, p.warmup, p.peak_lr, p.final_lr, p.baseline_step) == \
        (100_000, 5_000, 1e-4, 1e-8, 2)
    assert make_config("paper", data="templates", steps=200).warmup == 10
    gmm = make_config()  # the GMM defaults are untouched
    assert (gmm.dim, gmm.components, gmm.ema, gmm.steps) == (30, 4, 0.99, 10000)


def test_train_template_model_deterministic():
    data = make_template_data(2, 12, 3, size=5, val_samples=2)
    kw = dict(steps=4, warmup=1, draws=2, peak_lr=1e-3, seed=7)
    a, b = train_template_model(data, 5, **kw), train_template_model(data, 5, **kw)
    assert torch.equal(a.templates, b.templates) and torch.equal(a.losses, b.losses)
    assert a.templates.shape == (5, 5, 5) and a.color_means.shape == (5, 3)
    assert a.means().shape == (5, 3, 5, 5) and a.variance > 0
