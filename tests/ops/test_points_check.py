"""The cpu kernels check the points for NaN and Inf as they read them (softmax_mean then skips
its separate scan of the points): every non-finite value must still raise the same ValueError,
wherever it sits and however the call is laid out."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from conftest import BACKENDS

import diffmem

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")

# (B, N, d, precision): few queries over many tiles (the points split over work items), two
# query chunks (only the first checks), the fast kernels (centred tiles), d that is and is not
# a multiple of the vector width (tiles read in place or packed)
LAYOUTS = [(1, 3000, 64, "exact"), (300, 700, 30, "exact"), (80, 900, 48, "fast"),
           (5, 1000, 3, "exact")]
STORAGE = [torch.float32, torch.bfloat16, torch.float16]


def _call(x, points, bias=None, precision="exact", check_inputs=True):
    return diffmem.softmax_mean(x, points, 0.9, 0.3, bias, backend="cpu", precision=precision,
                                check_inputs=check_inputs)


def _assert_rejected(x, points, places, value, bias=None, precision="exact"):
    """points with value put at each place (an index tuple) in turn: the checked call raises,
    the unchecked one runs (no error, no hang)."""
    kind = "NaN" if math.isnan(value) else "Inf"
    for place in places:
        bad = points.clone()
        bad[place] = value
        with pytest.raises(ValueError, match=f"points contains {kind} values"):
            _call(x, bad, bias, precision=precision)
        _call(x, bad, bias, precision=precision, check_inputs=False)


def _problem(B, N, d, gen, groups=()):
    x = torch.randn(*groups, B, d, generator=gen)
    points = torch.randn(*groups, N, d, generator=gen)
    return x, points


@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
def test_every_non_finite_point_value_raises(layout, storage, value):
    B, N, d, precision = layout
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layout, storage, value)).encode()))
    x, points = _problem(B, N, d, gen)
    points = points.to(storage)
    _call(x, points, precision=precision)  # finite: no error
    # the first and last point, the last coordinate, and random places
    places = [(0, 0), (N - 1, d - 1)] + [
        (int(torch.randint(N, (1,), generator=gen)), int(torch.randint(d, (1,), generator=gen)))
        for _ in range(4)]
    _assert_rejected(x, points, places, value, precision=precision)


def test_masked_trailing_points_are_checked_too():
    # the kernels skip the tiles of trailing points with bias -inf; their values are checked
    gen = torch.Generator().manual_seed(5)
    x, points = _problem(7, 500, 40, gen)
    bias = torch.zeros(500)
    bias[100:] = -math.inf
    _assert_rejected(x, points, [(100, 3), (257, 3), (499, 3)], math.nan, bias)


def test_groups_with_their_own_points_and_shared_points_with_own_bias():
    gen = torch.Generator().manual_seed(6)
    x, points = _problem(9, 400, 20, gen, groups=(3,))
    _assert_rejected(x, points, [(g, 399 - 100 * g, 7) for g in range(3)], math.inf)
    # shared points, a bias per group (not folded into one problem): group 0 checks them; the
    # trailing points are masked in group 0 only
    shared = points[0].clone()
    bias = torch.zeros(3, 400)
    bias[0, 200:] = -math.inf
    _assert_rejected(x, shared, [(0, 0), (150, 0), (300, 0)], math.nan, bias)


def test_checked_and_unchecked_calls_agree_on_finite_points():
    gen = torch.Generator().manual_seed(7)
    for B, N, d, precision in LAYOUTS:
        x, points = _problem(B, N, d, gen)
        points = points * 1e15  # large but finite values are not mistaken for Inf
        torch.testing.assert_close(_call(x, points, precision=precision),
                                   _call(x, points, precision=precision, check_inputs=False),
                                   rtol=0, atol=0)


def test_uint8_points_need_no_check():
    gen = torch.Generator().manual_seed(8)
    x = 128 + 32 * torch.randn(4, 16, generator=gen)
    codes = torch.randint(0, 256, (300, 16), generator=gen, dtype=torch.uint8)
    mean = _call(x, codes)
    assert torch.isfinite(mean).all()
