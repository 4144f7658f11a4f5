"""Fused LoRA linears (embed_core.fused_lora) compute exactly PEFT's LoRA: the autograd Function passes
gradcheck in both GEMM layouts (K-concatenation and addmm, with and without bias); on whole tiny decoders the
fused model (every LoRA linear + the gate/up-merged MLP) gives PEFT's embeddings and LoRA gradients, padded
and packed; the fallbacks (adapters disabled, LoRA dropout) behave; the Trainer's step through DeepSpeed is
unchanged."""
from __future__ import annotations

import pytest
import torch

from embed_core.config import EmbedConfig
from embed_core.errors import ConfigError
from embed_core.fused_lora import LoraLinearFn, fuse_lora, lora_parts, unfuse_lora
from embed_core.model import EmbeddingModel, pad_ids

from .conftest import randomize_lora_b
from .test_trainer import make_config, reference_step, single_process, train_file, trainable_grads  # noqa: F401

TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field while a child watches.", "Hi",
         "The quick brown fox jumps over the lazy dog near the river bank at dawn."]


@pytest.mark.parametrize("out_f, in_f", [(12, 5), (5, 12), (7, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_fn_gradcheck(out_f, in_f, with_bias):
    """Both layouts (out > in: K-concatenated forward, addmm backward; out <= in: the reverse)."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 3, in_f, **d, requires_grad=True)
    w = torch.randn(out_f, in_f, **d)  # frozen
    bias = torch.randn(out_f, **d, requires_grad=True) if with_bias else None
    a = torch.randn(3, in_f, **d, requires_grad=True)
    b = torch.randn(out_f, 3, **d, requires_grad=True)
    assert torch.autograd.gradcheck(LoraLinearFn.apply, (x, w, bias, a, b))
    ref = x @ w.t() + (x @ a.t()) @ b.t() + (bias if with_bias else 0)
    torch.testing.assert_close(LoraLinearFn.apply(x, w, bias, a, b), ref)


def _model(tiny_dirs, arch, **kw) -> EmbeddingModel:
    cfg = EmbedConfig(base_model=str(tiny_dirs[arch]), **{"lora_r": 4, "num_latents": 4, "max_length": 64, **kw})
    m = EmbeddingModel.from_config(cfg, seed=0)
    randomize_lora_b(m, 0.2, torch.Generator().manual_seed(1))
    return m


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _run(model, rows, packed: bool):
    model.zero_grad()
    if packed:
        emb = model(packed=model.pack(rows))
    else:
        enc = pad_ids(rows, model.tokenizer, model.cfg.max_length)
        emb = model(enc["input_ids"], enc["attention_mask"])
    (emb.float() * torch.linspace(-1, 1, emb.shape[-1])).sum().backward()
    return emb.detach(), _grads(model)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: biased q/k/v; llama: no biases
@pytest.mark.parametrize("packed", [False, True])
def test_fused_model_equals_peft(tiny_dirs, arch, packed, monkeypatch):
    calls = []
    apply = LoraLinearFn.apply
    monkeypatch.setattr(LoraLinearFn, "apply", lambda *a: calls.append(a[1].shape) or apply(*a))
    model = _model(tiny_dirs, arch, fused_lora=True, attention="bidirectional", pooling="multi_layer_trainable",
                   packing=packed).train()
    layers = model.info["num_layers"]
    assert model.info["fused_lora"] == {"linears": 7 * layers, "mlps": layers}
    rows = model.token_ids(TEXTS)
    calls.clear()
    emb, grads = _run(model, rows, packed)
    # per layer: q, k, v, o, gate+up as one GEMM (2 x intermediate wide), down
    inter = model.backbone.base_model.model.layers[0].mlp.up_proj.base_layer.weight.shape[0]
    assert len(calls) == 6 * layers and sum(s[0] == 2 * inter for s in calls) == layers
    unfuse_lora(model.backbone)
    emb_ref, grads_ref = _run(model, rows, packed)
    torch.testing.assert_close(emb, emb_ref, atol=1e-5, rtol=1e-4)
    assert grads.keys() == grads_ref.keys() and any("lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_fused_path_falls_back_where_it_does_not_apply(tiny_dirs):
    model = _model(tiny_dirs, "llama", fused_lora=True).eval()
    enc = model.tokenize(TEXTS)
    with torch.no_grad():
        fused = model(**enc)
        with model.backbone.disable_adapter():  # adapters off: the base model, not the fused LoRA
            assert lora_parts(model.backbone.base_model.model.layers[0].mlp.gate_proj) is None
            off = model(**enc)
        unfuse_lora(model.backbone)
        with model.backbone.disable_adapter():
            off_ref = model(**enc)
        ref = model(**enc)
    torch.testing.assert_close(off, off_ref)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(off, ref, atol=1e-3)
    assert fuse_lora(model.backbone) == {"linears": 14, "mlps": 2} and fuse_lora(model.backbone)["linears"] == 0


def test_fused_lora_config_errors():
    with pytest.raises(ConfigError, match="fused_lora needs lora_dropout 0"):
        EmbedConfig(fused_lora=True, lora_dropout=0.1)
    with pytest.raises(ConfigError, match="fused_lora must be true or false"):
        EmbedConfig(fused_lora="yes")


@pytest.mark.parametrize("packing", [False, True])
def test_trainer_step_with_fused_lora_is_exact(single_process, reference_step, tiny_dirs, train_file, packing):  # noqa: F811
    """The Trainer (DeepSpeed ZeRO-2, GradCache chunks) with fused LoRA gives the plain PEFT step's loss and
    gradients."""
    batch, ref_loss, ref_grads = reference_step
    tcfg = make_config(tiny_dirs, train_file, packing=packing, chunk_size=3)
    tcfg.model.fused_lora = True
    from embed_core.trainer import Trainer

    trainer = Trainer(tcfg)
    assert trainer.model.info["fused_lora"]["mlps"] > 0
    loss, _, _ = trainer.forward_backward(batch)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    for name, g in trainable_grads(trainer).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
