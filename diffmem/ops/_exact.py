"""Exact mode's host rules, shared by every float32 kernel backend.

Float32 logits lose accuracy in two ways, and exact mode removes both:

1. **The form of the squared distance, chosen per query** (``make_plan``). The direct form
   ``sum_k (fma(-alpha, y, x)_k^2 - var)`` rounds every difference to float32, an error of
   ~eps |x - alpha y|^2 per feature that differs from point to point: harmless for queries near
   the points (a noised training point), fatal for queries far from all of them (random or
   held-out queries, large VE noise, t -> 1), where it moves the weights by up to 1e-2. The
   expansion around the points' centre c, ``alpha/var x'.(y - c) - alpha^2/(2 var) |y - c|^2``
   with ``x' = x - alpha c``, errs by ~eps alpha |y - c| |alpha (y - c) - 2 x'| per feature: small
   exactly where the direct form is not. The plan estimates both errors from the points' spread
   per feature (a strided sample of the points, see ``sample_rows``) and takes the smaller
   per query.
2. **Near-ties among the heaviest points** (``correct_forward``). When the few points that
   carry the weight have almost equal logits of large magnitude (a held-out query at small
   noise), any float32 logit is off by more than the gap. The kernels report the TOP_K largest
   logits per query with their indices; the host recomputes those logits in float64 and moves
   them, relative to the largest one, to their exact values (a constant error shared by all
   points cancels in the softmax, so only differences are corrected); mean and lse are
   corrected in float64 and the backward kernels use the corrected logits for those points.
   A backend may do this itself (``CORRECTS_TOP_K = True``: the cpu kernels, at the end of
   their forward) instead of ``correct_forward``.

Backend contract (float32 kernel backends with a module-level ``EXACT_PLAN = True``; the op
calls the others without a plan):

    forward(x, points, alpha, var, bias, precision, plan)
        -> mean (G, B, d), lse (G, B), lse64 (G, B) float64,
           top_idx (G, B, K) int64, top_logit (G, B, K) float64
    backward(x, points, alpha, var, bias, mean, lse64, grad_mean, grad_lse, needs, precision,
             plan, top_idx, top_logit) -> (dx, dpoints, dalpha, dvar, dbias)

- Forms. plan.expand[g, b] = 0, the DIRECT form: diff = fma(-alpha, y, x), shifted distance
  S = sum_k (diff_k^2 - var) in chained float32 chunks, internal logit bias - S / (2 var), true
  logit = internal - d / 2. plan.expand[g, b] = 1, the EXPANSION form: x' = float32(x - alpha c)
  (c = plan.centre[g], one rounding), yc = float32(y - c); dot = sum_k x'_k yc_k in float32
  chains of at most 16 features, each chain added into a float64 sum; yn = sum_k yc_k^2 in
  float64 (never rounded to float32); internal logit = bias + alpha / var dot
  - alpha^2 / (2 var) yn in float64; true logit = internal - |x'|^2 / (2 var), |x'|^2 in float64.
  Queries of one call, even of one tile, may use different forms.
- Top-K. The forward also reports, per query, the K = plan.top_k points with the largest logits
  (any tie order, no point twice) and their logits in the true frame (lse64's frame); empty
  slots (N < K, masked points) hold index -1 and logit -inf. With precision="fast", kernels that
  compute expansion logits without a plan return K = 0 (shape (G, B, 0)).
- Backward. The logits are recomputed with the forward's form per query, and the logit of each
  listed point (top_idx >= 0) is replaced by the corrected top_logit (true frame) wherever its
  weight exp(logit - lse) is formed.

Measured errors and costs are in the README's Precision section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOP_K = 4
# The sample of points behind the spread estimates: at most SAMPLE points and about
# SAMPLE_ELEMENTS values, at least MIN_SAMPLE points (the estimates only steer the choice of
# form, where a spread off by ~10% changes nothing that matters).
SAMPLE, MIN_SAMPLE, SAMPLE_ELEMENTS = 1024, 128, 1 << 18
# Largest (B, K, d) float64 block gathered at once by the correction.
_CHUNK_ELEMENTS = 1 << 22
# Runner-up logits this far below the best carry weights < 2e-9: nothing to correct.
_NEGLIGIBLE = 20.0


@dataclass
class ExactPlan:
    """Per-call plan of exact mode (canonical layout, see _canonical.py).

    centre: (G, d) float32, the points' centre per group (group stride 0 when shared).
    expand: (G, B) uint8, 1 where the query's logits use the expansion around ``centre``.
    top_k: how many of the largest logits per query the kernels report.
    """

    centre: torch.Tensor
    expand: torch.Tensor
    top_k: int = TOP_K


def make_plan(x: torch.Tensor, points: torch.Tensor, alpha: torch.Tensor,
              var: torch.Tensor) -> ExactPlan:
    """The per-query choice of logit form (see the module doc) for float32 canonical inputs.

    x (G, B, d), points (G, N, d), alpha and var (G, B).
    """
    G, B, d = x.shape
    N = points.shape[1]
    shared = shares_points(points)
    pts = points[:1] if shared else points
    n = sample_rows(N, d)
    sample = pts[:, :: max(1, N // n)][:, :n].contiguous().float()
    # estimates only: float32 is plenty (the centre itself may be any point near the data);
    # two passes (torch.var_mean is ~10x slower here)
    centre = sample.mean(1)  # (G', d)
    dev = sample - centre[:, None]
    spread = (dev * dev).mean(1)  # (G', d)
    # error scales (common factor eps / (2 var) dropped): expansion, with 4x for its chained
    # float32 sums; direct, from E[diff^4] >= 3 E[diff^2]^2 per feature, plus its chains' own
    # rounding when the shift by var overshoots the squared differences (var > their mean: the
    # chain then runs through values ~ 16 (var - mean) per 16 features). With sq_k = x'_k^2 +
    # alpha^2 s_k, the mean squared difference per feature over the points, only three sums
    # over the features of x'^2 are needed per query:
    #   sum s (alpha^2 s + 4 x'^2) = alpha^2 S2 + 4 P,  sum sq^2 = Q + 2 alpha^2 P + alpha^4 S2
    # one (G, B, d) buffer, updated in place: x' = x - alpha c, then x'^2, then x'^4
    xp = alpha[..., None] * centre[:, None]
    xp2 = torch.sub(x, xp, out=xp).square_()
    X2 = xp2.sum(-1)  # sum x'^2, (G, B)
    P = torch.bmm(xp2, spread[:, :, None].expand(G, d, 1))[..., 0]  # sum s x'^2
    Q = xp2.square_().sum(-1)  # sum x'^4
    S1, S2 = spread.sum(-1)[:, None], (spread * spread).sum(-1)[:, None]  # (G', 1)
    a2 = alpha * alpha
    err_expand = 4.0 * alpha * (a2 * S2 + 4.0 * P).clamp_min(0.0).sqrt()
    overshoot = (var - (X2 + a2 * S1) / d).clamp_min(0.0)
    err_direct = (3.0 * (Q + 2.0 * a2 * P + a2 * a2 * S2)).clamp_min(0.0).sqrt()
    err_direct = err_direct + 8.0 * math.sqrt(d) * overshoot
    expand = (err_expand < err_direct).to(torch.uint8).contiguous()
    centre = centre.contiguous()
    if shared:
        centre = centre[:1].expand(G, d)
    return ExactPlan(centre=centre, expand=expand)


def sample_rows(N: int, d: int) -> int:
    """How many points the plan samples: the cost of the estimates stays O(SAMPLE_ELEMENTS)
    whatever d is (a fixed 1024 would cost as much as the kernels at few queries)."""
    return min(N, SAMPLE, max(MIN_SAMPLE, SAMPLE_ELEMENTS // max(1, d)))


def shares_points(points: torch.Tensor) -> bool:
    """Whether all groups of canonical points (G, N, d) are one set (one centre row)."""
    return points.shape[0] == 1 or points.stride(0) == 0


def centre_rows(plan: ExactPlan) -> torch.Tensor:
    """The plan's distinct centre rows: (1, d) when the groups share their points, else (G, d)."""
    return plan.centre[:1] if plan.centre.stride(0) == 0 else plan.centre


def plan_from(expand: torch.Tensor, rows: torch.Tensor) -> ExactPlan:
    """The plan again from its forms (G, B) and centre rows (1 or G, d), as the backward gets it
    from the forward (the plan depends only on the inputs, so it is made once per call)."""
    return ExactPlan(centre=rows.expand(expand.shape[0], rows.shape[-1]), expand=expand)


def _gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """points (G, N, d), idx (G, b, K) >= 0 -> (G, b, K, d) float64."""
    G, b, K = idx.shape
    rows = torch.arange(G, device=idx.device)[:, None]
    return points[rows, idx.reshape(G, b * K)].double().reshape(G, b, K, points.shape[-1])


def _exact_block(x, points, alpha, var, bias, idx):
    """Exact logits (G, b, K) float64 of the listed points and the points themselves."""
    safe = idx.clamp_min(0)
    y = _gather_points(points, safe)
    diff = x.double()[:, :, None, :] - alpha.double()[:, :, None, None] * y
    logits = -(diff * diff).sum(-1) / (2.0 * var.double()[:, :, None])
    if bias is not None:
        picked = torch.gather(bias.double(), 1, safe.reshape(idx.shape[0], -1))
        logits = logits + picked.reshape(idx.shape)
    return logits, y


def _query_chunks(G: int, B: int, K: int, d: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, G * K * d))
    for start in range(0, B, step):
        yield slice(start, min(B, start + step))


def correct_forward(x, points, alpha, var, bias, mean, lse64, top_idx, top_logit):
    """Move the reported top logits to their exact values and correct mean and lse.

    top_idx (G, B, K) int64 (-1: empty slot) and top_logit (G, B, K) float64 are the kernel's
    largest logits, in lse64's frame. Returns (mean, lse, lse64, top_exact) where top_exact holds
    the corrected logits of the same points (-inf in empty slots), which the backward uses.
    """
    G, B, d = x.shape
    K = top_idx.shape[-1]
    valid = (top_idx >= 0) & torch.isfinite(top_logit)
    ap = top_logit.masked_fill(~valid, -math.inf)
    if K == 0:
        return mean, lse64.to(mean.dtype), lse64, ap
    best_ap, best = ap.max(-1, keepdim=True)
    runner_up = ap.scatter(-1, best, -math.inf).amax(-1)
    if not bool((runner_up > best_ap[..., 0] - _NEGLIGIBLE).any()):
        return mean, lse64.to(mean.dtype), lse64, ap
    mean64 = mean.double()
    lse64 = lse64.clone()
    corrected = ap.clone()
    for sl in _query_chunks(G, B, K, d):
        ex, y = _exact_block(x[:, sl], points, alpha[:, sl], var[:, sl], bias, top_idx[:, sl])
        b_ap, b_best, b_valid = ap[:, sl], best[:, sl], valid[:, sl]
        new = torch.gather(b_ap, -1, b_best) + ex - torch.gather(ex, -1, b_best)
        new = new.masked_fill(~b_valid, -math.inf)
        ref = lse64[:, sl, None]
        dw = (torch.exp(new - ref) - torch.exp(b_ap - ref)).masked_fill(~b_valid, 0.0)
        z = 1.0 + dw.sum(-1)
        mean64[:, sl] = (mean64[:, sl] + (dw[..., None] * y).sum(2)) / z[..., None]
        lse64[:, sl] = lse64[:, sl] + torch.log(z)
        corrected[:, sl] = new
    return mean64.to(mean.dtype), lse64.to(mean.dtype), lse64, corrected


def lse_offset(x, points, alpha, var, bias, top_idx, top_logit):
    """float64 (G, B): what moves lse to its absolute value.

    The correction makes the listed logits exact relative to the largest one, whose own
    value keeps its float32 error; a shift common to all logits cancels in the mean but not in
    lse, whose absolute error it is (|lse| eps sqrt(d), ~1e-3 at |lse| ~ 1e4). The largest
    listed logit recomputed in float64 minus its reported value is that shift; lse plus it is
    exact to the accuracy of the weights (which is what merging partial results needs).
    Zero where a query has no listed point. Not differentiated (a constant for autograd: the
    gradient of lse is the kernels').
    """
    with torch.no_grad():
        return _lse_offset(x, points, alpha, var, bias, top_idx, top_logit)


def _lse_offset(x, points, alpha, var, bias, top_idx, top_logit):
    best_logit, best = top_logit.max(-1, keepdim=True)
    idx = torch.gather(top_idx, -1, best)
    G, B = idx.shape[:2]
    shift = torch.zeros((G, B), dtype=torch.float64, device=x.device)
    for sl in _query_chunks(G, B, 1, x.shape[-1]):
        ex, _ = _exact_block(x[:, sl], points, alpha[:, sl], var[:, sl], bias, idx[:, sl])
        shift[:, sl] = (ex - best_logit[:, sl])[..., 0]
    valid = (idx[..., 0] >= 0) & torch.isfinite(best_logit[..., 0])
    return shift.masked_fill(~valid, 0.0)
