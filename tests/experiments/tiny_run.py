"""The tiny phase-transition configuration the experiment tests share (a run takes about a
second), its command-line form, and functions that run the command and compare result files."""

from __future__ import annotations

import json
from pathlib import Path

from diffmem.cli import main

TINY = dict(dim=4, components=2, samples=20, val_samples=10, eval_samples=10, steps=20, warmup=2,
            draws=2, eval_draws=4, baseline_step=10, peak_lr=1e-2)
TINY_ARGS = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))] + ["--quiet"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``diffmem`` with argv (capsys: pytest's fixture)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def results_of(folder) -> dict:
    """folder/results.json without the parts that differ between identical runs."""
    r = json.loads((Path(folder) / "results.json").read_text())
    return {k: v for k, v in r.items() if k not in ("timings", "environment")}


def one_line_error(code: int, err: str, *words: str) -> bool:
    """A refusal as the CLI gives it: non-zero exit, stderr ending in one error line with every
    word (after warnings, if any), no traceback."""
    lines = err.splitlines()
    return (code not in (0, None) and bool(lines) and err.endswith("\n")
            and "error: " in lines[-1] and all(w in lines[-1] for w in words)
            and all("warning: " in line for line in lines[:-1]) and "Traceback" not in err)
