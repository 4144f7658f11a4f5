"""EmbeddingModel on tiny random Llama / Qwen2 / Mistral and the real SmolLM2-135M: each pooling's shape,
masking (pads never change an embedding), gradient flow into LoRA and the head, save/load identity,
loading without the project (plain transformers + peft + the pooling module), and clear config errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embed_core.config import POOLINGS, EmbedConfig
from embed_core.model import EmbeddingModel, pad_ids

from .conftest import ARCHS

TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field while a child watches.", "Hi"]


def tiny_model(tiny_dirs, arch="llama", **kw) -> EmbeddingModel:
    return EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs[arch]), lora_r=4, num_latents=4, **kw))


def _batch(model, texts, side):
    model.tokenizer.padding_side = side
    return model.tokenize(texts)


def check_shape_masking_gradients(model: EmbeddingModel, pooling: str, atol: float = 2e-5) -> None:
    model.eval()
    hidden = model.embedding_dim
    with torch.no_grad():
        singles = torch.cat([model(**model.tokenize([t])) for t in TEXTS])
        assert singles.shape == (len(TEXTS), hidden) and torch.isfinite(singles).all()
        for side in ("left", "right"):
            enc = _batch(model, TEXTS, side)
            assert (enc["attention_mask"] == 0).any(), "test needs padding"
            batched = model(**enc)
            torch.testing.assert_close(batched, singles, atol=atol, rtol=10 * atol, msg=f"{side} padding changed embeddings")
            enc["input_ids"][enc["attention_mask"] == 0] = 123  # other pad ids: nothing changes
            torch.testing.assert_close(model(**enc), batched, atol=atol / 20, rtol=atol / 20)
    # gradient flow: LoRA and the head get gradients, the frozen base does not
    model.train()
    model.zero_grad()
    emb = model(**_batch(model, TEXTS, "right"))
    (emb.pow(2).sum()).backward()
    lora_b = [p for n, p in model.backbone.named_parameters() if "lora_B" in n]
    lora_a = [p for n, p in model.backbone.named_parameters() if "lora_A" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if "lora_" not in n)
    head = [p for p in model.pooler.parameters()]
    if pooling.endswith("_trainable"):
        assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    else:
        assert not head
    assert all(p.requires_grad for p in lora_a)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_pooling_shape_masking_gradients(tiny_dirs, arch, pooling, attention):
    check_shape_masking_gradients(tiny_model(tiny_dirs, arch, pooling=pooling, attention=attention), pooling)


@pytest.mark.slow
@pytest.mark.parametrize("pooling,attention", [("eos_last", "causal"), ("mean", "bidirectional"),
                                               ("last_layer_trainable", "causal"),
                                               ("multi_layer_trainable", "bidirectional")])
def test_smollm2_pooling_shape_masking_gradients(pooling, attention):
    """The real SmolLM2-135M, in float64 so that the padding checks can be tight (30 layers of float32
    rounding with its large activations reach ~1e-3 relative)."""
    model = EmbeddingModel.from_config(EmbedConfig(pooling=pooling, attention=attention, lora_r=4, max_length=32))
    check_shape_masking_gradients(model.double(), pooling, atol=1e-9)


def test_eos_appended_and_truncation(tiny_dirs):
    model = tiny_model(tiny_dirs, max_length=8)
    eos = model.tokenizer.eos_token_id
    enc = model.tokenize(["word " * 50, "short"])
    assert enc["input_ids"].shape[1] == 8
    last = enc["attention_mask"].sum(1) - 1
    assert all(enc["input_ids"][i, last[i]] == eos for i in range(2)), "EOS must be the last real token"
    ids = pad_ids([[5, 6, eos]], model.tokenizer, 8)["input_ids"][0].tolist()
    assert ids == [5, 6, eos], "EOS is not appended twice"


def test_multi_layer_per_layer_vectors(tiny_dirs):
    """causal -> EOS-last of each layer, bidirectional -> masked mean of each layer."""
    from embed_core import attention as attn
    from embed_core.pooling import eos_last, masked_mean

    for attention, pool in (("causal", eos_last), ("bidirectional", masked_mean)):
        model = tiny_model(tiny_dirs, pooling="multi_layer_trainable", attention=attention).eval()
        enc = model.tokenize(TEXTS)
        kw = attn.backbone_inputs(enc["input_ids"], enc["attention_mask"], attention == "bidirectional", model.dtype)
        with torch.no_grad():
            hs = model.backbone(**kw, output_hidden_states=True).hidden_states
            vecs = model.pooler.layer_vectors(hs, enc["attention_mask"])
        assert vecs.shape == (3, 2, model.embedding_dim)
        torch.testing.assert_close(vecs[:, 1], pool(hs[2], enc["attention_mask"]))


def test_trainable_sizes_configurable_and_reported(tiny_dirs):
    small = tiny_model(tiny_dirs, pooling="last_layer_trainable", inner_dim=32, num_heads=2)
    big = tiny_model(tiny_dirs, pooling="last_layer_trainable", inner_dim=128, num_heads=4)
    rs, rb = small.parameter_report(), big.parameter_report()
    assert 0 < rs["pooling_trainable"] < rb["pooling_trainable"]
    assert rs["trainable_total"] == rs["lora_trainable"] + rs["pooling_trainable"]
    assert small.pooler.attn.heads == 2 and small.pooler.attn.q_proj.out_features == 32


def _train_a_bit(model):
    """Move LoRA B away from zero so that save/load identity is meaningful."""
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_save_load_identity(tiny_dirs, tmp_path, pooling):
    model = tiny_model(tiny_dirs, "qwen2", pooling=pooling, attention="bidirectional")
    _train_a_bit(model)
    before = model.encode(TEXTS, instruction="Retrieve semantically similar text.")
    out = model.save(tmp_path / "ckpt")
    meta = json.loads((out / "embed_config.json").read_text())
    assert meta["config"]["pooling"] == pooling and meta["info"]["hidden_size"] == 64
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "pooling_head.safetensors").is_file() == pooling.endswith("_trainable")
    again = EmbeddingModel.load(out)
    after = again.encode(TEXTS, instruction="Retrieve semantically similar text.")
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert again.info["fingerprint"] == meta["fingerprint"]
    assert "fingerprint" not in EmbeddingModel.load(out, trainable=True).info  # it may change: no stale revision
    # a fresh (untrained) model differs: the test could fail
    fresh = tiny_model(tiny_dirs, "qwen2", pooling=pooling, attention="bidirectional")
    assert np.abs(fresh.encode(TEXTS) - model.encode(TEXTS)).max() > 1e-4


def test_load_standalone_without_project_trainer(tiny_dirs, tmp_path):
    """Only transformers + peft + the pooling module (+ the mask helper for bidirectional attention)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from embed_core.attention import backbone_inputs, set_causal
    from embed_core.pooling import build_pooling

    model = tiny_model(tiny_dirs, "mistral", pooling="multi_layer_trainable", attention="bidirectional")
    _train_a_bit(model)
    ref = model.encode(TEXTS, normalize=False)
    ckpt = model.save(tmp_path / "ckpt")

    meta = json.loads((ckpt / "embed_config.json").read_text())
    cfg = EmbedConfig.from_dict(meta["config"])
    tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    base = AutoModel.from_pretrained(meta["info"]["backbone_source"], attn_implementation="sdpa")
    net = PeftModel.from_pretrained(base, ckpt / "adapter").eval()
    set_causal(net, False)
    head = build_pooling(cfg, meta["info"]["hidden_size"], meta["info"]["num_layers"])
    head.load_state_dict(load_file(ckpt / "pooling_head.safetensors"))
    outs = []
    for t in TEXTS:
        ids = tok(t)["input_ids"] + [tok.eos_token_id]
        ids_t = torch.tensor([ids])
        with torch.no_grad():
            o = net(**backbone_inputs(ids_t, torch.ones_like(ids_t), True, torch.float32), output_hidden_states=True)
            outs.append(head(o.last_hidden_state, torch.ones_like(ids_t), hidden_states=o.hidden_states)[0])
    np.testing.assert_allclose(torch.stack(outs).numpy(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_end_to_end_save_load(tmp_path):
    model = EmbeddingModel.from_config(EmbedConfig(pooling="multi_layer_trainable", attention="bidirectional",
                                                   max_length=64))
    report = model.parameter_report()
    assert model.info["num_layers"] == 30 and model.embedding_dim == 576
    assert report["backbone_total"] > 130_000_000 and 0 < report["pooling_trainable"] < 5_000_000
    _train_a_bit(model)
    texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Quarterly revenue grew 4 percent."]
    emb = model.encode(texts)
    assert emb.shape == (3, 576)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    out = model.save(tmp_path / "smol")
    np.testing.assert_allclose(EmbeddingModel.load(out).encode(texts), emb, atol=1e-5)


@pytest.mark.slow
def test_smollm2_eos_embeddings_are_semantic():
    """The pretrained SmolLM2 with EOS pooling already ranks a paraphrase above an unrelated sentence."""
    model = EmbeddingModel.from_config(EmbedConfig(lora_r=0, max_length=64))
    e = model.encode(["A man is playing a guitar.", "A person plays the guitar.", "The stock market fell sharply."])
    assert e[0] @ e[1] > e[0] @ e[2]


def test_load_runtime_overrides_change_how_not_what(tiny_dirs, tmp_path):
    """Evaluation loads checkpoints without compiled layers (and on a GPU through varlen attention): runtime
    fields only; anything that would change the function is refused."""
    from embed_core.errors import ConfigError

    from .conftest import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tiny_dirs["llama"], tmp_path / "ckpt", compile=True)
    plain = EmbeddingModel.load(ckpt)
    fast = EmbeddingModel.load(ckpt, runtime={"compile": False})
    assert plain.cfg.compile and not fast.cfg.compile
    texts = ["a red car", "the blue house by the river"]
    np.testing.assert_allclose(fast.encode(texts), plain.encode(texts), atol=1e-6)
    with pytest.raises(ConfigError, match="runtime overrides"):
        EmbeddingModel.load(ckpt, runtime={"pooling": "mean"})
