"""GradCache: exact large-batch contrastive steps whose activation memory grows with the chunk size.

After Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(cached-representation backprop). A contrastive loss couples every example of the batch, so plain
gradient accumulation changes the loss; GradCache keeps it exact:

    (a) embed every chunk under ``torch.no_grad`` (no activations kept), recording the RNG state
        before each chunk (`RandContext`) so dropout can be replayed identically;
    (b) turn the representations into leaf tensors, compute the loss on the whole batch (this is
        where cross-device negatives are gathered) and get d loss / d reps;
    (c) re-embed each chunk *with* grad under its recorded RNG state and backpropagate the cached
        gradient through it: ``torch.autograd.backward(reps_chunk, grad_chunk)``, or
        ``backward_fn((reps_chunk * grad_chunk).sum())`` so an engine's own backward
        (DeepSpeed ``engine.backward``) can be used. Both give d loss / d theta for that chunk.

Peak activation memory is one chunk's encoder graph (plus the [B, d] representations and the loss
graph), at the cost of a second forward pass. `full_batch_step` is the plain step with the same
signature (kept graphs, one backward) for small batches and for testing.

Inputs are grouped by role::

    roles = {"query":    {"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L]},
             "positive": {...  [B, L] ...},
             "negative": {...  [B*K, L] ...}}        # any number of roles, any field names

Each role's fields are tensors or lists sharing their first dimension (roles may differ in
length). ``embed_fn(chunk) -> Tensor[n, d]`` embeds one chunk (a dict with the same fields, sliced
along dim 0); ``loss_fn(reps) -> (loss, metrics)`` gets ``{role: Tensor[n_role, d]}``.

This module imports torch only (no ray).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["RandContext", "grad_cache_step", "merged_grad_cache_step", "merged_chunks", "merged_chunk_count",
           "full_batch_step", "merged_batch_step", "iter_chunks"]

Field = torch.Tensor | Sequence[Any]
Chunk = dict[str, Field]
Roles = Mapping[str, Mapping[str, Field]]
EmbedFn = Callable[[Chunk], torch.Tensor]
LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]
BackwardFn = Callable[[torch.Tensor], Any]


class RandContext:
    """Snapshot of the RNG state at construction; `with ctx:` replays it without side effects.

    Captures the CPU generator and, when CUDA is initialised, the generators of the current CUDA
    device and of every CUDA device holding one of `tensors`. Entering forks the RNG (so the
    surrounding random stream is left untouched on exit) and restores the snapshot, so a forward
    pass run inside draws the same dropout masks as the forward pass that followed the snapshot.
    """

    def __init__(self, *tensors: Any) -> None:
        self.cpu_state = torch.get_rng_state()
        devices: list[int] = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.append(torch.cuda.current_device())
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.is_cuda and t.get_device() not in devices:
                    devices.append(t.get_device())
        self.cuda_devices = devices
        self.cuda_states = [torch.cuda.get_rng_state(dev) for dev in devices]
        self._fork = None

    def __enter__(self) -> "RandContext":
        self._fork = torch.random.fork_rng(devices=self.cuda_devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for dev, state in zip(self.cuda_devices, self.cuda_states):
            torch.cuda.set_rng_state(state, dev)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


def _role_length(role: str, fields: Mapping[str, Field]) -> int:
    if not fields:
        raise ValueError(f"role {role!r} has no fields")
    lengths = {name: (v.shape[0] if isinstance(v, torch.Tensor) else len(v)) for name, v in fields.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"fields of role {role!r} must share their first dimension, got lengths {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"role {role!r} is empty")
    return n


def iter_chunks(fields: Mapping[str, Field], chunk_size: int | None, role: str = "?") -> list[Chunk]:
    """Split one role's fields into consecutive chunks of `chunk_size` rows (None: one chunk)."""
    n = _role_length(role, fields)
    size = n if chunk_size is None else chunk_size
    return [{k: v[i:i + size] for k, v in fields.items()} for i in range(0, n, size)]


def _validate(roles: Roles, chunk_size: int | None) -> None:
    if not roles:
        raise ValueError("roles is empty: pass e.g. {'query': {...}, 'positive': {...}}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for role, fields in roles.items():
        _role_length(role, fields)


def _check_reps(role: str, reps: Any, n: int) -> torch.Tensor:
    if not isinstance(reps, torch.Tensor) or reps.dim() != 2 or reps.shape[0] != n:
        got = tuple(reps.shape) if isinstance(reps, torch.Tensor) else type(reps).__name__
        raise ValueError(f"embed_fn must return a Tensor[n, d]; for a {role!r} chunk of {n} rows got {got}")
    return reps


def grad_cache_step(
    embed_fn: EmbedFn,
    roles: Roles,
    loss_fn: LossFn,
    chunk_size: int | None,
    backward_fn: BackwardFn | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One GradCache forward/backward: accumulates exact full-batch gradients into the parameters.

    Args:
        embed_fn: maps a chunk ``{field: rows}`` to embeddings ``Tensor[n, d]``. It is called twice
            per chunk (no-grad, then with grad under the replayed RNG state); it must be a pure
            function of the chunk, the parameters and the RNG (e.g. model in train mode is fine).
        roles: ``{role: {field: Tensor | list}}``, see the module docstring. Roles are embedded in
            dict order, each in chunks of `chunk_size` rows (None: the whole role at once).
        loss_fn: ``{role: Tensor[n_role, d]} -> (loss, metrics)``; may all-gather across ranks
            (it runs exactly once per step on every rank). It must not own trainable parameters:
            only d loss / d reps is propagated (a learnable temperature would get no gradient).
        chunk_size: rows per chunk; peak activation memory scales with it.
        backward_fn: optional ``fn(surrogate)`` used for the per-chunk backward instead of
            ``torch.autograd.backward``; ``surrogate = (reps_chunk * grad_chunk).sum()`` has the
            same parameter gradient as the loss restricted to that chunk. Use it for an engine's
            backward, e.g. ``lambda s: engine.backward(s)`` with DeepSpeed -- note that it is
            then called once per chunk within one optimizer step (configure the engine so that
            several backward calls accumulate, and that gradient-accumulation loss scaling is not
            applied per chunk), and with DDP wrap all but the last call in ``no_sync()``.

    Returns:
        (loss detached, metrics from loss_fn). Parameter ``.grad`` holds d loss / d theta
        (accumulated onto any existing grads, as ``loss.backward()`` would).
    """
    _validate(roles, chunk_size)
    names = list(roles)
    chunks = [(role, c) for role in names for c in iter_chunks(roles[role], chunk_size, role)]
    sizes = [_role_length(r, roles[r]) for r in names]

    def role_loss(all_reps: torch.Tensor):
        return loss_fn(dict(zip(names, torch.split(all_reps, sizes))))

    return _grad_cache(embed_fn, chunks, role_loss, backward_fn)


def _grad_cache(
    embed_fn: EmbedFn,
    chunks: list[tuple[str, Chunk]],
    loss_on_reps: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]],
    backward_fn: BackwardFn | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The GradCache core over an explicit list of (label, chunk): the chunks' representations, concatenated in
    list order, are what `loss_on_reps` gets."""
    # (a) representations without a graph; one RNG snapshot per chunk
    rand_states: list[RandContext] = []
    parts: list[torch.Tensor] = []
    for label, chunk in chunks:
        rand_states.append(RandContext(*chunk.values()))
        with torch.no_grad():
            parts.append(_check_reps(label, embed_fn(chunk), _role_length(label, chunk)))
    reps = torch.cat(parts, dim=0).detach().requires_grad_(True)
    del parts

    # (b) loss on the whole (possibly gathered) batch; gradient w.r.t. the cached representations
    loss, metrics = loss_on_reps(reps)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return (scalar loss tensor, metrics)")
    (cached,) = torch.autograd.grad(loss, [reps], allow_unused=True)
    if cached is None:
        cached = torch.zeros_like(reps)
    loss = loss.detach()
    del reps

    # (c) re-embed each chunk with grad under its saved RNG state, backprop the cached gradient
    start = 0
    for (label, chunk), rand in zip(chunks, rand_states):
        n = _role_length(label, chunk)
        grad_chunk = cached[start:start + n]
        start += n
        with rand:
            reps_chunk = _check_reps(label, embed_fn(chunk), n)
        if backward_fn is None:
            torch.autograd.backward(reps_chunk, grad_tensors=grad_chunk)
        else:
            backward_fn((reps_chunk * grad_chunk.detach()).sum())
        del reps_chunk
    return loss, metrics


def full_batch_step(
    embed_fn: EmbedFn,
    roles: Roles,
    loss_fn: LossFn,
    chunk_size: int | None = None,
    backward_fn: BackwardFn | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The plain step, same signature as `grad_cache_step`: embed with grad, loss, one backward.

    Embeds each role in chunks of `chunk_size` rows (None: one call per role) and keeps every
    chunk's graph, so memory grows with the whole batch; with the same `chunk_size` it consumes the
    RNG exactly like `grad_cache_step`, hence equal dropout masks and equal results. The backward is
    ``backward_fn(loss)`` if given, else ``loss.backward()``. Returns (loss detached, metrics).
    """
    _validate(roles, chunk_size)
    reps: dict[str, torch.Tensor] = {}
    for role, fields in roles.items():
        parts = [
            _check_reps(role, embed_fn(c), _role_length(role, c)) for c in iter_chunks(fields, chunk_size, role)
        ]
        reps[role] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    loss, metrics = loss_fn(reps)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return (scalar loss tensor, metrics)")
    if backward_fn is None:
        loss.backward()
    else:
        backward_fn(loss)
    return loss.detach(), metrics


def merged_batch_step(
    embed_fn: EmbedFn,
    roles: Roles,
    loss_fn: LossFn,
    chunk_size: int | None = None,
    backward_fn: BackwardFn | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`full_batch_step` with every role embedded in ONE `embed_fn` call: the roles' fields (lists, e.g.
    token-id lists for a packed forward) are concatenated, the representations split back per role before
    `loss_fn`. One forward/backward instead of one per role: a third of the kernel launches, which is what
    limits a small model on a fast GPU. Same loss and gradients (dropout masks are drawn differently).
    `chunk_size` must be None (use `grad_cache_step` for chunks)."""
    if chunk_size is not None:
        raise ValueError("merged_batch_step embeds the whole batch at once: chunk_size must be None")
    _validate(roles, None)
    names = list(roles)
    sizes = [_role_length(r, roles[r]) for r in names]
    merged = _merge_fields([roles[r] for r in names])

    def split_loss(reps: dict[str, torch.Tensor]):
        return loss_fn(dict(zip(names, torch.split(reps["all"], sizes))))

    return full_batch_step(embed_fn, {"all": merged}, split_loss, None, backward_fn)


def _merge_fields(parts: list[Chunk]) -> Chunk:
    keys = list(parts[0])
    if any(list(p) != keys for p in parts):
        raise ValueError("merging roles needs the same fields in every role")
    return {k: (torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor)
                else [x for p in parts for x in p[k]]) for k in keys}


def merged_chunk_count(roles: Roles, chunk_size: int) -> int:
    """How many chunks `merged_chunks` makes: ceil(rows of all roles / chunk_size), at most the rows of the
    largest role (so no chunk is empty)."""
    sizes = [_role_length(r, f) for r, f in roles.items()]
    return min(-(-sum(sizes) // chunk_size), max(sizes))


def merged_chunks(roles: Roles, chunk_size: int) -> tuple[list[Chunk], list[list[tuple[str, int, int]]]]:
    """Split a batch into ceil(total rows / `chunk_size`) chunks that each hold EVERY role: chunk j of n holds
    rows [s*j//n, s*(j+1)//n) of each role of s rows, so a chunk has about `chunk_size` rows in all (at most
    one more per role; with a `chunk_size` below the number of roles, one row of the largest role) and the roles
    in the batch's proportions (e.g. per query one positive and K hard negatives). Returns (merged chunks, for
    each chunk its pieces as (role, start, stop) in merge order)."""
    _validate(roles, chunk_size)
    if chunk_size is None:
        raise ValueError("merged_chunks needs a chunk_size")
    names = list(roles)
    sizes = {r: _role_length(r, roles[r]) for r in names}
    n = merged_chunk_count(roles, chunk_size)
    chunks, layout = [], []
    for j in range(n):
        pieces = [(r, sizes[r] * j // n, sizes[r] * (j + 1) // n) for r in names]
        pieces = [p for p in pieces if p[2] > p[1]]
        chunks.append(_merge_fields([{k: v[a:b] for k, v in roles[r].items()} for r, a, b in pieces]))
        layout.append(pieces)
    return chunks, layout


def merged_grad_cache_step(
    embed_fn: EmbedFn,
    roles: Roles,
    loss_fn: LossFn,
    chunk_size: int | None,
    backward_fn: BackwardFn | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`grad_cache_step` whose chunks each hold all roles of a slice of the batch (`merged_chunks`): with
    packing, chunk j's queries, positives and hard negatives go through the backbone as ONE packed row, as
    `merged_batch_step` does for the whole batch, instead of one chunk per role (a chunk of queries alone is a
    short row of short texts). `chunk_size` counts rows of all roles together, so peak activation memory stays
    that of about `chunk_size` texts. Same loss and gradients as `grad_cache_step` (dropout masks are drawn
    differently)."""
    chunks, layout = merged_chunks(roles, chunk_size)
    names = list(roles)
    sizes = [_role_length(r, roles[r]) for r in names]
    # position in the role-ordered batch of every row of the merged order
    offsets = dict(zip(names, [sum(sizes[:i]) for i in range(len(names))]))
    order = torch.cat([torch.arange(offsets[r] + a, offsets[r] + b) for pieces in layout for r, a, b in pieces])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))

    def role_loss(merged_reps: torch.Tensor):
        return loss_fn(dict(zip(names, torch.split(merged_reps[inverse.to(merged_reps.device)], sizes))))

    return _grad_cache(embed_fn, [("merged chunk", c) for c in chunks], role_loss, backward_fn)
