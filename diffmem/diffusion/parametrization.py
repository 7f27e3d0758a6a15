"""Vector-field parametrizations (x0, eps, v, score): conversions and loss scaling (SPEC B, D.4).

With a = alpha'/alpha, s = sigma'/sigma and r = s - a (all at t):

    from \\ to  x0                    eps                   v                   score
    x0 (h)     h                     (x - alpha h)/sigma   s x - alpha r h     (alpha h - x)/sigma^2
    eps (e)    (x - sigma e)/alpha   e                     a x + sigma r e     -e/sigma
    v (v)      (s x - v)/(alpha r)   (v - a x)/(sigma r)   v                   (a x - v)/(sigma^2 r)
    score (g)  (x + sigma^2 g)/alpha -sigma g              a x - sigma^2 r g   g
"""

from __future__ import annotations

import torch

from .processes import Process, Time, _bcast

FIELDS = ("x0", "eps", "v", "score")


def _check(field: str, name: str) -> None:
    if field not in FIELDS:
        raise ValueError(f"{name} must be one of {FIELDS}, got {field!r}")


def to_x0(field: str, value: torch.Tensor, x: torch.Tensor, t: Time,
          process: Process) -> torch.Tensor:
    """The x0 prediction equivalent to `value`, a prediction of type `field` at (x, t)."""
    _check(field, "field")
    al, sg = _bcast(process.alpha(t), x), _bcast(process.sigma(t), x)
    if field == "x0":
        return value
    if field == "eps":
        return (x - sg * value) / al
    if field == "score":
        return (x + sg * sg * value) / al
    a = _bcast(process.alpha_prime(t), x) / al
    s = _bcast(process.sigma_prime(t), x) / sg
    return (s * x - value) / (al * (s - a))


def from_x0(field: str, x0: torch.Tensor, x: torch.Tensor, t: Time,
            process: Process) -> torch.Tensor:
    """The prediction of type `field` equivalent to the x0 prediction x0 at (x, t)."""
    _check(field, "field")
    al, sg = _bcast(process.alpha(t), x), _bcast(process.sigma(t), x)
    if field == "x0":
        return x0
    if field == "eps":
        return (x - al * x0) / sg
    if field == "score":
        return (al * x0 - x) / (sg * sg)
    a = _bcast(process.alpha_prime(t), x) / al
    s = _bcast(process.sigma_prime(t), x) / sg
    return s * x - al * (s - a) * x0


def convert(value: torch.Tensor, source: str, target: str, x: torch.Tensor, t: Time,
            process: Process) -> torch.Tensor:
    """Convert a prediction between parametrizations at (x, t)."""
    _check(source, "source")
    _check(target, "target")
    if source == target:
        return value
    return from_x0(target, to_x0(source, value, x, t, process), x, t, process)


def loss_scale(source: str, target: str, t: Time, process: Process) -> Time:
    """lsf(source -> target)(t): L_target = lsf * L_source for the same x0 error (SPEC D.4)."""
    _check(source, "source")
    _check(target, "target")
    al, sg = process.alpha(t), process.sigma(t)
    r = process.r(t)
    # Squared factor that turns an x0 error into each field's error.
    factor = {"x0": 1.0 + 0 * al, "eps": (al / sg) ** 2, "v": (al * r) ** 2,
              "score": al ** 2 / sg ** 4}
    return factor[target] / factor[source]
