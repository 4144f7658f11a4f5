"""mteb 2.x encoder for a saved (or in-memory) EmbeddingModel.

Each checkpoint gets a unique `mteb_model_meta.revision` (the content fingerprint of its weights and config),
because mteb caches results by (model name, revision): two checkpoints of one sweep must never share one.
Queries (and both sides of symmetric tasks) get the task's instruction; retrieval documents get none.
Encoding is batched and sorted by length, fp32 on CPU / bf16 on GPU, output L2-normalised.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import EmbeddingModel, fingerprint

# E5-mistral / LLM2Vec style instructions for the tasks this project evaluates; others fall back by type.
TASK_INSTRUCTIONS: dict[str, str] = {
    "STSBenchmark": "Retrieve semantically similar text.",
    "SICK-R": "Retrieve semantically similar text.",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six "
                             "emotions: anger, fear, joy, love, sadness, and surprise",
    "AmazonCounterfactualClassification": "Classify a given Amazon customer review text as either counterfactual "
                                          "or not-counterfactual",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
}
TYPE_INSTRUCTIONS: dict[str, str] = {
    "STS": "Retrieve semantically similar text.",
    "Classification": "Classify the given text",
    "Clustering": "Identify the topic or theme of the given text",
    "Retrieval": "Given a query, retrieve relevant documents",
    "Reranking": "Given a query, retrieve relevant documents",
    "PairClassification": "Retrieve text that is semantically similar to the given text",
    "Summarization": "Given a news summary, retrieve other semantically similar summaries",
}


def task_instruction(task_name: str, task_type: str | None) -> str | None:
    return TASK_INSTRUCTIONS.get(task_name) or TYPE_INSTRUCTIONS.get(task_type or "")


def _abs_encoder_base():
    from mteb.models.abs_encoder import AbsEncoder  # lazily: embed_core.model does not need mteb
    return AbsEncoder


def make_encoder(model: EmbeddingModel, name: str = "embed-sweeps/checkpoint", revision: str | None = None,
                 batch_size: int = 32, instructions: dict[str, str] | None = None, show_progress: bool = False):
    """Wrap `model` as an mteb `AbsEncoder`. `revision` defaults to the checkpoint's content fingerprint."""
    from mteb.models import ModelMeta
    from mteb.models.model_meta import ScoringFunction

    AbsEncoder = _abs_encoder_base()

    class EmbedCoreEncoder(AbsEncoder):
        def __init__(self) -> None:
            self.model = model
            self.batch_size = batch_size
            self.instructions = dict(TASK_INSTRUCTIONS, **(instructions or {}))
            self.show_progress = show_progress
            rev = revision or model.info.get("fingerprint") or _live_fingerprint(model)
            report = model.parameter_report()
            self.mteb_model_meta = ModelMeta(
                loader=None, name=name, revision=rev, release_date=None, languages=["eng-Latn"],
                n_parameters=report["backbone_total"] + report["pooling_trainable"], memory_usage_mb=None,
                max_tokens=model.cfg.max_length, embed_dim=model.embedding_dim, license=None, open_weights=True,
                public_training_code=None, public_training_data=None, framework=["PyTorch"],
                similarity_fn_name=ScoringFunction.COSINE, use_instructions=True, training_datasets=set(),
            )

        def instruction_for(self, task_metadata, prompt_type) -> str | None:
            is_document = prompt_type is not None and getattr(prompt_type, "value", prompt_type) == "document"
            if is_document:
                return None
            return self.instructions.get(task_metadata.name) or task_instruction(task_metadata.name, task_metadata.type)

        def cache_context(self, task_metadata, prompt_type) -> str:
            return self.instruction_for(task_metadata, prompt_type) or ""

        def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                   **kwargs: Any) -> np.ndarray:
            texts: list[str] = []
            for batch in inputs:
                texts.extend(batch["text"])
            instruction = self.instruction_for(task_metadata, prompt_type)
            return self.model.encode(texts, instruction=instruction, batch_size=self.batch_size,
                                     normalize=True, show_progress=self.show_progress)

    return EmbedCoreEncoder()


def _live_fingerprint(model: EmbeddingModel) -> str:

    adapter, head = model.trainable_state()
    return fingerprint(adapter, head, model.cfg)


def load_encoder(checkpoint: str | Path, device: str | None = None, name: str | None = None, **kwargs):
    """Load a saved checkpoint directory as an mteb encoder (bf16 on GPU, fp32 on CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EmbeddingModel.load(checkpoint, device=device)
    return make_encoder(model, name=name or f"embed-sweeps/{Path(checkpoint).name}", **kwargs)


# ====================================================================================== per-run embedding cache
def _abs_encoder_cached_class():
    AbsEncoder = _abs_encoder_base()

    class CachedEncoder(AbsEncoder):
        """Any mteb encoder plus a text-hash cache: each distinct (text, instruction context) is embedded once per
        run (classification re-encodes training rows across experiments and splits, retrieval corpora repeat
        titles, STS pairs share sentences). Misses are encoded in one call to the wrapped encoder, which
        batches them by length. The cache lives as long as this object (one checkpoint, one run).

        The context is what decides the instruction: the wrapped encoder's ``cache_context(task_metadata,
        prompt_type)`` if it has one, else (task name, prompt type), so a text embedded as a query and as a
        document (different instructions) is cached twice, and nothing is shared across tasks whose
        instructions differ."""

        def __init__(self, inner) -> None:
            self.inner = inner
            self.mteb_model_meta = inner.mteb_model_meta
            self._cache: dict[bytes, np.ndarray] = {}
            self.hits = 0
            self.misses = 0

        def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                   **kwargs: Any) -> np.ndarray:

            texts: list[str] = [t for batch in inputs for t in batch["text"]]
            ctx_fn = getattr(self.inner, "cache_context", None)
            ctx = ctx_fn(task_metadata, prompt_type) if ctx_fn else \
                f"{task_metadata.name}\0{getattr(prompt_type, 'value', prompt_type)}"
            keys = [hashlib.sha1(f"{ctx}\0{t}".encode()).digest() for t in texts]
            todo: dict[bytes, str] = {}
            for k, t in zip(keys, texts):
                if k not in self._cache and k not in todo:
                    todo[k] = t
            self.hits += len(texts) - len(todo)
            self.misses += len(todo)
            if todo:
                new = self.inner.encode([{"text": list(todo.values())}], task_metadata=task_metadata,
                                        hf_split=hf_split, hf_subset=hf_subset, prompt_type=prompt_type, **kwargs)
                new = new.detach().float().cpu().numpy() if isinstance(new, torch.Tensor) else np.asarray(new)
                for k, row in zip(todo, new):
                    self._cache[k] = row
            if not texts:
                return np.zeros((0, int(self.mteb_model_meta.embed_dim or 0)), dtype=np.float32)
            return np.stack([self._cache[k] for k in keys])

    return CachedEncoder


def cached(encoder):
    """Wrap an mteb encoder with the per-run text-hash embedding cache (see CachedEncoder)."""
    return _abs_encoder_cached_class()(encoder)


# ====================================================================================== where mteb scores
SMALL_SCORING_MACS = 50_000_000  # below this many multiply-adds a host <-> GPU round trip costs more than the product


def fast_mteb_scoring() -> None:
    """Make mteb's similarity scoring cost what the product costs. Two things in mteb 2.x cost ~2 ms a call on an
    H100 machine, and SummEval scores 100 texts through ~53k one-row similarities (~100 s a checkpoint; encoding
    2-4 s):

    1. every similarity goes to CUDA when there is one (``similarity_functions._select_device``; its docstring
       promises a size threshold that its code does not apply): products below SMALL_SCORING_MACS now stay on
       the CPU, where the embeddings are; large ones (a retrieval corpus) still go to the GPU;
    2. on compute capability 7.0 / 8.0 / 9.0 (``_use_torch_compile``) each ``cos_sim`` / ``dot_score`` call wraps
       a fresh closure in ``torch.compile``: dynamo's per-call wrapping and guard checks cost more than a
       normalise-and-matmul ever saves, so mteb is told not to (the same function, eagerly).

    Idempotent; without those private functions (another mteb) nothing changes."""
    import mteb.similarity_functions as sf

    if getattr(sf, "_use_torch_compile", None) is not None:
        sf._use_torch_compile = lambda: False
    chosen = getattr(sf, "_select_device", None)
    if chosen is None or getattr(chosen, "keeps_small_on_cpu", False):
        return

    def select(a: torch.Tensor, b: torch.Tensor) -> torch.device:
        device = chosen(a, b)
        if a.device.type == b.device.type == "cpu" != device.type:
            rows_b = b.shape[0] if b.dim() > 1 else 1
            if a.numel() * rows_b < SMALL_SCORING_MACS:
                return a.device
        return device

    select.keeps_small_on_cpu = True  # type: ignore[attr-defined]
    sf._select_device = select
