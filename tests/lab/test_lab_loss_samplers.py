"""Laboratory layer: parametrization round-trips, DSM losses (SPEC D, J.3) and samplers
(SPEC G.1, J.5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffmem.data import make_gmm_data
from diffmem.denoisers import EmpiricalDenoiser
from diffmem.diffusion import (
    FIELDS,
    VE,
    VP,
    FlowMatching,
    convert,
    from_x0,
    loss_scale,
    time_grid,
    to_x0,
)
from diffmem.diffusion.loss import dsm_loss, loss_per_t, time_weights, training_loss, weighted_loss
from diffmem.diffusion.samplers import ddim_sample, ddpm_sample, euler_ode_sample
from diffmem.metrics import memorization_ratio

PROCESSES = [VP(), VE(), FlowMatching()]


@pytest.fixture(scope="module")
def gmm():
    """The J.3 / J.5 configuration: d=50, K=12, N=200, sigma0^2 = 1."""
    return make_gmm_data(50, 12, 200, seed=1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- conversions (SPEC B) -------------------------------------------------------------------

@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
@pytest.mark.parametrize("per_sample", [False, True])
def test_conversions_round_trip(process, per_sample):
    g = gen(1)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.8 + 0.1 if per_sample else 0.37
    value = torch.randn(6, 4, generator=g, dtype=torch.float64)
    for a in FIELDS:
        for b in FIELDS:
            there = convert(value, a, b, x, t, process)
            back = convert(there, b, a, x, t, process)
            assert torch.allclose(back, value, rtol=1e-9, atol=1e-9), (a, b)
            via_x0 = from_x0(b, to_x0(a, value, x, t, process), x, t, process)
            assert torch.allclose(there, via_x0)


def test_conversion_matches_posterior_identities():
    """For x = alpha x0 + sigma eps exactly, x0 -> eps recovers eps and eps -> v gives
    alpha' x0 + sigma' eps."""
    p, t = VP(), 0.6
    g = gen(2)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x = p.noise(x0, t, eps)
    assert torch.allclose(convert(x0, "x0", "eps", x, t, p), eps)
    v = p.alpha_prime(t) * x0 + p.sigma_prime(t) * eps
    assert torch.allclose(convert(eps, "eps", "v", x, t, p), v)


# --- losses (SPEC D) -----------------------------------------------------------------------

def test_dsm_loss_units_and_targets(gmm):
    """Same noise: L_eps = lsf(x0->eps) L_x0 and L_v = lsf(x0->v) L_x0, per sample and
    per-sample t."""
    x0 = gmm.train[:8].double()
    t = torch.linspace(0.2, 0.9, 8, dtype=torch.float64)
    losses = {f: dsm_loss(gmm.ground_truth(prediction=f), x0, t, draws=5, target=f,
                          generator=gen(3))
              for f in ("x0", "eps", "v")}
    assert losses["x0"].shape == (8,)
    for f in ("eps", "v"):
        assert torch.allclose(losses[f], loss_scale("x0", f, t, VP()) * losses["x0"], rtol=1e-8)


def test_loss_per_t_matches_spec_j3(gmm):
    """SPEC J.3 (EPS units, train set). 20 draws x 200 points = 4000 terms per t: the GT loss has
    per-term std about sqrt(2 d) (1 - t^2) <= 10, so its MC error is < 0.2 (< 1%); 4% also covers
    a different data draw than the spec's run."""
    ts = torch.tensor([0.7595, 0.5998, 0.4401, 0.3603, 0.2006])
    gt = loss_per_t(gmm.ground_truth(), gmm.train, ts, draws=20, generator=gen(0))
    expected = torch.tensor([21.2, 32.1, 40.3, 43.5, 48.0], dtype=torch.float64)
    assert torch.allclose(gt, expected, rtol=0.04)
    mem = loss_per_t(EmpiricalDenoiser(gmm.train, VP(), "eps"), gmm.train, ts, draws=20,
                     generator=gen(0))
    assert mem[0] < 0.3                      # 0.027 in J.3; a few points are not yet resolved
    assert bool((mem[1:] < 1e-6).all())      # ~0: the empirical denoiser is exact on its data


def test_loss_per_t_chunking(gmm):
    m = gmm.ground_truth()
    a = loss_per_t(m, gmm.train[:30], [0.5, 0.3], draws=4, generator=gen(5), batch=10_000)
    b = loss_per_t(m, gmm.train[:30], [0.5, 0.3], draws=4, generator=gen(5), batch=8)
    assert a.shape == (2,) and a.dtype == torch.float64 and bool((a > 0).all())
    # Different chunking draws the noise in a different order; both estimate the same mean.
    assert torch.allclose(a, b, rtol=0.15)


class _Scaled(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.process, self.prediction = inner, inner.process, inner.prediction
        self.scale = nn.Parameter(torch.tensor(0.9))

    def forward(self, x, t):
        return self.scale * self.inner(x, t)


def test_training_loss_weights_and_grad(gmm):
    model = _Scaled(gmm.ground_truth())
    ts = time_grid(dtype=torch.float32)
    one = training_loss(model, gmm.train[:16], ts, draws=3, generator=gen(4))
    two = training_loss(model, gmm.train[:16], ts, draws=3, generator=gen(4),
                        weights=2 * torch.ones(26))
    assert one.dim() == 0 and torch.allclose(two, 2 * one)
    one.backward()
    assert model.scale.grad is not None and torch.isfinite(model.scale.grad)
    # All mass on one time: the objective is the DSM loss there.
    probs = torch.zeros(26)
    probs[14] = 1
    at = training_loss(model, gmm.train[:16], ts, probs=probs, draws=50, generator=gen(6)).item()
    ref = dsm_loss(model, gmm.train[:16], float(ts[14]), draws=50, generator=gen(7)).mean().item()
    assert at == pytest.approx(ref, rel=0.1)


def test_time_weights():
    ts = time_grid()
    p = VP()
    c = time_weights(ts, "x0", units="eps")
    assert torch.allclose(c, (p.sigma(ts) / p.alpha(ts)) ** 2 / 26)
    assert torch.allclose(time_weights(ts, "eps", units="eps"),
                          torch.full((26,), 1 / 26, dtype=torch.float64))
    w = torch.arange(26.0)
    assert weighted_loss(torch.ones(26), ts, "eps", weights=w) == pytest.approx(float(w.mean()))


# --- samplers (SPEC G.1, J.5) -------------------------------------------------------------------

def test_ddim_memorization_j5(gmm):
    x = torch.randn(50, 50, generator=gen(3))
    ts = time_grid()
    mem = EmpiricalDenoiser(gmm.train, VP(), "eps")
    assert memorization_ratio(ddim_sample(mem, x, ts), gmm.train) == 1.0
    assert memorization_ratio(ddim_sample(gmm.ground_truth(), x, ts), gmm.train) == 0.0


@pytest.mark.parametrize("sampler", [ddpm_sample, euler_ode_sample])
def test_other_samplers_memorize_with_empirical(gmm, sampler):
    x = torch.randn(20, 50, generator=gen(4))
    out = sampler(EmpiricalDenoiser(gmm.train), x, time_grid())
    assert out.shape == x.shape and memorization_ratio(out, gmm.train) == 1.0


def test_ddim_step_formula_and_prediction_independence(gmm):
    p = VP()
    x = torch.randn(4, 50, generator=gen(8), dtype=torch.float64)
    gt_x0 = gmm.ground_truth(prediction="x0")
    gt_x0.means.data = gt_x0.means.double()
    t, t1 = 0.5, 0.3
    x0 = gt_x0(x, t)
    a, s, a1, s1 = p.alpha(t), p.sigma(t), p.alpha(t1), p.sigma(t1)
    expect = (s1 / s) * x + a1 * (1 - (a / a1) * (s1 / s)) * x0
    assert torch.allclose(ddim_sample(gt_x0, x, [t, t1]), expect)
    for f in ("eps", "v", "score"):
        m = gmm.ground_truth(prediction=f)
        m.means.data = m.means.double()
        ts = [0.9, 0.5, 0.1]
        assert torch.allclose(ddim_sample(m, x, ts), ddim_sample(gt_x0, x, ts), atol=1e-8)


def test_samplers_keep_data_shape():
    data = torch.randn(10, 2, 3, 3, generator=gen(9))
    x = torch.randn(4, 2, 3, 3, generator=gen(10))
    assert ddim_sample(EmpiricalDenoiser(data), x, time_grid(num=5)).shape == (4, 2, 3, 3)


# --- bad inputs -------------------------------------------------------------------------

def test_bad_inputs(gmm):
    m = gmm.ground_truth()
    x = gmm.train[:4]
    with pytest.raises(ValueError, match="target"):
        dsm_loss(m, x, 0.5, target="score")
    with pytest.raises(ValueError, match="draws"):
        dsm_loss(m, x, 0.5, draws=0)
    with pytest.raises(ValueError, match="x0"):
        dsm_loss(m, x[0], 0.5)
    with pytest.raises(TypeError, match="x0"):
        dsm_loss(m, x.numpy(), 0.5)
    with pytest.raises(ValueError, match="t must"):
        dsm_loss(m, x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="ts"):
        loss_per_t(m, x, [])
    with pytest.raises(ValueError, match="ts"):
        loss_per_t(m, x, [0.5, 1.5])
    with pytest.raises(ValueError, match="batch"):
        loss_per_t(m, x, [0.5], batch=0)
    with pytest.raises(ValueError, match="weights"):
        time_weights(time_grid(), weights=torch.ones(3))
    with pytest.raises(ValueError, match="weighting"):
        time_weights(time_grid(), "bogus")
    with pytest.raises(TypeError, match="x_init"):
        ddim_sample(m, [[0.0]], [0.5, 0.1])
    with pytest.raises(ValueError, match="ts"):
        ddim_sample(m, x, [0.5])
    with pytest.raises(ValueError, match="ts"):
        ddpm_sample(m, x, [0.5, 0.0])
