"""Sequence packing: many texts in one row, no padding, with a per-document attention mask.

A `PackedBatch` holds n documents concatenated into one row of ``total`` tokens (rounded up to a multiple
of ``pad_to`` with filler tokens that form their own dummy document), position ids restarting at 0 for every
document, and the indices needed to pool per document. The attention mask keeps every document to itself,
causal or bidirectional:

* ``flex_attention``: a FlexAttention `BlockMask` built directly from the document boundaries (block-level
  sparsity computed with a few tensor ops, no dense [T, T] mask, no host sync), so the cost is the sum of
  the documents' squared lengths, not the square of the row;
* ``flash_varlen``: no mask at all -- the documents' cumulative lengths (``cu_seqlens``) go to the
  variable-length FlashAttention kernel (`torch.nn.attention.varlen`), which computes each document's
  attention on its own: no block rounding, no work outside the documents, causal or bidirectional;
* ``sdpa`` / ``eager``: a dense 4D additive block-diagonal mask (exact, O(T^2) memory: for CPU and tests).

transformers passes a ready 4D mask (or BlockMask) through untouched; it infers packed documents from
position ids only when no mask is given -- we always give one, so documents never attend to each other.
Sliding-window layers (Gemma3) keep their window inside each document (embed_core.attention says why): a
second mask per layer type, or the kernel's window under flash_varlen.

This module imports torch only.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import per_layer_type

# FlexAttention, varlen attention, dynamo and transformers' attention registry are imported where used: their
# modules differ between torch / transformers versions, and a padded (SDPA) model never touches them.
FLEX_BLOCK = 128


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [1, T] long
    position_ids: torch.Tensor   # [1, T] long, restarting per document
    doc_ids: torch.Tensor        # [T] long, document index per token (n for the filler tail)
    lengths: torch.Tensor        # [n] long, tokens per document
    starts: torch.Tensor         # [n] long, first token of each document
    gather_index: torch.Tensor   # [n, Lmax] long, token index of (doc, offset), clamped to the doc
    pad_mask: torch.Tensor       # [n, Lmax] long, 1 where offset < length (a right-padded view)
    num_real_tokens: int         # sum(lengths), known on the host

    @property
    def num_docs(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def last_index(self) -> torch.Tensor:
        return self.starts + self.lengths - 1

    def to(self, device, non_blocking: bool = True) -> "PackedBatch":
        """One host->device copy: every index tensor (all int64) goes in one flat buffer, pinned when the target
        is a GPU, so the copy is asynchronous and costs one transfer, not eight."""
        device = torch.device(device)
        names = [k for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)]
        tensors = [getattr(self, k) for k in names]
        if all(t.device == device for t in tensors):
            return self
        flat = torch.cat([t.reshape(-1).to(torch.long) for t in tensors])
        if device.type == "cuda" and flat.device.type == "cpu":
            flat = flat.pin_memory()
        parts = flat.to(device, non_blocking=non_blocking).split([t.numel() for t in tensors])
        fields = dict(self.__dict__)
        fields.update({k: p.view(t.shape) for k, p, t in zip(names, parts, tensors)})
        return PackedBatch(**fields)


def pack_ids(ids: Sequence[Sequence[int]], pad_id: int, pad_to: int = 1) -> PackedBatch:
    """Concatenate token-id lists (EOS already appended, truncated) into one packed row, on the host."""
    if len(ids) == 0:
        raise ValueError("pack_ids needs at least one document")
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    if int(lengths.min()) < 1:
        raise ValueError("pack_ids got an empty document: every text keeps at least its EOS token")
    n = len(ids)
    real = int(lengths.sum())
    total = -(-real // pad_to) * pad_to
    flat = torch.full((total,), pad_id, dtype=torch.long)
    flat[:real] = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    doc_ids = torch.full((total,), n, dtype=torch.long)
    doc_ids[:real] = torch.repeat_interleave(torch.arange(n), lengths)
    pos = torch.arange(total, dtype=torch.long)
    pos[:real] -= torch.repeat_interleave(starts, lengths)
    pos[real:] -= real
    lmax = int(lengths.max())
    off = torch.arange(lmax)[None, :]
    pad_mask = (off < lengths[:, None]).long()
    gather = starts[:, None] + torch.minimum(off, lengths[:, None] - 1)
    return PackedBatch(flat[None], pos[None], doc_ids, lengths, starts, gather, pad_mask, real)


def unpack(states: torch.Tensor, pack: PackedBatch) -> torch.Tensor:
    """[1 or -, T, H] packed states -> [n, Lmax, H] right-padded (pads repeat the last real state)."""
    return states.reshape(-1, states.shape[-1])[pack.gather_index]


def packed_eos_last(states: torch.Tensor, pack: PackedBatch) -> torch.Tensor:
    return states.reshape(-1, states.shape[-1])[pack.last_index]


def packed_mean(states: torch.Tensor, pack: PackedBatch) -> torch.Tensor:
    flat = states.reshape(-1, states.shape[-1])
    out = torch.zeros(pack.num_docs + 1, flat.shape[-1], dtype=torch.float32, device=flat.device)
    out.index_add_(0, pack.doc_ids, flat.float())
    return (out[:-1] / pack.lengths[:, None].to(torch.float32)).to(states.dtype)


# ------------------------------------------------------------------------------------------ masks
def dense_mask(pack: PackedBatch, causal: bool, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """[1, 1, T, T] additive mask: same document (and kv <= q when causal; |q - kv| < window when given)."""
    d = pack.doc_ids
    keep = d[:, None] == d[None, :]
    t = d.shape[0]
    if causal:
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=d.device).tril()
    if window is not None:
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=d.device).triu(1 - window).tril(window - 1)
    mask = torch.zeros(keep.shape, dtype=dtype, device=d.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)[None, None]


def doc_mask_mod(doc_ids: torch.Tensor, causal: bool, window: int | None = None):
    if window is not None:
        inner = doc_mask_mod(doc_ids, causal)

        def windowed(b, h, q, kv):
            return inner(b, h, q, kv) & ((q - kv).abs() < window)
        return windowed
    if causal:
        def mask_mod(b, h, q, kv):
            return (doc_ids[q] == doc_ids[kv]) & (q >= kv)
    else:
        def mask_mod(b, h, q, kv):
            return doc_ids[q] == doc_ids[kv]
    return mask_mod


def flex_block_mask(pack: PackedBatch, causal: bool, block: int = FLEX_BLOCK, window: int | None = None):
    """FlexAttention BlockMask for the packed row, from the document boundaries (documents are contiguous,
    so each block spans the document range [first, last]; two blocks interact iff their ranges overlap).
    With `window`: blocks whose closest tokens are `window` or more apart are skipped, and a block is full only
    when its farthest tokens are closer than `window`."""
    from torch.nn.attention.flex_attention import BlockMask

    d = pack.doc_ids
    t = d.shape[0]
    nb = -(-t // block)
    padded = torch.cat([d, d[-1:].expand(nb * block - t)]) if nb * block != t else d
    blocks = padded.view(nb, block)
    lo, hi = blocks[:, 0], blocks[:, -1]  # doc ids are non-decreasing along the row
    overlap = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])
    full = (lo == hi)[:, None] & (lo == hi)[None, :] & (lo[:, None] == lo[None, :])
    if nb * block != t:  # the last block has out-of-range positions: never 'full'
        full[-1, :] = False
        full[:, -1] = False
    qi = torch.arange(nb, device=d.device)
    if causal:
        overlap &= qi[None, :] <= qi[:, None]
        full &= qi[None, :] < qi[:, None]
    if window is not None:
        gap = (qi[:, None] - qi[None, :]).abs()
        overlap &= (gap - 1) * block + 1 < window  # the closest pair of two distinct blocks
        full &= (gap + 1) * block - 1 < window     # the farthest pair
    partial = overlap & ~full

    def to_idx(m: torch.Tensor):
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    kv_num, kv_idx = to_idx(partial)
    full_num, full_idx = to_idx(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=doc_mask_mod(d, causal, window), seq_lengths=(t, t))


def cu_seqlens(pack: PackedBatch) -> torch.Tensor:
    """[n + 1] int32 cumulative document lengths (the filler tail, if any, is one more document)."""
    ends = torch.cumsum(pack.lengths, 0)
    total = pack.input_ids.shape[-1]
    parts = [ends.new_zeros(1), ends]
    if total > pack.num_real_tokens:
        parts.append(ends.new_full((1,), total))
    return torch.cat(parts).to(torch.int32)


def varlen_kwargs(pack: PackedBatch) -> dict:
    """Keyword arguments that carry the document boundaries through a transformers backbone to
    `varlen_attention_forward` (decoder layers pass their **kwargs to the attention function)."""
    cu = cu_seqlens(pack)
    total = pack.input_ids.shape[-1]
    # the longest document is the width of gather_index: a shape, known on the host (no device sync)
    longest = max(int(pack.gather_index.shape[1]), total - pack.num_real_tokens)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_attention_mask(pack: PackedBatch, causal: bool, attn_implementation: str, dtype: torch.dtype,
                          window: int | None = None):
    """The per-document mask for the backbone; with sliding-window layers (`window`), one per layer type."""

    if attn_implementation == "flash_varlen":
        return None  # the boundaries travel as varlen_kwargs, the window as each layer's sliding_window
    if attn_implementation == "flex_attention":
        make = lambda w=None: flex_block_mask(pack, causal, window=w)  # noqa: E731
    else:
        make = lambda w=None: dense_mask(pack, causal, dtype, w)  # noqa: E731
    # the longest document is the width of gather_index: a shape, known on the host
    return per_layer_type(make(), lambda: make(window), window, int(pack.gather_index.shape[1]))


# ------------------------------------------------------------------------------------------ attention
FLEX_IMPL_NAME = "embed_flex"
_compiled = None


RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function recompile limit to `limit` (never lower it). Packed rows change length every
    step and causal / bidirectional, training / no-grad and FlexAttention's masks each add compiled variants; past
    the default limit (8) dynamo silently runs the function eagerly from then on, and an eager FlexAttention is
    orders of magnitude slower. The benchmarks ran with 64."""
    import torch._dynamo as dynamo

    if dynamo.config.cache_size_limit < limit:
        dynamo.config.cache_size_limit = limit


def _flex_fn(is_cuda: bool):
    """torch.compile'd flex_attention on GPU (the fused kernel; automatic dynamic shapes after the first
    length); eager on CPU (a reference implementation, for tests)."""
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    if not is_cuda:
        return flex_attention
    if _compiled is None:
        allow_recompiles()
        _compiled = torch.compile(flex_attention)
    return _compiled


def flex_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: FlexAttention when given a BlockMask (the packed path), else SDPA
    with the explicit 4D mask (the padded path), so one backbone serves both. [B,H,T,D] -> [B,T,H,D]."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout and module.training:
        raise ValueError("attention dropout is not supported on the packed FlexAttention path: set it to 0")
    gqa = query.shape[1] != key.shape[1]
    if not query.is_cuda and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        # FlexAttention has no CPU backward: the same mask, materialised, through SDPA (CPU tests only)
        from torch.nn.attention.flex_attention import create_mask

        t = query.shape[2]
        dense = create_mask(attention_mask.mask_mod, 1, 1, t, t, device=query.device)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=dense, scale=scaling,
                                                               enable_gqa=gqa)
    else:
        out = _flex_fn(query.is_cuda)(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register_flex() -> str:
    """Register `flex_attention_forward` with transformers; returns the attn_implementation name to load with."""
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX_IMPL_NAME, flex_attention_forward)
    return FLEX_IMPL_NAME


# ------------------------------------------------------------------------------------------ varlen attention
VARLEN_IMPL_NAME = "embed_varlen"


def _varlen_reference(q, k, v, cu, causal: bool, scale, window: int | None = None):
    """The same computation as the varlen kernel, per document through SDPA (CPU; tests)."""
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        keep = None
        if window is not None and b - a > window:
            keep = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1 - window).tril(0 if causal else window - 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=keep, is_causal=causal and keep is None, scale=scale,
            enable_gqa=qd.shape[0] != kd.shape[0]).transpose(0, 1))
    return torch.cat(outs)


_VARLEN = None  # (op, takes window_size, takes enable_gqa): resolved once, outside any compiled region


def _varlen_kernel():
    """torch's variable-length FlashAttention op and how to ask it for causal / GQA (its keywords changed
    between torch releases: `is_causal` at first, `window_size` in 2.11, `enable_gqa` later)."""
    global _VARLEN
    if _VARLEN is None:

        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        _VARLEN = (varlen_attn, "window_size" in params, "enable_gqa" in params)
    return _VARLEN


def varlen_attention(q, k, v, cu, max_len: int, causal: bool, scale=None, window: int | None = None):
    """[T, H, D] packed q / k / v (k, v may have fewer heads) -> [T, H, D], each document on its own; with
    `window` (a sliding-window layer), keys |q - k| < window only (and k <= q when causal)."""
    if window is not None and max_len <= window:
        window = None  # no document is longer than the window: it changes nothing
    if not q.is_cuda:
        return _varlen_reference(q, k, v, cu, causal, scale, window)
    fn, has_window, has_gqa = _varlen_kernel()
    kw = {"scale": scale}
    side = -1 if window is None else window - 1
    if has_window:
        kw["window_size"] = (side, 0) if causal else (side, side)
    elif window is not None:
        raise ValueError(f"this torch's varlen_attn has no window_size: documents longer than the sliding window "
                         f"({window}) need torch >= 2.11, or attn_implementation='flex_attention'")
    else:
        kw["is_causal"] = causal
    if has_gqa and q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    # Without the flag (torch 2.11) the FlashAttention kernel takes fewer kv heads natively: the same output
    # and gradients as repeated heads (checked on an H100 by bench/probe_varlen_gqa.py), without the copies.
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: variable-length FlashAttention over packed documents when the
    backbone got `varlen_kwargs` (the packed path), else SDPA with the explicit 4D mask (the padded path).
    Causal or bidirectional follows the module's ``is_causal`` flag (attention.set_causal). [1,H,T,D] -> [1,T,H,D]."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if attention_mask is None:  # a packed row without its boundaries would attend across documents
            raise ValueError("flash_varlen attention got neither document boundaries (cu_seq_lens_q) nor a 4D "
                             "mask: call the backbone with EmbeddingModel.packed_inputs(...) or a padded 4D mask")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout and module.training:
        raise ValueError("attention dropout is not supported on the packed varlen path: set it to 0")
    if query.shape[0] != 1:
        raise ValueError(f"the varlen path takes one packed row, got a batch of {query.shape[0]}")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    out = varlen_attention(q, k, v, cu, int(kwargs["max_length_q"]), bool(module.is_causal), scaling,
                           kwargs.get("sliding_window"))
    return out[None], None


def register_varlen() -> str:
    """Register `varlen_attention_forward` with transformers; returns the attn_implementation name to load with."""
    from transformers import AttentionInterface

    if torch.cuda.is_available():
        _varlen_kernel()
    AttentionInterface.register(VARLEN_IMPL_NAME, varlen_attention_forward)
    return VARLEN_IMPL_NAME


def register_attention(attn_implementation: str) -> str:
    """The name to load a transformers model with: this module's attention function for ``flex_attention`` and
    ``flash_varlen`` (registered with transformers), anything else unchanged."""
    fn = {"flex_attention": register_flex, "flash_varlen": register_varlen}
    return fn[attn_implementation]() if attn_implementation in fn else attn_implementation
