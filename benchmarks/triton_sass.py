"""Compile the Triton kernels for a GPU architecture without a GPU and count their SASS.

    python benchmarks/triton_sass.py [--arch 90] [--kernels forward,stats,query,point]
    python benchmarks/triton_sass.py --compile-all [--arch 90]

Each kernel is compiled ahead of time (Triton's own ptxas) at the launch configurations its
autotuner can pick, and disassembled with Triton's bundled cuobjdump. Printed per configuration:
registers, stack (spills), the total static instruction count and the instructions that matter
for these kernels (FFMA/FADD/FMUL arithmetic, SHFL cross-lane reductions, local-memory spills,
shared and global loads). Static counts are not timings: use them to compare two versions of a
kernel (fewer shuffles and spills in the same loop) when no GPU is at hand, and measure on one.

--compile-all compiles every kernel at every configuration its plans can launch (both
precisions, with and without bias, one and several feature chunks, each feature chunk size, the
autotuner's candidates and the few-query blocks) with float32 points, and each kernel family at
a few configurations with points stored as uint8, float16 and bfloat16 (the points' pointer
type is a specialization: every load converts to float32), and exits non-zero if any fails: a
GPU compilation check for machines without a GPU.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from diffmem.ops import _exact
from diffmem.ops._triton import _backward, _config, _forward, _knn

KEY_OPS = ["FFMA", "FADD", "FMUL", "SHFL", "STL", "LDL", "LDS", "LDG", "HMMA", "HGMMA"]

# Exact kernels take exact mode's plan: both logit forms (FORMS = 3, a superset of the code of
# either form alone), and the top TOP_K logits per query reported (forward) or overridden
# (backward); KP is TOP_K rounded up to a power of 2. "fast" tiles take no plan.
EXACT_TOP = dict(FORMS=3, TOP_K=_exact.TOP_K, KP=triton.next_power_of_2(_exact.TOP_K))
NO_TOP = dict(FORMS=1, TOP_K=0, KP=1)
GRAD_TOP = dict(FORMS=3, TOP_K=_exact.TOP_K)

# kernel -> (function, constexprs besides the blocks, [(num_warps, num_stages, BB, BN, NUM_D, BD)])
COMMON = dict(HAS_BIAS=False, FAST=False, DOT="tf32x3")
KERNELS = {
    "forward": (_forward._forward_kernel, dict(COMMON, FINAL=True, **EXACT_TOP),
                [(4, 2, 16, 32, 1, 16), (8, 2, 32, 32, 1, 16), (4, 1, 16, 32, 192, 16)]),
    # the few-query plan: BB = 2..16 rows, BN = min(128, 8192 / (BB BD))
    "forward-few": (_forward._forward_kernel, dict(COMMON, FINAL=False, **EXACT_TOP),
                    [(4, 2, 2, 128, 1, 16), (4, 2, 8, 64, 1, 16), (4, 2, 16, 32, 1, 16),
                     (4, 1, 2, 128, 192, 16)]),
    "forward-fast": (_forward._forward_kernel, dict(COMMON, FAST=True, FINAL=True, **NO_TOP),
                     [(8, 2, 64, 64, 1, 64), (4, 1, 64, 32, 96, 32)]),
    "stats": (_backward._stats_kernel, dict(COMMON, HAS_GM=True, **GRAD_TOP),
              [(8, 1, 16, 32, 1, 16), (4, 1, 16, 16, 1, 16)]),
    "query": (_backward._query_kernel,
              dict(COMMON, HAS_GM=True, NEED_DX=True, NEED_DALPHA=True, NEED_DVAR=True,
                   **GRAD_TOP),
              [(8, 1, 16, 32, 1, 16), (4, 1, 16, 16, 1, 16)]),
    "point": (_backward._point_kernel, dict(COMMON, HAS_GM=True, NEED_DY=True, NEED_DBIAS=True,
                                            **GRAD_TOP),
              [(8, 1, 16, 32, 1, 16), (4, 1, 16, 16, 1, 16)]),
}

# Pointer arguments that are not float32 (the others are).
POINTER_TYPES = {"expand_ptr": "*u8", "m_ptr": "*fp64", "m_out_ptr": "*fp64", "lse_ptr": "*fp64",
                 "top_v_ptr": "*fp64", "top_i_ptr": "*i32", "idx_ptr": "*i64"}
# Storage dtypes of the points besides float32 (diffmem/ops/_canonical.py COMPACT_POINT_DTYPES),
# as pointer types.
COMPACT_POINTS = ("*u8", "*fp16", "*bf16")


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int, arch: int,
                   pointers: dict | None = None):
    """Ahead-of-time compile: pointers (*_ptr) as fp32 pointers unless pointers or
    POINTER_TYPES say otherwise, other arguments as i32."""
    params = list(inspect.signature(fn.fn).parameters)
    types = {**POINTER_TYPES, **(pointers or {})}
    signature = {p: "constexpr" if p in constexprs
                 else types.get(p, "*fp32") if p.endswith("_ptr") else "i32"
                 for p in params}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(params.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def sass_counts(cubin: bytes) -> tuple[str, collections.Counter]:
    """(resource-usage line, opcode counts) of a cubin, with Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    line = next((ln.strip() for ln in usage.splitlines() if "REG:" in ln), "")
    ops = collections.Counter(
        m.group(1).split(".")[0]
        for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]+)", sass))
    return line, ops


def launch_configurations():
    """(kernel name, function, constexprs, num_warps, num_stages, pointer types) for everything
    the plans can launch with float32 points (see diffmem/ops/_triton/_config.py), then
    compact_configurations()."""
    for config in float32_configurations():
        yield (*config, {})
    yield from compact_configurations()


def _knn_blocks(bd: int) -> dict:
    """The knn kernel's blocks on a GPU (diffmem/ops/_triton/_knn.py)."""
    return dict(BB=32, BN=min(128, max(16, 256 // bd)))


def compact_configurations():
    """Each kernel family with points stored as uint8, float16 and bfloat16, at one or two
    configurations the plans launch (bias, the largest feature chunk of the gradient kernels,
    one chunk and several). The centre rows are the points themselves where exact logits are
    computed (their first row) and float32 (the points' mean) for "fast"."""
    grads = [(_backward._stats_kernel, "stats", dict(HAS_GM=True)),
             (_backward._query_kernel, "query",
              dict(HAS_GM=True, NEED_DX=True, NEED_DALPHA=True, NEED_DVAR=True)),
             (_backward._point_kernel, "point", dict(HAS_GM=True, NEED_DY=True, NEED_DBIAS=True))]
    for ptype in COMPACT_POINTS:
        exact_ptrs = {"y_ptr": ptype, "c_ptr": ptype}
        fast_ptrs = {"y_ptr": ptype}
        for num_d in (1, 3):
            single = num_d == 1
            common = dict(HAS_BIAS=True, DOT=_config.FAST_DOT, NUM_D=num_d, FINAL=single)
            cfg = _config.autotune_configs(False, 16, single, budget=32)[0]
            yield ("forward", _forward._forward_kernel,
                   dict(common, FAST=False, BD=16, **EXACT_TOP, **cfg.kwargs), cfg.num_warps,
                   cfg.num_stages, exact_ptrs)
            cfg = _config.autotune_configs(True, 32, single)[0]
            yield ("forward-fast", _forward._forward_kernel,
                   dict(common, FAST=True, BD=32, **NO_TOP, **cfg.kwargs), cfg.num_warps,
                   cfg.num_stages, fast_ptrs)
        yield ("forward-few", _forward._forward_kernel,
               dict(HAS_BIAS=True, FAST=False, DOT=_config.FAST_DOT, NUM_D=3, BD=16, FINAL=False,
                    BB=2, BN=128, **EXACT_TOP), 4, 1, exact_ptrs)
        yield ("merge", _forward._merge_kernel, dict(NUM_D=3, BD=16, BB=32), 4, 1,
               {"c_ptr": ptype})
        for fast, ptrs, top in ((False, exact_ptrs, GRAD_TOP), (True, fast_ptrs, NO_TOP)):
            cfg = _config.autotune_configs(False, 16, True, budget=32)[0]
            for fn, name, extra in grads:
                yield (name, fn, dict(HAS_BIAS=True, FAST=fast, DOT=_config.FAST_DOT, NUM_D=1,
                                      BD=16, FORMS=top["FORMS"], TOP_K=top["TOP_K"], **extra,
                                      **cfg.kwargs), cfg.num_warps, cfg.num_stages, ptrs)
        yield ("knn", _knn._knn_kernel, dict(K=2, KP=2, SQRT=True, NUM_D=3, BD=16,
                                             **_knn_blocks(16)), 4, 2, {"p_ptr": ptype})


def float32_configurations():
    """(kernel name, function, constexprs, num_warps, num_stages) for everything the plans can
    launch with float32 points."""
    grads = {
        "stats": (_backward._stats_kernel, dict(HAS_GM=True)),
        "query": (_backward._query_kernel,
                  dict(HAS_GM=True, NEED_DX=True, NEED_DALPHA=True, NEED_DVAR=True)),
        "point": (_backward._point_kernel, dict(HAS_GM=True, NEED_DY=True, NEED_DBIAS=True)),
    }
    for fast, bias, bd, num_d in itertools.product((False, True), (False, True),
                                                   (1, 4, 16, 32, 64), (1, 3)):
        common = dict(HAS_BIAS=bias, FAST=fast, DOT=_config.FAST_DOT, NUM_D=num_d, BD=bd)
        top = NO_TOP if fast else EXACT_TOP  # the op passes exact mode's plan to exact kernels
        single = num_d == 1
        if not fast or bd >= 16:  # the forward's chunks: any for exact, >= 16 for tl.dot
            configs = _config.autotune_configs(fast, bd, single)
            if not fast:  # launches with the expansion form tune with half the register budget
                configs += [c for c in _config.autotune_configs(fast, bd, single, budget=32)
                            if all(c.all_kwargs() != o.all_kwargs() for o in configs)]
            for cfg in configs:
                yield ("forward", _forward._forward_kernel,
                       dict(common, FINAL=single, **top, **cfg.kwargs), cfg.num_warps,
                       cfg.num_stages)
        if bd <= 16 or (fast and bd <= 32):  # the gradient kernels' chunks
            if fast and bd < 16:
                continue
            for name, (fn, extra) in grads.items():
                for cfg in _config.autotune_configs(False, bd, single, budget=32):
                    grad_top = dict(FORMS=top["FORMS"], TOP_K=top["TOP_K"])
                    yield (name, fn, dict(common, **extra, **grad_top, **cfg.kwargs),
                           cfg.num_warps, cfg.num_stages)
        if not fast and bd <= 16:  # the few-query forward: fixed blocks
            for bb in (2, 4, 8, 16):
                bn = min(128, 64 * 128 // (bb * bd))
                yield ("forward-few", _forward._forward_kernel,
                       dict(common, FINAL=single, **top, BB=bb, BN=bn), 4, 2 if single else 1)
    # the merge of split partial results, and knn (blocks fixed by its feature chunk)
    for bd, num_d in ((16, 1), (64, 3)):
        yield ("merge", _forward._merge_kernel, dict(NUM_D=num_d, BD=bd, BB=16 if bd >= 64 else 32),
               4, 1)
    for bd, k in ((1, 1), (4, 3), (16, 2)):
        for sqrt in (False, True):
            yield ("knn", _knn._knn_kernel, dict(K=k, KP=triton.next_power_of_2(k), SQRT=sqrt,
                                                 NUM_D=1 if bd < 16 else 3, BD=bd,
                                                 **_knn_blocks(bd)), 4, 2)


def compile_all(arch: int) -> int:
    failures = 0
    count = 0
    for name, fn, constexprs, warps, stages, pointers in launch_configurations():
        count += 1
        try:
            compile_kernel(fn, constexprs, warps, stages, arch, pointers)
        except Exception as exc:  # report every failing configuration, then fail
            failures += 1
            print(f"FAILED {name} warps={warps} stages={stages} {pointers} {constexprs}: "
                  f"{type(exc).__name__}: {str(exc)[:300]}")
    print(f"compiled {count} Triton kernel configurations for sm_{arch}: {failures} failed")
    return 1 if failures else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    ap.add_argument("--kernels", default=",".join(KERNELS),
                    help=f"comma-separated subset of {', '.join(KERNELS)}")
    ap.add_argument("--compile-all", action="store_true",
                    help="compile every launchable configuration, report failures")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the kernels' own default
    if args.compile_all:
        return compile_all(args.arch)
    print(f"sm_{args.arch}, Triton {triton.__version__}; static SASS instruction counts")
    print("kernel        warps stages BB BN NUM_D BD  regs stack  total  "
          + " ".join(f"{k:>5}" for k in KEY_OPS))
    for name in args.kernels.split(","):
        fn, constexprs, configs = KERNELS[name]
        for warps, stages, bb, bn, num_d, bd in configs:
            ce = dict(constexprs, BB=bb, BN=bn, NUM_D=num_d, BD=bd)
            kernel = compile_kernel(fn, ce, warps, stages, args.arch)
            usage, ops = sass_counts(kernel.asm["cubin"])
            regs = re.search(r"REG:(\d+)", usage)
            stack = re.search(r"STACK:(\d+)", usage)
            print(f"{name:13} {warps:5} {stages:6} {bb:2} {bn:2} {num_d:5} {bd:2} "
                  f"{regs.group(1) if regs else '?':>5} {stack.group(1) if stack else '?':>5} "
                  f"{sum(ops.values()):6}  " + " ".join(f"{ops[k]:5}" for k in KEY_OPS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
