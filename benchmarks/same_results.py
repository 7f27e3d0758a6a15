"""Whether two run folders hold the same results: results.json without its timings and
environment, and the trained models (models.npz), compared exactly.

    python benchmarks/same_results.py RUN_A RUN_B

Prints the first differences (JSON path and the two values) and exits 1 when there are any,
0 when the results are identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

IGNORED = ("timings", "environment")


def _differences(a, b, path: str = ""):
    """(path, a, b) for every leaf where a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                yield f"{path}/{key}", a.get(key, "<missing>"), b.get(key, "<missing>")
            else:
                yield from _differences(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _differences(x, y, f"{path}[{i}]")
    elif a != b and not (a != a and b != b):  # NaN equals NaN here
        yield path, a, b


def _results(folder: Path) -> dict:
    data = json.loads((folder / "results.json").read_text())
    return {k: v for k, v in data.items() if k not in IGNORED}


def _models(folder: Path) -> dict:
    path = folder / "models.npz"
    if not path.exists():
        return {}
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: same_results.py RUN_A RUN_B", file=sys.stderr)
        return 2
    a, b = (Path(p) for p in argv)
    diffs = list(_differences(_results(a), _results(b)))
    models_a, models_b = _models(a), _models(b)
    for name in sorted(set(models_a) | set(models_b)):
        x, y = models_a.get(name), models_b.get(name)
        if x is None or y is None or x.shape != y.shape or not np.array_equal(
                x, y, equal_nan=x.dtype.kind == "f"):
            diffs.append((f"models.npz:{name}", "array", "differs"))
    for path, x, y in diffs[:20]:
        print(f"{path}: {x!r} != {y!r}")
    print(f"{len(diffs)} differences" if diffs else "identical")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
