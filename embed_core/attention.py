"""Causal or bidirectional attention for Hugging Face decoders.

Bidirectional attention is done in two places, because either alone fails silently in some path:
1. every attention module gets ``is_causal = False`` (SDPA / flash kernels read this flag);
2. the model receives a ready 4D additive mask that masks only padded *keys* — transformers passes a
   4D mask through untouched instead of building its causal mask, for eager and SDPA alike.
Causal attention gets the same kind of 4D mask with the lower triangle, so both modes share one code path.
Padded *query* rows may always see themselves: a fully masked row would give NaN in float64 eager attention
(seen with transformers' own causal mask under left padding) and NaN leaks into real rows through 0 * NaN.
Position ids are always derived from the padding mask, so left and right padding give the same states.
A behavioural test (tests/test_attention.py) proves it per architecture and backend.

Sliding-window layers (Gemma2/3: local layers of window W interleaved with global ones) keep their window,
as pretrained: a causal local layer sees keys q - W < k <= q, a bidirectional one keys |q - k| < W (symmetric,
as transformers' `use_bidirectional_attention` and EmbeddingGemma do); global layers see the whole text. The
model then gets one mask per layer type ({"full_attention": ..., "sliding_attention": ...}), which these
architectures pass through as they do a single 4D mask; a single 4D mask would silently make every layer global.
"""
from __future__ import annotations

import torch
from torch import nn


def set_causal(model: nn.Module, causal: bool) -> int:
    """Set ``is_causal`` on every attention module of `model`; returns how many were changed."""
    n = 0
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(getattr(module, "is_causal"), bool):
            module.is_causal = causal
            n += 1
    if n == 0 and not causal:
        raise RuntimeError(f"{type(model).__name__} exposes no attention module with an is_causal flag: "
                           "bidirectional attention cannot be enabled for this architecture")
    return n


def sliding_window(config) -> int | None:
    """The window of the model's sliding-window layers, or None when every layer is global."""
    window = getattr(config, "sliding_window", None)
    return window if window and "sliding_attention" in (getattr(config, "layer_types", None) or ()) else None


def attention_mask_4d(attention_mask: torch.Tensor, causal: bool, dtype: torch.dtype,
                      window: int | None = None) -> torch.Tensor:
    """[B, T] 0/1 padding mask -> [B, 1, T, T] additive mask (0 = attend, dtype min = blocked).

    Keys that are pads are blocked; with `causal`, keys after the query too; with `window`, keys W or more
    tokens away (real tokens are contiguous under left or right padding, so index distance = position distance).
    Every row keeps its diagonal, so no row is fully masked (no NaN in softmax); real rows attend to real tokens only.
    """
    t = attention_mask.shape[-1]
    dev = attention_mask.device
    keep = attention_mask.to(torch.bool)[:, None, None, :].expand(-1, 1, t, t)
    if causal:
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    if window is not None and t > window:
        keep = keep & torch.ones(t, t, dtype=torch.bool, device=dev).triu(1 - window).tril(window - 1)
    keep = keep | torch.eye(t, dtype=torch.bool, device=dev)
    mask = torch.zeros(keep.shape, dtype=dtype, device=dev)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: identical for left and right padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def per_layer_type(full, make_windowed, window: int | None, longest: int):
    """The mask argument for a model with sliding-window layers (`window`): one mask per layer type, the windowed
    one built only when a text is longer than the window (else it equals the full mask); `full` alone otherwise."""
    if window is None:
        return full
    return {"full_attention": full, "sliding_attention": make_windowed() if longest > window else full}


def backbone_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, bidirectional: bool, dtype: torch.dtype,
                    window: int | None = None) -> dict:
    """Keyword arguments for a HF decoder forward that embed (not generate): no KV cache, explicit mask
    (per layer type when the model has sliding-window layers of `window`, see `sliding_window`).

    The explicit mask matters: packing via position_ids alone would let documents attend to each other."""
    causal = not bidirectional
    full = attention_mask_4d(attention_mask, causal=causal, dtype=dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": per_layer_type(full, lambda: attention_mask_4d(attention_mask, causal, dtype, window),
                                         window, attention_mask.shape[-1]),
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
