"""Training the learnable GMMs as the paper does (SPEC D.1-D.2, F.1-F.5).

- ``wsd_schedule``: warmup-stable-decay learning rate (F.3).
- ``ReferenceOptimizer``: clip_by_global_norm -> Adam -> EMA of the updates (F.2), optionally
  with one clipping norm per model when the leading dim of every parameter indexes models.
- ``train_gmm_models``: full-batch training of one GMM per size M, all sizes batched into one
  padded ``LearnableGMM``; each model's randomness comes from its own generator seeded by
  (seed, M), so batched training equals training the sizes one by one. It can hand out its
  state mid-run (``checkpoint``) and continue from it (``resume_state``) with identical results.
- ``Checkpointer``, ``training_state``, ``load_training_state``: that checkpointing, shared with
  the colored-template training (train_templates.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .denoisers.gmm import IsotropicGMM
from .denoisers.learnable import INIT_STRATEGIES, LearnableGMM, initialize
from .diffusion.processes import VP, Process, time_grid


def _check_int(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_number(value, name: str, low: float = -math.inf, high: float = math.inf,
                  open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (low < value if open_low else low <= value) or not value <= high:
        raise ValueError(f"{name} must lie in {'(' if open_low else '['}{low}, {high}], got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule (F.3)

def _linear(count: float, init: float, end: float, steps: int) -> float:
    """optax.linear_schedule: init -> end over steps (progress clipped to [0, 1]); constant
    init when steps <= 0."""
    if steps <= 0:
        return init
    frac = 1.0 - min(max(count / steps, 0.0), 1.0)
    return (init - end) * frac + end


def wsd_schedule(k: int, total: int, warmup: int, decay: int, init: float = 0.0,
                 peak: float = 1e-3, final: float = 1e-6) -> float:
    """lr at 0-based step k: linear init -> peak over [0, warmup), peak until total - decay,
    then linear peak -> final over decay steps (optax.join_schedules at [warmup, total-decay])."""
    k = _check_int(k, "k")
    total = _check_int(total, "total")
    warmup, decay = _check_int(warmup, "warmup"), _check_int(decay, "decay")
    if warmup + decay > total:
        raise ValueError(f"warmup + decay must be <= total, got {warmup} + {decay} > {total}")
    stable_end = total - decay
    if k >= stable_end:
        return _linear(k - stable_end, peak, final, decay)
    if k >= warmup:
        return _linear(k - warmup, peak, peak, stable_end - warmup)
    return _linear(k, init, peak, warmup)


# ---------------------------------------------------------------------------------------------
# Optimizer chain (F.2)

class ReferenceOptimizer:
    """chain(clip_by_global_norm(clip), adam(lr, b1, b2, eps, eps_root=0), ema(gamma, debias)).

    At 0-based step k with gradient g: g <- g if ||g|| < clip else g clip / ||g||; Adam moments
    m, v with bias correction at n = k + 1; u = -lr(k) m_hat / (sqrt(v_hat) + eps);
    e = gamma e + (1 - gamma) u; theta += e / (1 - gamma^(k+1)).

    params: list of tensors (updated in place, gradients read from .grad; None counts as 0).
    lr: float or callable k -> float. per_model: dim 0 of every parameter indexes independent
    models (all the same size G) and ||g|| is computed per model.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float | Callable[[int], float], *,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip: float = 1e9,
                 ema: float = 0.99, per_model: bool = False):
        params = list(params)
        if not params or not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError("params must be a non-empty sequence of tensors")
        if not (callable(lr) or isinstance(lr, (int, float))) or isinstance(lr, bool):
            raise TypeError(f"lr must be a number or a callable, got {type(lr).__name__}")
        self.b1 = _check_number(b1, "b1", 0.0, 1.0)
        self.b2 = _check_number(b2, "b2", 0.0, 1.0)
        self.eps = _check_number(eps, "eps", 0.0)
        self.clip = _check_number(clip, "clip", 0.0, open_low=True)
        self.ema = _check_number(ema, "ema", 0.0, 1.0)
        if b1 >= 1 or b2 >= 1 or ema >= 1:
            raise ValueError("b1, b2 and ema must be < 1")
        if per_model:
            G = params[0].shape[0] if params[0].dim() else None
            if G is None or any(p.dim() == 0 or p.shape[0] != G for p in params):
                raise ValueError("per_model needs every parameter to have the same leading dim")
        self.params, self.lr, self.per_model = params, lr, per_model
        self.count = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.e = [torch.zeros_like(p) for p in params]

    def learning_rate(self, k: int) -> float:
        return float(self.lr(k)) if callable(self.lr) else float(self.lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _clipped(self) -> list[torch.Tensor]:
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self.params]
        if self.per_model:
            sq = sum(g.double().pow(2).reshape(g.shape[0], -1).sum(1) for g in grads)  # (G,)
        else:
            sq = sum(g.double().pow(2).sum() for g in grads)
        norm = sq.sqrt()
        if not bool((norm >= self.clip).any()):
            return grads
        out = []
        for g in grads:
            n = norm.reshape(-1, *([1] * (g.dim() - 1))) if self.per_model else norm
            n = n.to(g.dtype)
            out.append(torch.where(n < self.clip, g, g / n * self.clip))
        return out

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update from the current gradients."""
        k = self.count
        n = k + 1
        lr = self.learning_rate(k)
        bc1, bc2, bce = 1 - self.b1 ** n, 1 - self.b2 ** n, 1 - self.ema ** n
        for p, g, m, v, e in zip(self.params, self._clipped(), self.m, self.v, self.e):
            m.mul_(self.b1).add_((1 - self.b1) * g)
            v.mul_(self.b2).add_((1 - self.b2) * g * g)
            u = -lr * ((m / bc1) / ((v / bc2).sqrt() + self.eps))
            e.mul_(self.ema).add_((1 - self.ema) * u)
            p.add_(e / bce)
        self.count = n

    def state(self) -> dict[str, torch.Tensor]:
        """Optimizer state as plain tensors (count, and m/v/e per parameter index)."""
        out = {"count": torch.tensor(self.count)}
        for i, (m, v, e) in enumerate(zip(self.m, self.v, self.e)):
            out[f"m{i}"], out[f"v{i}"], out[f"e{i}"] = m.clone(), v.clone(), e.clone()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of state(); shapes must match the parameters."""
        for i, p in enumerate(self.params):
            for name, buf in (("m", self.m), ("v", self.v), ("e", self.e)):
                value = state[f"{name}{i}"]
                if value.shape != p.shape:
                    raise ValueError(f"state[{name}{i}] has shape {tuple(value.shape)}, "
                                     f"expected {tuple(p.shape)}")
                buf[i] = value.to(p).clone()
        self.count = int(state["count"])


# ---------------------------------------------------------------------------------------------
# Full-batch DSM training of learnable GMMs (D.1, D.2, F.4, F.5)

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


def model_seed(seed: int, M: int) -> int:
    """A 63-bit seed that depends only on (seed, M)."""
    digest = hashlib.sha256(f"diffmem.train:{seed}:{M}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _SquaredResidual(torch.autograd.Function):
    """||c x - a m - n||^2 over the last dim in one pass, gradients for c, a and m only.

    c, a: (G, Q, 1); x, m, n: (G, Q, d) -> (G, Q). Saves r = c x - a m - n, x and m.
    """

    @staticmethod
    def forward(ctx, c, a, x, m, n):
        r = c * x
        r.sub_(n).addcmul_(a, m, value=-1)
        ctx.save_for_backward(c, a, x, m, r)
        return torch.einsum("gqd,gqd->gq", r, r)

    @staticmethod
    def backward(ctx, grad):
        c, a, x, m, r = ctx.saved_tensors
        w = 2 * grad[..., None]                                           # (G, Q, 1)
        dc = w * torch.einsum("gqd,gqd->gq", r, x)[..., None] if ctx.needs_input_grad[0] else None
        da = -w * torch.einsum("gqd,gqd->gq", r, m)[..., None] if ctx.needs_input_grad[1] else None
        dm = r * (-w * a) if ctx.needs_input_grad[3] else None
        return dc, da, None, dm, None


def eps_losses(model: LearnableGMM, data: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
    """Per-model DSM loss in EPS units: mean over samples and draws of ||eps_hat - eps||^2
    summed over dims. data (N, d); t (G, N) per-sample times; noise (G, N, R, d) -> (G,).

    eps_hat = (sigma / s)(x_t - alpha mu_bar), computed as one fused residual.
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
    mu_bar = model.posterior_mean(x_t, per_query(alpha), per_query(s))
    cq, aq = per_query(c)[..., None], per_query(alpha * c)[..., None]
    return _SquaredResidual.apply(cq, aq, x_t, mu_bar, noise).mean(-1)


def _check_sizes(sizes) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise TypeError("sizes must be a non-empty sequence of ints")
    sizes = [_check_int(M, "sizes[i]", 1) for M in sizes]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must be distinct, got {sizes}")
    return sizes


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
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or not data.is_floating_point():
        raise ValueError("data must be a floating-point (N, d) tensor")
    if data.shape[0] == 0 or not bool(torch.isfinite(data).all()):
        raise ValueError("data must be non-empty and finite")
    sizes = _check_sizes(sizes)
    steps, warmup = _check_int(steps, "steps", 1), _check_int(warmup, "warmup")
    if decay is None:
        if warmup > steps:
            raise ValueError(f"warmup + decay must be <= steps, got warmup {warmup} > {steps}")
        decay = steps - warmup
    decay = _check_int(decay, "decay")
    draws = _check_int(draws, "draws", 1)
    _check_int(seed, "seed")
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
    for k in range(start, steps):
        idx = torch.stack([torch.randint(0, grid.numel(), (N,), generator=gen) for gen in gens])
        noise = torch.stack([torch.randn(N, draws, d, generator=gen, dtype=data.dtype)
                             for gen in gens]).to(data.device)
        opt.zero_grad()
        losses = eps_losses(model, data, grid[idx.to(data.device)], noise)
        losses.sum().backward()
        opt.step()
        history[:, k] = losses.detach()
        if progress is not None:
            progress(k, steps, losses.detach())
        if saver.due(k + 1, steps):
            saver.save(training_state(k + 1, sizes, steps, seed, params, opt, gens, history))
    parts = model.parts()
    return {M: TrainedGMM(M, mu, std, history[g].clone())
            for g, (M, (mu, std)) in enumerate(zip(sizes, parts))}


class Checkpointer:
    """When a training loop hands out its state: checkpoint(state) after every `every`-th step
    and/or once `seconds` of wall time passed since the last call, never after the last step
    (checkpoint None: never)."""

    def __init__(self, checkpoint: Callable[[dict], None] | None, every: int = 0,
                 seconds: float | None = None):
        if checkpoint is not None and not callable(checkpoint):
            raise TypeError("checkpoint must be callable or None")
        self.checkpoint, self.every = checkpoint, _check_int(every, "checkpoint_every")
        self.seconds = (None if seconds is None else
                        _check_number(seconds, "checkpoint_seconds", 0.0))
        self.last = time.monotonic()

    def due(self, done: int, steps: int) -> bool:
        """Whether to checkpoint after `done` of `steps` steps."""
        if self.checkpoint is None or done >= steps:
            return False
        return bool((self.every and done % self.every == 0) or
                    (self.seconds is not None and time.monotonic() - self.last >= self.seconds))

    def save(self, state: dict) -> None:
        self.checkpoint(state)
        self.last = time.monotonic()


def training_state(step, sizes, steps, seed, params, opt, gens, history) -> dict:
    """State of a training loop after `step` steps: scalars (step, steps, seed, sizes) and cloned
    tensors: each of params ({name: tensor}, e.g. means (G, M, d) and std (G,)), losses
    (history[..., :step]), generators (G, bytes) and opt.<name> (ReferenceOptimizer.state())."""
    state = {"step": step, "steps": steps, "seed": seed, "sizes": list(sizes),
             "losses": history[..., :step].clone(),
             "generators": torch.stack([gen.get_state() for gen in gens])}
    state.update({name: p.detach().clone() for name, p in params.items()})
    state.update({f"opt.{k}": v for k, v in opt.state().items()})
    return state


def load_training_state(state, sizes, steps, seed, params, opt, gens, history) -> int:
    """Restore a training_state into a freshly built run (params, opt, gens, history are
    updated in place); returns the step to continue at."""
    if not isinstance(state, dict):
        raise TypeError("resume_state must be a dict from a checkpoint")
    found = (state.get("sizes"), state.get("steps"), state.get("seed"))
    if found != (list(sizes), steps, seed):
        raise ValueError(f"resume_state is for sizes, steps, seed = {found}, "
                         f"not {(list(sizes), steps, seed)}")
    step = _check_int(state["step"], "resume_state step")
    if not step <= steps or any(state[name].shape != p.shape for name, p in params.items()):
        raise ValueError("resume_state does not match this run (step or parameter shapes)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    history[..., :step] = state["losses"]
    opt.load_state({k[4:]: v for k, v in state.items() if k.startswith("opt.")})
    for gen, s in zip(gens, state["generators"]):
        gen.set_state(s.to(torch.uint8).clone())  # a fresh tensor: views with an offset crash
    return step


# ---------------------------------------------------------------------------------------------
# Saving results without pickle: one JSON file (floats round-trip exactly via repr).

def save_results(path: str, results: dict[int, TrainedGMM]) -> None:
    """Write results to a JSON file (means as nested lists, dtype recorded)."""
    payload = {str(M): {"size": r.size, "std": r.std, "dtype": str(r.means.dtype),
                        "means": r.means.double().tolist(), "losses": r.losses.double().tolist()}
               for M, r in results.items()}
    with open(path, "w") as f:
        json.dump(payload, f)


def load_results(path: str) -> dict[int, TrainedGMM]:
    """Read a file written by save_results."""
    with open(path) as f:
        payload = json.load(f)
    out = {}
    for key, r in payload.items():
        dtype = getattr(torch, r["dtype"].removeprefix("torch."))
        out[int(key)] = TrainedGMM(int(r["size"]), torch.tensor(r["means"], dtype=dtype),
                                   float(r["std"]), torch.tensor(r["losses"], dtype=dtype))
    return out
