"""``diffmem memorize``: the digits default run (the memorizing denoiser copies, the fitted
Gaussian does not), image folders and arrays, the fitted Gaussian against its float64 closed
form, bad data, the runtime record, --resume, and two processes (samples split, points
sharded) against one."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import rank_log_tails, wait_for_ranks

from diffmem import EmpiricalDenoiser, PartialMemorizingDenoiser, memorization_ratio
from diffmem.cli import main
from diffmem.data.images import load_digits_set
from diffmem.denoisers.gaussian import fit_gaussian

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--num-samples", "12", "--steps", "20", "--fractions", "0.2", "--threads", "1"]
HARD_LIMIT_S = 120  # a two-process run, start to finish


def run(tmp_path: Path, *args: str, name: str = "run") -> tuple[int, dict | None]:
    out = tmp_path / name
    code = main(["memorize", *args, "--out", str(out)])
    path = out / "results.json"
    return code, json.loads(path.read_text()) if path.exists() else None


def test_digits_default_run(tmp_path, capsys):
    code, r = run(tmp_path, "--threads", "1", "--quiet")
    assert code == 0
    assert r["schema"] == "diffmem.memorize/1" and r["data"]["points"] == 1797
    assert r["data"]["shape"] == [8, 8, 1] and r["data"]["storage"] == "uint8"
    dens = r["denoisers"]
    assert set(dens) == {"memorizing", "partial_0.1", "partial_0.5", "generalizing_gaussian"}
    assert dens["memorizing"]["memorization_ratio"] == 1.0
    assert dens["generalizing_gaussian"]["memorization_ratio"] == 0.0
    for name in ("memorizing", "partial_0.1", "partial_0.5"):
        d = dens[name]
        assert d["memorization_ratio"] == 1.0
        assert d["copies_outside_points"] == 0 and d["nearest"]["outside_points"] == 0
        assert 1 <= d["distinct_copied"] <= min(d["points"], 64)
        assert d["nearest"]["agrees_with_knn"] == 1.0
        assert 0.5 < d["nearest"]["weight"]["min"] <= d["nearest"]["weight"]["max"] <= 1.0
    assert dens["partial_0.1"]["points"] == 180
    for d in dens.values():
        assert d["seconds_per_step"] > 0 and len(d["seconds_per_step_ranks"]) == 1
    assert set(r["runtime"]) >= {"device", "device_name", "backend", "precision", "diffmem",
                                 "commit"}
    assert r["runtime"]["device"] == "cpu" and r["runtime"]["precision"] == "exact"
    assert r["plots"] == ["plots/samples.png"]
    assert (tmp_path / "run" / "plots" / "samples.png").stat().st_size > 1000
    assert "results:" in capsys.readouterr().out


def test_stage_numbers_match_float64(tmp_path):
    """The stored knn (on uint8 codes) gives the float64 distances, and the memorized rule
    gives metrics.memorization_ratio; the partial denoiser copies only its subset."""
    code, r = run(tmp_path, *SMALL, "--quiet")
    assert code == 0
    values = load_digits_set().values()
    for name in ("memorizing", "partial_0.2", "generalizing_gaussian"):
        with np.load(tmp_path / "run" / "stages" / f"{name}.npz") as z:
            samples, d1, d2 = (torch.from_numpy(z[k]) for k in ("samples", "d1", "d2"))
            idx = torch.from_numpy(z["knn_idx"])
        dist = torch.cdist(samples.double(), values)
        top = dist.topk(2, largest=False)
        torch.testing.assert_close(d1, top.values[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d2, top.values[:, 1], rtol=1e-5, atol=1e-6)
        assert torch.equal(idx, top.indices[:, 0])
        assert r["denoisers"][name]["memorization_ratio"] == memorization_ratio(
            samples.double(), values)


def test_partial_is_the_empirical_denoiser_of_its_subset():
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(40, 6, generator=gen)
    pmem = PartialMemorizingDenoiser(data, 9, generator=gen)
    emp = EmpiricalDenoiser(data[pmem.subset])
    x = torch.randn(7, 6, generator=gen)
    torch.testing.assert_close(emp(x, 0.3), pmem(x, 0.3), rtol=0, atol=0)
    x0, idx, weight = emp.x0_nearest(x, 0.3)
    torch.testing.assert_close(x0, emp(x, 0.3))
    want_idx, want_w = emp.nearest(x, 0.3)
    assert torch.equal(idx, want_idx) and torch.equal(weight, want_w)


def _closed_form(mu, cov, x, t):
    """Float64 posterior mean of N(mu, cov) under VP at t."""
    a, s2 = math.sqrt(1 - t * t), t * t
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    return mu + (a * cov @ torch.linalg.inv(a * a * cov + s2 * eye) @ (x - a * mu).T).T


def test_fitted_gaussian_matches_the_float64_closed_form():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (300, 10), generator=gen, dtype=torch.uint8)
    codes[:, 3] = codes[:, 2] // 2 + 7                     # correlated features
    values = codes.double() * (2 / 255) - 1
    mu, cov = values.mean(0), torch.cov(values.T, correction=0)
    x = torch.randn(5, 10, generator=gen, dtype=torch.float64)
    den = fit_gaussian(codes, scale=2 / 255, offset=-1.0)
    for t in (0.05, 0.5, 0.95):
        torch.testing.assert_close(den(x.float(), t).double(), _closed_form(mu, cov, x, t),
                                   rtol=1e-5, atol=1e-5)


def test_fitted_gaussian_pca_path():
    """Above max_full_dim: the top-k components and the mean variance of the rest, denoised
    as the closed form of that covariance."""
    gen = torch.Generator().manual_seed(1)
    D, k = 40, 4
    basis = torch.linalg.qr(torch.randn(D, k, generator=gen, dtype=torch.float64))[0]
    scales = torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=torch.float64)
    data = (torch.randn(4000, k, generator=gen, dtype=torch.float64) * scales) @ basis.T
    data += 0.1 * torch.randn(4000, D, generator=gen, dtype=torch.float64) + 2.0
    data = data.float()
    den = fit_gaussian(data, max_full_dim=10, rank=k)
    mu, cov = data.double().mean(0), torch.cov(data.double().T, correction=0)
    lam, U = torch.linalg.eigh(cov)
    top, rest = U[:, -k:], float(lam[:-k].mean())
    model = top @ torch.diag(lam[-k:]) @ top.T + rest * (torch.eye(D) - top @ top.T)
    assert abs(den.rest - rest) < 1e-3 * rest
    x = torch.randn(6, D, generator=gen, dtype=torch.float64) * 3
    for t in (0.1, 0.7):
        torch.testing.assert_close(den(x.float(), t).double(), _closed_form(mu, model, x, t),
                                   rtol=1e-4, atol=1e-4)


def _write_pngs(folder: Path, n: int, size=(6, 5), mode="RGB", seed=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(
            folder / f"img{i:03d}.png")


def test_image_folder(tmp_path):
    _write_pngs(tmp_path / "images", 20)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    code, r = run(tmp_path, "--data", str(tmp_path / "images"), *SMALL, "--quiet")
    assert code == 0
    assert r["data"]["points"] == 20 and r["data"]["shape"] == [5, 6, 3]
    assert r["data"]["storage"] == "uint8" and r["data"]["scale"] == pytest.approx(2 / 255)
    assert r["denoisers"]["memorizing"]["memorization_ratio"] == 1.0
    assert r["denoisers"]["partial_0.2"]["points"] == 4
    assert r["denoisers"]["partial_0.2"]["distinct_copied"] <= 4
    assert r["plots"] == ["plots/samples.png"]


def test_npy_and_npz_arrays(tmp_path):
    gen = np.random.default_rng(0)
    floats = gen.normal(size=(30, 7)).astype(np.float32) * 3 + 1
    np.save(tmp_path / "points.npy", floats)
    code, r = run(tmp_path, "--data", str(tmp_path / "points.npy"), *SMALL, "--quiet")
    assert code == 0
    assert r["data"]["shape"] is None and r["data"]["storage"] == "float32"
    assert r["data"]["scale"] is None and r["plots"] == []
    assert r["denoisers"]["memorizing"]["memorization_ratio"] == 1.0
    codes = gen.integers(0, 256, (25, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "two.npz", images=codes, labels=np.arange(25))
    code, r = run(tmp_path, "--data", str(tmp_path / "two.npz"), "--array", "images", *SMALL,
                  "--quiet", name="npz")
    assert code == 0
    assert r["data"]["shape"] == [4, 4, 1] and r["data"]["storage"] == "uint8"


def _bad_cases(tmp: Path) -> dict:
    """{case: (path for --data, text the error must name)}."""
    _write_pngs(tmp / "mixed", 3)
    _write_pngs(tmp / "mixed", 1, size=(7, 5), seed=1)
    (tmp / "mixed" / "img000.png").rename(tmp / "mixed" / "z.png")
    (tmp / "empty").mkdir()
    _write_pngs(tmp / "corrupt", 3)
    (tmp / "corrupt" / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    nan = np.zeros((5, 3), dtype=np.float32)
    nan[2, 1] = np.nan
    np.save(tmp / "nan.npy", nan)
    inf = np.zeros((5, 3), dtype=np.float64)
    inf[4, 0] = np.inf
    np.save(tmp / "inf.npy", inf)
    np.save(tmp / "flat.npy", np.zeros(5, dtype=np.float32))
    np.save(tmp / "five.npy", np.zeros((2, 2, 2, 2, 2), dtype=np.uint8))
    np.save(tmp / "one.npy", np.zeros((1, 3), dtype=np.uint8))
    np.save(tmp / "ints.npy", np.zeros((4, 3), dtype=np.int64))
    (tmp / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    np.savez(tmp / "two.npz", a=np.zeros((3, 2)), b=np.zeros((3, 2)))
    return {
        "mixed sizes": (tmp / "mixed", "same size"),
        "empty folder": (tmp / "empty", "no PNG or JPEG"),
        "corrupt image": (tmp / "corrupt", "img001.png"),
        "nan": (tmp / "nan.npy", "NaN or infinite values (first in row 2)"),
        "inf": (tmp / "inf.npy", "NaN or infinite values (first in row 4)"),
        "1-d array": (tmp / "flat.npy", "expected an array"),
        "5-d array": (tmp / "five.npy", "expected an array"),
        "one point": (tmp / "one.npy", "at least 2 points"),
        "int64": (tmp / "ints.npy", "expected uint8 codes or float"),
        "unreadable npy": (tmp / "broken.npy", "cannot be read"),
        "npz of two": (tmp / "two.npz", "name one with --array"),
        "missing": (tmp / "nowhere.npy", "no such file or folder"),
        "not data": (tmp / "nan.npy.txt", "no such file or folder"),
    }


def test_bad_data_is_one_line_naming_the_file(tmp_path, capsys):
    cases = _bad_cases(tmp_path / "data")
    for case, (path, text) in cases.items():
        code, _ = run(tmp_path, "--data", str(path), *SMALL, "--quiet", name=f"out-{len(case)}")
        err = capsys.readouterr().err.strip()
        assert code == 2, case
        assert len(err.splitlines()) == 1 and err.startswith("diffmem memorize: error: "), case
        assert text in err and path.name in err, (case, err)


@pytest.mark.parametrize("args, text", [
    (["--fractions", "0.5,1.5"], "--fractions"),
    (["--fractions", "0.1,0.1000001"], "distinct"),  # both would name the stage partial_0.1
    (["--steps", "0"], "--steps"),
    (["--t-min", "0.9"], "--t-min"),
    (["--samples", "50"], "--data gmm only"),
    (["--data", "gmm", "--storage", "int4"], "--storage"),
    (["--array", "x"], "--array"),
    (["--device", "tpu"], "--device"),
])
def test_bad_options(tmp_path, capsys, args, text):
    try:
        code, _ = run(tmp_path, *args, "--quiet")
    except SystemExit as e:  # argparse's own checks (choices, types)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err


def _numbers(r: dict) -> dict:
    """What must agree between runs: results without timings and machine records."""
    skip = {"environment", "runtime", "processes", "plots"}
    out = {k: v for k, v in r.items() if k not in skip}
    out["denoisers"] = {name: {k: v for k, v in d.items() if "seconds" not in k}
                        for name, d in r["denoisers"].items()}
    return out


def test_resume_skips_finished_stages(tmp_path, capsys):
    code, first = run(tmp_path, *SMALL)
    assert code == 0
    capsys.readouterr()
    code, _ = run(tmp_path, *SMALL)   # the folder holds a run: --resume or another --out
    assert code == 2 and "--resume" in capsys.readouterr().err
    stage = tmp_path / "run" / "stages" / "partial_0.2.npz"
    stage.write_bytes(b"damaged")
    code, second = run(tmp_path, *SMALL, "--resume")
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("finished in an earlier run, skipped") == 2
    assert "partial_0.2.npz" in err and "sampling partial_0.2 again" in err
    assert "memorizing: DDIM steps" not in err and "partial_0.2: DDIM steps" in err
    assert _numbers(second) == _numbers(first)
    code, _ = run(tmp_path, *SMALL, "--resume", "--steps", "21")
    assert code == 2 and "settings differ" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path: Path, args: list[str]) -> dict:
    """`diffmem memorize args` as 2 ranks with torchrun's environment; rank 0's results."""
    port, out = _free_port(), tmp_path / "two"
    code = "import sys; from diffmem.cli import main; sys.exit(main(sys.argv[1:]))"
    procs, logs = [], []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        logs.append(open(tmp_path / f"rank{rank}.log", "w"))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code, "memorize", *args, "--out", str(out)],
            stdout=logs[-1], stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
    failed = wait_for_ranks(procs, logs, HARD_LIMIT_S)
    if failed:
        pytest.fail(f"ranks failed or hung (limit {HARD_LIMIT_S} s):\n"
                    f"{rank_log_tails(tmp_path, failed)}")
    return json.loads((out / "results.json").read_text())


def _assert_same_numbers(got, want, path=""):
    """Integers, strings and flags equal; floats to float32 rounding (rel 1e-5, abs 1e-7)."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _assert_same_numbers(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_numbers(a, b, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), path
    else:
        assert got == want, path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process run the two-process runs must reproduce: (folder, results)."""
    tmp = tmp_path_factory.mktemp("one")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, r = run(tmp, *SMALL, "--quiet", name="one")
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return tmp / "one", r


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("mode", ["split samples", "shard points"])
def test_two_processes_equal_one(tmp_path, one_process, mode):
    one_folder, one = one_process
    args = [*SMALL, "--quiet"] + (["--shard-points"] if mode == "shard points" else [])
    two = _two_processes(tmp_path, args)
    assert two["processes"] == {"world": 2,
                                "split": "points" if mode == "shard points" else "samples"}
    assert len(two["denoisers"]["memorizing"]["seconds_per_step_ranks"]) == 2
    _assert_same_numbers(_numbers(two), _numbers(one))
    with np.load(one_folder / "stages" / "memorizing.npz") as a, \
            np.load(tmp_path / "two" / "stages" / "memorizing.npz") as b:
        np.testing.assert_allclose(b["samples"], a["samples"], rtol=0, atol=1e-6)
        assert np.array_equal(b["op_idx"], a["op_idx"])
