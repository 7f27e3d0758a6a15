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
autotuner's candidates and the few-query blocks) and exits non-zero if any fails: a GPU
compilation check for machines without a GPU.
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
from diffmem.ops._triton import _backward, _config, _forward

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
POINTER_TYPES = {"expand_ptr": "*u8", "m_ptr": "*fp64", "lse_ptr": "*fp64", "top_v_ptr": "*fp64",
                 "top_i_ptr": "*i32"}


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    """Ahead-of-time compile: pointers (*_ptr) as fp32 pointers unless POINTER_TYPES says
    otherwise, other arguments as i32."""
    params = list(inspect.signature(fn.fn).parameters)
    signature = {p: "constexpr" if p in constexprs
                 else POINTER_TYPES.get(p, "*fp32") if p.endswith("_ptr") else "i32"
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
    """(kernel name, function, constexprs, num_warps, num_stages) for everything the plans can
    launch: see diffmem/ops/_triton/_config.py."""
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


def compile_all(arch: int) -> int:
    failures = 0
    count = 0
    for name, fn, constexprs, warps, stages in launch_configurations():
        count += 1
        try:
            compile_kernel(fn, constexprs, warps, stages, arch)
        except Exception as exc:  # report every failing configuration, then fail
            failures += 1
            print(f"FAILED {name} warps={warps} stages={stages} {constexprs}: "
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
