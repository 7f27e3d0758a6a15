"""Points in a read-only memory-mapped file are streamed by the kernels without a copy into
process memory, and diffmem adds no warning about read-only memory.

The check runs in a fresh process (so other tests' allocations do not blur it): it maps a 2 GiB
uint8 file and a float32 one, calls softmax_mean (with return_nearest) and knn, and reports how
much the process's anonymous memory grew (RssAnon); file-backed pages of the map do not count,
a copy would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

GIB = 1 << 30
D = 3072

_CHILD = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np, torch, diffmem

    def rss_anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    torch.set_num_threads(2)
    out = {}
    for path in sys.argv[1:]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own note that the array is not writable
            points = torch.from_numpy(np.load(path, mmap_mode="r"))
        x = points[:3].float() * 0.9 + 0.1
        diffmem.softmax_mean(x[:1], points[:64], 0.9, 1.0)  # loads the kernels
        before = rss_anon()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mean, idx, weight = diffmem.softmax_mean(x, points, 0.9, 0.01, return_nearest=True)
            dist, kidx = diffmem.knn(x, points, k=2)
        out[path] = dict(grew=rss_anon() - before,
                         backend=diffmem.backends()["cpu"]["available"],
                         bytes=points.numel() * points.element_size(),
                         warnings=[str(w.message) for w in caught], idx=idx.tolist(),
                         kidx=kidx[:, 0].tolist(), finite=bool(torch.isfinite(mean).all()))
    print(json.dumps(out))
""")


def _write(path, dtype, n_rows, seed):
    """A .npy file of n_rows x D values, written in chunks (never held in memory whole)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n_rows, D))
    rng = np.random.default_rng(seed)
    step = 8192
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        if dtype == np.uint8:
            arr[start:stop] = rng.integers(0, 256, (stop - start, D), dtype=np.uint8)
        else:
            arr[start:stop] = rng.standard_normal((stop - start, D), dtype=np.float32)
    arr.flush()
    del arr


def test_memory_mapped_points_are_not_copied(tmp_path):
    paths = []
    for dtype, seed in ((np.uint8, 1), (np.float32, 2)):
        path = tmp_path / f"points_{np.dtype(dtype).name}.npy"
        _write(path, dtype, -(-2 * GIB // (D * np.dtype(dtype).itemsize)), seed)
        paths.append(str(path))
    # run from tmp_path: `python -c` puts the working directory first on the path, and the
    # checkout's diffmem/ (no compiled module) must not shadow the installed package
    result = subprocess.run([sys.executable, "-c", _CHILD, *paths], capture_output=True,
                            text=True, timeout=600, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for path, r in report.items():
        assert r["bytes"] >= 2 * GIB
        assert r["grew"] < 0.1 * r["bytes"], f"{path}: anonymous memory grew by {r['grew']}"
        assert r["warnings"] == [], r["warnings"]
        assert r["finite"]
        assert r["backend"], "the child process did not load the cpu backend"
        # the queries are scaled copies of the first three points
        assert r["idx"] == [0, 1, 2] and r["kidx"] == [0, 1, 2]
