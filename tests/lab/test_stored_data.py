"""The memorizing denoisers on data stored as codes (uint8 with scale and offset, float16,
bfloat16), against the float64 denoisers of the values; and their nearest-point output."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_fro

import diffmem
from diffmem import VE, VP

SCALE, OFFSET = 2 / 255, -1.0


def _codes(N, D, seed):
    gen = torch.Generator().manual_seed(seed)
    # images-like: smooth rows of codes (neighbouring points share structure, so the
    # posterior spreads over several at moderate noise)
    base = torch.randint(0, 256, (N // 4 + 1, D), generator=gen)
    noise = torch.randint(-20, 21, (N, D), generator=gen)
    return (base.repeat_interleave(4, 0)[:N] + noise).clamp(0, 255).to(torch.uint8)


def _queries(process, vals, t, B, seed, held_out):
    gen = torch.Generator().manual_seed(seed)
    src = vals[torch.randint(0, vals.shape[0], (B,), generator=gen)]
    if held_out:
        src = src + 0.3 * torch.randn(src.shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(src.shape, generator=gen, dtype=torch.float64)
    return (process.alpha(t) * src + process.sigma(t) * eps).float()


@pytest.mark.parametrize("process", [VP(), VE()], ids=["vp", "ve"])
@pytest.mark.parametrize("held_out", [False, True])
@pytest.mark.parametrize("per_feature", [False, True])
def test_empirical_denoiser_on_uint8_codes(process, held_out, per_feature):
    N, D = 400, 768
    codes = _codes(N, D, 1)
    offset = torch.linspace(-1.0, -0.5, D) if per_feature else OFFSET
    vals = codes.double() * SCALE + (offset.double() if per_feature else offset)
    den = diffmem.EmpiricalDenoiser(codes, process, "x0", scale=SCALE, offset=offset)
    ref = diffmem.EmpiricalDenoiser(vals, process, "x0", backend="reference")
    for i, t in enumerate([0.02, 0.1, 0.3, 0.7, 0.95]):
        x = _queries(process, vals, t, 12, 10 + i, held_out)
        got, want = den(x, t), ref(x.double(), t)
        assert got.dtype == torch.float32
        assert rel_fro(got, want) <= 1e-5, t
        idx, weight = den.nearest(x, t)
        ridx, rweight = ref.nearest(x.double(), t)
        assert torch.equal(idx, ridx)
        assert float((weight.double() - rweight).abs().max()) <= 1e-5
        lp, rlp = den.log_prob(x, t), ref.log_prob(x.double(), t)
        assert float(((lp.double() - rlp).abs() / rlp.abs().clamp_min(1)).max()) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_empirical_denoiser_on_half_data(dtype):
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(300, 64, generator=gen).to(dtype)
    den = diffmem.EmpiricalDenoiser(data, VP(), "eps")
    ref = diffmem.EmpiricalDenoiser(data.double(), VP(), "eps", backend="reference")
    x = torch.randn(20, 64, generator=gen)
    for t in (0.05, 0.5, 0.9):
        assert rel_fro(den(x, t), ref(x.double(), t)) <= 1e-5


def test_partial_memorizing_denoiser_on_codes():
    codes = _codes(200, 96, 2)
    vals = codes.double() * SCALE + OFFSET
    gen = torch.Generator().manual_seed(4)
    den = diffmem.PartialMemorizingDenoiser(codes, 50, generator=gen, scale=SCALE, offset=OFFSET)
    ref = diffmem.EmpiricalDenoiser(vals[den.subset], VP(), "x0", backend="reference")
    x = _queries(VP(), vals, 0.3, 10, 5, True)
    assert rel_fro(den(x, 0.3), ref(x.double(), 0.3)) <= 1e-5


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(scale=0.0), "scale must be a finite number > 0"),
    (dict(scale=float("nan")), "scale must be a finite number > 0"),
    (dict(scale="2"), "scale must be a finite number > 0"),
    (dict(offset=torch.zeros(5)), "offset must be None, a number or a float tensor of 12"),
    (dict(offset=float("inf")), "offset must be finite"),
])
def test_bad_affine_map(kwargs, message):
    codes = torch.zeros(3, 12, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        diffmem.EmpiricalDenoiser(codes, **kwargs)
    with pytest.raises(ValueError, match=message):
        diffmem.PartialMemorizingDenoiser(codes, 2, **kwargs)


def test_codes_with_float64_queries_are_refused():
    den = diffmem.EmpiricalDenoiser(torch.zeros(3, 4, dtype=torch.uint8), scale=1.0)
    with pytest.raises(TypeError, match="storage dtype"):
        den(torch.zeros(2, 4, dtype=torch.float64), 0.5)
