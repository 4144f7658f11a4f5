"""Pooling heads: token states -> one vector per text. Each is an nn.Module whose parameters (if any) are
saved with the model (`pooling_head.safetensors`).

- ``eos_last``: the state of the last real (non-pad) token, for left or right padding; the tokenizer
  wrapper appends EOS, so this is the EOS state.
- ``mean``: masked mean of the last layer.
- ``last_layer_trainable``: trainable latents cross-attend to the last layer's token states (pads masked),
  then a small MLP, then the mean over latents.
- ``multi_layer_trainable`` (arXiv 2409.02727): one vector per layer (EOS-last under causal attention,
  masked mean under bidirectional), plus a trainable per-layer embedding, then the same latent
  cross-attention over the L layer vectors, mean over latents.

The paper's Mistral-7B head had ~1.3B parameters (inner dim and latents sized for 4096 hidden and
512 latents). Defaults here scale with the backbone: inner_dim = hidden, heads = inner_dim // 64,
32 latents -> about 6 * hidden^2 parameters (2.0M for SmolLM2-135M, 100M for a 4096-hidden model).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EmbedConfig
from .errors import ConfigError
from .packing import PackedBatch, packed_eos_last, packed_mean, unpack


def head_dims(cfg: EmbedConfig, hidden: int) -> tuple[int, int, int]:
    """(inner_dim, num_heads, num_latents) for the trainable heads, defaults filled in and checked."""
    inner = cfg.inner_dim or hidden
    heads = cfg.num_heads
    if heads is None:
        heads = max(1, inner // 64)
        while inner % heads:
            heads -= 1
    if inner % heads:
        raise ConfigError(f"pooling inner_dim {inner} is not divisible by num_heads {heads}: change one of them")
    return inner, heads, cfg.num_latents


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row; works for left and right padding."""
    t = attention_mask.shape[-1]
    pos = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return (pos * attention_mask.long()).argmax(-1)


def eos_last(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    idx = last_token_index(attention_mask)
    return states[torch.arange(states.shape[0], device=states.device), idx]


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


class PoolingHead(nn.Module):
    """Base class. forward(last_hidden [B,T,H], attention_mask [B,T], hidden_states=(emb, l1..lL)) -> [B,H]."""

    name: str = ""
    needs_all_layers: bool = False

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward_packed(self, last_hidden: torch.Tensor, pack: PackedBatch, hidden_states=None) -> torch.Tensor:
        """The same vectors from packed states [1, T, H] (see embed_core.packing): by default the states are
        unpacked into a right-padded [n, Lmax, H] view and `forward` runs on it."""
        hs = tuple(unpack(h, pack) for h in hidden_states) if hidden_states is not None else None
        return self(unpack(last_hidden, pack), pack.pad_mask, hidden_states=hs)


class EosLastPooling(PoolingHead):
    name = "eos_last"

    def forward(self, last_hidden, attention_mask, hidden_states=None):
        return eos_last(last_hidden, attention_mask)

    def forward_packed(self, last_hidden, pack, hidden_states=None):
        return packed_eos_last(last_hidden, pack)


class MeanPooling(PoolingHead):
    name = "mean"

    def forward(self, last_hidden, attention_mask, hidden_states=None):
        return masked_mean(last_hidden, attention_mask)

    def forward_packed(self, last_hidden, pack, hidden_states=None):
        return packed_mean(last_hidden, pack)


class LatentCrossAttention(nn.Module):
    """Trainable latents [M,H] as queries over N input vectors [B,N,H] (keys/values), pads masked;
    a residual GELU MLP per latent; mean over latents -> [B,H]."""

    def __init__(self, hidden: int, inner: int, heads: int, num_latents: int):
        super().__init__()
        self.heads = heads
        self.latents = nn.Parameter(torch.randn(num_latents, hidden) * 0.02)
        self.norm_kv = nn.LayerNorm(hidden)
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B,N,inner] -> [B,heads,N,hd]
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        x = x.to(self.latents.dtype)
        kv = self.norm_kv(x)
        q = self._split(self.q_proj(self.latents).unsqueeze(0).expand(b, -1, -1))
        k, v = self._split(self.k_proj(kv)), self._split(self.v_proj(kv))
        mask = key_mask.to(torch.bool)[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B,heads,M,hd]
        out = self.o_proj(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))
        out = out + self.mlp(self.norm_mlp(out))
        return out.mean(1)


class LastLayerTrainablePooling(PoolingHead):
    name = "last_layer_trainable"

    def __init__(self, hidden: int, inner: int, heads: int, num_latents: int):
        super().__init__()
        self.attn = LatentCrossAttention(hidden, inner, heads, num_latents)

    def forward(self, last_hidden, attention_mask, hidden_states=None):
        return self.attn(last_hidden, attention_mask)


class MultiLayerTrainablePooling(PoolingHead):
    name = "multi_layer_trainable"
    needs_all_layers = True

    def __init__(self, hidden: int, inner: int, heads: int, num_latents: int, num_layers: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.num_layers = num_layers
        self.layer_embed = nn.Parameter(torch.randn(num_layers, hidden) * 0.02)
        self.attn = LatentCrossAttention(hidden, inner, heads, num_latents)

    def layer_vectors(self, hidden_states, attention_mask) -> torch.Tensor:
        layers = hidden_states[1:]  # drop the embedding output: one vector per transformer layer
        if len(layers) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layer outputs, got {len(layers)}")
        pool = eos_last if self.causal else masked_mean
        return torch.stack([pool(h, attention_mask) for h in layers], dim=1)  # [B,L,H]

    def forward(self, last_hidden, attention_mask, hidden_states=None):
        if hidden_states is None:
            raise ValueError("multi_layer_trainable pooling needs all hidden states (output_hidden_states=True)")
        vecs = self.layer_vectors(hidden_states, attention_mask).to(self.layer_embed.dtype) + self.layer_embed
        return self.attn(vecs)

    def forward_packed(self, last_hidden, pack, hidden_states=None):
        if hidden_states is None:
            raise ValueError("multi_layer_trainable pooling needs all hidden states (output_hidden_states=True)")
        layers = hidden_states[1:]
        if len(layers) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layer outputs, got {len(layers)}")
        pool = packed_eos_last if self.causal else packed_mean
        vecs = torch.stack([pool(h, pack) for h in layers], dim=1)  # [n,L,H], no per-layer unpacking
        return self.attn(vecs.to(self.layer_embed.dtype) + self.layer_embed)


def build_pooling(cfg: EmbedConfig, hidden: int, num_layers: int) -> PoolingHead:
    if cfg.pooling == "eos_last":
        return EosLastPooling()
    if cfg.pooling == "mean":
        return MeanPooling()
    inner, heads, latents = head_dims(cfg, hidden)
    if cfg.pooling == "last_layer_trainable":
        return LastLayerTrainablePooling(hidden, inner, heads, latents)
    if cfg.pooling == "multi_layer_trainable":
        return MultiLayerTrainablePooling(hidden, inner, heads, latents, num_layers, causal=cfg.attention == "causal")
    raise ConfigError(f"unknown pooling {cfg.pooling!r}")
