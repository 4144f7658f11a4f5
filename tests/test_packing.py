"""The packed fast path (embed_core.packing) on CPU: the FlexAttention block mask equals the dense per-document
mask; packed embeddings equal the padded ones for every pooling, both attention modes and both attention
implementations (SDPA dense mask, FlexAttention BlockMask), gradients included; bidirectional stays
bidirectional inside a document, documents in one pack never see each other; packed `encode`, the merged-roles
step and the Trainer's packed steps (plain and GradCache, through DeepSpeed) give the padded results."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embed_core import packing as pk
from embed_core.config import POOLINGS, EmbedConfig
from embed_core.errors import ConfigError
from embed_core.gradcache import full_batch_step, merged_batch_step
from embed_core.model import EmbeddingModel, pad_ids
from embed_core.train_config import TrainConfig
from embed_core.trainer import Trainer

from .test_trainer import make_config, reference_step, single_process, train_file, trainable_grads  # noqa: F401

TEXTS = ["A man is playing a guitar.", "Two dogs run across a snowy field while a child watches the dogs play.",
         "Hi", "The quick brown fox jumps over the lazy dog near the river bank at dawn."]
IMPLS = ("sdpa", "flex_attention", "flash_varlen")


def tiny(tiny_dirs, arch="qwen2", **kw) -> EmbeddingModel:
    kw = {"lora_r": 4, "num_latents": 4, "max_length": 64, **kw}
    return EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs[arch]), **kw))


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("window", [None, 100, 200])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_block_mask_equals_dense_mask(causal, window):
    """Also with a sliding window (Gemma3's local layers), narrower than a 300-token document: blocks farther
    apart than the window are skipped, none is wrongly 'full'."""
    torch.manual_seed(0)
    ids = [[1] * n for n in (5, 140, 1, 37, 128, 300, 2)]  # docs inside, across and exactly on 128-blocks
    pack = pk.pack_ids(ids, 2, pad_to=pk.FLEX_BLOCK)
    t = pack.input_ids.shape[1]
    assert t % pk.FLEX_BLOCK == 0 and pack.num_real_tokens == sum(map(len, ids))
    dense_bool = pk.dense_mask(pack, causal, torch.float32, window)[0, 0] == 0
    if window is not None:  # the window: a token 300 - 1 apart from another of its document never sees it
        first = int(pack.starts[5])
        assert not dense_bool[first + 299, first] and dense_bool[first + window - 1, first]
    from torch.nn.attention.flex_attention import create_mask, flex_attention

    block_mask = pk.flex_block_mask(pack, causal, window=window)
    assert torch.equal(create_mask(block_mask.mask_mod, 1, 1, t, t, device="cpu")[0, 0], dense_bool)
    q, k, v = (torch.randn(1, 2, t, 8) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=block_mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_bool)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # block sparsity: the 5-token doc's block never looks at the 300-token doc's blocks
    assert int(block_mask.kv_num_blocks[0, 0, 0]) + int(block_mask.full_kv_num_blocks[0, 0, 0]) <= 2


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_equals_dense_mask(causal, window):
    """The varlen path's boundaries (cu_seqlens, the filler tail as its own document) give the dense
    per-document mask's attention, with GQA (fewer kv heads), and with a sliding window narrower than a document."""
    torch.manual_seed(0)
    ids = [[1] * n for n in (5, 40, 1, 17)]
    pack = pk.pack_ids(ids, 2, pad_to=16)
    cu = pk.cu_seqlens(pack)
    assert cu.tolist() == [0, 5, 45, 46, 63, 64] and cu.dtype == torch.int32
    kw = pk.varlen_kwargs(pack)
    assert kw["max_length_q"] == 40 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    t = pack.input_ids.shape[1]
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    out = pk.varlen_attention(q, k, v, cu, kw["max_length_q"], causal, window=window)
    keep = pk.dense_mask(pack, causal, torch.float32, window)[0] == 0
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=keep,
                                         enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_pack_ids_layout_and_device_copy():
    pack = pk.pack_ids([[5, 6, 2], [7, 2], [2]], pad_id=0, pad_to=4)
    assert pack.input_ids.tolist() == [[5, 6, 2, 7, 2, 2, 0, 0]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert pack.doc_ids.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert pack.last_index.tolist() == [2, 4, 5]
    assert pack.pad_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    moved = pack.to("meta")
    assert moved.gather_index.shape == pack.gather_index.shape and moved.num_real_tokens == 6
    with pytest.raises(ValueError, match="empty document"):
        pk.pack_ids([[1], []], 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_packed_equals_padded(tiny_dirs, impl, attention, pooling):
    model = tiny(tiny_dirs, attention=attention, pooling=pooling, attn_implementation=impl)
    rows = model.token_ids(TEXTS)
    padded = pad_ids(rows, model.tokenizer, model.cfg.max_length)
    model.eval()
    with torch.no_grad():
        ref = model(padded["input_ids"], padded["attention_mask"])
        out = model(packed=model.pack(rows))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    if pooling in ("mean", "multi_layer_trainable") or impl != "sdpa" and attention == "bidirectional":
        # gradients too (the FlexAttention path runs its CPU fallback with the same mask under autograd)
        model.train()
        model.zero_grad()
        model(padded["input_ids"], padded["attention_mask"]).pow(2).sum().backward()
        g_ref = _lora_grads(model)
        model.zero_grad()
        model(packed=model.pack(rows)).pow(2).sum().backward()
        g = _lora_grads(model)
        assert g.keys() == g_ref.keys() and g
        for n in g:
            torch.testing.assert_close(g[n], g_ref[n], atol=5e-5, rtol=1e-3, msg=lambda m: f"{n}: {m}")


def _states(model, pack):
    with torch.no_grad():
        return model.backbone(**model.packed_inputs(pack)).last_hidden_state[0]


def test_varlen_backbone_refuses_a_row_without_boundaries(tiny_dirs):
    model = tiny(tiny_dirs, attn_implementation="flash_varlen").eval()
    pack = model.pack(model.token_ids(TEXTS[:2]))
    with pytest.raises(ValueError, match="neither document boundaries"):
        model.backbone(input_ids=pack.input_ids, position_ids=pack.position_ids, use_cache=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_packed_documents_isolated_and_bidirectional(tiny_dirs, impl, attention):
    model = tiny(tiny_dirs, "llama", attention=attention, attn_implementation=impl, pooling="mean").eval()
    a, b = [11, 12, 13, 14, 15, 2], [21, 22, 23, 2]
    base = _states(model, model.pack([a, b]))
    # a later token of document A changes A's first position iff attention is bidirectional
    changed = _states(model, model.pack([a[:3] + [99] + a[4:], b]))
    moved = (changed[0] - base[0]).abs().max().item()
    if attention == "bidirectional":
        assert moved > 1e-4, "bidirectional packed attention does not look ahead"
    else:
        assert moved < 1e-6, "causal packed attention looked ahead"
    # document B never influences document A, and A never influences B (either order in the pack)
    other_b = _states(model, model.pack([a, [31, 32, 33, 34, 35, 36, 37, 2]]))
    torch.testing.assert_close(other_b[:len(a)], base[:len(a)], atol=1e-6, rtol=0)
    other_a = _states(model, model.pack([[41, 42, 2], b]))
    torch.testing.assert_close(other_a[3:3 + len(b)], base[len(a):len(a) + len(b)], atol=1e-6, rtol=0)
    with torch.no_grad():
        emb_a = model(packed=model.pack([a, b]))[0]
        emb_a2 = model(packed=model.pack([a, [51] * 9 + [2]]))[0]
    torch.testing.assert_close(emb_a, emb_a2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_packed_equals_padded(tiny_dirs, impl):
    model = tiny(tiny_dirs, attention="bidirectional", pooling="last_layer_trainable", attn_implementation=impl)
    texts = TEXTS * 5 + ["x" * 400]  # truncated at max_length; several packed rows of <= pack_tokens
    ref = model.encode(texts, instruction="Find it", batch_size=3)
    model.cfg.packing, model.cfg.pack_tokens = True, 64
    out = model.encode(texts, instruction="Find it")
    assert out.shape == ref.shape
    assert abs(out - ref).max() < 1e-5


def test_merged_batch_step_equals_full_batch_step(tiny_dirs):
    from embed_core.loss import info_nce

    model = tiny(tiny_dirs, attention="bidirectional", pooling="multi_layer_trainable").train()
    roles = {"query": {"ids": model.token_ids(TEXTS[:2])}, "positive": {"ids": model.token_ids(TEXTS[2:])},
             "negative": {"ids": model.token_ids(TEXTS[::-1])}}
    embed = lambda c: model(packed=model.pack(c["ids"]))  # noqa: E731
    loss_fn = lambda r: info_nce(r["query"], r["positive"], r["negative"], temperature=0.05)  # noqa: E731
    l1, _ = full_batch_step(embed, roles, loss_fn)
    g1 = _lora_grads(model)
    model.zero_grad()
    l2, _ = merged_batch_step(embed, roles, loss_fn)
    g2 = _lora_grads(model)
    assert float(l1) == pytest.approx(float(l2), rel=1e-5)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="chunk_size must be None"):
        merged_batch_step(embed, roles, loss_fn, chunk_size=2)


@pytest.mark.parametrize("impl, chunk", [("sdpa", None), ("flex_attention", 3), ("flash_varlen", None)])
def test_trainer_packing_is_exact(single_process, reference_step, tiny_dirs, train_file, impl, chunk):  # noqa: F811
    """Trainer(packing=True) through DeepSpeed: the merged packed step and the packed GradCache step give
    the padded plain-autograd loss and gradients."""
    batch, ref_loss, ref_grads = reference_step
    tcfg = make_config(tiny_dirs, train_file, packing=True, chunk_size=chunk)
    tcfg.model.attn_implementation = impl
    trainer = Trainer(tcfg)
    loss, _, tokens = trainer.forward_backward(batch)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert tokens == sum(len(x) for k in ("queries", "positives", "negatives") for x in trainer.model.token_ids(batch[k]))
    grads = trainable_grads(trainer)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("changes, match", [
    (dict(packing="yes"), "packing must be true or false"),
    (dict(pack_tokens=16), "pack_tokens must be an int >= max_length"),
    (dict(pack_tokens=True), "pack_tokens must be an int"),
    (dict(compile=1), "compile must be true or false"),
    (dict(attn_implementation="flash"), "choose one of sdpa, eager, flex_attention"),
])
def test_packing_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        EmbedConfig(base_model="x", max_length=32, **changes)


def test_packing_turns_off_length_grouping(tiny_dirs, train_file):  # noqa: F811
    """Packed batches are random mixes: grouping by length would make the longest batch's packed row (and its
    memory) several times the average one."""
    from embed_core.train_data import TrainData

    assert TrainData(make_config(tiny_dirs, train_file)).batcher.length_grouping
    assert not TrainData(make_config(tiny_dirs, train_file, packing=True)).batcher.length_grouping


def test_train_config_packing_must_be_bool():
    with pytest.raises(ConfigError, match="packing must be true or false"):
        TrainConfig(model={"base_model": "x"}, train_data=["a.jsonl"], packing=1)


def test_compiling_raises_the_recompile_limit_only_upwards(tiny_dirs, monkeypatch):
    """Packed rows change length every step: past dynamo's default limit of 8 compiled variants the layer (and
    FlexAttention) would silently run eagerly, so compiling raises the limit to what the benchmarks used."""
    import torch._dynamo as dynamo

    from embed_core.packing import RECOMPILE_LIMIT

    model = tiny(tiny_dirs)
    monkeypatch.setattr(dynamo.config, "cache_size_limit", 8)
    assert model.compile_layers() == model.backbone.config.num_hidden_layers
    assert dynamo.config.cache_size_limit == RECOMPILE_LIMIT == 64
    monkeypatch.setattr(dynamo.config, "cache_size_limit", 500)
    model.compile_layers()
    assert dynamo.config.cache_size_limit == 500
