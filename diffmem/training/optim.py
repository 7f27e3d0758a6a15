"""The optimizer chain and learning-rate schedule of the paper (SPEC F.2, F.3).

- ``wsd_schedule``: warmup-stable-decay learning rate (F.3).
- ``ReferenceOptimizer``: clip_by_global_norm -> Adam -> EMA of the updates (F.2), optionally
  with one clipping norm per model when the leading dim of every parameter indexes models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .common import check_int, check_number


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
    k = check_int(k, "k")
    total = check_int(total, "total")
    warmup, decay = check_int(warmup, "warmup"), check_int(decay, "decay")
    if warmup + decay > total:
        raise ValueError(f"warmup + decay must be <= total, got {warmup} + {decay} > {total}")
    stable_end = total - decay
    if k >= stable_end:
        return _linear(k - stable_end, peak, final, decay)
    if k >= warmup:
        return _linear(k - warmup, peak, peak, stable_end - warmup)
    return _linear(k, init, peak, warmup)



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
        self.b1 = check_number(b1, "b1", 0.0, 1.0)
        self.b2 = check_number(b2, "b2", 0.0, 1.0)
        self.eps = check_number(eps, "eps", 0.0)
        self.clip = check_number(clip, "clip", 0.0, open_low=True)
        self.ema = check_number(ema, "ema", 0.0, 1.0)
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


__all__ = ["ReferenceOptimizer", "wsd_schedule"]
