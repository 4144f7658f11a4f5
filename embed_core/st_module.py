"""The sentence-transformers input module of an exported embed-sweeps model (see embed_core/export.py).

`embed_core.export` writes this file into the exported folder as ``embed_sweeps_st.py``, with the import block
between the ``shared`` markers replaced by the source of the imported definitions: the folder then loads with
``SentenceTransformer(folder, trust_remote_code=True)`` on a machine without this project, and the maths
(EOS appended, positions from the padding mask, the 4D causal / bidirectional mask, the pooling heads) is the
project's own code, not a re-implementation. tests/test_export.py checks the embeddings match.

The module tokenises (prompt + text, truncated to max_length - 1, EOS appended, padded on the saved side), runs
the decoder with ``is_causal`` set on every attention module and an explicit 4D mask, and pools. An unmerged LoRA
adapter (folder ``adapter/``) is applied with peft at load, so the computation is the checkpoint's own.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
import torch.nn.functional as F  # noqa: F401  (used by the pooling code spliced in below)
from torch import nn
from sentence_transformers.base.modules import InputModule

# --- shared: begin (export.py replaces this block by the source of the named definitions)
# (attention_mask_4d, per_layer_type, position_ids_from_mask, eos_rows, last_token_index: used by the others, copied
# with them)
from embed_core.attention import attention_mask_4d, backbone_inputs, per_layer_type, position_ids_from_mask  # noqa: F401
from embed_core.attention import set_causal, sliding_window  # noqa: F401
from embed_core.model import eos_rows, pad_ids  # noqa: F401
from embed_core.pooling import LatentCrossAttention, eos_last, last_token_index, masked_mean  # noqa: F401
# --- shared: end

ADAPTER_DIR = "adapter"
HEAD_FILE = "pooling_head.safetensors"
TRAINABLE = ("last_layer_trainable", "multi_layer_trainable")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PoolingHead(nn.Module):
    """The project's four pooling heads in one module; parameter names match `pooling_head.safetensors`."""

    def __init__(self, pooling: str, causal: bool, hidden: int, inner: int, heads: int, latents: int,
                 num_layers: int):
        super().__init__()
        self.pooling, self.causal = pooling, causal
        self.needs_all_layers = pooling == "multi_layer_trainable"
        if pooling in TRAINABLE:
            self.attn = LatentCrossAttention(hidden, inner, heads, latents)
        if self.needs_all_layers:
            self.layer_embed = nn.Parameter(torch.zeros(num_layers, hidden))

    def forward(self, last_hidden: torch.Tensor, mask: torch.Tensor, hidden_states=None) -> torch.Tensor:
        if self.pooling == "eos_last":
            return eos_last(last_hidden, mask)
        if self.pooling == "mean":
            return masked_mean(last_hidden, mask)
        if self.pooling == "last_layer_trainable":
            return self.attn(last_hidden, mask)
        pool = eos_last if self.causal else masked_mean
        vecs = torch.stack([pool(h, mask) for h in hidden_states[1:]], dim=1)  # one vector per layer
        return self.attn(vecs.to(self.layer_embed.dtype) + self.layer_embed)


def _dtype(model_kwargs: dict | None, saved: str) -> torch.dtype:
    """`model_kwargs={"dtype": ...}` (a torch dtype or its name) wins; "auto" / nothing = the stored dtype."""
    want = (model_kwargs or {}).get("dtype", (model_kwargs or {}).get("torch_dtype"))
    if want is None or want == "auto":
        return DTYPES[saved]
    return want if isinstance(want, torch.dtype) else DTYPES[str(want).replace("torch.", "")]


class EmbedSweepsEncoder(InputModule):
    """Decoder LLM (+ optional LoRA adapter) + pooling head, as exported by embed-sweeps."""

    config_file_name = "embed_sweeps_module.json"
    config_keys = ["settings"]
    save_in_root = True

    def __init__(self, backbone: nn.Module, tokenizer, head: PoolingHead, settings: dict[str, Any]):
        super().__init__()
        self.backbone, self.tokenizer, self.head, self.settings = backbone, tokenizer, head, settings
        self.bidirectional = settings["attention"] == "bidirectional"
        self.max_seq_length = settings["max_length"]
        tokenizer.padding_side = settings["padding_side"]
        set_causal(self.backbone, not self.bidirectional)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, model_kwargs: dict | None = None, **kwargs) -> "EmbedSweepsEncoder":
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        path = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        with open(os.path.join(path, cls.config_file_name), encoding="utf-8") as fh:
            settings = json.load(fh)["settings"]
        dtype = _dtype(model_kwargs, settings["dtype"])
        attn = (model_kwargs or {}).get("attn_implementation", "sdpa")
        backbone = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        backbone.config.use_cache = False
        if settings["adapter"]:
            backbone = _with_adapter(backbone, os.path.join(path, ADAPTER_DIR))
        head = PoolingHead(**settings["head"]).to(dtype)
        if list(head.parameters()):
            state = load_file(os.path.join(path, HEAD_FILE))
            head.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        return cls(backbone.eval(), AutoTokenizer.from_pretrained(path), head.eval(), settings)

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """prompt + text, truncated to max_length - 1 tokens, EOS appended (always the last real token), padded."""
        texts = [(prompt or "") + t for t in inputs]
        n = self.settings["max_length"]
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=n - 1)["input_ids"]
        return pad_ids(ids, self.tokenizer, n)

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        mask = features["attention_mask"]
        dtype = next(self.backbone.parameters()).dtype
        window = sliding_window(self.backbone.config)  # Gemma3's local layers keep their window, as in training
        out = self.backbone(**backbone_inputs(features["input_ids"], mask, self.bidirectional, dtype, window),
                            output_hidden_states=self.head.needs_all_layers, return_dict=True)
        features["token_embeddings"] = out.last_hidden_state
        features["sentence_embedding"] = self.head(out.last_hidden_state, mask, out.hidden_states).float()
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.settings["head"]["hidden"]

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Backbone (+ adapter/), tokenizer, pooling head, settings and this file, as export writes them."""
        from safetensors.torch import save_file

        base = self.backbone
        if self.settings["adapter"]:
            self.backbone.save_pretrained(os.path.join(output_path, ADAPTER_DIR))
            base = copy.deepcopy(self.backbone).unload()  # the base weights without the LoRA layers
        base.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        if state:
            save_file(state, os.path.join(output_path, HEAD_FILE))
        with open(os.path.join(output_path, self.config_file_name), "w", encoding="utf-8") as fh:
            json.dump({"settings": self.settings}, fh, indent=2, sort_keys=True)


def _with_adapter(backbone: nn.Module, adapter_dir: str) -> nn.Module:
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("this model keeps its LoRA adapter separate (adapter/): pip install peft, or re-export "
                          "it with --merge-lora") from err
    return PeftModel.from_pretrained(backbone, adapter_dir, autocast_adapter_dtype=False)
