"""Training the learnable GMMs as the paper does (SPEC D.1-D.2, F.1-F.5).

``train_gmm_models``: full-batch training of one GMM per size M, all sizes batched into one
padded ``LearnableGMM``; each model's randomness comes from its own generator seeded by
(seed, M), so batched training equals training the sizes one by one. It can hand out its state
mid-run (``checkpoint``) and continue from it (``resume_state``) with identical results.
``TrainedGMM`` is one trained model; ``eps_losses`` the batched DSM loss it minimizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..denoisers.gmm import IsotropicGMM
from ..denoisers.learnable import INIT_STRATEGIES, LearnableGMM, initialize
from ..diffusion.processes import VP, Process, time_grid
from .checkpoint import Checkpointer, load_training_state, training_state
from .common import check_finite, check_int, check_sizes, model_seed
from .optim import ReferenceOptimizer, wsd_schedule


@dataclass
class TrainedGMM:
    """One trained model: size M, means (M, d), std, and the training loss before each step
    (steps,), EPS units."""

    size: int
    means: torch.Tensor
    std: float
    losses: torch.Tensor

    def denoiser(self, prediction: str = "x0", **kwargs) -> IsotropicGMM:
        """The trained model as a fixed IsotropicGMM (variance std^2, uniform priors)."""
        return IsotropicGMM(self.means, self.std ** 2, prediction=prediction, **kwargs)


class _SquaredResidual(torch.autograd.Function):
    """||c x - a m - n||^2 over the last dim in one pass, gradients for c, a and m only.

    c, a: (G, Q, 1); x, m, n: (G, Q, d) -> (G, Q). Saves r = c x - a m - n, x and m.
    """

    @staticmethod
    def forward(ctx, c, a, x, m, n):
        r = c * x
        r.sub_(n).addcmul_(a, m, value=-1)
        ctx.save_for_backward(c, a, x, m, r)
        return _rowwise_dot(r, r)

    @staticmethod
    def backward(ctx, grad):
        c, a, x, m, r = ctx.saved_tensors
        w = 2 * grad[..., None]                                           # (G, Q, 1)
        dc = w * _rowwise_dot(r, x)[..., None] if ctx.needs_input_grad[0] else None
        da = -w * _rowwise_dot(r, m)[..., None] if ctx.needs_input_grad[1] else None
        dm = r * (-w * a) if ctx.needs_input_grad[3] else None
        return dc, da, None, dm, None


def _rowwise_dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_d u v over the last dim: (G, Q, d) x (G, Q, d) -> (G, Q), as the batched matmul
    einsum("gqd,gqd->gq") runs (the same sums, without einsum's parsing on every step)."""
    G, Q, d = u.shape
    return torch.bmm(u.reshape(G * Q, 1, d), v.reshape(G * Q, d, 1)).reshape(G, Q)


def eps_losses(model: LearnableGMM, data: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor, *, check_inputs: bool = True) -> torch.Tensor:
    """Per-model DSM loss in EPS units: mean over samples and draws of ||eps_hat - eps||^2
    summed over dims. data (N, d); t (G, N) per-sample times; noise (G, N, R, d) -> (G,).

    eps_hat = (sigma / s)(x_t - alpha mu_bar), computed as one fused residual.
    check_inputs=False skips softmax_mean's scan of its inputs, for callers that know data,
    noise, times and the model's parameters are finite (the training loop checks them).
    """
    G, N, R, d = noise.shape
    if t.shape != (G, N) or data.shape != (N, d) or G != model.num_models:
        raise ValueError(f"need data (N, d), t ({model.num_models}, N), noise "
                         f"({model.num_models}, N, R, d); got {tuple(data.shape)}, "
                         f"{tuple(t.shape)}, {tuple(noise.shape)}")
    alpha, sigma = model.process.alpha(t), model.process.sigma(t)          # (G, N)
    x_t = torch.addcmul((alpha[..., None] * data)[:, :, None, :], sigma[..., None, None], noise)
    s = alpha * alpha * model.variance()[:, None] + sigma * sigma          # (G, N)
    c = sigma / s
    per_query = lambda v: v[:, :, None].expand(G, N, R).reshape(G, N * R)  # noqa: E731
    x_t, noise = x_t.reshape(G, N * R, d), noise.reshape(G, N * R, d)
    mu_bar = model.posterior_mean(x_t, per_query(alpha), per_query(s), check_inputs=check_inputs)
    cq, aq = per_query(c)[..., None], per_query(alpha * c)[..., None]
    return _SquaredResidual.apply(cq, aq, x_t, mu_bar, noise).mean(-1)


def train_gmm_models(data: torch.Tensor, sizes: Sequence[int], *, steps: int, warmup: int,
                     decay: int | None = None, init_lr: float = 0.0, peak_lr: float = 1e-3,
                     final_lr: float = 1e-6, draws: int = 100, init: str = "pmem",
                     init_var: float = 1e-6, init_noise_var: float = 0.0, clip: float = 1e9,
                     ema: float = 0.99, seed: int = 0, grid: torch.Tensor | None = None,
                     process: Process | None = None, gt=None, backend: str = "auto",
                     precision: str = "exact",
                     progress: Callable[[int, int, torch.Tensor], None] | None = None,
                     checkpoint: Callable[[dict], None] | None = None,
                     checkpoint_every: int = 0, checkpoint_seconds: float | None = None,
                     resume_state: dict | None = None) -> dict[int, TrainedGMM]:
    """Train one learnable GMM per size M on data (N, d), full batch, all sizes at once.

    Each step k: every model draws per-sample grid indices (N,) uniformly from grid (default the
    26-point VP grid) and noise (N, draws, d) from its own generator seeded by model_seed(seed, M)
    (after its initialization draws), computes eps_losses, and takes one ReferenceOptimizer step
    with lr = wsd_schedule(k, steps, warmup, decay (default steps - warmup), init_lr, peak_lr,
    final_lr). progress(k, steps, losses (G,)) is called after each step. Returns {M: TrainedGMM}.

    checkpoint(state) is called after every checkpoint_every-th step and/or once
    checkpoint_seconds of wall time passed since the last call (never after the last step, see
    Checkpointer); state (see training_state) holds tensors and plain scalars only. Passing it
    back as resume_state (same data and settings) continues the run: the result equals an
    uninterrupted one, since the per-step draws come from the restored generators.

    A NaN or infinite loss or parameter stops the run with TrainingDiverged (step, size, loss).
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or not data.is_floating_point():
        raise ValueError("data must be a floating-point (N, d) tensor")
    if data.shape[0] == 0 or not bool(torch.isfinite(data).all()):
        raise ValueError("data must be non-empty and finite")
    sizes = check_sizes(sizes)
    steps, warmup = check_int(steps, "steps", 1), check_int(warmup, "warmup")
    if decay is None:
        if warmup > steps:
            raise ValueError(f"warmup + decay must be <= steps, got warmup {warmup} > {steps}")
        decay = steps - warmup
    decay = check_int(decay, "decay")
    draws = check_int(draws, "draws", 1)
    check_int(seed, "seed")
    wsd_schedule(0, steps, warmup, decay)  # validates the schedule
    if init not in INIT_STRATEGIES:
        raise ValueError(f"init must be one of {INIT_STRATEGIES}, got {init!r}")
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable or None")
    saver = Checkpointer(checkpoint, checkpoint_every, checkpoint_seconds)
    grid = time_grid() if grid is None else grid
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() == 0:
        raise ValueError("grid must be a non-empty 1-D tensor of times")
    grid = grid.to(dtype=data.dtype, device=data.device)
    if not bool(((grid > 0) & (grid <= 1)).all()):
        raise ValueError("grid times must lie in (0, 1]")
    N, d = data.shape
    G, M_max = len(sizes), max(sizes)

    gens = [torch.Generator().manual_seed(model_seed(seed, M)) for M in sizes]
    means = data.new_zeros(G, M_max, d)
    mask = torch.zeros(G, M_max, dtype=torch.bool, device=data.device)
    stds = []
    for g, (M, gen) in enumerate(zip(sizes, gens)):
        mu, std = initialize(init, M, generator=gen, data=data, gt=gt, init_var=init_var,
                             noise_var=init_noise_var)
        means[g, :M], means[g, M:] = mu.to(data), mu[0].to(data)  # padding: copies, masked out
        mask[g, :M] = True
        stds.append(std)
    model = LearnableGMM(means, torch.tensor(stds, dtype=data.dtype), mask=mask,
                         process=process if process is not None else VP(), prediction="eps",
                         backend=backend, precision=precision)
    opt = ReferenceOptimizer([model.means, model.std],
                             lambda k: wsd_schedule(k, steps, warmup, decay, init_lr, peak_lr,
                                                    final_lr),
                             clip=clip, ema=ema, per_model=True)
    history = data.new_zeros(G, steps)
    params = {"means": model.means, "std": model.std}
    start = 0
    if resume_state is not None:
        start = load_training_state(resume_state, sizes, steps, seed, params, opt, gens, history)
    # per-step draws land in buffers reused by every step (each generator fills its own row,
    # drawing exactly what torch.randint / torch.randn would)
    idx = torch.empty(G, N, dtype=torch.long)
    noise = torch.empty(G, N, draws, d, dtype=data.dtype)
    for k in range(start, steps):
        for g, gen in enumerate(gens):
            idx[g].random_(0, grid.numel(), generator=gen)
            noise[g].normal_(generator=gen)
        opt.zero_grad()
        losses = eps_losses(model, data, grid[idx.to(data.device)], noise.to(data.device),
                            check_inputs=False)
        losses.sum().backward()
        opt.step()
        check_finite(k + 1, steps, sizes, losses, params.values())
        history[:, k] = losses.detach()
        if progress is not None:
            progress(k, steps, losses.detach())
        if saver.due(k + 1, steps):
            saver.save(training_state(k + 1, sizes, steps, seed, params, opt, gens, history))
    parts = model.parts()
    return {M: TrainedGMM(M, mu, std, history[g].clone())
            for g, (M, (mu, std)) in enumerate(zip(sizes, parts))}


__all__ = ["TrainedGMM", "eps_losses", "train_gmm_models"]
