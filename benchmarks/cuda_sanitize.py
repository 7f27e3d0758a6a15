"""A small run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/cuda_sanitize.py

Covers: one and several groups with shared points, bias with masked points, d <= 64 (register
accumulators) and d > 64 (chunked), split and unsplit points and queries, both precisions,
forward (tile kernels, on the CUDA cores and, for "fast", on the tensor cores; few-query
kernel), all five gradients and knn. Exact mode runs with its plan (_exact.py), its queries
alternating between the two logit forms: top-logit lists, the float64 correction, and the
backward with the corrected logits and q relative to the heaviest point. The few-query cases
reach its group sizes 1, 32 and 256 (the last with the cross-warp sums in shared memory), one
and four queries per block. Exits non-zero if a result disagrees with the float64 reference (so
a sanitizer run also checks the numbers). Without a GPU it runs on CPU tensors, which only the
host-emulator build (DIFFMEM_CUDA_EMULATE=ON) accepts.
"""

from __future__ import annotations

import sys

import torch

from diffmem.ops import _cuda, _exact
from diffmem.ops import _reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(G, B, N, d, t, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(1, N, d, generator=gen).expand(G, N, d)
    ts = torch.full((G, B), t)
    alpha, var = (1 - ts * ts).sqrt(), ts * ts
    x = alpha[..., None] * y[:, torch.randint(0, N, (B,), generator=gen)] + t * torch.randn(
        G, B, d, generator=gen)
    bias = torch.randn(1, N, generator=gen)
    bias[:, 1::3] = -float("inf")
    bias = bias.expand(G, N)
    return [a.to(DEVICE) if a.stride(0) else a[:1].to(DEVICE).expand(a.shape)
            for a in (x, y, alpha, var, bias)]


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    worst = 0.0
    # G, B, N, d, t, split, few
    cases = [(1, 70, 130, 30, 0.3, 1, False), (3, 5, 200, 67, 0.5, 3, False),
             (2, 65, 64, 3, 0.1, 2, False), (2, 5, 200, 67, 0.5, 3, True),
             (1, 1, 300, 600, 0.5, 2, True), (2, 3, 50, 3, 0.2, 1, True),
             (1, 1, 40, 3072, 0.9, 1, True)]
    for G, B, N, d, t, split, few in cases:
        args = case(G, B, N, d, t, seed=G + N + d)
        gen = torch.Generator().manual_seed(d)
        gm = torch.randn(G, B, d, generator=gen).to(DEVICE)
        gl = torch.randn(G, B, generator=gen).to(DEVICE)
        needs = (True, True, True, True, True)
        dargs = [a.double().cpu() for a in args]
        want_mean, _, _ = ref.forward(*dargs)
        want = ref.backward(*dargs, None, None, gm.double().cpu(), gl.double().cpu(), needs)
        for precision, tensor in (("exact", False), ("fast", False), ("fast", True)):
            if tensor and few:
                continue
            plan = _exact.make_plan(*args[:4])
            alternate = (torch.arange(B, device=DEVICE) % 2).to(torch.uint8)
            plan.expand = alternate.expand(G, B).contiguous()
            with _cuda.force(split=split, split_b=split, few=few, tensor=tensor):
                mean, lse, lse64, top_idx, top_logit = _cuda.forward(*args, precision, plan)
                mean, lse, lse64, top_logit = _exact.correct_forward(
                    *args, mean, lse64, top_idx, top_logit)
                grads = _cuda.backward(*args, mean, lse64, gm, gl, needs, precision, plan, top_idx,
                                       top_logit)
                dist, idx = _cuda.knn(args[0], args[1], 2)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            errs = [rel(mean, want_mean)] + [rel(a, b) for a, b in zip(grads, want)]
            ref_dist, ref_idx = ref.knn(args[0].cpu(), args[1].cpu(), 2)
            assert torch.equal(idx.cpu(), ref_idx), "knn indices differ"
            errs.append(rel(dist, ref_dist))
            worst = max(worst, max(errs))
            kernel = "few-query" if few else "tiles, tensor cores" if tensor else "tiles"
            print(f"G={G} B={B} N={N} d={d} split={split} {kernel} {precision}: "
                  f"max rel err {max(errs):.2e}")
    print(f"worst relative error {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
