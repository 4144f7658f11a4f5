"""The embedding model: a decoder LLM (+ PEFT LoRA) with causal or bidirectional attention and a pooling head.

    model = EmbeddingModel.from_config(EmbedConfig(pooling="multi_layer_trainable", attention="bidirectional"))
    vecs = model.encode(["a query"], instruction="Retrieve relevant passages")   # L2-normalised numpy
    model.save("ckpt/"); again = EmbeddingModel.load("ckpt/")

A saved directory holds everything (see `save`) and loads with plain transformers + peft + the pooling
module too (`load_standalone` in README).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import attention as attn
from . import packing as pk
from .backbone import Preflight, load_backbone, load_tokenizer, preflight, prepare_tokenizer, torch_dtype
from .config import RUNTIME_FIELDS, EmbedConfig, read_versioned_json
from .errors import ConfigError
from .fused_lora import fuse_lora
from .pooling import PoolingHead, build_pooling

# peft and transformers are imported where used: seconds to import each, and reading a checkpoint's metadata
# (`read_meta`, as `sweeps export --best` does for every checkpoint) needs neither.

log = logging.getLogger(__name__)

FORMAT = "embed_core/v1"
CONFIG_FILE = "embed_config.json"
HEAD_FILE = "pooling_head.safetensors"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"


def _apply_lora(backbone: nn.Module, cfg: EmbedConfig, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.effective_lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    # adapters in the backbone's dtype: peft's default up-casts them to fp32 on a bf16 model, which turns every
    # LoRA matmul into an fp32 GEMM plus two casts of the activations (DeepSpeed's bf16 engine casts them back
    # to bf16 anyway; plain-PyTorch training and encoding paid for it)
    return get_peft_model(backbone, lcfg, autocast_adapter_dtype=False)


class EmbeddingModel(nn.Module):
    """backbone (PeftModel when lora_r > 0) + pooling head + tokenizer + config."""

    def __init__(self, cfg: EmbedConfig, backbone: nn.Module, pooler: PoolingHead, tokenizer, info: dict):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.pooler = pooler
        self.tokenizer = tokenizer
        self.info = info  # hidden_size, num_layers, lora_targets, backbone_source
        self.bidirectional = cfg.attention == "bidirectional"
        attn.set_causal(self.backbone, not self.bidirectional)
        # sliding-window layers keep their window (Gemma3: 512), causal or bidirectional (embed_core.attention)
        self.window = attn.sliding_window(self.backbone.config)
        if cfg.fused_lora and cfg.lora_r > 0:

            self.info["fused_lora"] = fuse_lora(self.backbone)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: EmbedConfig, device: str | torch.device | None = None, seed: int | None = 0,
                    pre: Preflight | None = None) -> "EmbeddingModel":
        """Check the config (cheap, no weights), then load the backbone, add LoRA and a fresh pooling head."""
        pre = pre or preflight(cfg)
        tok = load_tokenizer(pre.source, cfg)
        dtype = torch_dtype(cfg, device)
        backbone = load_backbone(pre.source, cfg, dtype)
        if seed is not None:
            torch.manual_seed(seed)
        if cfg.lora_r > 0:
            backbone = _apply_lora(backbone, cfg, pre.lora_targets)
        else:
            backbone.requires_grad_(False)
        pooler = build_pooling(cfg, pre.hidden_size, pre.num_layers).to(dtype)
        info = {"hidden_size": pre.hidden_size, "num_layers": pre.num_layers, "lora_targets": pre.lora_targets,
                "backbone_source": pre.source.path, "model_type": pre.hf_config.model_type}
        model = cls(cfg, backbone, pooler, tok, info)
        return model.to(device) if device is not None else model

    # ------------------------------------------------------------------ forward
    @property
    def device(self) -> torch.device:
        return next(self.pooler.parameters(), next(self.backbone.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def embedding_dim(self) -> int:
        return self.info["hidden_size"]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                packed: pk.PackedBatch | None = None) -> torch.Tensor:
        """Token ids [B,T] + padding mask [B,T] -> embeddings [B,H] (not normalised); or, with `packed`
        (embed_core.packing), the n packed documents -> [n,H], the same vectors without padding."""
        self.maybe_compile()
        if packed is not None:
            return self.forward_packed(packed)
        kwargs = attn.backbone_inputs(input_ids, attention_mask, self.bidirectional, self.dtype, self.window)
        out = self.backbone(**kwargs, output_hidden_states=self.pooler.needs_all_layers, return_dict=True)
        return self.pooler(out.last_hidden_state, attention_mask, hidden_states=out.hidden_states)

    def forward_packed(self, packed: pk.PackedBatch) -> torch.Tensor:
        """One packed row: position ids restart per document, and an explicit per-document mask (a BlockMask
        under flex_attention, the documents' boundaries under flash_varlen, else a dense 4D mask) keeps documents
        apart, causal or bidirectional."""
        out = self.backbone(**self.packed_inputs(packed), output_hidden_states=self.pooler.needs_all_layers,
                            return_dict=True)
        return self.pooler.forward_packed(out.last_hidden_state, packed, hidden_states=out.hidden_states)

    def packed_inputs(self, packed: pk.PackedBatch) -> dict:
        """Backbone keyword arguments for one packed row: ids, restarting positions, no KV cache, and the
        per-document mask (or, under flash_varlen, the document boundaries)."""
        kw = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False,
              "attention_mask": pk.packed_attention_mask(packed, causal=not self.bidirectional,
                                                         attn_implementation=self.cfg.attn_implementation,
                                                         dtype=self.dtype, window=self.window)}
        if self.cfg.attn_implementation == "flash_varlen":
            kw.update(pk.varlen_kwargs(packed))
        return kw

    def compile_layers(self) -> int:
        """torch.compile every decoder layer (dynamic shapes: packed rows vary in length); fuses the elementwise
        work and cuts the per-kernel host overhead that dominates small LoRA models. Returns how many."""
        pk.allow_recompiles()
        n = 0
        for module in self.backbone.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.compile(dynamic=True)
                n += 1
        if n == 0:
            raise RuntimeError(f"compile: no *DecoderLayer module found in {type(self.backbone).__name__}")
        return n

    def maybe_compile(self) -> None:
        """Apply cfg.compile once, on the first forward on a GPU (CPU runs stay eager)."""
        if self.cfg.compile and not getattr(self, "_compiled", False) and self.device.type == "cuda":
            self.compile_layers()
            self._compiled = True

    @property
    def pack_multiple(self) -> int:
        """Packed rows are rounded up to this many tokens (FlexAttention's block size; 1 for dense masks)."""
        return pk.FLEX_BLOCK if self.cfg.attn_implementation == "flex_attention" else 1

    def pack(self, ids: Sequence[Sequence[int]]) -> pk.PackedBatch:
        """Token-id lists (as from `token_ids`) -> one PackedBatch on the host (`.to(device)` moves it)."""
        return pk.pack_ids(ids, self.tokenizer.pad_token_id, self.pack_multiple)

    def token_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Tokenise with truncation and EOS appended (exactly the rows `tokenize` pads), no padding."""
        return eos_rows(self.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                                       max_length=(max_length or self.cfg.max_length) - 1)["input_ids"],
                        self.tokenizer, max_length or self.cfg.max_length)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise with truncation, append EOS to every text (always the last real token), pad."""
        return tokenize(self.tokenizer, texts, max_length or self.cfg.max_length)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32,
               normalize: bool = True, show_progress: bool = False) -> np.ndarray:
        """Embed texts (queries get `instruction` via the query template). Batches are sorted by length."""
        texts = [self.cfg.format_query(t, instruction) for t in texts]
        if not texts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        was_training = self.training
        self.eval()
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                             max_length=self.cfg.max_length - 1)["input_ids"]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        batches = range(0, len(texts), batch_size)
        if show_progress:
            batches = tqdm(batches, desc="encode", unit="batch")
        if self.cfg.packing:
            self._encode_packed(eos_rows(ids, self.tokenizer, self.cfg.max_length), order, out, normalize)
            self.train(was_training)
            return out
        for start in batches:
            idx = order[start:start + batch_size]
            enc = pad_ids([ids[i] for i in idx], self.tokenizer, self.cfg.max_length)
            emb = self(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)).float()
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.cpu().numpy()
        self.train(was_training)
        return out

    def _encode_packed(self, rows: list[list[int]], order: np.ndarray, out: np.ndarray, normalize: bool) -> None:
        """Length-sorted texts packed into rows of <= cfg.pack_tokens tokens. The next row is packed and copied
        (pinned, non-blocking) while the GPU runs the current one; results come back once, at the end."""
        groups, cur, used = [], [], 0
        for i in order:
            n = len(rows[i])
            if cur and used + n > self.cfg.pack_tokens:
                groups.append(cur)
                cur, used = [], 0
            cur.append(int(i))
            used += n
        if cur:
            groups.append(cur)
        results = []
        nxt = self.pack([rows[i] for i in groups[0]]).to(self.device)
        for g, idx in enumerate(groups):
            packed = nxt
            emb = self(packed=packed).float()
            if g + 1 < len(groups):
                nxt = self.pack([rows[i] for i in groups[g + 1]]).to(self.device)
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            results.append(emb)
        out[np.concatenate([np.asarray(g) for g in groups])] = torch.cat(results).cpu().numpy()

    # ------------------------------------------------------------------ reporting
    def parameter_report(self) -> dict[str, int]:
        lora = sum(p.numel() for n, p in self.backbone.named_parameters() if p.requires_grad)
        head = self.pooler.num_trainable()
        total_backbone = sum(p.numel() for p in self.backbone.parameters())
        return {"backbone_total": total_backbone, "lora_trainable": lora, "pooling_trainable": head,
                "trainable_total": lora + head}

    def trainable_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(LoRA tensors keyed as in backbone.named_parameters(), pooling head state): the only weights a
        checkpoint needs. PEFT's save_pretrained(state_dict=...) takes the first as is."""
        adapter = {}
        if self.cfg.lora_r > 0:
            adapter = {n: p.detach() for n, p in self.backbone.named_parameters() if "lora_" in n}
        return adapter, dict(self.pooler.state_dict())

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path, adapter_state: dict | None = None, head_state: dict | None = None) -> Path:
        """Write config, adapter, pooling head and tokenizer into `path`.

        adapter_state / head_state override the module's own tensors (e.g. gathered from ZeRO-3 shards,
        where the local parameters are empty placeholders). Refuses to write an empty adapter."""

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        own_adapter, own_head = self.trainable_state()
        adapter_state = own_adapter if adapter_state is None else adapter_state
        head_state = own_head if head_state is None else head_state
        if self.cfg.lora_r > 0:
            empty = [k for k, v in adapter_state.items() if v.numel() == 0]
            if not adapter_state or empty:
                raise RuntimeError(f"refusing to save an empty LoRA adapter ({len(empty)} empty tensors): under ZeRO-3 "
                                   "gather the parameters first (embed_core.engine.gathered_trainable_state)")
            self.backbone.save_pretrained(str(path / ADAPTER_DIR), state_dict=adapter_state)
        if head_state:
            save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()}, str(path / HEAD_FILE))
        self.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        meta = {"format": FORMAT, "config": self.cfg.to_dict(), "info": self.info,
                "fingerprint": fingerprint(adapter_state, head_state, self.cfg)}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, base_model: str | None = None,
             trainable: bool = False, runtime: dict | None = None) -> "EmbeddingModel":
        """Load a saved directory. `base_model` overrides where the backbone comes from (other machine);
        `runtime` overrides how it runs (``attn_implementation``, ``compile``, ``pack_tokens``: the same function)."""
        path = Path(path)
        meta = read_meta(path)
        bad = sorted(set(runtime or {}) - RUNTIME_FIELDS)
        if bad:
            raise ConfigError(f"EmbeddingModel.load runtime overrides may only set {sorted(RUNTIME_FIELDS)}, got {bad}")
        cfg = EmbedConfig.from_dict({**meta["config"], **(runtime or {})})
        if base_model is not None:
            cfg.base_model = base_model
        pre = preflight(cfg)
        tok = prepare_tokenizer(_auto_tokenizer(path / TOKENIZER_DIR), cfg)
        dtype = torch_dtype(cfg, device)
        backbone = load_backbone(pre.source, cfg, dtype)
        if cfg.lora_r > 0:
            from peft import PeftModel
            backbone = PeftModel.from_pretrained(backbone, str(path / ADAPTER_DIR), is_trainable=trainable,
                                                 autocast_adapter_dtype=False)
        else:
            backbone.requires_grad_(False)
        pooler = build_pooling(cfg, pre.hidden_size, pre.num_layers).to(dtype)
        load_head(pooler, path)
        if not trainable:
            pooler.requires_grad_(False)
        model = cls(cfg, backbone, pooler, tok, dict(meta["info"], backbone_source=pre.source.path))
        if not trainable:
            # The saved fingerprint names these exact weights (the mteb revision). A trainable load will
            # change them, so it must not carry the old name: its revision is recomputed from the weights.
            model.info["fingerprint"] = meta["fingerprint"]
        model.eval()
        return model.to(device) if device is not None else model


def _auto_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def read_meta(path: Path) -> dict:
    return read_versioned_json(path, CONFIG_FILE, FORMAT, "a saved embedding model")


def load_head(pooler: nn.Module, path: Path) -> None:

    f = Path(path) / HEAD_FILE
    expected = pooler.state_dict()
    if not expected:
        return
    if not f.is_file():
        raise ConfigError(f"{f} is missing: the checkpoint's {type(pooler).__name__} head was not saved")
    state = load_file(str(f))
    pooler.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def fingerprint(adapter_state: dict, head_state: dict, cfg: EmbedConfig) -> str:
    """A short content hash of the trained weights + config: the checkpoint's mteb revision."""
    h = hashlib.sha256(cfg.to_json().encode())
    for state in (adapter_state, head_state):
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- tokenisation helpers
def eos_rows(ids: Sequence[Sequence[int]], tokenizer, max_length: int) -> list[list[int]]:
    """Append EOS (unless already last), truncate to max_length keeping EOS."""
    eos = tokenizer.eos_token_id
    rows = []
    for x in ids:
        x = list(x)[: max_length - 1]
        if not x or x[-1] != eos:
            x.append(eos)
        rows.append(x)
    return rows


def pad_ids(ids: Sequence[Sequence[int]], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Append EOS (unless already last), truncate to max_length keeping EOS, pad on the tokenizer's side."""
    pad = tokenizer.pad_token_id
    rows = eos_rows(ids, tokenizer, max_length)
    t = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    left = tokenizer.padding_side == "left"
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def tokenize(tokenizer, texts: Iterable[str], max_length: int) -> dict[str, torch.Tensor]:
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length - 1)["input_ids"]
    return pad_ids(ids, tokenizer, max_length)
