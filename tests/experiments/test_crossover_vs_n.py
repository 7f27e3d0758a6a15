"""``diffmem crossover --samples N1,N2,...``: the crossover as N grows (crossover_vs_n.py)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from tiny_run import cli, one_line_error

from diffmem import EmpiricalDenoiser, make_gmm_data, theory, time_grid
from diffmem.diffusion.loss import time_weights
from diffmem.diffusion.processes import VP
from diffmem.experiments.crossover_vs_n import (
    crossing_se,
    instancewise_with_progress,
    measured_subsampled,
    per_point_losses,
)
from diffmem.experiments.evaluate import generator

pytestmark = pytest.mark.usefixtures("one_thread")
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
TS = time_grid(dtype=torch.float64)


def test_crossing_se_is_the_gap_se_over_the_slope():
    f = [k / 10 for k in range(1, 11)]
    gaps = [2.0 * (0.72 - x) for x in f]
    frac, se = crossing_se(f, gaps, [0.01] * 10)
    assert frac == pytest.approx(0.72) and se == pytest.approx(0.005)
    # the SE is interpolated between the sizes that bracket the crossing (0.7 and 0.8)
    ses = [0.01] * 6 + [0.02, 0.04] + [0.01] * 2
    assert crossing_se(f, gaps, ses)[1] == pytest.approx((0.8 * 0.02 + 0.2 * 0.04) / 2)
    no = crossing_se(f, [1.0] * 10, [0.01] * 10)
    assert math.isnan(no[0]) and no[1] is None
    assert crossing_se(f, [-1.0] * 10, [0.01] * 10) == (0.1, None)


def test_per_point_losses_match_a_float64_computation():
    """Per point: the mean over its draws of ||eps_hat(alpha x0 + sigma eps, t) - eps||^2 of
    the memorizing denoiser, against float64 softmax weights on the same float32 inputs. Exact
    mode bounds x0_hat to 1e-5 relative; eps_hat = (x_t - alpha x0_hat) / sigma moves by
    alpha/sigma times that (about 1 at t = 0.5)."""
    data = make_gmm_data(6, 2, 30, seed=5).train
    x0, P, R = data[:7], 7, 3
    eps = torch.randn(P, R, 6, generator=torch.Generator().manual_seed(1))
    model = EmpiricalDenoiser(data, VP(), "eps")
    for t in (0.2, 0.5, 0.8):
        got = per_point_losses(model, x0, t, eps)
        a, s = float(VP().alpha(t)), float(VP().sigma(t))
        y, e = data.double(), eps.double()
        xt = a * x0.double()[:, None, :] + s * e                             # (P, R, d)
        w = torch.softmax(-((xt[:, :, None, :] - a * y) ** 2).sum(-1) / (2 * s * s), -1)
        eps_hat = (xt - a * (w @ y)) / s
        want = ((eps_hat - e) ** 2).sum(-1).mean(1)
        assert got.dtype == torch.float64 and got.shape == (P,)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * 6), t


def test_instancewise_with_progress_is_the_one_call_result():
    train = make_gmm_data(5, 2, 60, seed=2).train
    calls = []
    got = instancewise_with_progress(train, TS, variance=1.0, weighting="x0", seed=2,
                                     progress=lambda k, n: calls.append((k, n)))
    want = theory.crossover_instancewise(train, TS, variance=1.0, weighting="x0",
                                         generator=generator(2, "instancewise"),
                                         return_scan=True)
    assert got == want and calls[-1] == (20, 20)


def test_measured_subsampled_agrees_with_the_full_measurement():
    """With every training point as a query (P = N) the subsampled estimate and
    theory.crossover_measured (its own noise and subsets) measure the same gaps: they agree
    within a few of the reported standard errors, and so do the crossovers."""
    data = make_gmm_data(5, 2, 60, seed=4)
    gt = data.ground_truth(prediction="eps")
    full, ms, gaps = theory.crossover_measured(data.train, gt, TS, draws=16,
                                               generator=generator(4, "m"), seed=4,
                                               return_scan=True)
    est = measured_subsampled(data.train, gt, TS, points=100, draws=16, seed=4)
    assert est["points"] == 60 and est["sizes"] == ms
    z = [abs(a - b) / (math.sqrt(2) * s) for a, b, s in zip(est["gaps"], gaps, est["gap_se"])]
    assert max(z) < 4, z
    assert 0 < est["se"] < 0.1
    assert abs(est["fraction"] - full) < 4 * math.sqrt(2) * est["se"]
    # the gap is a weighted sum: at M = N the pmem model is the memorizing one, below the GT
    c = time_weights(TS, "x0", units="eps")
    assert c.shape == TS.shape and est["gaps"][-1] < 0


def test_fewer_points_give_a_larger_standard_error():
    data = make_gmm_data(5, 2, 200, seed=6)
    gt = data.ground_truth(prediction="eps")
    small = measured_subsampled(data.train, gt, TS, points=16, draws=4, seed=6)
    large = measured_subsampled(data.train, gt, TS, points=128, draws=4, seed=6)
    assert small["points"] == 16 and large["points"] == 128
    # SE ~ 1/sqrt(P): 128 points about sqrt(8) ~ 2.8 times smaller
    ratio = sum(small["gap_se"]) / sum(large["gap_se"])
    assert 1.5 < ratio < 5, ratio


ARGS = ["crossover", "--dim", "4", "--components", "2", "--samples", "20,40",
        "--measure-points", "12", "--eval-draws", "2"]


def test_crossover_as_n_grows_writes_stages_json_and_plot_and_resumes(tmp_path, capsys):
    out = tmp_path / "cr"
    code, stdout, err = cli(capsys, *ARGS, "--out", out)
    assert code == 0, err
    summary = json.loads((out / "crossover_vs_n.json").read_text())
    assert summary["schema"] == "diffmem.crossover_vs_n/1" and summary["samples"] == [20, 40]
    rows = summary["rows"]
    assert [r["samples"] for r in rows] == [20, 40]
    for r in rows:
        assert r["coded"] == pytest.approx(0.6604, abs=1e-4)
        assert 0 < r["instancewise"] <= 1 and 0 < r["measured"] <= 1 and r["measured_se"] > 0
        assert r["measured_scan"]["points"] == 12 and r["measured_scan"]["draws"] == 2
    assert "N=40 measured" in err and "N=20: coded" in err  # progress on stderr
    assert "      40" in stdout and "crossover_vs_n.json" in stdout
    assert (out / "crossover_vs_n.png").exists() == HAVE_MPL
    stage = out / "stages" / "N40.json"
    before = stage.read_bytes(), stage.stat().st_mtime_ns
    code, _, err = cli(capsys, *ARGS, "--out", out, "--resume")
    assert code == 0 and err.count("finished earlier") == 2
    assert (stage.read_bytes(), stage.stat().st_mtime_ns) == before
    assert json.loads((out / "crossover_vs_n.json").read_text())["rows"] == rows
    # other settings: the stages are computed again, with a warning
    code, _, err = cli(capsys, *ARGS[:-4], "--measure-points", "10", "--eval-draws", "2",
                       "--out", out, "--resume", "--no-plots")
    assert code == 0 and err.count("computing N=") == 2
    assert json.loads(stage.read_text())["result"]["measured_scan"]["points"] == 10


@pytest.mark.parametrize("extra, words", [
    (["--samples", "20,20"], ["--samples must not repeat"]),
    (["--samples", "20,x"], ["integers"]),
    (["--measure-points", "1"], ["--measure-points must be at least 2"]),
    (["--data", "templates", "--dim", "4"], ["--data gmm"]),
])
def test_bad_crossover_as_n_grows_input(extra, words, tmp_path, capsys):
    code, _, err = cli(capsys, *ARGS, *extra, "--out", tmp_path / "x")
    assert code == 2 and one_line_error(code, err, *words), err


def test_crossing_at_the_first_size_has_no_standard_error():
    """A crossing at the first size has no slope to its left: no SE, even when noisy gaps
    bracket zero again further on."""
    from diffmem.experiments.crossover_vs_n import crossing_se

    frac, se = crossing_se([0.1, 0.2, 0.3, 0.4], [-0.1, 0.2, -0.05, -0.3], [0.01] * 4)
    assert frac == 0.1 and se is None
    frac, se = crossing_se([0.1, 0.2, 0.3], [0.2, 0.1, -0.1], [0.01] * 3)
    assert 0.2 < frac < 0.3 and se == pytest.approx(0.01 / 2.0)
