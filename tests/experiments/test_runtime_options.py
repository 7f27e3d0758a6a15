"""--device, --backend and --precision on every experiment command: recorded in each results
JSON, bad values refused in one line, and a run on the reference backend equal to one on the
cpu backend up to the op's stated precision. And the sweep's shard under torchrun."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_run import TINY_ARGS, cli, one_line_error

from diffmem import __version__
from diffmem.experiments.config import ConfigError
from diffmem.experiments.evaluate import to_x0_units
from diffmem.experiments.runtime import Runtime
from diffmem.experiments.sweep import launcher_shard, local_device, pick_shard

pytestmark = pytest.mark.usefixtures("one_thread")

SWEEP_ARGS = ["sweep", "--dims", "4", "--components", "2", "--samples", "20,30",
              *TINY_ARGS[6:], "--no-refine", "--no-plots"]


def _check_record(record: dict, backend: str, precision: str) -> None:
    assert record["device"] == "cpu" and record["device_name"]
    assert record["backend"] == backend and record["requested_backend"] == backend
    assert record["precision"] == precision and record["diffmem"] == __version__
    assert "commit" in record


@pytest.fixture(scope="module")
def two_backends(tmp_path_factory):
    """results.json of the tiny run on the cpu and on the reference backend."""
    from diffmem.cli import main

    out = {}
    for backend in ("cpu", "reference"):
        folder = tmp_path_factory.mktemp(backend)
        assert main(["phase-transition", *TINY_ARGS, "--no-plots", "--backend", backend,
                     "--out", str(folder)]) == 0
        out[backend] = json.loads((folder / "results.json").read_text())
    return out


def test_phase_transition_records_its_runtime(two_backends):
    for backend, results in two_backends.items():
        _check_record(results["runtime"], backend, "exact")
        assert results["environment"]["device"] == "cpu"


def test_a_run_resumes_on_another_backend(tmp_path, capsys):
    """The runtime is not part of a run's identity: a run started on one backend continues on
    another (finished stages are reused as they are), and results.json names the last one."""
    args = ["phase-transition", *TINY_ARGS, "--no-plots", "--out", tmp_path]
    assert cli(capsys, *args, "--backend", "cpu")[0] == 0
    first = json.loads((tmp_path / "results.json").read_text())
    code, _, err = cli(capsys, *args, "--backend", "reference", "--precision", "fast",
                       "--resume")
    assert code == 0, err
    again = json.loads((tmp_path / "results.json").read_text())
    _check_record(again["runtime"], "reference", "fast")
    assert again["trained"] == first["trained"] and again["baselines"] == first["baselines"]


def _x0_losses(results) -> dict:
    """Every per-t loss of a results.json in x0 units, (T,) float64 each, by name."""
    ts = torch.tensor(results["grid"], dtype=torch.float64)
    b, out = results["baselines"], {}
    for name in ("ground_truth", "memorizing"):
        for split, losses in b[name].items():
            out[f"{name}/{split}"] = losses
    for m, per in b["partial_mem"].items():
        for split, losses in per.items():
            out[f"pmem{m}/{split}"] = losses
    for m, ev in results["trained"].items():
        out[f"M{m}/train"], out[f"M{m}/val"] = ev["train_loss"], ev["val_loss"]
    return {k: torch.tensor(to_x0_units(v, ts), dtype=torch.float64) for k, v in out.items()}


def test_reference_backend_equals_cpu_backend_up_to_the_op_precision(two_backends):
    """Exact mode bounds the denoiser's mean x0_hat to eps = 1e-5 of a float64 computation
    (relative to its norm); every other step is the same torch code on the same draws. An x0-unit
    loss L = E||x0_hat - x0||^2 then moves by at most 2 ||x0_hat - x0|| eps ||x0_hat|| +
    eps^2 ||x0_hat||^2 <= eps (L + E||x0_hat||^2) (AM-GM), with E||x0_hat||^2 about
    E||x0||^2 = d (1 + sigma0^2) = 8 here. Training (20 steps) carries the same bound along,
    and the memorization ratio, a count, does not move."""
    cpu, ref = two_backends["cpu"], two_backends["reference"]
    scale = 4 * (1 + 1.0)
    a, b = _x0_losses(cpu), _x0_losses(ref)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert ((a[name] - b[name]).abs() <= 1e-5 * (b[name].abs() + scale)).all(), name
    assert cpu["memorization_ratio"] == ref["memorization_ratio"]
    assert cpu["sizes"] == ref["sizes"]
    for m in cpu["trained"]:
        va, vb = cpu["trained"][m]["variance"], ref["trained"][m]["variance"]
        assert abs(va - vb) <= 1e-5 * abs(vb), m
    # the runs did differ: the reference backend computes in float64
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_crossover_records_its_runtime(tmp_path, capsys):
    out = tmp_path / "one"
    code, _, err = cli(capsys, "crossover", "--dim", "4", "--components", "2", "--samples", "20",
                       "--eval-draws", "2", "--backend", "reference", "--precision", "fast",
                       "--out", out)
    assert code == 0, err
    _check_record(json.loads((out / "crossover.json").read_text())["runtime"], "reference",
                  "fast")
    many = tmp_path / "many"
    code, _, err = cli(capsys, "crossover", "--dim", "4", "--components", "2", "--samples",
                       "20,40", "--measure-points", "8", "--eval-draws", "2", "--no-plots",
                       "--backend", "reference", "--quiet", "--out", many)
    assert code == 0, err
    summary = json.loads((many / "crossover_vs_n.json").read_text())
    _check_record(summary["runtime"], "reference", "exact")
    _check_record(json.loads((many / "stages" / "N40.json").read_text())["runtime"],
                  "reference", "exact")


def test_sweep_records_its_runtime(tmp_path, capsys):
    code, _, err = cli(capsys, *SWEEP_ARGS, "--samples", "20", "--backend", "reference",
                       "--out", tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    _check_record(summary["runtime"], "reference", "exact")
    assert summary["shard"] == [0, 1]
    results = json.loads((tmp_path / "gmm-d4-K2-N20-s1" / "results.json").read_text())
    _check_record(results["runtime"], "reference", "exact")


@pytest.mark.parametrize("command", [["phase-transition", *TINY_ARGS], SWEEP_ARGS,
                                     ["crossover", "--samples", "20", "--no-measured"]])
@pytest.mark.parametrize("option, words", [
    (["--device", "tpu"], ["--device", "cpu, cuda or cuda:K", "tpu"]),
    (["--device", "cuda:99"], ["--device cuda:99"]),
    (["--device", "cpu", "--backend", "cuda"], ["--backend cuda", "--device cpu"]),
    (["--backend", "numpy"], ["--backend", "invalid choice"]),
    (["--precision", "half"], ["--precision", "invalid choice"]),
])
def test_bad_runtime_options_are_one_line_exit_2(command, option, words, tmp_path, capsys,
                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *command, *option, "--out", tmp_path / "run")
    assert code == 2 and one_line_error(code, err, *words), err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ---------------------------------------------------------------------------------------------
# The sweep under torchrun


def test_shard_from_torchrun_environment():
    assert launcher_shard({}) is None and pick_shard(None, {}) == (0, 1)
    assert launcher_shard({"RANK": "0"}) is None  # both or nothing
    env = {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"}
    assert pick_shard(None, env) == (1, 3)
    assert pick_shard((1, 3), env) == (1, 3)
    assert pick_shard((0, 2), {}) == (0, 2)
    with pytest.raises(ConfigError, match="disagrees with torchrun's RANK=1 WORLD_SIZE=3"):
        pick_shard((0, 3), env)
    for bad in ({"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"},
                {"RANK": "0", "WORLD_SIZE": "0"}):
        with pytest.raises(ConfigError, match="torchrun environment"):
            launcher_shard(bad)
    # LOCAL_RANK picks the GPU of a bare --device cuda only; the CPU stays the CPU
    assert local_device(Runtime(), env) == Runtime()
    assert local_device(Runtime(device="cuda:0"), env).device == "cuda:0"


def test_sweep_takes_its_shard_from_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli(capsys, *SWEEP_ARGS, "--out", tmp_path)
    assert code == 0, err
    assert not (tmp_path / "gmm-d4-K2-N20-s1").exists()  # configuration 0: rank 0's
    assert (tmp_path / "gmm-d4-K2-N30-s1" / "results.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["shard"] == [1, 2]
    code, _, err = cli(capsys, *SWEEP_ARGS, "--shard", "0/2", "--out", tmp_path / "x")
    assert one_line_error(code, err, "--shard 0/2 disagrees", "RANK=1 WORLD_SIZE=2")
    assert code == 2 and not (tmp_path / "x").exists()
