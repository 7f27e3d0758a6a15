"""GPU-kernel paths of the triton and cuda backends: split-N merge, chunked (split-d)
accumulators, plans.

The shared suite runs these backends through the public API with their default plans; here the
kernels are called directly on the canonical layout (stride-0 shared groups included) with
plans forced so that small shapes reach every path. Triton runs under TRITON_INTERPRET=1 on CPU
tensors, the cuda backend in its host-emulator build (DIFFMEM_CUDA_EMULATE=ON) on CPU tensors,
and both on CUDA with DIFFMEM_TEST_DEVICE=cuda; a backend that cannot run here is skipped.
"""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE, INTERPRETED, T_GRID, lse_err, rel_fro

import diffmem
from diffmem.ops import _exact
from diffmem.ops import _reference as ref
from diffmem.ops._gpu_common import MAX_PARTIAL_ELEMENTS, work_split


def _kernel_backends() -> list:
    """(name, module, force(plan) context) of each GPU backend that can run on DEVICE."""
    found = []
    report = diffmem.backends()
    if report["triton"]["available"] and DEVICE.type in report["triton"]["devices"]:
        config = importlib.import_module("diffmem.ops._triton._config")
        found.append(("triton", importlib.import_module("diffmem.ops._triton"),
                      lambda plan: config.force(**plan)))
    if report["cuda"]["available"] and DEVICE.type in report["cuda"]["devices"]:
        cuda = importlib.import_module("diffmem.ops._cuda")
        # The cuda kernels' feature chunk is fixed (64): d > 64 reaches the chunked path.
        found.append(("cuda", cuda, lambda plan: cuda.force(split=plan.get("split"),
                                                            split_b=plan.get("split_b"),
                                                            few=plan.get("few"))))
    return found


KERNEL_BACKENDS = _kernel_backends()
if not KERNEL_BACKENDS:
    pytest.skip("no GPU kernel backend can run here (needs CUDA tensors, TRITON_INTERPRET=1 or "
                "the CUDA emulator build)", allow_module_level=True)


@pytest.fixture(params=KERNEL_BACKENDS, ids=lambda b: b[0])
def kern(request):
    name, module, force = request.param
    return SimpleNamespace(name=name, forward=module.forward, backward=module.backward,
                           knn=module.knn, force=force, module=module)


def _triton_config():
    pytest.importorskip("triton")
    if DEVICE.type != "cuda" and not INTERPRETED:
        pytest.skip("Triton kernels need CUDA tensors or TRITON_INTERPRET=1")
    return importlib.import_module("diffmem.ops._triton._config")


# GRAD_TOL is the shared suite's float32 gradient tolerance (measured here: <= 2e-6).
MEAN_TOL, LSE_TOL, GRAD_TOL = 1e-5, 1e-4, 3e-5

# Forced plans: default; points split across programs (merge); features in chunks of 16 with the
# accumulators streamed through global memory (split-d); both at once. The test cases have a few
# queries, so the default forward plans take the few-query kernels; "few": False pins the tile
# kernels (for cuda the 64-query tiles, whose feature chunk is fixed at 64).
PLANS = {
    "default": {},
    "split_n": {"split": 3, "split_b": 2},
    "split_d": {"block_d": 16, "few": False},
    "split_n_d": {"split": 2, "split_b": 3, "block_d": 16, "few": False},
}


def make_case(G=1, B=5, N=7, d=3, t=0.5, offset=0.0, shared=False, bias=None, dup=False, seed=0,
              shared_queries=False):
    """Canonical float32 inputs: VP queries x = alpha y[j] + t eps, per-query alpha and var.

    shared: one copy of the points for all G groups (group stride 0); shared_queries: one copy
    of x, alpha and var for all groups. bias: None, "finite" or
    "masked" (finite with every third point at -inf). dup: the second half of the points copies
    the first.
    """
    gen = torch.Generator().manual_seed(seed)
    Gp = 1 if shared else G
    n0 = (N + 1) // 2 if dup else N
    y = torch.randn(Gp, n0, d, generator=gen, dtype=torch.float64) + offset
    if dup:
        y = torch.cat([y, y[:, : N - n0]], dim=1)
    ts = torch.full((G, B), float(t), dtype=torch.float64)
    ts[:, 1::2] = min(0.999, 1.5 * t)  # per-query noise levels
    alpha = (1 - ts * ts).sqrt()
    j = torch.randint(0, N, (G, B), generator=gen)
    src = torch.stack([y[0 if shared else g, j[g]] for g in range(G)])
    x = alpha[..., None] * src + ts[..., None] * torch.randn(G, B, d, generator=gen,
                                                              dtype=torch.float64)
    y = y.float()
    y = y.expand(G, N, d) if shared else y
    b = None
    if bias is not None:
        b = 0.5 * torch.randn(1 if shared else G, N, generator=gen)
        if bias == "masked" and N > 1:
            b[:, 1::3] = -math.inf
        b = b.expand(G, N) if shared else b
    out = [x.float(), y, alpha.float(), (ts * ts).float(), b]
    out = [_to_device(a) for a in out]
    if shared_queries:
        out[0], out[2], out[3] = (a[:1].expand(a.shape) for a in out[:1] + out[2:4])
    return out


def _to_device(a):
    """Move to DEVICE keeping a shared (stride-0) group dimension, which a copy would expand."""
    if a is None:
        return None
    if a.shape[0] > 1 and a.stride(0) == 0:
        return a[:1].to(DEVICE).expand(a.shape)
    return a.to(DEVICE)


def _double(args):
    return [None if a is None else a.double() for a in args]


def output_grads(G, B, d, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(G, B, d, generator=gen).to(DEVICE),
            torch.randn(G, B, generator=gen).to(DEVICE))


def check_grads(got, want, tol=GRAD_TOL):
    for name, a, b in zip(["x", "points", "alpha", "var", "bias"], got, want):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert rel_fro(a, b) <= tol, (name, rel_fro(a, b))


def exact_plan(kern, args):
    """Exact mode's per-query plan for backends that take one (EXACT_PLAN), else None."""
    if not getattr(kern.module, "EXACT_PLAN", False):
        return None
    return _exact.make_plan(*args[:4])


def run_forward(kern, args, precision="exact", plan=None):
    """The forward as the op runs it: (mean, lse, lse64, extra), with the host's float64
    correction of the top logits when a plan is given; extra: what the backward then takes."""
    if plan is None:
        mean, lse, lse64 = kern.forward(*args, precision)[:3]
        return mean, lse, lse64, ()
    mean, _, lse64, idx, top = kern.forward(*args, precision, plan)
    mean, lse, lse64, top = _exact.correct_forward(*args, mean, lse64, idx, top)
    return mean, lse, lse64, (plan, idx, top)


def check_case(kern, args, plan, precision="exact", grads=True, mean_tol=MEAN_TOL,
               lse_tol=LSE_TOL, exact=None):
    """Forward and backward against the float64 reference (whose backward recomputes its own
    float64 weights, so this is the error of the whole float32 pipeline). Backends that take
    exact mode's plan get one (exact: a given plan; default: make_plan's)."""
    exact = exact or exact_plan(kern, args)
    with kern.force(plan):
        mean, lse, lse64, extra = run_forward(kern, args, precision, exact)
    ref_mean, ref_lse, _ = ref.forward(*_double(args))
    assert mean.shape == ref_mean.shape and lse.shape == ref_lse.shape
    assert lse.dtype == torch.float32 and lse64.dtype == torch.float64
    assert rel_fro(mean, ref_mean) <= mean_tol
    assert lse_err(lse, ref_lse) <= lse_tol and lse_err(lse64, ref_lse) <= lse_tol
    if not grads:
        return
    G, B, d = args[0].shape
    gm, gl = output_grads(G, B, d)
    needs = (True, True, True, True, args[4] is not None)
    with kern.force(plan):
        got = kern.backward(*args, mean, lse64, gm, gl, needs, precision, *extra)
    want = ref.backward(*_double(args), None, None, gm.double(), gl.double(), needs)
    check_grads(got, want)


SHAPES = [
    # G, B, N, d, shared, bias, dup, offset, t
    (1, 5, 1, 1, False, None, False, 0.0, 0.3),
    (3, 5, 7, 2, True, "finite", False, 1000.0, 0.05),
    (3, 5, 70, 30, True, "masked", True, 0.0, 0.999),
    (1, 5, 70, 67, False, "masked", False, 1000.0, 0.3603),
    (3, 5, 7, 67, False, None, True, 0.0, 0.001),
]


@pytest.mark.parametrize("plan", ["default", "split_n_d"])
def test_shared_queries_own_points(kern, plan):
    """x, alpha, var shared by all groups (stride 0), points and bias per group."""
    args = make_case(G=3, B=5, N=9, d=6, t=0.4, bias="masked", seed=12, shared_queries=True)
    assert args[0].stride(0) == 0 and args[1].stride(0) != 0
    check_case(kern, args, PLANS[plan])


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "G{}B{}N{}d{}".format(*s[:4]))
def test_forward_backward_against_reference(kern, plan, shape):
    G, B, N, d, shared, bias, dup, offset, t = shape
    args = make_case(G, B, N, d, t, offset, shared, bias, dup, seed=N + d)
    check_case(kern, args, PLANS[plan])


@pytest.mark.parametrize("plan", ["default", "split_n_d"])
def test_noise_grid_far_from_origin(kern, plan):
    """Forward exactness at every t of the grid, data offset by 1000, duplicated points."""
    for i, t in enumerate(T_GRID):
        args = make_case(G=2, B=3, N=7, d=19, t=t, offset=1000.0, dup=True, seed=i)
        check_case(kern, args, PLANS[plan], grads=False)


@pytest.mark.parametrize("few", [True, False], ids=["few", "tiles"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("t", [0.999, 0.001])
def test_pixel_dimension_small_n(kern, t, offset, few):
    """d = 3072 at small N: the shifted squared distances keep fp32 logits exact."""
    args = make_case(G=1, B=3, N=8, d=3072, t=t, offset=offset, bias="finite", seed=5)
    plan = {"few": few, **({"block_d": 256} if INTERPRETED else {})}
    check_case(kern, args, plan, grads=few)  # the backward does not depend on the forward kernel


# (B, d, split): every group size of the cuda few-query kernel (1, 8, 16, 32, 256 threads per
# point) and every register width (4, 8, 12, 16 features per thread), with 1, 4 and 5 queries.
FEW_CASES = [(1, 1, None), (4, 3, 3), (5, 30, None), (1, 64, 4), (5, 67, 2), (4, 600, None),
             (1, 1100, 3), (5, 2100, None), (3, 3072, 2), (1, 4096, None)]


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("case", FEW_CASES, ids=lambda c: "B{}d{}s{}".format(*c))
def test_few_query_forward(kern, case, precision):
    """The few-query forward at both ends of the noise grid, offset data, masked points, N not a
    multiple of any step, against float64; its lse feeds the (unchanged) backward."""
    B, d, split = case
    plan = {"few": True, "split": split}
    for i, (t, offset) in enumerate([(0.999, 0.0), (0.001, 1000.0)]):
        args = make_case(G=2, B=B, N=37, d=d, t=t, offset=offset, bias="masked", dup=True,
                         seed=d + i)
        check_case(kern, args, plan, precision=precision, grads=d <= 67 and precision == "exact")


@pytest.mark.parametrize("d, split", [(3, 2), (30, None), (67, 2), (130, None)])
def test_cuda_tensor_core_fast_forward(d, split):
    """cuda, precision "fast" on the tensor cores (mma.sync TF32, 3-product split; in the host
    emulator, the PTX fragment layout computed in fp32): as accurate as the CUDA-core expansion.
    Two query tiles (B = 65), register (d <= 64) and streamed accumulators, masked points."""
    cuda = importlib.import_module("diffmem.ops._cuda")
    if not cuda.status()[0]:
        pytest.skip("the cuda backend cannot run here")
    kern = SimpleNamespace(module=cuda, forward=cuda.forward,
                           force=lambda plan: cuda.force(**plan, few=False, tensor=True))
    for t in (0.999, 0.2):
        args = make_case(G=2, B=65, N=70, d=d, t=t, shared=True, bias="masked", seed=d)
        check_case(kern, args, {"split": split}, precision="fast", grads=False, mean_tol=1e-4,
                   lse_tol=1e-4)


@pytest.mark.parametrize("case", ["one_point", "shared", "sixteen_queries"])
def test_few_query_edge_cases(kern, case):
    """The few-query forward with one point, with points and queries shared by all groups
    (stride 0) and no bias, and at 16 queries (four blocks of four on cuda)."""
    if case == "one_point":
        args = make_case(G=2, B=3, N=1, d=40, t=0.2, seed=40)
    elif case == "shared":
        args = make_case(G=3, B=2, N=33, d=70, t=0.5, shared=True, shared_queries=True, seed=41)
        assert args[0].stride(0) == 0 and args[1].stride(0) == 0
    else:
        args = make_case(G=1, B=16, N=50, d=9, t=0.05, offset=1000.0, bias="masked", seed=42)
    for split in (None, 2):
        check_case(kern, args, {"few": True, "split": split}, grads=False)


def test_cuda_few_query_choice():
    """cuda: a few queries per group take the few-query kernel unless d is too large."""
    cuda = importlib.import_module("diffmem.ops._cuda")
    if not cuda.status()[0]:
        pytest.skip("the cuda backend cannot run here")
    max_d = cuda._module()[2]["few_max_d"]
    assert cuda._few_queries(1, 64) and cuda._few_queries(cuda.FEW_QUERIES, max_d)
    assert not cuda._few_queries(cuda.FEW_QUERIES + 1, 64)
    assert not cuda._few_queries(1, max_d + 1)
    with cuda.force(few=False):
        assert not cuda._few_queries(1, 64)
    with cuda.force(few=True):
        assert cuda._few_queries(1000, 64)
        with pytest.raises(ValueError, match="d <= "):
            cuda._few_queries(1, max_d + 1)


def test_outputs_do_not_depend_on_initial_contents(kern):
    """Two runs with differently poisoned buffers (NaN, by the conftest fixture) agree exactly."""
    args = make_case(G=3, B=5, N=70, d=30, t=0.4, shared=True, bias="masked", seed=3)
    with kern.force(PLANS["split_n_d"]):
        first = kern.forward(*args)
        second = kern.forward(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(bool(torch.isfinite(a).all()) for a in first)


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("plan", ["default", "split_n_d"])
def test_gradients_far_from_origin(kern, plan, precision):
    """Offset 1000: the backward centres the points, so no gradient loses accuracy to it.

    "fast" gradients hold at every t too (the backward renormalises the weights), though its
    forward lse does not at small t (hence no lse check), and without duplicated points: the
    expansion's logit error can split the weight between two copies of a point unevenly.
    """
    fast = precision == "fast"
    for i, t in enumerate([0.001, 0.3603, 0.8, 0.999]):
        args = make_case(G=2, B=5, N=9, d=20, t=t, offset=1000.0, shared=True, bias="masked",
                         dup=not fast, seed=20 + i)
        check_case(kern, args, PLANS[plan], precision=precision,
                   lse_tol=math.inf if fast else LSE_TOL)


def _needs_plan(kern):
    if not getattr(kern.module, "EXACT_PLAN", False):
        pytest.skip(f"the {kern.name} backend takes no exact-mode plan")


def _float64_logits(args):
    x, y, alpha, var, bias = _double(args)
    diff = x[:, :, None, :] - alpha[:, :, None, None] * y[:, None, :, :]
    logits = -(diff * diff).sum(-1) / (2.0 * var[:, :, None])
    return logits if bias is None else logits + bias[:, None, :]


@pytest.mark.parametrize("plan", list(PLANS) + ["tiles"])
def test_exact_plan_mixed_forms_and_top_k(kern, plan):
    """Both logit forms in one query tile (every other query expanded), points split across
    programs and features in chunks: the reported top K are the K largest float64 logits, in
    lse's frame, no point twice; mean, lse and gradients through the host's correction."""
    _needs_plan(kern)
    forced = {"few": False} if plan == "tiles" else PLANS[plan]
    args = make_case(G=2, B=6, N=40, d=20, t=0.5, offset=3.0, shared=True, bias="masked", seed=30)
    exact = exact_plan(kern, args)
    exact.expand = torch.zeros_like(exact.expand)
    exact.expand[:, ::2] = 1
    with kern.force(forced):
        _, _, lse64, idx, top = kern.forward(*args, "exact", exact)
    K = exact.top_k
    assert idx.shape == top.shape == (2, 6, K) and idx.dtype == torch.int64
    want = _float64_logits(args).topk(K, dim=-1).values
    assert bool((idx >= 0).all()) and bool((idx.sort(-1).values.diff(dim=-1) > 0).all())
    at_idx = torch.gather(_float64_logits(args), -1, idx)
    scale = lse64.abs().clamp_min(1.0)[..., None]
    assert float(((top - at_idx).abs() / scale).max()) <= 1e-5
    assert float(((top.sort(-1).values - want.sort(-1).values).abs() / scale).max()) <= 1e-5
    check_case(kern, args, forced, exact=exact)


@pytest.mark.parametrize("plan", ["default", "split_n_d"])
def test_exact_plan_empty_top_slots(kern, plan):
    """Fewer unmasked points than K: the extra slots hold index -1 and logit -inf."""
    _needs_plan(kern)
    args = make_case(G=2, B=3, N=4, d=5, t=0.3, bias="masked", seed=31)  # point 1 masked
    exact = exact_plan(kern, args)
    with kern.force(PLANS[plan]):
        _, _, _, idx, top = kern.forward(*args, "exact", exact)
    assert idx.shape[-1] == exact.top_k == 4
    assert torch.equal(idx.sort(-1).values[..., 1:], torch.tensor([0, 2, 3]).expand(2, 3, 3))
    assert bool((idx.sort(-1).values[..., 0] == -1).all())
    assert bool((top[idx < 0] == -math.inf).all()) and bool(torch.isfinite(top[idx >= 0]).all())
    check_case(kern, args, PLANS[plan], exact=exact)


@pytest.mark.parametrize("plan", ["default", "split_n_d"])
def test_far_queries_take_the_expansion(kern, plan):
    """Queries far from all points (norm 30 per feature): the plan expands all of them, and the
    expansion (every query of the launch, points split, features chunked) is within bound."""
    _needs_plan(kern)
    args = make_case(G=1, B=5, N=30, d=64, t=0.3, seed=32)
    gen = torch.Generator().manual_seed(33)
    args[0] = (30.0 * torch.randn(1, 5, 64, generator=gen)).to(DEVICE)
    exact = exact_plan(kern, args)
    assert bool(exact.expand.bool().all())
    check_case(kern, args, PLANS[plan], exact=exact)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_top_k_only_from_exact_logits(kern, precision):
    """The fast tiles report no top logits (no list, or only empty slots); the few-query plan
    computes exact logits for either precision and reports them; without a plan nothing is
    reported."""
    _needs_plan(kern)
    args = make_case(G=1, B=20, N=30, d=16, t=0.4, seed=34)
    exact = exact_plan(kern, args)

    def reported(out) -> int:  # the most listed points of any query
        return 0 if len(out) < 5 or out[3].shape[-1] == 0 else int((out[3] >= 0).sum(-1).max())

    with kern.force({"few": False}):
        K_tiles = reported(kern.forward(*args, precision, exact))
        K_none = reported(kern.forward(*args, precision))
    with kern.force({"few": True}):
        K_few = reported(kern.forward(*args, precision, exact))
    assert (K_tiles, K_few, K_none) == (0 if precision == "fast" else 4, 4, 0)


def test_backward_renormalises_the_weights(kern):
    """The backward divides the recomputed weights by their sum: an lse off by a constant (or
    rounded to float32) gives the same gradients, and sum_n P = h holds (sum of dbias)."""
    args = make_case(G=2, B=5, N=9, d=6, t=0.3603, offset=1000.0, bias="finite", seed=13)
    mean, lse, lse64 = kern.forward(*args)[:3]
    gm, gl = output_grads(2, 5, 6, seed=3)
    needs = (True, True, True, True, True)
    want = ref.backward(*_double(args), None, None, gm.double(), gl.double(), needs)
    for saved in (lse64, lse, lse64 + 0.7, lse64 - 3.0):
        got = kern.backward(*args, mean, saved, gm, gl, needs)
        check_grads(got, want)
        assert torch.allclose(got[4].double().sum(1), gl.double().sum(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("needs", [(True, False, False, False, False),
                                   (False, True, False, False, True),
                                   (False, False, True, True, False)])
@pytest.mark.parametrize("which", ["both", "mean_only", "lse_only"])
def test_backward_subsets_and_missing_grads(kern, needs, which):
    args = make_case(G=1, B=5, N=7, d=5, t=0.5, bias="finite", seed=4)
    mean, _, lse64 = kern.forward(*args)[:3]
    gm, gl = output_grads(1, 5, 5, seed=2)
    gm = gm if which != "lse_only" else None
    gl = gl if which != "mean_only" else None
    got = kern.backward(*args, mean, lse64, gm, gl, needs)
    want = ref.backward(*_double(args), None, None,
                        None if gm is None else gm.double(), None if gl is None else gl.double(),
                        needs)
    for need, a, b in zip(needs, got, want):
        assert (a is None) == (not need)
        if need:
            assert rel_fro(a, b) <= GRAD_TOL


def test_backward_without_any_output_gradient_is_zero(kern):
    args = make_case(G=2, B=3, N=4, d=3, seed=6)
    mean, _, lse64 = kern.forward(*args)[:3]
    got = kern.backward(*args, mean, lse64, None, None, (True, True, True, True, False))
    assert all(bool((g == 0).all()) for g in got[:4]) and got[4] is None


@pytest.mark.parametrize("t", [0.999, 0.5, 0.2])
def test_fast_precision_at_moderate_noise(kern, t):
    """The centred expansion (fp32 here: the interpreter's tl.dot is numpy fp32)."""
    args = make_case(G=2, B=5, N=70, d=30, t=t, shared=True, seed=7)
    for plan in ("default", "split_n_d"):
        check_case(kern, args, PLANS[plan], precision="fast", mean_tol=1e-4, lse_tol=1e-4)


@pytest.mark.parametrize("plan", list(PLANS))
def test_knn_paths(kern, plan):
    """Split points (merged by a stable sort) and chunked features; ties to the lower index."""
    args = make_case(G=3, B=5, N=40, d=21, t=0.1, offset=1000.0, shared=True, dup=True, seed=8)
    q, p = args[0], args[1]
    for k in (1, 2, 3):
        with kern.force(PLANS[plan]):
            dist, idx = kern.knn(q, p, k)
        ref_dist, ref_idx = ref.knn(q, p, k)
        assert idx.dtype == torch.int64 and dist.shape == (3, 5, k)
        assert torch.equal(idx, ref_idx)
        assert float(((dist.double() - ref_dist.double()).abs()
                      / ref_dist.double().clamp_min(1e-30)).max()) <= 1e-5
    # exact duplicates in different splits: point i and i + 20 are identical
    points = p[:1, :20].repeat(1, 2, 1)
    with kern.force(PLANS[plan]):
        dist, idx = kern.knn(points[:, :7].contiguous(), points, 2)
    assert torch.equal(idx[0, :, 0], torch.arange(7, device=DEVICE))
    assert torch.equal(idx[0, :, 1], torch.arange(7, device=DEVICE) + 20)
    assert bool((dist == 0).all())


def _stored(args, dtype):
    """A case with its points in a storage dtype (a shared group dimension kept shared) and the
    same points in float32: uint8 codes 20 y + 128 (queries and variances scaled to match), or y
    rounded to float16 / bfloat16."""
    x, y, alpha, var, bias = args
    shared = y.shape[0] > 1 and y.stride(0) == 0
    rows = y[:1] if shared else y
    if dtype == torch.uint8:
        rows = (20 * rows + 128).round().clamp(0, 255).to(dtype)
        x, var = 20 * x + 128 * alpha[..., None], 400 * var
    else:
        rows = rows.to(dtype)
    share = (lambda t: t.expand(y.shape)) if shared else (lambda t: t)  # noqa: E731
    return [x, share(rows), alpha, var, bias], [x, share(rows.float()), alpha, var, bias]


def _outputs_equal(got, want):
    for a, b in zip(got, want):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a is None and b is None


# (plan, points dtype, shared points): each plan once, each dtype at least once (the emulations
# are slow; tests/ops/test_compact_points.py covers every dtype with the default plans).
COMPACT_CASES = [("default", torch.uint8, False), ("split_n", torch.float16, True),
                 ("split_d", torch.bfloat16, False), ("split_n_d", torch.uint8, True)]


@pytest.mark.parametrize("case", COMPACT_CASES,
                         ids=lambda c: f"{c[0]}-{str(c[1]).removeprefix('torch.')}"
                                       f"{'-shared' if c[2] else ''}")
def test_compact_points_equal_float32_points(kern, case):
    """Points stored as uint8, float16 or bfloat16 on every kernel path (few-query and tile
    forwards, splits and their merges, chunked features, both precisions, with exact mode's
    plan and without one, the backward, knn) give the bits of the same points in float32."""
    plan, dtype, shared = case
    args = make_case(G=2, B=5, N=40, d=67, t=0.2, offset=3.0, shared=shared, bias="masked",
                     dup=True, seed=21)
    stored, converted = _stored(args, dtype)
    assert stored[1].dtype == dtype and (stored[1].stride(0) == 0) == shared
    G, B, d = args[0].shape
    gm, gl = output_grads(G, B, d)
    needs = (True, True, True, True, True)
    for precision, planned in [("exact", True), ("exact", False), ("fast", False)]:
        results = []
        for case in (stored, converted):
            plan_ = exact_plan(kern, case) if planned else None
            with kern.force(PLANS[plan]):
                mean, lse, lse64, extra = run_forward(kern, case, precision, plan_)
                grads = kern.backward(*case, mean, lse64, gm, gl, needs, precision, *extra)
            results.append([mean, lse, lse64, *extra[1:], *grads])
        _outputs_equal(*results)
    with kern.force(PLANS[plan]):
        _outputs_equal(kern.knn(stored[0], stored[1], 3), kern.knn(converted[0], converted[1], 3))


def test_triton_plans_and_autotune_configs():
    """Interpreter: one fixed config, no split. GPU candidates: at most two, within budget."""
    _config = _triton_config()
    for fast in (False, True):
        for d in (1, 2, 30, 67, 3072):
            plan = _config.plan("forward", 1, 100, 70, d, fast, DEVICE)
            assert not plan.few
            assert plan.num_d == -(-d // plan.block_d)
            if fast:
                assert plan.block_d >= 16
            if INTERPRETED:
                assert plan.blocks is not None and plan.split == 1
            block_d = _config._block_d(d, fast, on_gpu=True)
            configs = _config.autotune_configs(fast, block_d, d <= block_d)
            assert 1 <= len(configs) <= 2
            for cfg in configs:
                bb, bn = cfg.kwargs["BB"], cfg.kwargs["BN"]
                if not fast:
                    assert bb * bn * block_d <= 64 * 32 * cfg.num_warps
                else:
                    assert min(bb, bn, block_d) >= 16
            for cfg in _config.autotune_configs(False, 16, False, budget=32):
                assert cfg.kwargs["BB"] * cfg.kwargs["BN"] * 16 <= 32 * 32 * cfg.num_warps
    for kind in ("query_grad", "point_grad"):  # 3-D tiles: small chunks even in fast mode
        assert _config.plan(kind, 1, 5, 70, 3072, True, DEVICE).block_d <= 64
    with _config.force(split=4, block_d=8):
        plan = _config.plan("forward", 1, 1, 100, 30, False, DEVICE)
        assert plan.split == 4 and plan.num_d == 4 and not plan.single_d
    # A few queries: exact chunks even for "fast", fixed blocks of at least 2 rows.
    for B, bb in ((1, 2), (3, 4), (5, 8), (16, 16)):
        plan = _config.plan("forward", 1, B, 70, 30, True, DEVICE)
        assert plan.few and plan.blocks["BB"] == bb
        on_gpu = DEVICE.type == "cuda" and not INTERPRETED
        assert plan.block_d == _config._block_d(30, False, on_gpu)
        assert bb * plan.blocks["BN"] * plan.block_d <= 64 * 32 * plan.blocks["num_warps"]
    assert not _config.plan("forward", 1, 17, 70, 30, True, DEVICE).few
    assert not _config.plan("query_grad", 1, 1, 70, 30, True, DEVICE).few
    with _config.force(few=False):
        assert not _config.plan("forward", 1, 1, 70, 30, True, DEVICE).few
    with pytest.raises(ValueError):
        with _config.force(blocks=3):
            pass


@pytest.mark.skipif(DEVICE.type != "cuda" or INTERPRETED, reason="autotuned launch needs a GPU")
def test_gpu_default_plan_splits_small_batches(kern):
    """One query: the points are split across programs and merged (flash-decoding style)."""
    if kern.name == "triton":
        plan = _triton_config().plan("forward", 1, 1, 100_000, 64, False, DEVICE)
        assert plan.few and plan.split > 1
        plan = _triton_config().plan("forward", 1, 64, 100_000, 64, False, DEVICE)
        assert not plan.few and plan.split > 1 and plan.blocks is None
    args = make_case(G=1, B=1, N=20_000, d=64, t=0.3, seed=9)
    check_case(kern, args, {})


def test_work_split_fills_the_device():
    """Splits for a 132-multiprocessor card: the GPU sizes' blocks fill it, within the limits."""
    cuda = torch.device("cuda")
    split = lambda *a, **kw: work_split(*a, cuda, sms=132, **kw)  # noqa: E731
    assert split(1, 50_000, 64, 3072) == 264           # (64, 50000, 3072): one 64-query tile
    assert split(4, 1_000_000, 256, 64) == 66          # (256, 1e6, 64)
    assert split(300, 1_000_000, 256, 64) == 1         # enough blocks already
    assert split(1, 1000, 64, 64) == 1000 // 128       # at least 128 points per split
    assert split(1, 10**7, 1, 64, blocks_per_sm=4, min_items=256) == 528
    assert split(1, 10**7, 4096, 4096) == MAX_PARTIAL_ELEMENTS // (4096 * 4096)
    assert work_split(1, 10**6, 1, 64, torch.device("cpu")) == 1


def test_status(kern):
    ok, reason = kern.module.status()
    assert ok and reason == ""


def _cuda_or_skip():
    cuda = importlib.import_module("diffmem.ops._cuda")
    if not cuda.status()[0]:
        pytest.skip("the cuda backend cannot run here")
    return cuda


@pytest.mark.parametrize("forms", ["direct", "expansion", "mixed", "planned"])
@pytest.mark.parametrize("kernel", [{"few": True}, {"few": True, "split": 3},
                                    {"few": False}, {"few": False, "split": 2, "split_b": 2}],
                         ids=["few", "few_split", "tiles", "tiles_split"])
@pytest.mark.parametrize("d", [5, 67])
def test_cuda_exact_plan(kernel, forms, d):
    """cuda, exact mode's plan: each query's form (forced all direct, all expansion, alternating,
    or make_plan's choice on far queries), the top-4 logits of the forward (merged across
    splits) against float64, and the corrected forward and the backward against the reference."""
    from diffmem.ops import _exact
    cuda = _cuda_or_skip()
    G, B, N = 2, 5, 70
    x, y, alpha, var, bias = make_case(G=G, B=B, N=N, d=d, t=0.3, offset=3.0, bias="masked",
                                       seed=d)
    x = x + 4.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    plan = _exact.make_plan(x, y, alpha, var)
    if forms != "planned":
        fill = {"direct": 0, "expansion": 1}
        expand = (torch.arange(B) % 2).expand(G, B) if forms == "mixed" else torch.full(
            (G, B), fill[forms])
        plan.expand = expand.to(torch.uint8).to(DEVICE).contiguous()
    with cuda.force(**kernel):
        mean, lse, lse64, top_idx, top_logit = cuda.forward(x, y, alpha, var, bias, "exact", plan)
    assert top_idx.shape == (G, B, 4) and top_logit.dtype == torch.float64
    xd, yd, ad, vd, bd = _double((x, y, alpha, var, bias))
    logits = bd[:, None] - ((xd[:, :, None] - ad[..., None, None] * yd[:, None]) ** 2).sum(-1) / (
        2 * vd[..., None])
    want = logits.topk(4, dim=-1)
    assert torch.equal(top_idx.sort(-1).values, want.indices.sort(-1).values)
    got = torch.gather(logits, -1, top_idx)
    assert float(((top_logit - got).abs() / got.abs().clamp_min(1.0)).max()) <= 1e-5
    mean, lse, lse64, top_exact = _exact.correct_forward(x, y, alpha, var, bias, mean, lse64,
                                                         top_idx, top_logit)
    ref_mean, ref_lse, _ = ref.forward(xd, yd, ad, vd, bd)
    assert rel_fro(mean, ref_mean) <= MEAN_TOL and lse_err(lse64, ref_lse) <= LSE_TOL
    gm, gl = output_grads(G, B, d)
    needs = (True, True, True, True, True)
    with cuda.force(**kernel):
        grads = cuda.backward(x, y, alpha, var, bias, mean, lse64, gm, gl, needs, "exact", plan,
                              top_idx, top_exact)
    check_grads(grads, ref.backward(xd, yd, ad, vd, bd, None, None, gm.double(), gl.double(),
                                    needs))


def test_cuda_exact_plan_empty_slots_and_fast():
    """Fewer points than top slots (and masked ones) leave -1 / -inf; the fast tile kernels report
    no top logits (all slots empty), the few-query kernel does for either precision."""
    from diffmem.ops import _exact
    cuda = _cuda_or_skip()
    x, y, alpha, var, bias = make_case(G=1, B=3, N=3, d=4, t=0.5, bias="masked", seed=2)
    plan = _exact.make_plan(x, y, alpha, var)
    for few in (True, False):
        with cuda.force(few=few):
            *_, top_idx, top_logit = cuda.forward(x, y, alpha, var, bias, "exact", plan)
        assert bool((top_idx[..., 2:] == -1).all())
        assert bool((top_logit[..., 2:] == -math.inf).all())
        assert sorted(top_idx[0, 0, :2].tolist()) == [0, 2]  # point 1 is masked
        with cuda.force(few=few):
            *_, top_idx, _ = cuda.forward(x, y, alpha, var, bias, "fast", plan)
        assert top_idx.shape[-1] == 4 and bool((top_idx[..., :2] >= 0).all()) == few
