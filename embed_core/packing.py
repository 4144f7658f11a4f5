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
* ``bucketed``: made for the very short texts of embedding training (median 14-36 tokens): documents of up to
  128 tokens are laid out in slots of 16 / 32 / 64 / 128 tokens and attend densely inside their slot (two
  batched matmuls and a masked softmax per width, the query heads of one kv head stacked so GQA needs no
  repeated heads); longer documents go to the variable-length FlashAttention kernel. FlexAttention and varlen
  FlashAttention spend a whole 128-row tile (and per-tile setup) on each short text; here the work is the
  slots' own size. Host-side layout, built once per packed row (`bucket_layout`);
* ``sdpa`` / ``eager``: a dense 4D additive block-diagonal mask (exact, O(T^2) memory: for CPU and tests).

transformers passes a ready 4D mask (or BlockMask) through untouched; it infers packed documents from
position ids only when no mask is given -- we always give one, so documents never attend to each other.

This module imports torch only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

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
    # the bucketed attention's layout (bucket_layout; None unless packed for attn_implementation="bucketed")
    slot_index: torch.Tensor | None = None    # [sum n_w * w] token index of each slot position, widths in order
    slot_lengths: torch.Tensor | None = None  # [sum n_w] document length in each slot (1 for filler slots)
    slot_counts: tuple[int, ...] | None = None  # n_w per width of BUCKET_WIDTHS (host ints)
    long_index: torch.Tensor | None = None    # [T_long] token index of the documents longer than the widest slot
    long_cu: torch.Tensor | None = None       # [n_long + 1] cumulative lengths of those documents
    long_max: int = 0                         # the longest of them
    inverse: torch.Tensor | None = None       # [T] row of each packed token in the concatenated slot/long outputs

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


def pack_ids(ids: Sequence[Sequence[int]], pad_id: int, pad_to: int = 1, bucketed: bool = False) -> PackedBatch:
    """Concatenate token-id lists (EOS already appended, truncated) into one packed row, on the host.
    `bucketed`: also build the bucketed attention's layout (`bucket_layout`)."""
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
    pack = PackedBatch(flat[None], pos[None], doc_ids, lengths, starts, gather, pad_mask, real)
    if bucketed:
        for k, v in bucket_layout(lengths, total).items():
            setattr(pack, k, v)
    return pack


BUCKET_WIDTHS = (16, 32, 64, 128)  # slot widths of the bucketed attention; longer documents go to varlen
MIN_SLOTS = 2  # every width keeps >= 2 slots (filler slots if need be): no 0/1-size specialisation in compile


def bucket_layout(lengths: torch.Tensor, total: int, widths: Sequence[int] = BUCKET_WIDTHS) -> dict:
    """The bucketed attention's layout of one packed row, on the host (PackedBatch fields).

    Document d of length L <= widths[-1] gets a slot of the smallest width w >= L: ``slot_index`` holds its w
    token positions (offsets past L repeat its last token; they are masked as keys and their outputs are never
    read). Longer documents are listed token by token in ``long_index`` with their boundaries ``long_cu``. A
    filler tail (rows rounded up) is one more document. Each width gets filler slots up to MIN_SLOTS (token 0,
    length 1) and the long part a 2-token filler document if it is empty, so the compiled graph sees the same
    structure for every row. ``inverse[t]`` is the row of token t in cat(flattened slot outputs, long outputs)."""
    lens = lengths.tolist()
    real = sum(lens)
    if total > real:
        lens.append(total - real)
    starts = [0] * len(lens)
    for i in range(1, len(lens)):
        starts[i] = starts[i - 1] + lens[i - 1]
    by_width: list[list[int]] = [[] for _ in widths]
    longs: list[int] = []
    for d, n in enumerate(lens):
        for b, w in enumerate(widths):
            if n <= w:
                by_width[b].append(d)
                break
        else:
            longs.append(d)
    inverse = torch.empty(total, dtype=torch.long)
    slot_index, slot_lengths, counts, row = [], [], [], 0
    for b, w in enumerate(widths):
        docs = by_width[b]
        if docs:
            st = torch.tensor([starts[d] for d in docs])
            ln = torch.tensor([lens[d] for d in docs])
            off = torch.arange(w)
            idx = st[:, None] + torch.minimum(off[None, :], ln[:, None] - 1)  # [n, w]
            valid = off[None, :] < ln[:, None]
            rows = row + torch.arange(len(docs) * w).view(len(docs), w)
            inverse[idx[valid]] = rows[valid]
        else:
            idx, ln = torch.zeros(0, w, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        fill = max(MIN_SLOTS - len(docs), 0)
        idx = torch.cat([idx, torch.zeros(fill, w, dtype=torch.long)])
        ln = torch.cat([ln, torch.ones(fill, dtype=torch.long)])
        slot_index.append(idx.reshape(-1))
        slot_lengths.append(ln)
        counts.append(int(ln.shape[0]))
        row += int(ln.shape[0]) * w
    if longs:
        long_index = torch.cat([torch.arange(starts[d], starts[d] + lens[d]) for d in longs])
        long_lens = torch.tensor([lens[d] for d in longs])
        inverse[long_index] = row + torch.arange(long_index.shape[0])
    else:
        long_index, long_lens = torch.zeros(2, dtype=torch.long), torch.tensor([2])
    long_cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(long_lens, 0)])
    return {"slot_index": torch.cat(slot_index), "slot_lengths": torch.cat(slot_lengths), "slot_counts": tuple(counts),
            "long_index": long_index, "long_cu": long_cu, "long_max": int(long_lens.max()), "inverse": inverse}


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, pad_to: int = 1) -> PackedBatch:
    """Pack a padded batch (left or right padding) -- the same documents, no padding."""
    rows = [r[m.bool()].tolist() for r, m in zip(input_ids.cpu(), attention_mask.cpu())]
    return pack_ids(rows, pad_id, pad_to)


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
def dense_mask(pack: PackedBatch, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, T, T] additive mask: same document (and kv <= q when causal)."""
    d = pack.doc_ids
    keep = d[:, None] == d[None, :]
    if causal:
        t = d.shape[0]
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=d.device).tril()
    mask = torch.zeros(keep.shape, dtype=dtype, device=d.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)[None, None]


def doc_mask_mod(doc_ids: torch.Tensor, causal: bool):
    if causal:
        def mask_mod(b, h, q, kv):
            return (doc_ids[q] == doc_ids[kv]) & (q >= kv)
    else:
        def mask_mod(b, h, q, kv):
            return doc_ids[q] == doc_ids[kv]
    return mask_mod


def flex_block_mask(pack: PackedBatch, causal: bool, block: int = FLEX_BLOCK):
    """FlexAttention BlockMask for the packed row, from the document boundaries (documents are contiguous,
    so each block spans the document range [first, last]; two blocks interact iff their ranges overlap)."""
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
    partial = overlap & ~full

    def to_idx(m: torch.Tensor):
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    kv_num, kv_idx = to_idx(partial)
    full_num, full_idx = to_idx(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=doc_mask_mod(d, causal), seq_lengths=(t, t))


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


def bucketed_kwargs(pack: PackedBatch, widths: Sequence[int] = BUCKET_WIDTHS) -> dict:
    """Keyword arguments that carry the bucketed layout through a transformers backbone to
    `bucketed_attention_forward` (per-width views of the flat slot tensors; the split sizes are host ints)."""
    if pack.slot_index is None:
        raise ValueError("this PackedBatch has no bucketed layout: pack it with pack_ids(..., bucketed=True) "
                         "(EmbeddingModel.pack does so under attn_implementation='bucketed')")
    counts = pack.slot_counts
    slots = tuple(t.view(n, w) for t, n, w in zip(pack.slot_index.split([n * w for n, w in zip(counts, widths)]),
                                                  counts, widths))
    return {"bucket_slots": slots, "bucket_lengths": tuple(pack.slot_lengths.split(list(counts))),
            "bucket_long": (pack.long_index, pack.long_cu.to(torch.int32)), "bucket_long_max": pack.long_max,
            "bucket_inverse": pack.inverse}


def packed_attention_mask(pack: PackedBatch, causal: bool, attn_implementation: str, dtype: torch.dtype):
    if attn_implementation == "flex_attention":
        return flex_block_mask(pack, causal)
    if attn_implementation in ("flash_varlen", "bucketed"):
        return None  # the boundaries / the layout travel as keyword arguments
    return dense_mask(pack, causal, dtype)


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


def _varlen_reference(q, k, v, cu, causal: bool, scale):
    """The same computation as the varlen kernel, per document through SDPA (CPU; tests)."""
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, is_causal=causal, scale=scale, enable_gqa=qd.shape[0] != kd.shape[0]).transpose(0, 1))
    return torch.cat(outs)


_VARLEN = None  # (op, takes window_size, takes enable_gqa): resolved once, outside any compiled region


def _varlen_kernel():
    """torch's variable-length FlashAttention op and how to ask it for causal / GQA (its keywords changed
    between torch releases: `is_causal` at first, `window_size` in 2.11, `enable_gqa` later)."""
    global _VARLEN
    if _VARLEN is None:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        _VARLEN = (varlen_attn, "window_size" in params, "enable_gqa" in params)
    return _VARLEN


def varlen_attention(q, k, v, cu, max_len: int, causal: bool, scale=None):
    """[T, H, D] packed q / k / v (k, v may have fewer heads) -> [T, H, D], each document on its own."""
    if not q.is_cuda:
        return _varlen_reference(q, k, v, cu, causal, scale)
    fn, has_window, has_gqa = _varlen_kernel()
    kw = {"scale": scale}
    if has_window:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
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
    out = varlen_attention(q, k, v, cu, int(kwargs["max_length_q"]), bool(module.is_causal), scaling)
    return out[None], None


def register_varlen() -> str:
    """Register `varlen_attention_forward` with transformers; returns the attn_implementation name to load with."""
    from transformers import AttentionInterface

    if torch.cuda.is_available():
        _varlen_kernel()
    AttentionInterface.register(VARLEN_IMPL_NAME, varlen_attention_forward)
    return VARLEN_IMPL_NAME


# ------------------------------------------------------------------------------------------ bucketed attention
BUCKETED_IMPL_NAME = "embed_bucketed"


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q @ k^T in at least float32: on CUDA a bf16 / fp16 GEMM writes fp32 itself (as a flash kernel keeps its
    scores in fp32); elsewhere the product in the inputs' dtype, promoted."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q, k.transpose(1, 2)).to(torch.promote_types(q.dtype, torch.float32))


def slot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor,
                   causal: bool, scale: float) -> torch.Tensor:
    """Dense attention inside slots of one width: q [T, Hq, D], k / v [T, Hk, D], idx [n, w] token positions,
    lengths [n] -> [n * w, Hq, D] (rows past a slot's length are computed and never read). The Hq / Hk query
    heads sharing a kv head are stacked along the query axis: one [g * w, w] score matrix per (slot, kv head)."""
    n, w = idx.shape
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    g = hq // hk
    qs = q[idx].view(n, w, hk, g, d).permute(0, 2, 3, 1, 4).reshape(n * hk, g * w, d)
    ks = k[idx].permute(0, 2, 1, 3).reshape(n * hk, w, d)
    vs = v[idx].permute(0, 2, 1, 3).reshape(n * hk, w, d)
    s = _scores(qs, ks).view(n, hk, g, w, w) * scale
    pos = torch.arange(w, device=q.device)
    keep = (pos[None, :] < lengths[:, None])[:, None, None, None, :]  # [n, 1, 1, 1, w] real keys
    if causal:
        keep = keep & (pos[None, :] <= pos[:, None])  # key offset <= query offset
    p = s.masked_fill(~keep, float("-inf")).softmax(-1).to(q.dtype).view(n * hk, g * w, w)
    out = torch.bmm(p, vs)  # [n * hk, g * w, d]
    return out.view(n, hk, g, w, d).permute(0, 3, 1, 2, 4).reshape(n * w, hq, d)


def bucketed_attention(q, k, v, slots, lengths, long, long_max: int, inverse, causal: bool, scale=None):
    """[T, Hq, D] packed q and [T, Hk, D] k / v -> [T, Hq, D]: each document attends to itself only, short ones
    densely in their slots, long ones through `varlen_attention`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = [slot_attention(q, k, v, idx, ln, causal, scale) for idx, ln in zip(slots, lengths)]
    long_index, long_cu = long
    outs.append(varlen_attention(q[long_index], k[long_index], v[long_index], long_cu, long_max, causal, scale))
    return torch.cat(outs)[inverse]


def bucketed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: bucketed attention over packed documents when the backbone got
    `bucketed_kwargs` (the packed path), else SDPA with the explicit 4D mask (the padded path). Causal or
    bidirectional follows the module's ``is_causal`` flag. [1,H,T,D] -> [1,T,H,D]."""
    slots = kwargs.get("bucket_slots")
    if slots is None:
        if attention_mask is None:  # a packed row without its layout would attend across documents
            raise ValueError("bucketed attention got neither its layout (bucket_slots) nor a 4D mask: call the "
                             "backbone with EmbeddingModel.packed_inputs(...) or a padded 4D mask")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout and module.training:
        raise ValueError("attention dropout is not supported on the packed bucketed path: set it to 0")
    if query.shape[0] != 1:
        raise ValueError(f"the bucketed path takes one packed row, got a batch of {query.shape[0]}")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    out = bucketed_attention(q, k, v, slots, kwargs["bucket_lengths"], kwargs["bucket_long"],
                             int(kwargs["bucket_long_max"]), kwargs["bucket_inverse"], bool(module.is_causal), scaling)
    return out[None], None


def register_bucketed() -> str:
    """Register `bucketed_attention_forward` with transformers; returns the attn_implementation name to load with."""
    from transformers import AttentionInterface

    if torch.cuda.is_available():
        _varlen_kernel()
    AttentionInterface.register(BUCKETED_IMPL_NAME, bucketed_attention_forward)
    return BUCKETED_IMPL_NAME


def register_attention(attn_implementation: str) -> str:
    """The name to load a transformers model with: this module's attention function for ``flex_attention``,
    ``flash_varlen`` and ``bucketed`` (registered with transformers), anything else unchanged."""
    fn = {"flex_attention": register_flex, "flash_varlen": register_varlen, "bucketed": register_bucketed}
    return fn[attn_implementation]() if attn_implementation in fn else attn_implementation
