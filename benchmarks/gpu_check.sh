#!/usr/bin/env bash
# GPU check for a lent H100/H200 machine without network access.
#   1. install diffmem editable against the machine's own torch/triton (no build isolation, no
#      dependency resolution); if that fails, fall back to running from the source tree
#   2. the whole test suite on CUDA tensors (DIFFMEM_TEST_DEVICE=cuda)
#   3. python benchmarks/compare.py --device cuda
# Logs go to $OUT (or benchmarks/results/gpu_check). Exit status: non-zero if any step failed.
# Time limits (seconds) can be overridden: INSTALL_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/benchmarks/results/gpu_check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # real kernels only

{
    date
    nvidia-smi || true
    "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print(torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT_DIR/env.txt"

if ! timeout "${INSTALL_TIMEOUT:-900}" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
        >"$OUT_DIR/install.txt" 2>&1; then
    echo "editable install failed (see install.txt); running from the source tree" | tee -a "$OUT_DIR/install.txt"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import diffmem, json; print(json.dumps(diffmem.backends(), indent=1))' 2>&1 | tee "$OUT_DIR/backends.txt"

status=0
DIFFMEM_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-1500}" "$PY" -m pytest -x -q -p no:cacheprovider tests \
    2>&1 | tee "$OUT_DIR/pytest.txt" || status=$?
timeout "${BENCH_TIMEOUT:-1200}" "$PY" benchmarks/compare.py --device cuda \
    2>&1 | tee "$OUT_DIR/compare.txt" || status=$?

echo "gpu_check finished with status $status; logs in $OUT_DIR" | tee -a "$OUT_DIR/env.txt"
exit "$status"
