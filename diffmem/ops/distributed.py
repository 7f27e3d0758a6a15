"""softmax_mean and knn over points sharded across processes (torch.distributed).

Every rank of the process group holds the same queries and a disjoint shard of the points;
the shards in rank order make up the global set (global index = local index + the number of
points on lower ranks). Each rank computes its shard's partial result with the local op, and
two collectives on the data give every rank the global result:

    M    = all_reduce MAX of the partial lse                       (G, B)
    S    = all_reduce SUM of [mean_p exp(lse_p - M), exp(lse_p - M)] packed   (G, B, d + 1)
    mean = S[..., :d] / S[..., d],  lse = M + log S[..., d]

Before them a fixed-size all_gather of each rank's metadata (function, dtype, B, d, result
shape, options, local N, whether its input was valid) lets every rank detect bad use (ranks
with different shapes or dtypes, invalid input on one rank) and raise the same ValueError
instead of hanging in a collective of mismatched size.

Gradients. Every rank is assumed to compute the same loss from the replicated output (as in
data-parallel training: the same code on every rank, the same calls in the same order, and a
backward on every rank). Then the gradient of the loss w.r.t. a rank's partial sums is the
output gradient itself, so the backward of the SUM passes it through unchanged; the gradient
w.r.t. the local shard (points and bias) is that shard's part of the global gradient, and the
contributions of all ranks to the gradients of the replicated x, alpha and var are summed by
one all_reduce in the backward. Those are the single-process gradients.

Query sharding (each rank its own queries, all the points) needs nothing from this module:
call diffmem.softmax_mean on the local queries (see the README, "Large data sets").
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._canonical import SUPPORTED_DTYPES, canonicalize, check_knn_inputs
from .knn import knn as _knn
from .merge import merge_knn, merge_nearest
from .softmax_mean import softmax_mean as _softmax_mean

_MAX_BATCH_DIMS = 8

# Slots of the metadata vector each rank contributes; ``_COMPARED`` must agree on all ranks.
_FIELDS = ("error", "function", "dtype", "B", "d", "option", "grads", "N", "batch_dims",
           *(f"batch{i}" for i in range(_MAX_BATCH_DIMS)))
_SLOT = {name: i for i, name in enumerate(_FIELDS)}
_COMPARED = {
    "function": "the function called (every rank must make the same calls in the same order)",
    "dtype": "the dtype",
    "B": "the number of queries B",
    "d": "the feature dimension d",
    "batch_dims": "the number of leading (batch) dimensions of the result",
    **{f"batch{i}": f"leading (batch) dimension {i} of the result"
       for i in range(_MAX_BATCH_DIMS)},
    "option": "the option",  # named per function by _OPTIONS
    "grads": "which of x, alpha, var require gradients",
}
_FUNCTIONS = {1: "diffmem.distributed.softmax_mean", 2: "diffmem.distributed.knn"}
_OPTIONS = {1: "return_nearest", 2: "k"}


def _dtype_code(t) -> int:
    if isinstance(t, torch.Tensor) and t.dtype in SUPPORTED_DTYPES:
        return SUPPORTED_DTYPES.index(t.dtype) + 1
    return 0


def _describe(field: str, value: int) -> str:
    if field == "dtype":
        return str(SUPPORTED_DTYPES[value - 1]) if value > 0 else "unsupported"
    if field == "function":
        return _FUNCTIONS.get(value, str(value))
    if field == "grads":
        names = [n for bit, n in enumerate(("x", "alpha", "var")) if value >> bit & 1]
        return "{" + ", ".join(names) + "}"
    return str(value)


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first (e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group) -> torch.device:
    """Where collectives on this group take their tensors: the current GPU for NCCL, else the
    CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """A reduced copy of t (t itself is left as it is), on t's device."""
    buf = t.detach().to(_comm_device(group), copy=True).contiguous()
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(t.device)


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """(world, *t.shape): every rank's t, in rank order, on t's device."""
    buf = t.detach().to(_comm_device(group)).contiguous()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, buf, group=group)
    return torch.stack(out).to(t.device)


def _agree(values: dict, error: Exception | None, group) -> torch.Tensor:
    """Exchange the metadata; raise the same error on every rank if the ranks disagree.

    values: {field: int} (missing fields are -1). Returns (world, fields) int64, the metadata
    of every rank in rank order. The rank whose input was invalid re-raises its own error; the
    others raise a ValueError naming it.
    """
    meta = torch.full((len(_FIELDS),), -1, dtype=torch.int64)
    for name, v in values.items():
        meta[_SLOT[name]] = int(v)
    meta[_SLOT["error"]] = 0 if error is None else 1
    table = _all_gather(meta, group).cpu()
    bad = [r for r in range(table.shape[0]) if table[r, _SLOT["error"]] != 0]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"invalid input on rank(s) {bad} (see the error raised there); "
                         "no rank computed a result")
    for field, label in _COMPARED.items():
        column = table[:, _SLOT[field]].tolist()
        if field == "option":  # the functions agree by now
            label = _OPTIONS[values["function"]]
        if len(set(column)) > 1:
            shown = ", ".join(f"rank {r}: {_describe(field, v)}" for r, v in enumerate(column))
            raise ValueError(f"the ranks disagree on {label} ({shown}); every rank must pass "
                             "the same queries (shape, dtype) and options, only the points differ")
    return table


def _batch_values(batch: tuple[int, ...]) -> dict:
    if len(batch) > _MAX_BATCH_DIMS:
        raise ValueError(f"at most {_MAX_BATCH_DIMS} leading (batch) dimensions are supported "
                         f"here, got the result shape {batch}")
    return {"batch_dims": len(batch), **{f"batch{i}": n for i, n in enumerate(batch)}}


class _SumGradients(torch.autograd.Function):
    """Identity forward for the replicated inputs (x, alpha, var); the backward sums their
    gradients over the ranks with one all_reduce (each rank holds its shard's contribution)."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads])
        total = _all_reduce(flat, dist.ReduceOp.SUM, ctx.group)
        out, start = [], 0
        for g in grads:
            out.append(total[start:start + g.numel()].view_as(g))
            start += g.numel()
        return (None, *out)


class _SumPartials(torch.autograd.Function):
    """all_reduce SUM of the packed partials; every rank computes the same loss from the
    replicated sum, so the backward passes the output gradient through unchanged."""

    @staticmethod
    def forward(ctx, group, partial):
        return _all_reduce(partial, dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def _masked_rows(bias):
    """(bias rows all -inf as a (..., 1) bool tensor, bias with those rows set to 0), or
    (None, bias): a shard may mask all its points where another shard has some."""
    if not (isinstance(bias, torch.Tensor) and bias.is_floating_point() and bias.dim() >= 1):
        return None, bias
    rows = (bias == -math.inf).all(-1, keepdim=True)
    if not bool(rows.any()):
        return None, bias
    return rows, torch.where(rows, torch.zeros((), dtype=bias.dtype, device=bias.device), bias)


def _anchor(tensors) -> torch.Tensor | None:
    """0 that depends on every tensor requiring grad: keeps an empty shard's (unused) inputs
    in the graph, so that they get zero gradients and the backward's all_reduce runs there."""
    terms = [t.reshape(-1)[:0].sum() for t in tensors
             if isinstance(t, torch.Tensor) and t.requires_grad]  # exactly 0, even for -inf
    return sum(terms) if terms else None


def _local_softmax_mean(x, points, alpha, var, bias, precision, backend, return_nearest):
    """This shard's (mean, lse, nearest idx, nearest weight) with lse = -inf where it has no
    unmasked point; nearest entries are None without return_nearest."""
    if not isinstance(points, torch.Tensor) or points.dim() < 2 or points.shape[-2] > 0:
        rows, safe_bias = _masked_rows(bias)
        extra = {"return_nearest": True} if return_nearest else {}
        out = _softmax_mean(x, points, alpha, var, safe_bias, backend=backend,
                            precision=precision, return_lse=True, lse_dtype=torch.float64,
                            **extra)
        mean, lse, *nearest = out
        if rows is not None:
            lse = lse.masked_fill(rows, -math.inf)
        return mean, lse, *(nearest or (None, None))
    # An empty shard: check the other inputs against one stand-in point, compute nothing.
    if isinstance(bias, torch.Tensor) and bias.dim() >= 1 and bias.shape[-1] not in (0, 1):
        raise ValueError(f"bias must have shape (..., N) with N = 0, got {tuple(bias.shape)}")
    stand_in = points.new_zeros((*points.shape[:-2], 1, points.shape[-1]))
    stand_bias = bias if not isinstance(bias, torch.Tensor) else bias.new_zeros(
        (*bias.shape[:-1], 1))
    c = canonicalize(x, stand_in, alpha, var, stand_bias)
    B, d = x.shape[-2:]
    mean = x.new_zeros((*c.batch_shape, B, d))
    anchor = _anchor((x, alpha, var, points, bias))
    if anchor is not None:
        mean = mean + anchor
    lse = x.new_full((*c.batch_shape, B), -math.inf)
    if not return_nearest:
        return mean, lse, None, None
    return mean, lse, torch.full_like(lse, -1, dtype=torch.int64), torch.zeros_like(lse)


def _replicated(group, x, alpha, var):
    """(x, alpha, var) passed through _SumGradients where they require gradients, and a bit
    mask of those (x 1, alpha 2, var 4)."""
    inputs = [x, alpha, var]
    slots = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad
             and torch.is_grad_enabled()]
    if slots:
        for i, t in zip(slots, _SumGradients.apply(group, *(inputs[i] for i in slots))):
            inputs[i] = t
    return (*inputs, sum(1 << i for i in slots))


def _outputs(mean, lse, idx, weight, return_lse, return_nearest):
    """The return value in softmax_mean's convention."""
    out = (mean, lse) if return_lse else (mean,)
    if return_nearest:
        out = (*out, idx, weight)
    return out[0] if len(out) == 1 else out


def softmax_mean(
    x: torch.Tensor,
    local_points: torch.Tensor,
    alpha: float | torch.Tensor,
    var: float | torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group=None,
    precision: str = "exact",
    backend: str = "auto",
    return_lse: bool = False,
    return_nearest: bool = False,
):
    """diffmem.softmax_mean over the union of the ranks' shards of the points.

    Collective: every rank of ``group`` must call it, with the same queries.

    Args:
        x: (..., B, d) queries, the same on every rank.
        local_points: (..., N_local, d) this rank's shard; N_local may differ between ranks
            and may be 0 (the rank then contributes nothing).
        alpha, var: as in diffmem.softmax_mean, the same on every rank.
        bias: None or (..., N_local) log-weights of this shard's points (a shard may mask all
            of its points; every problem needs an unmasked point on some rank).
        group: the process group (default: the world).
        precision, backend: passed to the local diffmem.softmax_mean.
        return_lse: also return the global lse (..., B).
        return_nearest: also return, per query, the global index (int64, (..., B)) of the
            point with the largest logit (ties to the lower index) and its softmax weight
            ((..., B), x's dtype); not differentiable.

    Returns:
        mean (..., B, d); with return_lse (mean, lse); with return_nearest (mean, idx, weight)
        or (mean, lse, idx, weight). The same on every rank. Differentiable w.r.t. x, alpha,
        var (the single-process gradient on every rank) and local_points, bias (this shard's
        part of it), assuming every rank computes the same loss from the output (module doc).

    Raises:
        ValueError on every rank when the ranks' queries differ in shape or dtype, their options
        differ, or one rank's input is invalid (that rank raises its own error).
    """
    rank, _ = _group_info(group)
    local = needs = error = None
    try:
        x, alpha, var, needs = _replicated(group, x, alpha, var)
        local = _local_softmax_mean(x, local_points, alpha, var, bias, precision, backend,
                                    return_nearest)
    except Exception as exc:  # reported to every rank by _agree
        error = exc
    values = {"function": 1, "dtype": _dtype_code(x), "option": int(bool(return_nearest)),
              "grads": -1 if needs is None else needs}
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        values.update(B=x.shape[-2], d=x.shape[-1])
    if isinstance(local_points, torch.Tensor) and local_points.dim() >= 2:
        values["N"] = local_points.shape[-2]
    if local is not None:
        try:
            values.update(_batch_values(tuple(local[1].shape[:-1])))
        except ValueError as exc:
            error = exc
    table = _agree(values, error, group)
    mean_p, lse_p, idx_p, weight_p = local
    if lse_p.numel() == 0:  # B = 0 (or an empty batch): nothing to merge
        return _outputs(mean_p, lse_p, idx_p, weight_p, return_lse, return_nearest)
    d = x.shape[-1]
    lse64 = lse_p.double()
    top = _all_reduce(lse64, dist.ReduceOp.MAX, group)
    if bool((top == -math.inf).any()):
        raise ValueError("bias masks out every point of every rank's shard in at least one "
                         "problem; at least one unmasked point is needed")
    w = torch.exp(lse64 - top)
    part = torch.where((w > 0).unsqueeze(-1), mean_p.double(),
                       torch.zeros((), dtype=torch.float64, device=mean_p.device))
    packed = torch.cat([part * w.unsqueeze(-1), w.unsqueeze(-1)], dim=-1)
    total = _SumPartials.apply(group, packed)
    mean = (total[..., :d] / total[..., d:]).to(x.dtype)
    lse = (top + torch.log(total[..., d])).to(x.dtype)
    n_idx = n_weight = None
    if return_nearest:
        offset = int(table[:rank, _SLOT["N"]].sum())
        idx = torch.where(idx_p >= 0, idx_p + offset, idx_p)
        stacked = _all_gather(torch.stack([idx.double(), weight_p.double(), lse64]), group)
        n_idx, n_weight = merge_nearest(stacked[:, 0].long(), stacked[:, 1], stacked[:, 2])
        n_weight = n_weight.to(x.dtype)
    return _outputs(mean, lse, n_idx, n_weight, return_lse, return_nearest)


def _local_knn(queries, points, k, backend):
    """This shard's k nearest (dist, idx), padded to k with (inf, -1), and the result's
    batch shape; idx local."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got k = {k}")
    n = points.shape[-2] if isinstance(points, torch.Tensor) and points.dim() >= 2 else 1
    if n == 0:  # check the rest against a stand-in point
        check_knn_inputs(queries, points.new_zeros((*points.shape[:-2], 1, points.shape[-1])), 1)
    else:
        check_knn_inputs(queries, points, min(k, n))
    batch = tuple(torch.broadcast_shapes(queries.shape[:-2], points.shape[:-2]))
    B = queries.shape[-2]
    dists = queries.new_full((*batch, B, k), math.inf)
    idxs = torch.full((*batch, B, k), -1, dtype=torch.int64, device=queries.device)
    if n > 0:
        dist_l, idx_l = _knn(queries, points, min(k, n), backend=backend)
        dists[..., :dist_l.shape[-1]] = dist_l
        idxs[..., :idx_l.shape[-1]] = idx_l
    return dists, idxs, batch


def knn(queries: torch.Tensor, local_points: torch.Tensor, k: int = 2, *, group=None,
        backend: str = "auto"):
    """diffmem.knn over the union of the ranks' shards of the points.

    Collective: every rank of ``group`` must call it, with the same queries and k.

    Args:
        queries: (..., B, d), the same on every rank.
        local_points: (..., N_local, d) this rank's shard (N_local may be 0); the shards in
            rank order make up the global points.
        k: 1 <= k <= the global N (the sum of N_local).
        group: the process group (default: the world); backend: of the local diffmem.knn.

    Returns:
        dist (..., B, k) ascending and idx (..., B, k) int64 global indices (local index plus
        the number of points on lower ranks); ties go to the lower index. The same on every
        rank; not differentiable.

    Raises:
        ValueError on every rank when the ranks' queries or k differ, k exceeds the global N,
        or one rank's input is invalid (that rank raises its own error).
    """
    rank, _ = _group_info(group)
    local = error = None
    try:
        local = _local_knn(queries, local_points, k, backend)
    except Exception as exc:  # reported to every rank by _agree
        error = exc
    values = {"function": 2, "dtype": _dtype_code(queries), "grads": 0,
              "option": k if isinstance(k, int) else -1}
    if isinstance(queries, torch.Tensor) and queries.dim() >= 2:
        values.update(B=queries.shape[-2], d=queries.shape[-1])
    if isinstance(local_points, torch.Tensor) and local_points.dim() >= 2:
        values["N"] = local_points.shape[-2]
    if local is not None:
        try:
            values.update(_batch_values(local[2]))
        except ValueError as exc:
            error = exc
    table = _agree(values, error, group)
    counts = table[:, _SLOT["N"]].tolist()
    if k > sum(counts):
        raise ValueError(f"k must satisfy 1 <= k <= N = {sum(counts)} (all ranks' points: "
                         f"{counts}), got k = {k}")
    dists, idxs, _ = local
    idxs = torch.where(idxs >= 0, idxs + sum(counts[:rank]), idxs)
    if dists.numel() == 0:
        return dists, idxs
    stacked = _all_gather(torch.stack([dists.double(), idxs.double()]), group)
    d_all, i_all = merge_knn(stacked[:, 0], stacked[:, 1].long(), k)
    return d_all.to(queries.dtype), i_all


__all__ = ["knn", "softmax_mean"]
