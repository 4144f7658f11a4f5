"""Bad input fails fast with a message that names the fix, before any weights are loaded."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest

from embed_core import backbone as bb
from embed_core.config import EmbedConfig
from embed_core.errors import ConfigError
from embed_core.model import EmbeddingModel


@pytest.mark.parametrize("field,value,needle", [
    ("pooling", "max", "choose one of eos_last, mean, last_layer_trainable, multi_layer_trainable"),
    ("attention", "sideways", "choose one of causal, bidirectional"),
    ("attn_implementation", "flash_attention_3", "choose one of sdpa, eager"),
    ("lora_r", -1, "lora_r must be >= 0"),
    ("lora_target_modules", "q_proj", "must be a list"),
    ("max_length", 1, "max_length must be >= 2"),
    ("query_template", "{text}", "'{instruction}'"),
])
def test_bad_names_and_values(field, value, needle):
    with pytest.raises(ConfigError, match=None) as e:
        EmbedConfig(**{field: value})
    assert needle in str(e.value)


def test_unknown_config_field():
    with pytest.raises(ConfigError, match="unknown EmbedConfig field"):
        EmbedConfig.from_dict({"pooling": "mean", "poolling": "mean"})


def test_missing_path_and_non_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        bb.preflight(EmbedConfig(base_model=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="does not exist"):
        bb.preflight(EmbedConfig(base_model="./models/missing.gguf"))
    with pytest.raises(ConfigError, match="no config.json"):
        bb.preflight(EmbedConfig(base_model=str(tmp_path)))


def test_unknown_hub_id_is_clear_and_fast():
    t = time.time()
    with pytest.raises(ConfigError, match="cannot load the config of base_model 'no-such-org/no-such-model'"):
        bb.preflight(EmbedConfig(base_model="no-such-org/no-such-model"))
    assert time.time() - t < 60  # offline: no retries loop (generous bound; not a speed test)


def test_gguf_without_gguf_package(monkeypatch, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install gguf"):
        bb.preflight(EmbedConfig(base_model=str(f)))


def test_lora_target_matching_nothing_fails_before_weights(tiny_dirs, monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the config was checked")

    monkeypatch.setattr(bb, "load_backbone", no_weights)
    monkeypatch.setattr("embed_core.model.load_backbone", no_weights)
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no Linear layer.*choose among \[.*'q_proj'"):
        EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs["llama"]), lora_target_modules=["q_proj", "qkv"]))
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs["llama"]), pooling="last_layer_trainable",
                                               inner_dim=60, num_heads=8))


def test_tokenizer_without_eos(tiny_dirs, tmp_path):
    import shutil

    d = tmp_path / "noeos"
    shutil.copytree(tiny_dirs["llama"], d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["eos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ConfigError, match="no EOS token.*tokenizer_config.json"):
        EmbeddingModel.from_config(EmbedConfig(base_model=str(d)))


def test_pad_token_override_and_fallback(tiny_dirs):
    with pytest.raises(ConfigError, match="not in the tokenizer's vocabulary"):
        EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs["llama"]), pad_token="<<nope>>"))
    m = EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs["llama"]), pad_token="<|endoftext|>"))
    assert m.tokenizer.pad_token == "<|endoftext|>"


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not a saved embedding model"):
        EmbeddingModel.load(tmp_path)


def test_truncate_layers_is_checked_and_keeps_the_first_layers(smollm2_dir) -> None:
    import torch

    with pytest.raises(ConfigError, match="truncate_layers"):
        EmbedConfig(truncate_layers=0)
    with pytest.raises(ConfigError, match="exceeds the 30 layers"):
        EmbeddingModel.from_config(EmbedConfig(truncate_layers=31))
    full = EmbeddingModel.from_config(EmbedConfig(lora_r=0, pooling="multi_layer_trainable"))
    cut = EmbeddingModel.from_config(EmbedConfig(lora_r=0, pooling="multi_layer_trainable", truncate_layers=4))
    assert cut.info["num_layers"] == 4 and len(cut.backbone.layers) == 4
    full_sd = full.backbone.state_dict()
    assert all(torch.equal(v, full_sd[k]) for k, v in cut.backbone.state_dict().items())


def test_a_models_config_is_read_once_per_process_and_again_when_rewritten(tiny_dirs, tmp_path):
    """A sweep checks one base model once per design: its config is read once (a GGUF's costs ~20 s), each caller
    gets its own copy (truncation mutates it), and a rewritten config.json is read again."""
    import os
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = EmbedConfig(base_model=str(d))
    src = bb.resolve_source(cfg)
    bb._read_config.cache_clear()
    a = bb.load_config(src, cfg)
    a.num_hidden_layers = 99
    b = bb.load_config(src, cfg)
    assert bb._read_config.cache_info().hits == 1 and b.num_hidden_layers == 2
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 1}))
    os.utime(d / "config.json", ns=(time.time_ns() + 10**9,) * 2)
    assert bb.load_config(src, cfg).num_hidden_layers == 1


def test_a_gguf_is_parsed_once_while_converting():
    """Inside `one_gguf_parse` every `gguf.GGUFReader(path)` of one file is the same reader (transformers parses a
    GGUF three times while converting it: ~20 s each for Gemma-3); outside it the real class is back."""
    import gguf

    path = bb.smollm2_gguf_path()
    real = gguf.GGUFReader
    with bb.one_gguf_parse() as readers:
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(path) is first and len(readers) == 1
        assert first.fields["general.architecture"].contents() == "llama"
    assert gguf.GGUFReader is real
