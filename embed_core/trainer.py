"""Contrastive training of an `EmbeddingModel` with DeepSpeed ZeRO 1/2/3 and GradCache (no ray import).

One optimizer step on a global batch of ``batch_size`` examples::

    global batch (deterministic in (seed, step))  --collate-->  queries / positives / K negatives
        --shard by rank-->  local lists  --tokenise-->  roles {query, positive, negative}
        --GradCache (or one plain forward/backward)-->  InfoNCE over the *global* batch
        (positives and negatives all-gathered with gradients)  -->  engine.step()

The pieces:

* `TrainConfig`: every hyper-parameter, validated (`ConfigError`) before any worker starts.
* `ds_config` / `build_engine`: the DeepSpeed config and engine (ZeRO 1/2/3; AdamW over the trainable
  parameters only -- LoRA + pooling head; warm-up then linear decay; gradient clipping; bf16 on GPU,
  fp32 on CPU). On CPU it runs over gloo with no compiled ops.
* `TrainData`: loads the training data (JSONL files and/or builders over the shared data folder),
  holds out ``val_size`` examples for a cheap in-training metric, and gives the global batch of any
  step -- the order is a pure function of (seed, step), so a resumed run sees exactly the batches
  an uninterrupted run would have seen.
* `Trainer`: ``train_step(batch)``, ``run_step()``, ``evaluate()``, ``save_checkpoint(dir)``,
  ``load_checkpoint(dir)``, and a TensorBoard writer on rank 0.
* `gathered_trainable_state`: the LoRA + head tensors, gathered from ZeRO-3 partitions when needed.

GradCache and DeepSpeed gradient accumulation
---------------------------------------------
GradCache calls the backward once per chunk of every role within one optimizer step. The engine runs
with ``gradient_accumulation_steps = 1`` (so ``engine.backward`` never divides the loss) and the step
marks every backward but the last as *not* an accumulation boundary
(``engine.set_gradient_accumulation_boundary``): ZeRO then accumulates the chunks' gradients and
reduces / averages across ranks exactly once, at the boundary, and ``engine.step()`` updates. The
sum of the chunk surrogates' gradients equals the full-batch loss gradient (see
`embed_core.gradcache`), which `tests/test_trainer.py` checks against plain PyTorch autograd.

Checkpoint layout (``save_checkpoint(dir)``)::

    dir/model/                 EmbeddingModel.save: config, LoRA adapter, pooling head, tokenizer
                               (loadable with EmbeddingModel.load; written by rank 0)
    dir/deepspeed/latest       DeepSpeed engine state: module (trainable tensors only), optimizer,
    dir/deepspeed/<tag>/...    LR scheduler; ZeRO files are per rank (zero_pp_rank_<r>_...)
    dir/trainer_state.json     step, epoch, position in the epoch, seed, data fingerprint, metrics
                               history (with a per-step batch fingerprint), resumes (rank 0)

Every rank writes only files of its own (distinct names), so per-rank directories can be merged
into one (what Ray Train does with the directories that several workers report).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .config import EmbedConfig, dataclass_from_dict, read_versioned_json
from .errors import ConfigError, DataError
from .gradcache import (full_batch_step, grad_cache_step, iter_chunks, merged_batch_step, merged_chunk_count,
                        merged_grad_cache_step)
from .loss import check_finite, dist_world, info_nce
from .model import EmbeddingModel

log = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "MODEL_DIR",
    "DEEPSPEED_DIR",
    "STATE_FILE",
    "TrainConfig",
    "TrainData",
    "Trainer",
    "WarmupLinear",
    "batch_fingerprint",
    "build_engine",
    "ds_config",
    "gathered_trainable_state",
    "init_single_process_group",
    "load_examples",
    "read_trainer_state",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16")
MODEL_DIR = "model"
DEEPSPEED_DIR = "deepspeed"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = "embed_core.trainer/v1"


# ====================================================================================== config
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
        self.model.validate()
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.chunk_size is not None and (not _is_int(self.chunk_size) or self.chunk_size < 1):
            raise ConfigError(f"chunk_size must be an int >= 1 or None (no GradCache), got {self.chunk_size!r}")
        if not _is_int(self.num_negatives) or self.num_negatives < 0:
            raise ConfigError(f"num_negatives must be an int >= 0, got {self.num_negatives!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not _is_number(self.lr) or not 0 < self.lr < 1:
            raise ConfigError(f"lr must be a finite number in (0, 1), got {self.lr!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not _is_int(self.max_steps) or self.max_steps < 1:
            raise ConfigError(f"max_steps must be an int >= 1, got {self.max_steps!r}")
        if not _is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"warmup_steps must be an int in [0, max_steps={self.max_steps}], got {self.warmup_steps!r}")
        if not _is_number(self.grad_clip) or self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be a finite number >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if self.zero_stage not in (1, 2, 3) or not _is_int(self.zero_stage):
            raise ConfigError(f"zero_stage must be 1, 2 or 3, got {self.zero_stage!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("checkpoint_every", "eval_every", "val_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ConfigError(f"{name} must be an int >= 0 (0 disables), got {v!r}")
        for name in ("checkpoint_every_s", "report_every_s"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number of seconds >= 0 (0 disables), got {v!r}")
        if self.eval_every > 0 and self.val_size < 2:
            raise ConfigError(f"eval_every={self.eval_every} needs val_size >= 2 held-out examples, got {self.val_size}")
        if not _is_number(self.max_bad_fraction) or not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"packing must be true or false, got {self.packing!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
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
        if self.max_per_source is not None and (not _is_int(self.max_per_source) or self.max_per_source < 1):
            raise ConfigError(f"max_per_source must be an int >= 1 or None, got {self.max_per_source!r}")
        if self.builders:
            from .data import BUILDERS
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
            if not _is_int(world_size) or world_size < 1:
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


def _model_config(tcfg: TrainConfig, on_gpu: bool) -> EmbedConfig:
    """The model config with dtype following the precision (so weights are built in that dtype)."""
    dtype = "bfloat16" if resolve_precision(tcfg, on_gpu) == "bf16" else "float32"
    return EmbedConfig.from_dict({**tcfg.model.to_dict(), "dtype": dtype})


# ====================================================================================== data
def load_examples(tcfg: TrainConfig) -> list:
    """All training examples: the JSONL files in order, then the builders' output (DataError if none)."""
    from .data import build_training_set, read_jsonl

    examples: list = []
    for path in tcfg.train_data:
        examples.extend(read_jsonl(path, max_bad_fraction=tcfg.max_bad_fraction))
    if tcfg.builders:
        examples.extend(build_training_set(tcfg.builders, data_dir=tcfg.data_dir, seed=tcfg.seed,
                                           max_per_source=tcfg.max_per_source))
    if not examples:
        raise DataError("the training data is empty: check train_data / builders")
    return examples


def _example_key(ex) -> str:
    return "\x1f".join([ex.query, ex.positive, *ex.negatives, ex.instruction or ""])


def data_fingerprint(examples: Sequence) -> str:
    """Content hash of a list of TrainExamples (order included)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(_example_key(ex).encode("utf-8", "replace"))
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def batch_fingerprint(batch: Sequence) -> str:
    """Short hash of a global batch's (query, positive) pairs, logged per step to audit the data order."""
    h = hashlib.sha1()
    for ex in batch:
        h.update(f"{ex.query}\x1f{ex.positive}\x1e".encode("utf-8", "replace"))
    return h.hexdigest()[:12]


def _derived_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of `parts` (stable across processes and runs)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_timestamp(key: str) -> bool:
    """Metrics that are wall-clock times (unix seconds), kept in the history but not plotted."""
    return key == "wall_time" or key.endswith("_at")


class TrainData:
    """Train / held-out split and the deterministic global batch of every step.

    The held-out slice is ``val_size`` examples picked by a permutation seeded with ``seed``; the
    rest is batched by `embed_core.data.LengthGroupedBatcher` (drop_last): step ``s`` (0-based)
    is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``.
    """

    def __init__(self, tcfg: TrainConfig, examples: Sequence | None = None) -> None:
        from .data import LengthGroupedBatcher

        self.tcfg = tcfg
        examples = list(examples) if examples is not None else load_examples(tcfg)
        self.fingerprint = data_fingerprint(examples)
        n = len(examples)
        if tcfg.val_size >= n:
            raise DataError(f"val_size {tcfg.val_size} leaves no training data out of {n} examples: lower val_size")
        order = np.random.default_rng(np.random.SeedSequence([tcfg.seed, 7919])).permutation(n)
        held = set(order[: tcfg.val_size].tolist())
        self.val = [examples[i] for i in sorted(held)]
        self.train = [ex for i, ex in enumerate(examples) if i not in held]
        if len(self.train) < tcfg.batch_size:
            raise DataError(f"{len(self.train)} training examples (after holding out val_size={tcfg.val_size}) "
                            f"do not fill one global batch of {tcfg.batch_size}: add data or lower batch_size")
        # packed rows have no padding to save, and length-grouped batches would swing the tokens per step (and
        # the activation memory) several-fold between an all-short and an all-long batch
        self.batcher = LengthGroupedBatcher(self.train, tcfg.batch_size, seed=tcfg.seed,
                                            length_grouping=tcfg.length_grouping and not tcfg.packing, drop_last=True)
        self.steps_per_epoch = len(self.batcher)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of 0-based global step `step`."""
        return divmod(step, self.steps_per_epoch)

    def global_batch(self, step: int) -> list:
        epoch, index = self.position(step)
        return [self.train[i] for i in self.batcher.indices(epoch)[index]]

    def local_batch(self, step: int, rank: int, world_size: int, format_query: Callable[[str, str | None], str]) -> dict:
        """This rank's share of step `step`'s global batch, collated (negatives drawn on the global batch,
        so the result does not depend on the number of workers). Keys: queries, positives, negatives,
        fingerprint (of the global batch)."""
        from .data import collate, shard_batch

        batch = self.global_batch(step)
        k = self.tcfg.num_negatives
        col = collate(batch, k, seed=_derived_seed(self.tcfg.seed, "negatives", step))
        queries = [format_query(ex.query, ex.instruction) for ex in batch]  # the model's own template
        return {
            "queries": shard_batch(queries, rank, world_size),
            "positives": shard_batch(col["positives"], rank, world_size),
            "negatives": shard_batch(col["negatives"], rank, world_size) if k else [],
            "fingerprint": batch_fingerprint(batch),
        }


# ====================================================================================== distributed
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(backend: str = "gloo") -> None:
    """Initialise a 1-rank torch.distributed group on 127.0.0.1 (DeepSpeed needs one) unless one exists.

    Uses a tcp:// init method on a free port; sets only LOCAL_RANK=0 if unset (deepspeed.initialize
    asserts that it exists)."""
    os.environ.setdefault("LOCAL_RANK", "0")
    if dist.is_initialized():
        return
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def destroy_single_process_group() -> None:
    """Tear down the group of :func:`init_single_process_group` so that a later one works in this process
    (notebooks, test modules): DeepSpeed caches its comm backend and a clone of the world group
    (``deepspeed.utils.groups._WORLD_GROUP``); a new ``deepspeed.initialize`` would reuse the dead clone
    ("Group ... is not registered")."""
    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        import deepspeed.comm.comm as ds_comm
        from deepspeed.utils import groups
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return
    ds_comm.cdb = None
    groups._WORLD_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups.mesh_device = None
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()


ALLOC_ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def configure_cuda_allocator(environ: dict | None = None) -> str | None:
    """Turn on expandable segments in PyTorch's CUDA caching allocator unless the user configured it.

    Packed training asks for activations of a different size every step (the packed row's length follows the
    batch's texts); with fixed-size cached blocks the allocator can end up freeing its cache and mapping new
    memory inside the step (synchronising cudaFree / cudaMalloc). One profile of Qwen2-0.5B at 512 triplets on an
    H100 showed ~105 ms of those in a ~565 ms step (bench/results/trainer_profile_h100.json); later runs did not
    reproduce it, and with expandable segments the step was 0.388 vs 0.408 s (trainer_alloc_h100.json): a guard,
    small gain at most. Returns the setting applied, or None when the environment already sets
    ``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF`` (the user's choice wins) or there is no GPU.
    """
    environ = os.environ if environ is None else environ
    if any(environ.get(k) for k in ALLOC_ENV_VARS) or not torch.cuda.is_available():
        return None
    setting = "expandable_segments:True"
    torch.cuda.memory._set_allocator_settings(setting)
    return setting


def _prepare_deepspeed(on_gpu: bool) -> None:
    """Import DeepSpeed with its INFO logging muted; on CPU, keep it from JIT-compiling its shared-memory
    all-reduce op (~100 s with a C++ compiler, only used for inference all-reduce): gloo does the work."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not on_gpu:
        with contextlib.suppress(Exception):
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ====================================================================================== engine
class WarmupLinear:
    """LR factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``.

    Step s (0-based optimizer step) uses (s + 1) / (warmup + 1) during warm-up, then
    (total - s) / (total - warmup): never 0 within the run, 1 at s = warmup."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / (self.warmup + 1)
        return max(0.0, (self.total - s) / max(1, self.total - self.warmup))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(tcfg: TrainConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config: one micro-batch per optimizer step (GradCache handles the batch), ZeRO stage,
    clipping, bf16 on GPU (fp32 master weights in the ZeRO optimizer), then ``tcfg.deepspeed_overrides``."""
    tcfg.validate(world_size)
    conf = {
        "train_batch_size": tcfg.batch_size,
        "train_micro_batch_size_per_gpu": tcfg.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(tcfg.grad_clip),
        "zero_optimization": {"stage": tcfg.zero_stage},
        # ZeRO-1/2: check_grad_overflow off. DeepSpeed's own check runs ~7 small ops per gradient tensor (336
        # with LoRA on a 24-layer model: 35-60 ms of a step's optimizer phase, measured on an H200); the Trainer
        # checks the same gradients with one fused reduction in its per-step sync instead (pending_gradients,
        # gradients_finite_flag) and refuses the step, weights untouched, as DeepSpeed's check did. ZeRO-3 keeps
        # DeepSpeed's check. A user override of this key wins.
        "bf16": {"enabled": resolve_precision(tcfg, on_gpu) == "bf16",
                 "check_grad_overflow": tcfg.zero_stage not in (1, 2)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(conf, tcfg.deepspeed_overrides)


def pending_gradients(engine) -> list[torch.Tensor] | None:
    """The gradients DeepSpeed's ZeRO-1/2 optimizer will step on (this rank's partition, reduced), between the
    last backward of a step and ``engine.step()``; None where they are not reachable that way (ZeRO-3, another
    optimizer): then DeepSpeed's own overflow check stays in charge."""
    groups = getattr(getattr(engine, "optimizer", None), "averaged_gradients", None)
    if not isinstance(groups, dict) or getattr(engine, "zero_optimization_stage", lambda: None)() not in (1, 2):
        return None
    return [g for gs in groups.values() if gs for g in gs if g is not None]


def gradients_finite_flag(grads: list[torch.Tensor], device) -> torch.Tensor:
    """0-dim float64 device tensor: the sum of the gradients' L1 norms, non-finite iff any gradient holds a NaN
    or inf (one fused multi-tensor reduction, no host sync)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(grads, 1)).to(torch.float64).sum()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (LoRA + pooling head): matrices decay, biases and norm weights (dim < 2) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters: set lora_r > 0 or use a trainable pooling head")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_engine(model: EmbeddingModel, tcfg: TrainConfig, world_size: int | None = None,
                 on_gpu: bool | None = None):
    """Wrap `model` in a DeepSpeed engine (torch.distributed must be initialised; DeepSpeed reuses the
    existing process group). AdamW (torch) over the trainable parameters, `WarmupLinear` schedule."""
    if not dist.is_initialized():
        raise RuntimeError("build_engine needs torch.distributed initialised (Ray Train does it; for one "
                           "process call embed_core.trainer.init_single_process_group())")
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    world_size = dist.get_world_size() if world_size is None else world_size
    _prepare_deepspeed(on_gpu)
    import deepspeed

    optimizer = torch.optim.AdamW(_param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=(0.9, 0.999),
                                  eps=1e-8, foreach=False)
    schedule = WarmupLinear(tcfg.warmup_steps, tcfg.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(tcfg, world_size, on_gpu),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule), dist_init_required=False)
    return engine


def _trainable_params(model: EmbeddingModel) -> list[torch.nn.Parameter]:
    lora = [p for n, p in model.backbone.named_parameters() if "lora_" in n] if model.cfg.lora_r > 0 else []
    return lora + list(model.pooler.parameters())


def gathered_trainable_state(engine, model: EmbeddingModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA tensors, pooling head state) as full CPU tensors, for ZeRO 1, 2 and 3.

    Under ZeRO-3 the module's parameters are empty placeholders between forwards, so they are
    gathered with ``deepspeed.zero.GatheredParameters`` first (a collective: call it on EVERY rank).
    Under ZeRO 1/2 the module holds the full, updated (low-precision) weights already."""
    params = _trainable_params(model)
    partitioned = any(hasattr(p, "ds_id") for p in params)
    ctx = contextlib.nullcontext()
    if partitioned:
        import deepspeed
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with ctx:
        adapter, head = model.trainable_state()
        adapter = {k: v.detach().clone().cpu() for k, v in adapter.items()}
        head = {k: v.detach().clone().cpu() for k, v in head.items()}
    return adapter, head


# ====================================================================================== trainer
def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The trainer_state.json of a checkpoint directory."""
    return read_versioned_json(checkpoint_dir, STATE_FILE, STATE_FORMAT, "a training checkpoint")


class Trainer:
    """DeepSpeed + GradCache contrastive trainer for one process of a (possibly 1-rank) process group.

    >>> init_single_process_group()                                   # doctest: +SKIP
    >>> trainer = Trainer(TrainConfig(model={...}, train_data=["train.jsonl"], max_steps=10))
    >>> while trainer.step < trainer.tcfg.max_steps: print(trainer.run_step())

    `model` / `examples` may be passed in (otherwise built from the config). ``step`` counts
    completed optimizer steps; ``history`` holds one metrics dict per step (with the global batch's
    fingerprint); ``resumes`` lists the steps this run was resumed from.
    """

    def __init__(self, tcfg: TrainConfig, model: EmbeddingModel | None = None, examples: Sequence | None = None,
                 *, device: str | torch.device | None = None, log_dir: str | None = None,
                 prefetch: bool | None = None) -> None:
        if not dist.is_initialized():
            init_single_process_group()
        self.rank, self.world_size = dist_world()
        tcfg.validate(self.world_size)
        self.tcfg = tcfg
        self.on_gpu = torch.cuda.is_available()
        if device is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if self.on_gpu else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(tcfg, self.on_gpu)
        self.allocator_setting = configure_cuda_allocator() if self.on_gpu else None
        self.data = TrainData(tcfg, examples)
        self.model = model if model is not None else EmbeddingModel.from_config(
            _model_config(tcfg, self.on_gpu), device=self.device, seed=tcfg.seed)
        self.engine = build_engine(self.model, tcfg, self.world_size, self.on_gpu)
        self.engine.train()
        # the Trainer's own fused gradient check (train_step) wherever DeepSpeed's per-tensor one is off (the config
        # the engine was built with); under fp16 DeepSpeed's loss scaler owns overflow
        ds_checks = self.engine.config.get("bf16", {}).get("check_grad_overflow", True)
        self._own_grad_check = not ds_checks and not self.engine.fp16_enabled()
        if self._own_grad_check and pending_gradients(self.engine) is None:
            import deepspeed

            raise RuntimeError(  # ds_config turned DeepSpeed's check off on the promise of this one
                f"this DeepSpeed version ({deepspeed.__version__}) does not expose the ZeRO-{tcfg.zero_stage} "
                "gradients the Trainer checks for NaN / inf: set deepspeed_overrides "
                "{'bf16': {'check_grad_overflow': true}}")
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.resumes: list[int] = []
        self.log_dir = log_dir if log_dir is not None else tcfg.log_dir
        self._writer = None
        # the next step's batch is collated and tokenised on a host thread while the device runs this step
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="batch") if (
            self.on_gpu if prefetch is None else prefetch) else None
        self._next: tuple[int, Future] | None = None

    # ------------------------------------------------------------------ one step
    def _tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        """Host-side inputs of one role: token-id lists (packed; each chunk is packed in _embed) or CPU tensors."""
        if self.tcfg.packing:
            return {"ids": self.model.token_ids(texts)}
        return dict(self.model.tokenize(texts))

    def prepare_batch(self, step: int) -> dict[str, Any]:
        """Step `step`'s local batch, collated and tokenised (host work only: safe on the prefetch thread)."""
        batch = self.data.local_batch(step, self.rank, self.world_size, self.model.cfg.format_query)
        roles = {"query": self._tokenize(batch["queries"]), "positive": self._tokenize(batch["positives"])}
        if batch.get("negatives"):
            roles["negative"] = self._tokenize(batch["negatives"])
        return {**batch, "roles": roles}

    def _take_batch(self, step: int) -> dict[str, Any]:
        """The prepared batch of `step` (prefetched when it was asked for), and the next one asked for.

        The tokenizer is not thread-safe: the prefetch only runs while `train_step` keeps the host busy with
        device work, and `_settle` waits for it before anything else tokenises (evaluation, checkpoints)."""
        ready = self._next[1].result() if self._next is not None and self._next[0] == step else None
        self._next = None
        batch = ready if ready is not None else self.prepare_batch(step)
        if self._prefetch is not None and step + 1 < self.tcfg.max_steps:
            self._next = (step + 1, self._prefetch.submit(self.prepare_batch, step + 1))
        return batch

    def _settle(self) -> None:
        if self._next is not None:
            self._next[1].result()

    def _embed(self, chunk: dict[str, Any]) -> torch.Tensor:
        if "ids" in chunk:
            return self.engine(packed=self.model.pack(chunk["ids"]).to(self.device))
        return self.engine(chunk["input_ids"].to(self.device), chunk["attention_mask"].to(self.device))

    def _loss(self, reps: dict[str, torch.Tensor]):
        # no host sync here: the metrics stay on the device and the loss is checked for NaN / inf in
        # train_step, after the backward was launched and before the optimizer step (one sync per step)
        return info_nce(reps["query"], reps["positive"], reps.get("negative"),
                        temperature=self.tcfg.temperature, gather=True, sync=False)

    def forward_backward(self, batch: dict[str, list[str]]) -> tuple[torch.Tensor, dict[str, Any], int]:
        """Run GradCache (or the plain step) with DeepSpeed backward calls on the local batch (tokenised by
        `prepare_batch` unless it carries its ``roles`` already).

        Returns (local loss, local metrics, local non-padding tokens). Gradients are accumulated and
        reduced at the last backward (the accumulation boundary); call ``engine.step()`` next. The loss
        and metrics are device tensors (not yet checked for NaN / inf: `train_step` does that)."""
        roles = batch["roles"] if "roles" in batch else {
            name: self._tokenize(batch[key]) for name, key in (("query", "queries"), ("positive", "positives"),
                                                               ("negative", "negatives")) if batch.get(key)}
        if self.tcfg.packing:
            tokens = sum(len(x) for r in roles.values() for x in r["ids"])
        else:
            tokens = int(sum(r["attention_mask"].sum().item() for r in roles.values()))
            roles = {name: {k: v.to(self.device) for k, v in r.items()} for name, r in roles.items()}
        chunk = self.tcfg.chunk_size
        if chunk is None:
            step_fn, n_backward = (merged_batch_step if self.tcfg.packing else full_batch_step), 1
        elif self.tcfg.packing:  # each chunk: all roles of a slice of the batch, one packed row
            step_fn, n_backward = merged_grad_cache_step, merged_chunk_count(roles, chunk)
        else:
            step_fn = grad_cache_step
            n_backward = sum(len(iter_chunks(r, chunk, name)) for name, r in roles.items())
        calls = 0

        def backward(surrogate: torch.Tensor) -> None:
            nonlocal calls
            calls += 1
            self.engine.set_gradient_accumulation_boundary(calls == n_backward)
            self.engine.backward(surrogate)

        loss, metrics = step_fn(self._embed, roles, self._loss, chunk, backward_fn=backward)
        if calls != n_backward:
            raise RuntimeError(f"expected {n_backward} backward calls in one step, got {calls}")
        return loss, metrics, tokens

    def train_step(self, batch: dict[str, list[str]]) -> dict[str, Any]:
        """One optimizer step on this rank's share of a global batch; metrics are global (averaged / summed
        over ranks): loss, acc, pos_sim, neg_sim, [hard_neg_sim], lr, grad_norm, tokens_per_s,
        examples_per_s, step_time_s, [gpu_mem_gb]."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # dropout masks are a pure function of (seed, step, rank): a resumed run replays them
        torch.manual_seed(_derived_seed(self.tcfg.seed, "dropout", self.step, self.rank))
        t0 = time.perf_counter()
        lr = float(self.engine.get_lr()[0])
        loss, m, tokens = self.forward_backward(batch)
        keys = ["acc", "pos_sim", "neg_sim"] + (["hard_neg_sim"] if "hard_neg_sim" in m else [])
        # the step's one host sync, after the backward is queued: local loss + metrics summed over ranks;
        # a NaN / inf loss on any rank makes the summed loss non-finite, so every rank stops here,
        # before the optimizer step (the weights stay as they were)
        local = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device)
                             for x in [loss.detach()] + [m[k] for k in keys]])  # metrics: tensors or floats
        # the gradients too, when DeepSpeed's per-tensor overflow check is off (ds_config): one fused reduction
        grad_flag = gradients_finite_flag(pending_gradients(self.engine) if self._own_grad_check else [], self.device)
        summed = torch.cat([local, torch.tensor([tokens, len(batch["queries"])], dtype=torch.float64,
                                                device=self.device), grad_flag[None]])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        vals = torch.cat([summed, local[:1]]).tolist()
        sums, grad_sum, own_loss = vals[:-2], vals[-2], vals[-1]
        if not math.isfinite(sums[0]):
            check_finite(own_loss, self.step + 1)  # raises here if this rank's own loss is the bad one
            raise FloatingPointError(f"non-finite training loss on another rank at step {self.step + 1}: "
                                     "see that rank's error for the causes to check")
        if not math.isfinite(grad_sum):
            raise FloatingPointError(
                f"non-finite gradients (NaN or inf) at step {self.step + 1} with a finite loss: the optimizer step "
                "was not taken (the weights are as before the step). Lower the learning rate, keep gradient "
                "clipping on, prefer bf16 over fp16 and check the batch of this step.")
        self.engine.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        world = self.world_size
        out: dict[str, Any] = {"loss": sums[0] / world}
        out.update({k: v / world for k, v in zip(keys, sums[1:1 + len(keys)])})
        n_tokens, n_examples = sums[-2], sums[-1]
        out.update({"lr": lr, "tokens_per_s": n_tokens / dt, "examples_per_s": n_examples / dt, "step_time_s": dt})
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        if self.device.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def run_step(self) -> dict[str, Any]:
        """Train on the next global batch (step ``self.step``), evaluate if due, log, return the metrics."""
        if self.step >= self.tcfg.max_steps:
            raise RuntimeError(f"training already reached max_steps={self.tcfg.max_steps}")
        batch = self._take_batch(self.step)
        epoch, index = self.data.position(self.step)
        metrics = self.train_step(batch)
        self._settle()
        self.step += 1
        metrics.update({"step": self.step, "epoch": epoch, "batch_in_epoch": index, "batch_fp": batch["fingerprint"],
                        "wall_time": time.time()})
        if self.tcfg.eval_every and (self.step % self.tcfg.eval_every == 0 or self.step == self.tcfg.max_steps):
            metrics.update(self.evaluate())
        self.history.append(metrics)
        self._log(metrics)
        return metrics

    # ------------------------------------------------------------------ held-out metric
    @torch.no_grad()
    def evaluate(self, batch_size: int | None = None) -> dict[str, float]:
        """In-batch retrieval on the held-out training slice: every rank embeds the same ``val_size``
        queries and positives (same number of forwards on all ranks, as ZeRO-3 requires).

        ``val_acc``: top-1 accuracy of the query's own positive among all held-out positives;
        ``val_margin``: mean of cos(q, own positive) - max cos(q, other positive)."""
        val = self.data.val
        if len(val) < 2:
            return {}
        bs = batch_size or max(1, self.tcfg.chunk_size or self.tcfg.batch_size // self.world_size)
        self.engine.eval()
        try:
            def embed(texts: list[str]) -> torch.Tensor:
                out = []
                for i in range(0, len(texts), bs):
                    out.append(torch.nn.functional.normalize(self._embed(self._tokenize(texts[i:i + bs])).float(), dim=-1))
                return torch.cat(out)

            q = embed([self.model.cfg.format_query(ex.query, ex.instruction) for ex in val])
            p = embed([ex.positive for ex in val])
        finally:
            self.engine.train()
        sims = q @ p.T
        own = sims.diagonal()
        others = sims.clone()
        others.fill_diagonal_(-float("inf"))
        acc = (sims.argmax(dim=1) == torch.arange(len(val), device=sims.device)).float().mean().item()
        margin = (own - others.max(dim=1).values).mean().item()
        return {"val_acc": acc, "val_margin": margin}

    # ------------------------------------------------------------------ logging
    def _log(self, metrics: dict[str, Any]) -> None:
        if self.rank != 0 or not self.log_dir:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a crashed attempt wrote after the checkpoint we resumed from
            self._writer = SummaryWriter(self.log_dir, purge_step=self.step if self.resumes else None)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and not _is_timestamp(k):
                self._writer.add_scalar(f"train/{k}", v, metrics["step"])

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=True, cancel_futures=True)
            self._prefetch, self._next = None, None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def ds_tag(self) -> str:
        return f"step_{self.step:08d}"

    def state(self) -> dict[str, Any]:
        epoch, index = self.data.position(self.step)
        return {"format": STATE_FORMAT, "step": self.step, "epoch": epoch, "batch_in_epoch": index,
                "seed": self.tcfg.seed, "world_size": self.world_size, "batch_size": self.tcfg.batch_size,
                "steps_per_epoch": self.data.steps_per_epoch, "data_fingerprint": self.data.fingerprint,
                "num_train": len(self.data.train), "num_val": len(self.data.val), "deepspeed_tag": self.ds_tag,
                "precision": self.precision, "config": self.tcfg.to_dict(), "history": self.history,
                "resumes": self.resumes}

    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        """Write model/ (rank 0), the DeepSpeed state (every rank, its own files) and trainer_state.json
        (rank 0) into `directory`. Collective: call on every rank (directories may differ per rank)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        adapter, head = gathered_trainable_state(self.engine, self.model)
        if self.rank == 0:
            self.model.save(directory / MODEL_DIR, adapter_state=adapter, head_state=head)
        self.engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=self.ds_tag, save_latest=True,
                                    exclude_frozen_parameters=True)
        if self.rank == 0:
            _atomic_write_json(directory / STATE_FILE, self.state())
        if self._writer is not None:
            self._writer.flush()
        dist.barrier()
        return directory

    def load_checkpoint(self, directory: str | os.PathLike) -> dict[str, Any]:
        """Restore engine (weights, optimizer, LR schedule), step, history from `directory`, so the run
        continues at the same step with the same data order. Returns the trainer state."""
        directory = Path(directory)
        state = read_trainer_state(directory)
        checks = {"seed": (state["seed"], self.tcfg.seed), "batch_size": (state["batch_size"], self.tcfg.batch_size),
                  "world_size": (state["world_size"], self.world_size),
                  "data_fingerprint": (state["data_fingerprint"], self.data.fingerprint)}
        bad = {k: v for k, v in checks.items() if v[0] != v[1]}
        if bad:
            raise ConfigError(f"checkpoint {str(directory)!r} does not match this run (checkpoint, run): {bad}. "
                              "Resume with the same seed, global batch size, number of workers and training data")
        load_path, _ = self.engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=state["deepspeed_tag"],
                                                   load_module_strict=False, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise ConfigError(f"no DeepSpeed state {state['deepspeed_tag']!r} under {directory / DEEPSPEED_DIR}")
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.resumes = list(state.get("resumes", [])) + [self.step]
        return state

    def fit(self, checkpoint_dir: str | os.PathLike | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train to max_steps in this process group (checkpoints into `checkpoint_dir/checkpoint_<step>`
        every checkpoint_every steps and at the end). Returns the last metrics."""
        metrics: dict[str, Any] = {}
        while self.step < self.tcfg.max_steps:
            metrics = self.run_step()
            if on_step is not None:
                on_step(metrics)
            due = self.tcfg.checkpoint_every and self.step % self.tcfg.checkpoint_every == 0
            if checkpoint_dir is not None and (due or self.step == self.tcfg.max_steps):
                self.save_checkpoint(Path(checkpoint_dir) / f"checkpoint_{self.step:08d}")
        self.close()
        return metrics
