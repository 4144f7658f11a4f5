"""Contrastive (InfoNCE) loss for embedding training, with exact cross-device negatives.

`info_nce` scores each query against every positive and every hard negative of the *global* batch
(all data-parallel ranks together). Under torch.distributed with world_size > 1 the positives and
hard negatives are all-gathered **with gradients** (`all_gather_with_grad`), so N workers with a
local batch of B behave like one worker with a batch of N*B -- both in the loss value and, once the
data-parallel engine (DDP / DeepSpeed) averages parameter gradients across ranks, in the gradients.
The derivation is in the comment above `_AllGatherWithGrad`.

`check_finite` is a guard to call on the loss before the optimizer step.

This module imports torch only (no ray).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import ConfigError, DataError

__all__ = ["info_nce", "all_gather_with_grad", "check_finite", "dist_world"]


def dist_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when torch.distributed is off."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# Why all_gather forward + all_reduce(SUM)-then-slice backward gives exact gradients
# ----------------------------------------------------------------------------------
# N ranks, each with B local queries. Let l_i be the per-query cross-entropy of query i against
# the global candidate set C = [p_1..p_NB, n_1..n_NM] (positives and hard negatives of all ranks).
# One worker on the concatenated batch minimises      L   = 1/(N B) * sum_{all i} l_i.
# Rank r computes only its own queries' mean:          L_r = 1/B     * sum_{i on r} l_i,
# hence L = 1/N * sum_r L_r  (the mean of the rank losses is the single-worker loss).
# Every embedding e (a query, positive or negative) is produced on exactly one rank r(e), from that
# rank's data, by the shared parameters theta:  dL/dtheta = sum_e J_e^T dL/de  with J_e = de/dtheta.
# Candidate e enters the loss of *every* rank through the gather, so
#     dL/de = 1/N * sum_k dL_k/de.
# Backward of the gather on rank k yields dL_k/d(gathered) for all N*B rows; all_reduce(SUM) over
# ranks forms sum_k dL_k/d(gathered) and rank r keeps its own rows, i.e. the gradient that reaches
# e on r(e) is sum_k dL_k/de = N * dL/de. (Queries are not gathered: query i enters only L_{r(i)},
# so its local gradient dL_r/dq_i = N * dL/dq_i as well.) Rank r's parameter gradient is therefore
#     g_r = sum_{e on r} J_e^T * N * dL/de,
# and the data-parallel AVERAGE  1/N * sum_r g_r = sum_e J_e^T dL/de = dL/dtheta  -- exactly the
# single-worker gradient. (With gradient SUMMING instead of averaging it would be N times larger.)
class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate `x` from all ranks along dim 0; gradients flow back to every rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group=None) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        world = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather `x` ([n, ...], same n on every rank) along dim 0, keeping the autograd graph.

    Every rank must call it (and later run backward) collectively. Without an initialised process
    group, or with world_size 1, it returns `x` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def _check_equal_local_sizes(b: int, m: int, device: torch.device, group=None) -> None:
    """Raise DataError unless every rank has the same number of queries and of hard negatives."""
    world = dist.get_world_size(group)
    mine = torch.tensor([b, m], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    sizes = [tuple(int(v) for v in t.tolist()) for t in parts]
    if any(s != sizes[0] for s in sizes):
        raise DataError(
            "info_nce with cross-device negatives needs the same local batch on every rank, got "
            f"(queries, hard negatives) per rank = {sizes}: use drop_last=True in the data loader "
            "(and a fixed number of hard negatives per query), or pass gather=False"
        )


def _checked_inputs(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor | None,
                   temperature: float) -> torch.Tensor | None:
    """`info_nce`'s arguments checked; the hard negatives flattened to [M, d]."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if q.dim() != 2 or p.dim() != 2 or q.shape != p.shape:
        raise ValueError(
            f"q and p must both be [B, d] with the same shape, got {tuple(q.shape)} and {tuple(p.shape)}"
        )
    b, d = q.shape
    if b == 0:
        raise ValueError("info_nce got an empty batch (B = 0)")
    if negs is not None:
        if negs.dim() == 3:
            if negs.shape[0] != b:
                raise ValueError(f"negs [B, K, d] must have B = {b} rows, got {tuple(negs.shape)}")
            negs = negs.reshape(-1, negs.shape[-1])
        if negs.dim() != 2 or negs.shape[-1] != d:
            raise ValueError(f"negs must be [B, K, {d}] or [M, {d}], got {tuple(negs.shape)}")
    return negs


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    negs: torch.Tensor | None = None,
    temperature: float = 0.05,
    gather: bool = True,
    sync: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """InfoNCE loss with in-batch and hard negatives, exact across data-parallel ranks.

    Args:
        q: query embeddings [B, d] (local batch).
        p: positive embeddings [B, d]; p[i] is the positive of q[i].
        negs: hard negatives [B, K, d], or flattened [M, d] (e.g. M = B*K), or None.
        temperature: softmax temperature tau (> 0); logits are cos(q, c) / tau.
        gather: with torch.distributed initialised and world_size > 1, all-gather positives and
            hard negatives from every rank (with gradients) so the candidate set is the global
            batch. Each rank must then have the same B and the same number of hard negatives.

    Candidate set (the choice made here): for every query, *all* positives and *all* hard negatives
    of the global batch -- its own positive, the other queries' positives (in-batch negatives), its
    own K hard negatives and also the other queries' hard negatives. Logits are laid out as
    [global positives (N*B) | global hard negatives (N*M)]; the label of local query i on rank r is
    r*B + i. Embeddings are L2-normalised here (cosine similarity); logits are computed in at
    least float32 even for bf16/fp16 inputs.

    Returns:
        (loss, metrics): loss is the mean cross-entropy over the *local* queries (the mean of the
        rank losses equals the single-worker loss on the concatenated batch; averaging gradients
        across ranks gives the single-worker gradient). metrics (python floats, local queries):
        ``acc`` top-1 accuracy over the candidate set, ``pos_sim`` mean cos(q_i, p_i),
        ``neg_sim`` mean cosine to all non-target candidates, and ``hard_neg_sim`` mean cosine to
        the global hard negatives when `negs` is given.
        With ``sync=False`` the metrics stay 0-dim device tensors (no host sync between the forward
        and the backward: the caller converts them after launching the backward, as the Trainer does).
    """
    negs = _checked_inputs(q, p, negs, temperature)
    b = q.shape[0]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qn = F.normalize(q.to(dtype), dim=-1)
    pn = F.normalize(p.to(dtype), dim=-1)
    nn_ = F.normalize(negs.to(dtype), dim=-1) if negs is not None else None
    m = 0 if nn_ is None else nn_.shape[0]

    rank, world = dist_world()
    if gather and world > 1:
        _check_equal_local_sizes(b, m, q.device)
        pn = all_gather_with_grad(pn)
        if nn_ is not None and m > 0:
            nn_ = all_gather_with_grad(nn_)
    else:
        rank = 0

    cands = pn if nn_ is None or m == 0 else torch.cat([pn, nn_], dim=0)
    sims = qn @ cands.T  # [B, N*B + N*M] cosine similarities
    labels = torch.arange(b, device=q.device) + rank * b
    loss = F.cross_entropy(sims / temperature, labels)
    return loss, _batch_metrics(sims, labels, n_pos=pn.shape[0], dtype=dtype, sync=sync)


def _batch_metrics(sims: torch.Tensor, labels: torch.Tensor, *, n_pos: int, dtype: torch.dtype,
                   sync: bool) -> dict[str, float]:
    """`info_nce`'s metrics (see there) from its similarity matrix, whose first `n_pos` columns are the global
    positives. Stacked into one tensor, so that reading them costs one device sync, or none with ``sync=False``."""
    b = sims.shape[0]
    with torch.no_grad():
        rows = torch.arange(b, device=sims.device)
        pos = sims[rows, labels]
        acc = (sims.argmax(dim=1) == labels).to(dtype).mean()
        n_cand = sims.shape[1]
        neg_sim = (sims.sum() - pos.sum()) / max(b * (n_cand - 1), 1)
        stats = [acc, pos.mean(), neg_sim]
        if n_cand > n_pos:
            stats.append(sims[:, n_pos:].mean())
        stacked = torch.stack(stats)
        vals = stacked.tolist() if sync else list(stacked.unbind())
    metrics = {"acc": vals[0], "pos_sim": vals[1], "neg_sim": vals[2]}
    if len(vals) > 3:
        metrics["hard_neg_sim"] = vals[3]
    return metrics


def check_finite(loss: torch.Tensor | float, step: int) -> None:
    """Raise FloatingPointError if `loss` is NaN or +-inf (call before the optimizer step)."""
    value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"non-finite training loss ({value}) at step {step}: training diverged or overflowed. "
            "Lower the learning rate or the warm-up peak, enable gradient clipping, prefer bf16 "
            "over fp16, check the temperature (too small overflows the logits), and inspect the "
            "batch of this step for empty or all-padding inputs."
        )
