#!/usr/bin/env bash
# GPU check for a CUDA machine (H100/H200 class) without network access.
#   1. install diffmem editable against the machine's own torch/triton (no build isolation, no
#      dependency resolution; CUDA module for this card's architecture only)
#   2. the kernel test suites on CUDA tensors (DIFFMEM_TEST_DEVICE=cuda), triton and cuda
#   3. compute-sanitizer memcheck and racecheck on a small run of every CUDA kernel
#   4. the comparison benchmark at GPU sizes (benchmarks/compare.py --device cuda)
#   5. the cuda fast forward with its tensor-core kernel against the CUDA-core kernels
#   6. the experiments on the GPU against the CPU (benchmarks/device_agreement.py: a small
#      phase-transition and diffmem memorize, --device cuda against --device cpu)
# Logs go to $OUT when it is set, else to benchmarks/results/gpu_check. Exit status: non-zero if any step failed.
# Time limits (seconds): INSTALL_TIMEOUT, TEST_TIMEOUT, SANITIZE_TIMEOUT, BENCH_TIMEOUT,
# AGREEMENT_TIMEOUT (step 6), TENSOR_BENCH_TIMEOUT (step 5: the cuda fast forward on the tensor cores, DIFFMEM_CUDA_TENSOR_CORES=1,
# at TENSOR_SIZES, tile-kernel sizes by default; "none" skips it).
# SANITIZE=0 skips step 3. TESTS (default: the op and kernel suites), TEST_FILTER (pytest -k expression), SIZES
# (benchmark sizes) and METHODS (benchmark method patterns) can be overridden.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/benchmarks/results/gpu_check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # real kernels only
TESTS="${TESTS:-tests/ops/test_softmax_mean.py tests/ops/test_softmax_mean_grad.py tests/ops/test_knn.py tests/ops/test_gpu_kernels.py tests/ops/test_cuda_module.py tests/ops/test_op_registration.py}"
# Most informative first: a timeout cuts the tail.
SIZES="${SIZES:-1,1000000,64;256,1000000,64;64,50000,3072;1,50000,3072;8,1000000,64;1024,100000,128}"
METHODS="${METHODS:-*}"
TEST_FILTER="${TEST_FILTER:-}"

{
    date
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || true
    "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print(torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT_DIR/env.txt"

arch=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')
start=$(date +%s)
if ! DIFFMEM_CUDA=ON DIFFMEM_CUDA_ARCHS="$arch" timeout "${INSTALL_TIMEOUT:-600}" "$PY" -m pip \
        install --no-build-isolation --no-deps --no-index -e . \
        >"$OUT_DIR/install.txt" 2>&1; then
    echo "editable install failed (see install.txt)" | tee -a "$OUT_DIR/env.txt"
    tail -30 "$OUT_DIR/install.txt"
    exit 1
fi
echo "install: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/env.txt"
"$PY" -c 'import diffmem, json; print(json.dumps({k: (v["available"], v["reason"]) for k, v in diffmem.backends().items()}))' 2>&1 | tee "$OUT_DIR/backends.txt"

status=0
start=$(date +%s)
# shellcheck disable=SC2086
DIFFMEM_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider \
    -o addopts="" ${TEST_FILTER:+-k "$TEST_FILTER"} $TESTS >"$OUT_DIR/pytest.txt" 2>&1 || status=$?
echo "tests: $(( $(date +%s) - start )) s, status $status" | tee -a "$OUT_DIR/env.txt"
grep -E "passed|failed|FAILED|Error" "$OUT_DIR/pytest.txt" | tail -25

if [ "${SANITIZE:-1}" = 1 ]; then
    start=$(date +%s)
    for tool in memcheck racecheck; do
        timeout "${SANITIZE_TIMEOUT:-150}" compute-sanitizer --tool "$tool" --print-limit 20 \
            "$PY" benchmarks/cuda_sanitize.py >"$OUT_DIR/sanitize-$tool.txt" 2>&1 || status=$?
        tail -4 "$OUT_DIR/sanitize-$tool.txt"
    done
    echo "sanitizer: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/env.txt"
fi

start=$(date +%s)
timeout "${BENCH_TIMEOUT:-300}" "$PY" benchmarks/compare.py --device cuda --budget 0.4 \
    --sizes "$SIZES" --methods "$METHODS" --csv "$OUT_DIR/compare-cuda.csv" >"$OUT_DIR/compare.txt" 2>&1 || status=$?
echo "benchmark: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/env.txt"
cat "$OUT_DIR/compare.txt" | cut -c1-150 | grep -v "^$" | tail -70

# The cuda fast forward on the tensor cores (opt-in) at the tile kernels' sizes.
TENSOR_SIZES="${TENSOR_SIZES:-256,1000000,64;64,50000,3072;1024,100000,128}"
if [ "$TENSOR_SIZES" != "none" ]; then
    start=$(date +%s)
    DIFFMEM_CUDA_TENSOR_CORES=1 timeout "${TENSOR_BENCH_TIMEOUT:-150}" "$PY" benchmarks/compare.py \
        --device cuda --budget 0.4 --sizes "$TENSOR_SIZES" \
        --methods "diffmem-cuda-fast,diffmem-cuda-exact,matmul-floor" \
        --csv "$OUT_DIR/compare-cuda-tensor.csv" >"$OUT_DIR/compare-tensor.txt" 2>&1 || status=$?
    echo "tensor-core benchmark: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/env.txt"
    cut -c1-150 "$OUT_DIR/compare-tensor.txt" | grep -v "^$" | tail -30
fi

start=$(date +%s)
timeout "${AGREEMENT_TIMEOUT:-180}" "$PY" benchmarks/device_agreement.py --out "$OUT_DIR/agreement" \
    >"$OUT_DIR/agreement.txt" 2>&1 || status=$?
echo "device agreement: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/env.txt"
grep -v "^results:" "$OUT_DIR/agreement.txt" | tail -30

echo "gpu_check finished with status $status; logs in $OUT_DIR" | tee -a "$OUT_DIR/env.txt"
exit "$status"
