"""Fused LoRA linears: ``W x + s B (A x)`` with the low-rank path folded into the frozen base GEMM.

PEFT computes a LoRA linear as two separate products plus an add: the base GEMM writes a [tokens, out]
result, the rank-r path writes another [tokens, out] tensor, and an elementwise kernel reads both. On a small
model those memory passes over [tokens, out] cost about as much as the GEMM itself (the MLP's gate / up
projections are 5.4x wider than the hidden size). Here the same math runs as one GEMM, exactly:

* forward, ``out > in``: concatenate along the reduction dimension, ``y = [x | xA^T] @ [W | sB]^T`` (one GEMM
  over in + r columns; the copy of x is the small side);
  ``out <= in``: ``y = addmm(s (xA^T) B^T, x, W^T)`` (the rank-r product is the GEMM's C input: no separate add);
* backward, the transposed choice: ``dx = [dy | s dy B] @ [W ; A]`` when ``in > out``, else
  ``dx = addmm(s (dy B) A, dy, W)``; ``dA = (s dy B)^T x`` and ``dB = s dy^T (xA^T)``; no gradient for the
  frozen W is ever computed.

A Llama-style MLP (``down(act(gate(x)) * up(x))``) also gets its gate and up projections as ONE fused LoRA
linear over the shared input (weights stacked, adapters block-diagonal): one GEMM of width 2 x intermediate.

`fuse_lora(backbone)` patches the forward of PEFT's LoRA layers (and of the MLPs) in place; parameters,
names, saving and loading stay PEFT's. Every call re-checks that the fused path applies (one active vanilla
adapter, no LoRA dropout, not merged, frozen base weight, not a ZeRO-3 partitioned parameter) and otherwise
runs PEFT's own forward, so the patch never changes what is computed, only how. Each MLP is verified against
its unfused forward once, when patched. torch.compile traces both directions (autograd.Function).

This module imports torch only (and peft's layer class lazily).
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

# peft is imported where a LoRA layer is recognised: a model without LoRA never needs it.

log = logging.getLogger(__name__)

_ORIG = "_embed_unfused_forward"


class LoraLinearFn(torch.autograd.Function):
    """y = x W^T + bias + (x A^T) B^T with W frozen; B already carries the LoRA scaling."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b):
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        xa = x2 @ a.t()  # [T, r]
        if out_f > in_f:  # K-concatenation: the copy of x ([T, in]) is smaller than a [T, out] add
            wcat = torch.cat([weight, b], 1)
            y = torch.cat([x2, xa], 1) @ wcat.t() if bias is None else torch.addmm(bias, torch.cat([x2, xa], 1), wcat.t())
        else:  # the rank-r product is the GEMM's C: one read of a [T, out] tensor, no separate add kernel
            c = xa @ b.t()
            if bias is not None:
                c = c + bias
            y = torch.addmm(c, x2, weight.t())
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.in_shape = x.shape
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, gy):
        x2, xa, weight, a, b = ctx.saved_tensors
        out_f, in_f = weight.shape
        gy2 = gy.reshape(-1, out_f)
        dxa = gy2 @ b  # [T, r]: the gradient reaching x A^T
        gx = None
        if ctx.needs_input_grad[0]:
            if in_f > out_f:  # K-concatenation over out + r: the copy of dy is the small side
                gx = torch.cat([gy2, dxa], 1) @ torch.cat([weight, a], 0)
            else:
                gx = torch.addmm(dxa @ a, gy2, weight)
            gx = gx.view(ctx.in_shape)
        gbias = gy2.sum(0) if ctx.needs_input_grad[2] else None
        ga = dxa.t() @ x2 if ctx.needs_input_grad[3] else None
        gb = gy2.t() @ xa if ctx.needs_input_grad[4] else None
        return gx, None, gbias, ga, gb


def lora_parts(layer: nn.Module):
    """(W, bias, A, B, scaling) of a PEFT LoRA Linear the fused path can run, else None."""
    if getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True):
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None  # DoRA & co., or LoRA dropout: PEFT's forward
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad or hasattr(base.weight, "ds_id"):
        return None  # not a plain frozen Linear, or a ZeRO-3 partitioned parameter (gathered by PEFT's path)
    w, a, b = base.weight, layer.lora_A[name].weight, layer.lora_B[name].weight
    if not (w.dtype == a.dtype == b.dtype) or w.device != a.device:
        return None
    return w, base.bias, a, b, layer.scaling[name]


def fused_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    parts = None if args or kwargs else lora_parts(self)
    if parts is None or x.dtype != parts[0].dtype:
        return getattr(self, _ORIG)(x, *args, **kwargs)
    w, bias, a, b, s = parts
    return LoraLinearFn.apply(x, w, bias, a, b * s)


def fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with gate and up as one fused LoRA GEMM over their shared input."""
    g, u = lora_parts(self.gate_proj), lora_parts(self.up_proj)
    if g is None or u is None or x.dtype != g[0].dtype or (g[1] is None) != (u[1] is None):
        return getattr(self, _ORIG)(x)
    (wg, bg, ag, b_g, sg), (wu, bu, au, b_u, su) = g, u
    w = torch.cat([wg, wu])
    bias = None if bg is None else torch.cat([bg, bu])
    b = torch.block_diag(b_g * sg, b_u * su)
    gate, up = LoraLinearFn.apply(x, w, bias, torch.cat([ag, au]), b).split([wg.shape[0], wu.shape[0]], -1)
    return self.down_proj(self.act_fn(gate) * up)


def _is_lora_linear(m: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return type(m) is LoraLinear


def _is_gated_mlp(m: nn.Module) -> bool:
    return (all(_is_lora_linear(getattr(m, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))
            and callable(getattr(m, "act_fn", None)))


@torch.no_grad()
def _mlp_matches(mlp: nn.Module) -> bool:
    """The fused MLP forward gives the module's own output on a small random input (guards against an
    architecture whose MLP is not down(act(gate(x)) * up(x)))."""
    w = mlp.gate_proj.base_layer.weight
    if w.device.type == "meta" or lora_parts(mlp.gate_proj) is None:
        return False
    gen = torch.Generator(device=w.device).manual_seed(0)  # not the global RNG: seeding downstream stays as it was
    x = torch.randn(1, 3, w.shape[1], dtype=w.dtype, device=w.device, generator=gen)
    ref = getattr(mlp, _ORIG)(x)
    out = fused_mlp_forward(mlp, x)
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2
    return bool(torch.allclose(out.float(), ref.float(), atol=tol * float(ref.abs().max().clamp(min=1)), rtol=tol))


def fuse_lora(model: nn.Module) -> dict[str, int]:
    """Patch every PEFT LoRA Linear (and every gated MLP over LoRA linears) of `model` to the fused path.
    Idempotent; returns how many linears and MLPs were patched."""
    linears = mlps = 0
    for m in model.modules():
        if _is_lora_linear(m) and not hasattr(m, _ORIG):
            setattr(m, _ORIG, m.forward)
            m.forward = types.MethodType(fused_linear_forward, m)
            linears += 1
    for name, m in model.named_modules():
        if _is_gated_mlp(m) and not hasattr(m, _ORIG):
            setattr(m, _ORIG, m.forward)
            m.forward = types.MethodType(fused_mlp_forward, m)
            if _mlp_matches(m):
                mlps += 1
            else:
                log.warning("fused LoRA: %s (%s) does not compute down(act(gate(x)) * up(x)); left unfused", name,
                            type(m).__name__)
                del m.forward
                delattr(m, _ORIG)
    return {"linears": linears, "mlps": mlps}


def unfuse_lora(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, _ORIG):
            del m.forward
            delattr(m, _ORIG)
