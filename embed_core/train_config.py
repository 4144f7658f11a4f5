"""`TrainConfig`: every hyper-parameter of one training run, validated (`ConfigError`) before any worker starts.

No torch import: a sweep config is parsed and checked (sweeps/config.py) without loading torch.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .config import EmbedConfig, dataclass_from_dict, is_int, is_number
from .data import BUILDERS
from .errors import ConfigError

__all__ = ["PRECISIONS", "TrainConfig", "model_config", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16")

# DeepSpeed keys the trainer owns (GradCache relies on one accumulation boundary per optimizer step)
_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "managed_gradient_accumulation")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. Validated on construction (`ConfigError`).

    model: the `EmbedConfig` (or a dict of its fields) of the model to train.
    train_data: training JSONL files ({query, positive, negatives[], instruction}).
    builders: names of builders over the shared data folder (`embed_core.data.BUILDERS`),
        concatenated after the files; ``data_dir`` is that folder (None: $EMBED_DATA_DIR or
        ../shared/data); ``max_per_source`` caps each builder.
    batch_size: GLOBAL batch (all workers together); must divide by the number of workers.
    chunk_size: GradCache rows per chunk on each worker (None: one plain forward/backward). Without packing a
        chunk holds one role (queries, positives or negatives); with packing it holds every role of a slice of
        the batch, about ``chunk_size`` texts in all, as one packed row (`gradcache.merged_grad_cache_step`).
    num_negatives: hard negatives per query (topped up from the batch when an example has fewer).
    temperature, lr, weight_decay, warmup_steps, max_steps, grad_clip (0 disables clipping).
    zero_stage: DeepSpeed ZeRO stage, 1, 2 or 3.
    seed: model init, data order, negative sampling and dropout are all functions of it.
    checkpoint_every: steps between checkpoints (0: only at the end).
    checkpoint_every_s: wall-clock seconds between checkpoints as well (0: by step only), so a killed run loses
        at most that much work whatever its step time.
    report_every_s: seconds between progress reports to a driver (Ray Train / Tune) between the reports that
        must happen (held-out evaluation, checkpoint, last step); every step still goes to TensorBoard.
    eval_every / val_size: every ``eval_every`` steps (0: never) embed a held-out slice of
        ``val_size`` TRAINING examples and report in-batch retrieval top-1 accuracy and the mean
        margin between the positive's similarity and the best other candidate's.
    max_bad_fraction: malformed JSONL rows tolerated per file (see embed_core.data.read_jsonl).
    precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``.
    length_grouping: batch examples of similar length together (less padding); not with ``packing`` (nothing to
        save there, and all-long batches would need several times the memory of the average one).
    packing: embed packed rows (embed_core.packing: no padding, per-document attention masks) instead of
        padded batches; without GradCache all roles go through ONE packed forward. Same loss and gradients;
        pair with the model's ``attn_implementation="flash_varlen"`` (or ``"flex_attention"``) on GPU (and ``compile``).
    log_dir: TensorBoard directory (rank 0 writes); None disables TensorBoard.
    deepspeed_overrides: merged (recursively) into the generated DeepSpeed config, e.g.
        ``{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}``; the batch-size and
        accumulation keys and the ZeRO stage are owned by the trainer and cannot be overridden.
    """

    model: EmbedConfig | dict = field(default_factory=EmbedConfig)
    train_data: list[str] = field(default_factory=list)
    builders: list[str] = field(default_factory=list)
    data_dir: str | None = None
    max_per_source: int | None = None
    batch_size: int = 32
    chunk_size: int | None = None
    num_negatives: int = 1
    temperature: float = 0.05
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 100
    grad_clip: float = 1.0
    zero_stage: int = 2
    seed: int = 0
    checkpoint_every: int = 0
    checkpoint_every_s: float = 300.0
    report_every_s: float = 10.0
    eval_every: int = 0
    val_size: int = 0
    max_bad_fraction: float = 0.01
    precision: str = "auto"
    length_grouping: bool = True
    packing: bool = False
    log_dir: str | None = None
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = EmbedConfig.from_dict(self.model)
        elif not isinstance(self.model, EmbedConfig):
            raise ConfigError(f"model must be an EmbedConfig or a dict of its fields, got {type(self.model).__name__}")
        if isinstance(self.train_data, (str, os.PathLike)):
            self.train_data = [str(self.train_data)]
        self.train_data = [str(p) for p in self.train_data]
        if isinstance(self.builders, str):
            self.builders = [self.builders]
        self.builders = list(self.builders)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError on any bad value; with `world_size`, also check the batch splits evenly."""
        self._check_values()
        self._check_combinations(world_size)

    def _check_values(self) -> None:
        """Each field on its own: types and ranges."""
        self.model.validate()
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.chunk_size is not None and (not is_int(self.chunk_size) or self.chunk_size < 1):
            raise ConfigError(f"chunk_size must be an int >= 1 or None (no GradCache), got {self.chunk_size!r}")
        if not is_int(self.num_negatives) or self.num_negatives < 0:
            raise ConfigError(f"num_negatives must be an int >= 0, got {self.num_negatives!r}")
        if not is_number(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not is_number(self.lr) or not 0 < self.lr < 1:
            raise ConfigError(f"lr must be a finite number in (0, 1), got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not is_int(self.max_steps) or self.max_steps < 1:
            raise ConfigError(f"max_steps must be an int >= 1, got {self.max_steps!r}")
        if not is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"warmup_steps must be an int in [0, max_steps={self.max_steps}], got {self.warmup_steps!r}")
        if not is_number(self.grad_clip) or self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be a finite number >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if self.zero_stage not in (1, 2, 3) or not is_int(self.zero_stage):
            raise ConfigError(f"zero_stage must be 1, 2 or 3, got {self.zero_stage!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("checkpoint_every", "eval_every", "val_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ConfigError(f"{name} must be an int >= 0 (0 disables), got {v!r}")
        for name in ("checkpoint_every_s", "report_every_s"):
            v = getattr(self, name)
            if not is_number(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number of seconds >= 0 (0 disables), got {v!r}")
        if self.eval_every > 0 and self.val_size < 2:
            raise ConfigError(f"eval_every={self.eval_every} needs val_size >= 2 held-out examples, got {self.val_size}")
        if not is_number(self.max_bad_fraction) or not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"packing must be true or false, got {self.packing!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    def _check_combinations(self, world_size: int | None) -> None:
        """Fields that constrain each other, the data sources, DeepSpeed keys the trainer owns, the workers."""
        if self.model.lora_r == 0 and self.model.pooling in ("eos_last", "mean"):
            raise ConfigError(f"nothing to train: lora_r=0 with the parameter-free pooling {self.model.pooling!r}; "
                              "set lora_r > 0 or use a trainable pooling head")
        if self.model.dtype == "float16":
            raise ConfigError("model dtype float16 is not supported for training (no loss scaling): use bfloat16 or float32")
        if self.precision == "bf16" and self.model.dtype == "float32" or self.precision == "fp32" and self.model.dtype == "bfloat16":
            raise ConfigError(f"precision {self.precision!r} contradicts model dtype {self.model.dtype!r}: "
                              "leave model dtype 'auto' (it follows the precision) or make them agree")
        if not self.train_data and not self.builders:
            raise ConfigError("no training data: give train_data (JSONL files) and/or builders (e.g. ['stsb', 'snli'])")
        if self.max_per_source is not None and (not is_int(self.max_per_source) or self.max_per_source < 1):
            raise ConfigError(f"max_per_source must be an int >= 1 or None, got {self.max_per_source!r}")
        if self.builders:
            unknown = [b for b in self.builders if b not in BUILDERS]
            if unknown:
                raise ConfigError(f"unknown builder(s) {unknown}: choose from {sorted(BUILDERS)}")
        if not isinstance(self.deepspeed_overrides, dict):
            raise ConfigError(f"deepspeed_overrides must be a dict, got {type(self.deepspeed_overrides).__name__}")
        owned = sorted(k for k in _OWNED_DS_KEYS if k in self.deepspeed_overrides)
        if "stage" in (self.deepspeed_overrides.get("zero_optimization") or {}):
            owned.append("zero_optimization.stage")
        if owned:
            raise ConfigError(f"deepspeed_overrides may not set {owned}: use batch_size / chunk_size / zero_stage "
                              "(the trainer runs one accumulation boundary per optimizer step for GradCache)")
        if world_size is not None:
            if not is_int(world_size) or world_size < 1:
                raise ConfigError(f"the number of workers must be an int >= 1, got {world_size!r}")
            if self.batch_size % world_size:
                raise ConfigError(f"global batch_size {self.batch_size} is not divisible by the number of workers "
                                  f"{world_size}: use a multiple of {world_size}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return dataclass_from_dict(cls, d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def resolve_precision(tcfg: TrainConfig, on_gpu: bool) -> str:
    """``bf16`` or ``fp32``: ``auto`` is bf16 on GPU, fp32 on CPU (an explicit model dtype wins)."""
    if tcfg.precision != "auto":
        return tcfg.precision
    if tcfg.model.dtype == "bfloat16":
        return "bf16"
    if tcfg.model.dtype == "float32":
        return "fp32"
    return "bf16" if on_gpu else "fp32"


def model_config(tcfg: TrainConfig, on_gpu: bool) -> EmbedConfig:
    """The model config with dtype following the precision (so weights are built in that dtype)."""
    dtype = "bfloat16" if resolve_precision(tcfg, on_gpu) == "bf16" else "float32"
    return EmbedConfig.from_dict({**tcfg.model.to_dict(), "dtype": dtype})
