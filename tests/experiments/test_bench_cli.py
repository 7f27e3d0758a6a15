"""`diffmem bench` end to end on a tiny size: the timed noise level and the thread count are
the ones asked for, and recorded."""

from __future__ import annotations

import csv

import pytest
import torch

from diffmem.tools.bench import cli


def test_bench_times_at_the_requested_sigma_and_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / "bench.csv"
    try:
        rc = cli.main(["--quick", "--sizes", "8,64,4", "--methods", "diffmem-cpu-*,torch-naive",
                       "--time-sigma", "0.9", "--threads", "1", "--csv", str(out)])
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert rc == 0 and threads == 1
    assert "at sigma = 0.9" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert {r["method"] for r in rows} >= {"diffmem-cpu-exact", "torch-naive"}
    assert all(r["time_sigma"] == "0.9" and r["threads"] == "1" for r in rows)
    assert all(r["status"] == "ok" for r in rows if r["method"] == "diffmem-cpu-exact")


@pytest.mark.parametrize("argv,word", [(["--time-sigma", "1.5"], "--time-sigma"),
                                       (["--time-sigma", "0"], "--time-sigma"),
                                       (["--threads", "0"], "--threads")])
def test_bench_refuses_bad_options(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert word in capsys.readouterr().err
