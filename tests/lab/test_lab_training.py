"""The learnable GMMs, the optimizer chain and schedule of the paper, and the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.denoisers import IsotropicGMM
from diffmem.denoisers.learnable import (
    LearnableGMM,
    SplitLearnableGMM,
    grid_index,
    init_gaussian,
    init_pmem,
    init_prior,
    init_sphere,
    initialize,
)
from diffmem.diffusion import time_grid
from diffmem.training import (
    ReferenceOptimizer,
    TrainedGMM,
    TrainedTemplates,
    eps_losses,
    load_models,
    model_seed,
    save_models,
    train_gmm_models,
    train_template_model,
    wsd_schedule,
)
from diffmem.training.checkpoint import load_state, remove_state, save_state

# ----------------------------------------------------------------------------- optimizer chain

def test_optimizer_matches_hand_computed_steps():
    """p0 = (1, -2); g0 = (0.5, -1), lr(0) = 0; g1 = (1, 2), lr(1) = 0.01.

    Step 0: m = 0.1 g0 = (0.05, -0.1), v = 0.001 g0^2 = (2.5e-4, 1e-3), u = -0 * ... = 0, so
    e = 0 and the applied update is exactly 0.
    Step 1 (n = 2): m = 0.9 m + 0.1 g1 = (0.145, 0.11); v = 0.999 v + 0.001 g1^2
    = (0.00124975, 0.004999); m_hat = m / 0.19 = (0.763157894736842, 0.578947368421053);
    v_hat = v / 0.001999 = (0.625187593796907, 2.500750375187628);
    u = -0.01 m_hat / (sqrt(v_hat) + 1e-8) = (-0.009651820136149, -0.003661035247207);
    e = 0.99 * 0 + 0.01 u; applied = e / (1 - 0.99^2) = (-0.004850160872437, -0.001839716204627).
    """
    p = torch.tensor([1.0, -2.0], dtype=torch.float64)
    opt = ReferenceOptimizer([p], lambda k: [0.0, 0.01][k])
    p.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p, torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(opt.m[0], torch.tensor([0.05, -0.1], dtype=torch.float64))
    torch.testing.assert_close(opt.v[0], torch.tensor([2.5e-4, 1e-3], dtype=torch.float64))
    p.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(opt.m[0], torch.tensor([0.145, 0.11], dtype=torch.float64))
    torch.testing.assert_close(opt.v[0], torch.tensor([0.00124975, 0.004999], dtype=torch.float64))
    expected = torch.tensor([1 - 0.004850160872437, -2 - 0.001839716204627], dtype=torch.float64)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-14)
    assert opt.count == 2


def test_optimizer_clips_each_model_by_its_own_norm():
    """Adam's first update is -lr * g/|g| per element (sign), so clipping is invisible in the
    update; check it on the first moment instead: m = 0.1 * clipped g."""
    a = torch.zeros(2, 2)  # 2 models
    b = torch.zeros(2)
    opt = ReferenceOptimizer([a, b], 1.0, clip=5.0, per_model=True)
    a.grad = torch.tensor([[3.0, 0.0], [30.0, 0.0]])
    b.grad = torch.tensor([4.0, 40.0])  # norms 5 (kept: not < 5 -> scaled by 5/5) and 50
    opt.step()
    torch.testing.assert_close(opt.m[0], 0.1 * torch.tensor([[3.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(opt.m[1], 0.1 * torch.tensor([4.0, 4.0]))
    glob = ReferenceOptimizer([torch.zeros(2, 2), torch.zeros(2)], 1.0, clip=5.0)
    glob.params[0].grad, glob.params[1].grad = a.grad, b.grad
    glob.step()  # one norm over both "models": sqrt(25 + 2500)
    torch.testing.assert_close(glob.m[1], 0.1 * b.grad * 5.0 / (2525.0 ** 0.5))


def test_optimizer_state_roundtrip():
    p = torch.ones(3)
    opt = ReferenceOptimizer([p], 0.1)
    p.grad = torch.tensor([1.0, -1.0, 2.0])
    opt.step()
    q = torch.ones(3)
    other = ReferenceOptimizer([q], 0.1)
    other.load_state(opt.state())
    q.copy_(p)
    p.grad = q.grad = torch.tensor([0.5, 0.5, 0.5])
    opt.step()
    other.step()
    assert torch.equal(p, q)


# ----------------------------------------------------------------------------- schedule

def test_wsd_schedule_values():
    S, W, D = 50_000, 5_000, 45_000
    lr = lambda k: wsd_schedule(k, S, W, D, 0.0, 1e-3, 1e-6)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(2500) == pytest.approx(5e-4, rel=1e-12)
    assert lr(5000) == pytest.approx(1e-3, rel=1e-12)
    assert lr(27500) == pytest.approx(5.005e-4, rel=1e-12)
    assert lr(49999) == pytest.approx(1e-3 - 0.999e-3 * 44999 / 45000, rel=1e-12)
    assert lr(49999) == pytest.approx(1.022e-6, rel=1e-3)
    # with a stable phase: constant peak in [W, S - D)
    assert wsd_schedule(50, 100, 10, 40, 0.0, 1.0, 0.0) == 1.0
    assert wsd_schedule(80, 100, 10, 40, 0.0, 1.0, 0.0) == pytest.approx(0.5)
    assert wsd_schedule(5, 10, 0, 10, 0.0, 1.0, 0.0) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- models

def _points(seed=0, n=6, d=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_learnable_matches_isotropic_gmm(prediction):
    means, std = _points(0), 0.7
    x = _points(1, 9)
    t = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    ref = IsotropicGMM(means, std ** 2, prediction=prediction)(x, t)
    single = LearnableGMM(means, std, prediction=prediction)
    torch.testing.assert_close(single(x, t), ref)
    torch.testing.assert_close(single(x, 0.3), IsotropicGMM(means, std ** 2,
                                                            prediction=prediction)(x, 0.3))
    # batched: model 1 is model 0 padded with two masked (far away) components
    pad = torch.cat([means, 100 + means[:2]])
    mask = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])
    other = torch.cat([means, _points(2, 2)])
    both = LearnableGMM(torch.stack([pad, other]), torch.tensor([std, 0.2]), mask=mask,
                        prediction=prediction)
    out = both(x, t)
    assert out.shape == (2, 9, 3)
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(out[1], IsotropicGMM(other, 0.04, prediction=prediction)(x, t))
    # per-model queries (G, B, d) with per-model times (G, B)
    xs, ts = torch.stack([x, x.flip(0)]), torch.stack([t, t.flip(0)])
    other_ref = IsotropicGMM(other, 0.04, prediction=prediction)(x.flip(0), t.flip(0))
    torch.testing.assert_close(both(xs, ts)[1], other_ref)
    torch.testing.assert_close(both.denoiser(0, prediction)(x, t), ref)


def test_learnable_gradients_flow_to_means_and_std():
    model = LearnableGMM(_points(0).float(), 0.5)
    model(_points(1, 4).float(), torch.full((4,), 0.4)).pow(2).sum().backward()
    assert model.means.grad.abs().sum() > 0 and model.std.grad.abs() > 0


def test_split_by_t_indexing_and_clip_fix():
    ts = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    t = torch.tensor([0.95, 0.9, 0.7, 0.5, 0.3, 0.1, 0.05, 0.001], dtype=torch.float64)
    assert grid_index(t, ts).tolist() == [0, 0, 1, 1, 2, 2, 2, 2]  # below the grid: T-1
    # T = 3 grids with M = 5 components: t below the grid must use the last time's parameters
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    std = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)
    model = SplitLearnableGMM(means, std, ts)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    out = model(x, t)
    for b, i in enumerate(grid_index(t, ts).tolist()):
        ref = IsotropicGMM(means[i], std[i] ** 2, prediction="eps")(x[b:b + 1], t[b:b + 1])
        torch.testing.assert_close(out[b:b + 1], ref)
    assert SplitLearnableGMM(torch.zeros(26, 2, 2), torch.ones(26)).ts.shape == (26,)


# ----------------------------------------------------------------------------- init

def test_pmem_init_reproduces_data_points():
    X = _points(0, 10, 4).float()
    g = torch.Generator().manual_seed(1)
    means, std = init_pmem(X, 7, generator=g)
    assert std == pytest.approx(1e-3)
    rows = [int((X == m).all(1).nonzero()) for m in means]  # each mean is exactly a data row
    assert len(set(rows)) == 7  # without replacement
    big, _ = init_pmem(X, 13, generator=g)
    assert torch.equal(big[:10], X)  # all N points, then M - N extra data points
    assert all(bool((X == m).all(1).any()) for m in big[10:])
    noisy, _ = init_pmem(X, 7, generator=torch.Generator().manual_seed(1), noise_var=0.01)
    torch.testing.assert_close(noisy, means, atol=0.6, rtol=0)  # 6 sigma
    assert not torch.equal(noisy, means)


def test_other_inits():
    g = torch.Generator().manual_seed(0)
    m, std = init_sphere(5, 4, generator=g, means_scale=2.0, init_var=0.25)
    torch.testing.assert_close(m.norm(dim=1), torch.full((4,), 2.0))
    assert std == 0.5
    m, _ = init_gaussian(100, 50, generator=g, means_scale=3.0)
    assert abs(float(m.norm(dim=1).mean()) - 3.0) < 0.3
    gt = IsotropicGMM(torch.randn(3, 2, generator=g), 4.0)
    m, std = init_prior(gt, 7, generator=g)  # M != K works
    assert m.shape == (7, 2) and std == 2.0
    m, std = initialize("sphere", 3, data=torch.zeros(5, 16), generator=g)
    torch.testing.assert_close(m.norm(dim=1), torch.full((3,), 4.0))


# ----------------------------------------------------------------------------- training

def _toy_data(N=12, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = IsotropicGMM(3 * torch.randn(3, d, generator=g), 1.0)
    return gt.sample(N, generator=g)[0].float()


KW = dict(steps=5, warmup=2, draws=4, seed=3, peak_lr=1e-2)


def test_fused_eps_losses_match_model_field():
    """eps_losses (fused residual with a hand-written backward) equals the plain formula
    mean ||model(x_t, t) - eps||^2 summed over dims, value and gradients, in float64."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    means = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    t = time_grid(dtype=torch.float64)[torch.randint(0, 26, (2, 5), generator=g)]
    noise = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64)
    fused = LearnableGMM(means, torch.tensor([0.3, 0.6], dtype=torch.float64), mask=mask)
    plain = LearnableGMM(means, torch.tensor([0.3, 0.6], dtype=torch.float64), mask=mask)
    loss = eps_losses(fused, X, t, noise)
    x_t = (1 - t * t).sqrt()[..., None, None] * X[:, None, :] + t[..., None, None] * noise
    tq = t[..., None].expand(2, 5, 3).reshape(2, 15)
    eps_hat = plain(x_t.reshape(2, 15, 3), tq)
    ref = (eps_hat - noise.reshape(2, 15, 3)).pow(2).sum(-1).mean(-1)
    torch.testing.assert_close(loss, ref)
    (loss * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()
    (ref * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(fused.means.grad, plain.means.grad)
    torch.testing.assert_close(fused.std.grad, plain.std.grad)


def test_eps_losses_match_diffusion_dsm_loss():
    """Cross-check with diffmem.diffusion.loss.dsm_loss (same noise stream: (N, R, d) order)."""
    from diffmem.diffusion.loss import dsm_loss

    X = _toy_data(N=6, d=3).double()
    model = LearnableGMM(X[:4], 0.2)
    t = time_grid(dtype=torch.float64)[torch.tensor([0, 5, 12, 20, 25, 3])]
    noise = torch.randn(1, 6, 7, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = eps_losses(LearnableGMM(X[:4][None], 0.2), X, t[None], noise)
    theirs = dsm_loss(model, X, t, draws=7, target="eps",
                      generator=torch.Generator().manual_seed(5)).mean()
    torch.testing.assert_close(ours[0], theirs)


def test_batched_training_equals_one_by_one_reference_backend():
    """With the reference backend, padding with masked components changes no arithmetic
    (exp(-inf) adds exact zeros and per-model reductions are independent): bitwise equal."""
    X, sizes = _toy_data(), [3, 8, 12, 15]
    batched = train_gmm_models(X, sizes, backend="reference", **KW)
    for M in sizes:
        alone = train_gmm_models(X, [M], backend="reference", **KW)[M]
        assert torch.equal(alone.means, batched[M].means)
        assert alone.std == batched[M].std
        assert torch.equal(alone.losses, batched[M].losses)


def test_batched_training_close_to_one_by_one_cpu_backend():
    """The CPU kernel's reduction order depends on the padded N, so results differ by float32
    rounding, amplified by the conditioning of the loss: at t = 0.001 the eps prediction is
    sigma (x - alpha mu_bar) / s with |x| ~ 5 and x - alpha mu_bar ~ 1e-3, i.e. ~1e-4 relative
    rounding in each gradient, which Adam (update ~ lr * m / sqrt(v)) and the tiny-variance
    dynamics amplify. Required: agreement within 1% of one step size (lr = 1e-2), i.e. 1e-4;
    measured after 5 steps: 4e-5 on means, 3.5e-5 on std. (The reference backend is bitwise
    equal: see the test above.)"""
    X, sizes = _toy_data(), [3, 8, 15]
    batched = train_gmm_models(X, sizes, **KW)
    for M in sizes:
        alone = train_gmm_models(X, [M], **KW)[M]
        torch.testing.assert_close(alone.means, batched[M].means, rtol=0, atol=1e-4)
        assert alone.std == pytest.approx(batched[M].std, rel=0, abs=1e-4)


def test_training_is_deterministic_and_uses_lr_zero_first():
    X = _toy_data()
    a = train_gmm_models(X, [4, 6], **KW)
    b = train_gmm_models(X, [4, 6], **KW)
    assert all(torch.equal(a[M].means, b[M].means) and a[M].std == b[M].std for M in (4, 6))
    one = train_gmm_models(X, [4], **{**KW, "steps": 1, "warmup": 1})[4]
    init, std = init_pmem(X, 4, generator=torch.Generator().manual_seed(model_seed(3, 4)))
    assert torch.equal(one.means, init) and one.std == pytest.approx(std)


def test_short_training_decreases_loss():
    X = _toy_data(N=20, d=4, seed=1)
    seen = []
    res = train_gmm_models(X, [5], steps=60, warmup=5, draws=8, seed=0, peak_lr=0.05,
                           progress=lambda k, S, loss: seen.append((k, S, float(loss[0]))))
    assert [k for k, _, _ in seen] == list(range(60)) and seen[0][1] == 60
    losses = res[5].losses
    assert float(losses[-10:].mean()) < 0.5 * float(losses[:10].mean())
    assert res[5].std > 1e-3  # the variance grows from its tiny init
    assert res[5].denoiser("eps")(X, 0.5).shape == X.shape


def test_resume_from_checkpoint_equals_uninterrupted_training():
    """Train 9 steps straight vs 4 steps, checkpoint, then a new call from that state: bitwise
    equal parameters and losses (cpu backend, same thread count)."""
    X, kw = _toy_data(), {**KW, "steps": 9, "warmup": 2}
    straight = train_gmm_models(X, [3, 7], **kw)
    saved = []

    class Stop(Exception):
        pass

    def keep(state):
        saved.append(state)
        if state["step"] == 4:
            raise Stop

    with pytest.raises(Stop):
        train_gmm_models(X, [3, 7], checkpoint=keep, checkpoint_every=2, **kw)
    assert [s["step"] for s in saved] == [2, 4] and saved[1]["losses"].shape == (2, 4)
    resumed = train_gmm_models(X, [3, 7], resume_state=saved[1], **kw)
    for M in (3, 7):
        assert torch.equal(resumed[M].means, straight[M].means)
        assert resumed[M].std == straight[M].std
        assert torch.equal(resumed[M].losses, straight[M].losses)
    with pytest.raises(ValueError, match="resume_state is for"):
        train_gmm_models(X, [3, 8], resume_state=saved[1], **kw)
    every = []  # checkpoint_seconds=0: after every step but the last
    train_gmm_models(X, [3], checkpoint=lambda s: every.append(s["step"]), checkpoint_seconds=0,
                     **kw)
    assert every == list(range(1, 9))


def test_save_load_models(tmp_path):
    """One persister for every trained-model type: exact round trip, type checked on load."""
    res = train_gmm_models(_toy_data(), [3, 5], **{**KW, "steps": 2})
    path = tmp_path / "models.npz"
    save_models(path, res)
    back = load_models(path, TrainedGMM)
    for M in (3, 5):
        assert torch.equal(back[M].means, res[M].means) and back[M].std == res[M].std
        assert torch.equal(back[M].losses, res[M].losses)
        assert back[M].means.dtype == res[M].means.dtype and back[M].size == M
    from diffmem.data.templates import make_template_data

    data = make_template_data(2, 12, 3, size=5, val_samples=2)
    tm = {4: train_template_model(data, 4, steps=2, warmup=1, draws=2, seed=7)}
    save_models(path, tm)
    tback = load_models(path, TrainedTemplates)[4]
    assert torch.equal(tback.templates, tm[4].templates) and tback.color_std == tm[4].color_std
    assert torch.equal(tback.color_means, tm[4].color_means)
    assert torch.equal(tback.losses, tm[4].losses) and tback.losses.dtype == torch.float64
    with pytest.raises(ValueError, match="TrainedTemplates models, not TrainedGMM"):
        load_models(path, TrainedGMM)
    assert load_models(tmp_path / "none.npz", TrainedGMM) == {}
    np.savez(tmp_path / "old.npz", means_3=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no metadata"):
        load_models(tmp_path / "old.npz", TrainedGMM)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_training_state_file_round_trip(tmp_path):
    """A checkpoint written to a run folder resumes a run exactly like the in-memory state."""
    X = _toy_data()
    kw = {**KW, "steps": 6}
    saved = []
    straight = train_gmm_models(X, [3, 4], **kw)
    train_gmm_models(X, [3, 4], checkpoint=saved.append, checkpoint_every=4, **kw)
    save_state(tmp_path, saved[0])
    state = load_state(tmp_path)
    assert state["step"] == 4 and state["sizes"] == [3, 4]
    resumed = train_gmm_models(X, [3, 4], resume_state=state, **kw)
    for M in (3, 4):
        assert torch.equal(resumed[M].means, straight[M].means)
        assert torch.equal(resumed[M].losses, straight[M].losses)
    remove_state(tmp_path)
    assert load_state(tmp_path) is None


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    X = _toy_data()
    with pytest.raises(ValueError, match="sizes must be distinct"):
        train_gmm_models(X, [3, 3], steps=2, warmup=1)
    with pytest.raises(TypeError, match="sizes"):
        train_gmm_models(X, 3, steps=2, warmup=1)
    with pytest.raises(ValueError, match="warmup \\+ decay"):
        train_gmm_models(X, [3], steps=2, warmup=3)
    with pytest.raises(ValueError, match="init must be one of"):
        train_gmm_models(X, [3], steps=2, warmup=1, init="bogus")
    with pytest.raises(ValueError, match="data must be"):
        train_gmm_models(X[0], [3], steps=2, warmup=1)
    with pytest.raises(TypeError, match="steps"):
        train_gmm_models(X, [3], steps=2.0, warmup=1)
    with pytest.raises(ValueError, match="draws"):
        train_gmm_models(X, [3], steps=2, warmup=1, draws=0)
    with pytest.raises(ValueError, match="grid times must lie in"):
        train_gmm_models(X, [3], steps=2, warmup=1, grid=torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="means must have"):
        LearnableGMM(torch.zeros(3), 1.0)
    with pytest.raises(TypeError, match="means must be a torch.Tensor"):
        LearnableGMM([[0.0]], 1.0)
    with pytest.raises(ValueError, match="std must be"):
        LearnableGMM(torch.zeros(2, 3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="mask must keep"):
        LearnableGMM(torch.zeros(2, 3, 4), 1.0, mask=torch.tensor([[True] * 3, [False] * 3]))
    with pytest.raises(ValueError, match="mask must have shape"):
        LearnableGMM(torch.zeros(2, 3, 4), 1.0, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="prediction"):
        LearnableGMM(torch.zeros(3, 4), 1.0, prediction="noise")
    model = LearnableGMM(torch.zeros(3, 4), 1.0)
    with pytest.raises(ValueError, match="x_t must have shape"):
        model(torch.zeros(5, 3), 0.5)
    with pytest.raises(ValueError, match="t must"):
        model(torch.zeros(5, 4), 1.5)
    with pytest.raises(ValueError, match="t must be a scalar or broadcast"):
        model(torch.zeros(5, 4), torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="init_var"):
        init_pmem(X, 3, init_var=0.0)
    with pytest.raises(TypeError, match="generator"):
        init_pmem(X, 3, generator=0)
    with pytest.raises(ValueError, match="strategy 'prior' needs gt"):
        initialize("prior", 3)
    with pytest.raises(ValueError, match="ts must be strictly descending"):
        SplitLearnableGMM(torch.zeros(3, 2, 2), 1.0, ts=torch.tensor([0.1, 0.5, 0.9]))
    with pytest.raises(ValueError, match="warmup \\+ decay"):
        wsd_schedule(0, 10, 6, 6)
    with pytest.raises(TypeError, match="params"):
        ReferenceOptimizer([], 0.1)
    with pytest.raises(ValueError, match="clip"):
        ReferenceOptimizer([torch.zeros(1)], 0.1, clip=0.0)
    with pytest.raises(ValueError, match="per_model"):
        ReferenceOptimizer([torch.zeros(2), torch.zeros(3)], 0.1, per_model=True)
    assert time_grid().shape == (26,)
