"""Laboratory denoisers against a dense float64 Gaussian-mixture oracle; template data."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from diffmem.denoisers.empirical import EmpiricalDenoiser
from diffmem.denoisers.gmm import IsotropicGMM
from diffmem.denoisers.lowrank import LearnableLowRankGMM, LowRankGMM
from diffmem.denoisers.partial import PartialMemorizingDenoiser
from diffmem.denoisers.templates import ColoredTemplates, LearnableColoredTemplates
from diffmem.diffusion.parametrization import FIELDS, from_x0
from diffmem.diffusion.processes import VP

F64 = torch.float64
TS = (0.001, 0.05, 0.3, 0.7, 0.999)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def naive(x, t, means, covs, priors):
    """Dense oracle: x0_hat (B, D) and log p_t (B,) of sum_k pi_k N(mu_k, Cov_k), per-sample t."""
    D = x.shape[1]
    out, logp = [], []
    for b in range(x.shape[0]):
        tb = float(t[b]) if isinstance(t, torch.Tensor) else t
        a, s2 = math.sqrt(1 - tb * tb), tb * tb
        sig = a * a * covs + s2 * torch.eye(D, dtype=F64)
        logits = torch.stack([math.log(float(p))
                              + MultivariateNormal(a * m, s, validate_args=False).log_prob(x[b])
                              for m, s, p in zip(means, sig, priors)])
        w = torch.softmax(logits, 0)
        post = means + a * (covs @ torch.linalg.solve(sig, (x[b] - a * means)[..., None]))[..., 0]
        out.append(w @ post)
        logp.append(torch.logsumexp(logits, 0))
    return torch.stack(out), torch.stack(logp)


def colored_covs(templates, color_means, v):
    """Means (K, C*P) and covariances (K, D, D) of the colored-template mixture."""
    K, C = color_means.shape
    T = templates.reshape(K, -1)
    eye = torch.eye(C, dtype=F64)
    means = (color_means[:, :, None] * T[:, None, :]).reshape(K, -1)
    covs = torch.stack([v * torch.kron(eye, torch.outer(tk, tk)) for tk in T])
    return means, covs


def cases():
    """(name, model builder(prediction), oracle means, covs, priors, D)."""
    g = gen(1)
    K, D, r = 4, 6, 2
    mu = 2 * torch.randn(K, D, generator=g, dtype=F64)
    U = torch.randn(K, D, r, generator=g, dtype=F64)
    pri = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    data = 2 * torch.randn(7, D, generator=g, dtype=F64)
    C, H, W = 2, 2, 3
    temps = torch.rand(3, H, W, generator=g, dtype=F64) + 0.1
    cm = torch.randn(3, C, generator=g, dtype=F64)
    cmeans, ccovs = colored_covs(temps, cm, 0.7)
    zero = torch.zeros(7, D, D, dtype=F64)
    uni7, uni3 = torch.full((7,), 1 / 7, dtype=F64), torch.full((3,), 1 / 3, dtype=F64)
    lr_cov = U @ U.transpose(-1, -2)
    return [
        ("empirical", lambda p: EmpiricalDenoiser(data, prediction=p), data, zero, uni7, D),
        ("isotropic", lambda p: IsotropicGMM(mu, 0.5, pri, prediction=p), mu,
         0.5 * torch.eye(D, dtype=F64).expand(K, D, D), pri, D),
        ("partial_all", lambda p: PartialMemorizingDenoiser(data, 10, prediction=p), data, zero,
         uni7, D),
        ("lowrank", lambda p: LowRankGMM(mu, U, pri, prediction=p), mu, lr_cov, pri, D),
        ("lowrank_learnable", lambda p: LearnableLowRankGMM(mu, U, pri, prediction=p), mu, lr_cov,
         pri, D),
        ("colored", lambda p: ColoredTemplates(temps, cm, 0.7, prediction=p), cmeans, ccovs, uni3,
         C * H * W),
        ("colored_learnable", lambda p: LearnableColoredTemplates(temps, cm, 0.7, prediction=p),
         cmeans, ccovs, uni3, C * H * W),
    ]


CASES = cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fields_and_log_prob_match_dense_oracle(case):
    """Every prediction type (x0 converted by from_x0) and log p_t, scalar and per-sample t."""
    name, build, means, covs, priors, D = case
    models = {p: build(p) for p in FIELDS}
    x = 1.5 * torch.randn(5, D, generator=gen(2), dtype=F64)
    for t in (*TS, torch.tensor(TS, dtype=F64)):
        ref_x0, ref_logp = naive(x, t, means, covs, priors)
        with torch.no_grad():
            for p, model in models.items():
                want = from_x0(p, ref_x0, x, t, VP())
                got = model(x, t)
                atol = 1e-7 * (1 + want.abs().max())
                assert torch.allclose(got, want, rtol=1e-7, atol=atol), (t, p)
            if name != "partial_all":
                logp = models["x0"].log_prob(x, t)
                assert torch.allclose(logp, ref_logp, rtol=1e-9, atol=1e-8), t


def test_float32_small_t_keeps_precision():
    g = gen(4)
    mu = 3 * torch.randn(3, 20, generator=g, dtype=F64)
    U = 0.5 * torch.randn(3, 20, 2, generator=g, dtype=F64)
    x = (0.9999995 * mu[1] + 0.001 * torch.randn(20, generator=g, dtype=F64))[None].repeat(2, 1)
    mu, U, x = mu.float(), U.float(), x.float()      # same rounded inputs for both
    want = LowRankGMM(mu.double(), U.double()).log_prob(x.double(), 0.001)
    got = LowRankGMM(mu, U).log_prob(x, 0.001)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    want = LowRankGMM(mu.double(), U.double())(x.double(), 0.001)
    assert torch.allclose(LowRankGMM(mu, U)(x, 0.001).double(), want, rtol=1e-5, atol=1e-5)


def test_colored_float32_small_t_keeps_precision():
    g = gen(41)
    temps = (torch.rand(3, 5, 5, generator=g, dtype=F64) + 0.5).float().double()
    cm = (2 * torch.randn(3, 3, generator=g, dtype=F64)).float().double()
    gt = ColoredTemplates(temps, cm, 1.0)
    x0, _ = gt.sample(4, gen(42))
    x = (0.9999995 * x0 + 0.001 * torch.randn(x0.shape, generator=g, dtype=F64)).float().double()
    low = ColoredTemplates(temps.float(), cm.float(), 1.0)
    assert torch.allclose(low.log_prob(x.float(), 0.001).double(), gt.log_prob(x, 0.001), rtol=1e-5)
    assert torch.allclose(low(x.float(), 0.001).double(), gt(x, 0.001), rtol=1e-5, atol=1e-5)


def test_colored_equals_lowrank_with_template_factors():
    g = gen(5)
    K, C, H, W = 3, 3, 4, 4
    temps = torch.rand(K, H, W, generator=g, dtype=F64)
    cm = torch.randn(K, C, generator=g, dtype=F64)
    eye = torch.eye(C, dtype=F64)
    U = torch.stack([math.sqrt(2.0) * torch.kron(eye, tk.reshape(-1, 1)) for tk in temps])
    means = (cm[:, :, None] * temps.reshape(K, 1, -1)).reshape(K, -1)
    x = torch.randn(6, C * H * W, generator=g, dtype=F64)
    t = torch.linspace(0.01, 0.99, 6, dtype=F64)
    col, low = ColoredTemplates(temps, cm, 2.0), LowRankGMM(means, U)
    assert torch.allclose(col(x.reshape(6, C, H, W), t).reshape(6, -1), low(x, t), atol=1e-10)
    assert torch.allclose(col.log_prob(x, t), low.log_prob(x, t), atol=1e-8)


def test_reference_logdet_misses_factor_c():
    g = gen(6)
    C, H, W = 3, 3, 3
    temp = torch.rand(1, H, W, generator=g, dtype=F64) + 0.2
    cm = torch.randn(1, C, generator=g, dtype=F64)
    x = torch.randn(4, C * H * W, generator=g, dtype=F64)
    t, v = 0.4, 0.8
    good = ColoredTemplates(temp, cm, v).log_prob(x, t)
    ref = ColoredTemplates(temp, cm, v, logdet="reference").log_prob(x, t)
    a2, s2, tau = 1 - t * t, t * t, float(temp.square().sum())
    # log p = -(q + L)/2 + const: the reference L lacks (C - 1) log(1 + alpha^2 v tau / sigma^2).
    gap = 0.5 * (C - 1) * math.log1p(a2 * v * tau / s2)
    assert torch.allclose(ref - good, torch.full_like(good, gap))
    # With templates of different norms the posteriors differ too.
    temps = torch.stack([temp[0], 3 * temp[0]])
    cm2 = torch.zeros(2, C, dtype=F64)
    y = torch.randn(4, C, H, W, generator=g, dtype=F64)
    assert not torch.allclose(ColoredTemplates(temps, cm2, v)(y, t),
                              ColoredTemplates(temps, cm2, v, logdet="reference")(y, t))


def test_partial_fixed_subset_and_redraw():
    data = torch.randn(30, 2, 2, generator=gen(7), dtype=F64)
    x = torch.randn(4, 2, 2, generator=gen(8), dtype=F64)
    full = EmpiricalDenoiser(data)
    assert torch.equal(PartialMemorizingDenoiser(data, 30)(x, 0.3), full(x, 0.3))
    a = PartialMemorizingDenoiser(data, 5, generator=gen(9))
    b = PartialMemorizingDenoiser(data, 5, generator=gen(9))
    c = PartialMemorizingDenoiser(data, 5, generator=gen(10))
    assert a.subset.shape == (5,) and a.subset.unique().numel() == 5
    assert torch.equal(a.subset, b.subset) and not torch.equal(a.subset, c.subset)
    assert torch.allclose(a(x, 0.3), EmpiricalDenoiser(data[a.subset])(x, 0.3), atol=1e-12)
    assert torch.allclose(a.log_prob(x, 0.3), EmpiricalDenoiser(data[a.subset]).log_prob(x, 0.3))
    r = PartialMemorizingDenoiser(data, 5, generator=gen(9), redraw_per_t=True)
    r2 = PartialMemorizingDenoiser(data, 5, generator=gen(9), redraw_per_t=True)
    assert r.subset is None
    assert torch.equal(r.subset_at(0.3), r2.subset_at(0.3))
    assert torch.equal(r.subset_at(0.3), r.subset_at(torch.tensor(0.3, dtype=torch.float32)))
    assert not torch.equal(r.subset_at(0.3), r.subset_at(0.5))
    t = torch.tensor([0.3, 0.5, 0.3, 0.5], dtype=F64)
    got = r(x, t)
    for tv in (0.3, 0.5):
        rows = t == tv
        want = EmpiricalDenoiser(data[r.subset_at(tv)])(x[rows], tv)
        assert torch.allclose(got[rows], want, atol=1e-12)


def test_learnable_lowrank_init_and_gradients():
    data = torch.randn(8, 5, generator=gen(11))
    for strategy in ("gaussian", "sphere", "pmem"):
        m = LearnableLowRankGMM.initialize(strategy, 6, 2, data=data, cov_scale=0.25,
                                           generator=gen(12), prediction="eps")
        assert m.means.shape == (6, 5) and m.factors.shape == (6, 5, 2)
        assert math.isclose(float(m.factors.detach().norm()), 0.5, rel_tol=1e-5)
    assert all(any(torch.equal(row, d) for d in data) for row in m.means)     # pmem rows are data
    sphere = LearnableLowRankGMM.initialize("sphere", 3, 1, dim=4, means_scale=2.0,
                                            generator=gen(1))
    assert torch.allclose(sphere.means.norm(dim=1), torch.full((3,), 2.0))
    gt = LowRankGMM(torch.randn(3, 5), torch.randn(3, 5, 2))
    prior = LearnableLowRankGMM.initialize("prior", 3, 2, ground_truth=gt, generator=gen(1))
    assert torch.equal(prior.factors, gt.factors)
    x = torch.randn(4, 5, generator=gen(13))
    loss = m(x, torch.tensor([0.1, 0.4, 0.7, 0.9])).square().sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_learnable_colored_init_and_gradients():
    from diffmem.data.templates import make_template_data

    d = make_template_data(components=3, samples=12, seed=0, size=5, channels=3)
    gt = d.ground_truth()
    m = LearnableColoredTemplates.initialize("pmem", 8, data=d.train, labels=d.train_labels,
                                             ground_truth=gt, generator=gen(2), prediction="eps")
    assert math.isclose(float(m.color_std.detach()), 1e-3, rel_tol=1e-5)        # sqrt of 1e-6
    # PMEM recovers each chosen sample exactly: color_means (x) template reproduces data rows.
    rebuilt = m.color_means[:, :, None, None] * m.templates[:, None]
    assert all(any(torch.allclose(row, s, atol=1e-5) for s in d.train) for row in rebuilt)
    ref = LearnableColoredTemplates(m.templates, m.color_means, 1e-6, std_init="reference")
    assert float(ref.color_std.detach()) == pytest.approx(1e-6)
    for strategy in ("gaussian", "sphere", "prior"):
        s = LearnableColoredTemplates.initialize(strategy, 4, ground_truth=gt, generator=gen(3))
        assert s.templates.shape == (4, 5, 5) and s.color_means.shape == (4, 3)
    m(d.train[:4], torch.tensor([0.1, 0.3, 0.6, 0.9])).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_sampling_shapes_and_moments():
    temps = torch.rand(2, 3, 3, generator=gen(14), dtype=F64) + 0.5
    gt = ColoredTemplates(temps, torch.tensor([[1.0, -1.0], [2.0, 0.0]], dtype=F64), 0.25)
    x, y = gt.sample(4000, gen(15))
    assert x.shape == (4000, 2, 3, 3) and y.shape == (4000,)
    colors = x[:, :, 0, 0] / temps[y][:, 0, 0, None]
    assert torch.allclose(colors[y == 0].mean(0), torch.tensor([1.0, -1.0], dtype=F64), atol=0.05)
    assert abs(float(colors[y == 0].var(0).mean()) - 0.25) < 0.03
    low = LowRankGMM(torch.zeros(2, 4), torch.randn(2, 4, 1, generator=gen(16)))
    s, lab = low.sample(10, gen(17))
    assert s.shape == (10, 4) and lab.shape == (10,)


def test_template_data_shapes_range_determinism():
    from diffmem.data.templates import make_template_data

    d = make_template_data(components=4, samples=20, seed=3, val_samples=7)
    assert d.train.shape == (20, 3, 15, 15) and d.val.shape == (7, 3, 15, 15)
    assert d.train_labels.shape == (20,) and d.templates.shape == (4, 15, 15)
    assert float(d.templates.min()) == 0.0 and float(d.templates.max()) == 1.0
    assert torch.equal(d.color_means, torch.zeros(4, 3)) and d.color_var == 1.0
    e = make_template_data(components=4, samples=20, seed=3, val_samples=7)
    f = make_template_data(components=4, samples=20, seed=4, val_samples=7)
    assert torch.equal(d.train, e.train) and torch.equal(d.templates, e.templates)
    assert not torch.equal(d.train, f.train) and torch.equal(d.templates, f.templates)
    own = make_template_data(samples=5, templates=torch.rand(2, 6, 6, generator=gen(1)), size=4)
    assert own.templates.shape == (2, 4, 4) and own.train.shape == (5, 3, 4, 4)


def test_bad_inputs_raise_clear_errors():
    mu, U = torch.randn(3, 4), torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="factors"):
        LowRankGMM(mu, torch.randn(3, 5, 2))
    with pytest.raises(TypeError, match="means"):
        LowRankGMM([[0.0]], U)
    with pytest.raises(ValueError, match="priors"):
        LowRankGMM(mu, U, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="strategy"):
        LearnableLowRankGMM.initialize("bogus", 3, 2, dim=4)
    with pytest.raises(ValueError, match="data"):
        LearnableLowRankGMM.initialize("pmem", 3, 2)
    with pytest.raises(ValueError, match="t must"):
        LowRankGMM(mu, U).log_prob(torch.randn(2, 4), 1.5)
    temps, cm = torch.rand(2, 3, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="color_means"):
        ColoredTemplates(temps, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="logdet"):
        ColoredTemplates(temps, cm, logdet="wrong")
    with pytest.raises(ValueError, match="color_var"):
        ColoredTemplates(temps, cm, -1.0)
    with pytest.raises(ValueError, match="nonzero"):
        ColoredTemplates(torch.zeros(2, 3, 3), cm)
    with pytest.raises(ValueError, match="std_init"):
        LearnableColoredTemplates(temps, cm, std_init="var")
    with pytest.raises(ValueError, match="ground_truth"):
        LearnableColoredTemplates.initialize("pmem", 2, data=torch.rand(4, 3, 3, 3))
    with pytest.raises(ValueError, match="m must"):
        PartialMemorizingDenoiser(torch.randn(5, 2), 0)
    with pytest.raises(TypeError, match="data"):
        PartialMemorizingDenoiser([[1.0]], 1)
    with pytest.raises(TypeError, match="generator"):
        PartialMemorizingDenoiser(torch.randn(5, 2), 2, generator=3)
    from diffmem.data.templates import make_template_data

    with pytest.raises(ValueError, match="samples"):
        make_template_data(samples=0)
    with pytest.raises(ValueError, match="color_var"):
        make_template_data(color_var=0.0)
    with pytest.raises(ValueError, match="components"):
        make_template_data(components=5000)
    with pytest.raises(ValueError, match="images"):
        make_template_data(templates=torch.rand(2, 3))


def test_structured_posteriors_gradcheck():
    from diffmem.denoisers.lowrank import lowrank_posterior
    from diffmem.denoisers.templates import templates_posterior

    g = gen(20)
    x = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    mu = torch.randn(2, 4, generator=g, dtype=F64, requires_grad=True)
    U = torch.randn(2, 4, 2, generator=g, dtype=F64, requires_grad=True)
    pri = torch.tensor([0.4, 0.6], dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    assert torch.autograd.gradcheck(lambda *a: lowrank_posterior(a[0], t, VP(), a[1], a[2], pri),
                                    (x, mu, U))
    xc = torch.randn(3, 2 * 4, generator=g, dtype=F64, requires_grad=True)
    T = (torch.rand(2, 2, 2, generator=g, dtype=F64) + 0.3).requires_grad_()
    cm = torch.randn(2, 2, generator=g, dtype=F64, requires_grad=True)
    v = torch.tensor(0.6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: templates_posterior(a[0], t, VP(), *a[1:]),
                                    (xc, T, cm, v))


def test_template_data_save_load(tmp_path):
    from diffmem.data.templates import TemplateData, make_template_data

    d = make_template_data(components=2, samples=4, seed=1, size=6, val_samples=2)
    d.save(tmp_path / "d.npz")
    e = TemplateData.load(tmp_path / "d.npz")
    assert torch.equal(d.train, e.train) and torch.equal(d.templates, e.templates)
    assert e.color_var == d.color_var and e.seed == d.seed
