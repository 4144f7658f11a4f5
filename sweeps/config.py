"""The sweep config: a YAML file validated into a typed `SweepConfig`, with errors that name the field.

    name: demo
    storage_path: runs/sweeps              # local or shared filesystem; the sweep lives in <storage_path>/<name>
    seeds: [0]                             # replicate seeds: each is its own grid cell
    grid:
      base_models: [smollm2-135m]          # hub ids, local dirs, .gguf files, smollm2-135m or gemma3-270m
      designs: [eos_last+causal, multi_layer_trainable+bidirectional]   # or pooling: [...] x attention: [...]
    model: {max_length: 64, truncate_layers: 8}    # EmbedConfig fields shared by every trial
    search:                                # inside each cell: Optuna TPE over what is a range or a list
      lora_r: [8, 16, 32]                  # a list: categorical; a number: fixed
      lr: {low: 1.0e-5, high: 1.0e-3, log: true}
      samples_per_cell: 4                  # sampler: tpe (default), random, or grid (lists only, all combinations)
    scheduler: {type: asha, metric: val_margin, mode: max, grace_period: 2, reduction_factor: 2}
    training: {builders: [snli, stsb], batch_size: 16, chunk_size: 4, max_steps: 8, eval_every: 2, val_size: 32}
    resources: {num_workers: 1, use_gpu: auto, cpus_per_worker: 1, gpus_per_worker: 1, max_concurrent_trials: null,
                start_ahead: true}        # trials sharing a GPU start up while earlier ones train (README: Sweeps)
    failure: {train_max_failures: 1, trial_max_failures: 0}
    evaluation: {tasks: [STSBenchmark, SciFact], quick: true, num_cpus: 1, num_gpus: 0}
    report: {baseline: eos_last+causal, correction: holm, alpha: 0.05}
    tracking: {mlflow: true, wandb: false}    # Ray Tune's logger callbacks (`ray_jobs.tracking`); off by default
    overrides:                             # per base model / design / seed adjustments
      - match: {base_model: mistralai/Mistral-7B-v0.1}
        resources: {num_workers: 4}
        training: {chunk_size: 16}
        search: {lr: 1.0e-5}               # its own lora_r / lr

This module holds the typed sections, `Cell` and `SweepConfig`; sweeps/config_parse.py reads a YAML file or a
preset (``sweeps/presets/<name>.yaml``) with ``key.path=value`` overrides and validates it, one checker per
section. Everything is checked without Ray and without loading weights; `SweepConfig.preflight` then checks
each base model's structure and the training data.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embed_core.config import RUNTIME_FIELDS, is_int, is_number
from embed_core.errors import ConfigError
from embed_core.train_config import TrainConfig

SCHEDULERS = ("asha", "fifo")
_KERNEL_FS = ("/proc/", "/sys/", "/dev/")
SAMPLERS = ("tpe", "random", "grid")  # grid: every combination of the searched lists, once each
MODES = ("max", "min")
# model fields a trial sets itself (grid / search), not the shared `model:` section
_TRIAL_MODEL_FIELDS = ("base_model", "pooling", "attention", "lora_r")
# training fields a trial sets itself
_TRIAL_TRAINING_FIELDS = ("model", "seed", "lr", "log_dir")


class _Ctx:
    """Where a value came from, for error messages: ``<file>: <field.path>``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, path: str, msg: str) -> ConfigError:
        return ConfigError(f"sweep config {self.source}: {path}: {msg}")


def _mapping(ctx: _Ctx, path: str, v: Any) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ctx.err(path, f"must be a mapping, got {type(v).__name__} {v!r:.60}")
    return v


def _fields(ctx: _Ctx, path: str, d: dict, cls) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ctx.err(path, f"unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**d)
    except ConfigError as e:
        raise ctx.err(path, str(e)) from None
    except TypeError as e:
        raise ctx.err(path, str(e)) from None


# ====================================================================================== sections
@dataclass
class Param:
    """A searched or fixed hyper-parameter: ``value`` (fixed), ``choices`` (categorical) or [low, high] (range)."""

    name: str
    value: Any = None
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def searched(self) -> bool:
        return self.value is None

    @classmethod
    def parse(cls, ctx: _Ctx, path: str, name: str, raw: Any, integer: bool, positive: bool = True) -> "Param":
        def check(v: Any, where: str) -> Any:
            if integer and not is_int(v) or not integer and not is_number(v):
                raise ctx.err(where, f"must be {'an int' if integer else 'a number'}, got {v!r}")
            if positive and v <= 0 and not (integer and name == "lora_r" and v == 0):
                raise ctx.err(where, f"must be > 0, got {v!r}")
            return v

        if isinstance(raw, list):
            if not raw:
                raise ctx.err(path, "an empty list: give at least one value")
            vals = [check(v, f"{path}[{i}]") for i, v in enumerate(raw)]
            if len(set(vals)) != len(vals):
                raise ctx.err(path, f"repeated values in {vals}")
            return cls(name, value=vals[0]) if len(vals) == 1 else cls(name, choices=vals, integer=integer)
        if isinstance(raw, dict):
            extra = sorted(set(raw) - {"low", "high", "log"})
            if extra or "low" not in raw or "high" not in raw:
                raise ctx.err(path, f"a range is {{low, high, log}}, got {raw!r}")
            low, high = check(raw["low"], f"{path}.low"), check(raw["high"], f"{path}.high")
            if not low < high:
                raise ctx.err(path, f"low {low} must be < high {high}")
            log = raw.get("log", False)
            if not isinstance(log, bool):
                raise ctx.err(f"{path}.log", f"must be true or false, got {log!r}")
            if log and low <= 0:
                raise ctx.err(path, "a log range needs low > 0")
            return cls(name, low=low, high=high, log=log, integer=integer)
        return cls(name, value=check(raw, path))

    def describe(self) -> str:
        if not self.searched:
            return f"{self.name}={self.value}"
        if self.choices is not None:
            return f"{self.name} in {self.choices}"
        return f"{self.name} in [{self.low}, {self.high}]{' (log)' if self.log else ''}"


@dataclass
class SearchSection:
    lora_r: Any = 16
    lr: Any = 1e-5
    samples_per_cell: int = 1
    sampler: str = "tpe"
    seed: int = 0


@dataclass
class SchedulerSection:
    type: str = "asha"
    metric: str = "val_margin"
    mode: str = "max"
    grace_period: int = 2
    reduction_factor: int = 2


@dataclass
class ResourcesSection:
    num_workers: int = 1
    use_gpu: Any = "auto"  # true | false | "auto" (GPU when the cluster has one)
    cpus_per_worker: float = 1
    gpus_per_worker: float = 1
    max_concurrent_trials: int | None = None
    # one-worker GPU trials: admit more than the GPU's memory holds at once; each builds its model on the host
    # while earlier trials train and waits for memory in the GPU's ledger (ray_jobs/gpu_ledger.py)
    start_ahead: bool = True

    @property
    def admits_ahead(self) -> bool:
        """Trials are admitted ahead of their turn: asked for, and one worker each (trials of several workers could
        each hold one GPU while waiting for another's)."""
        return self.start_ahead and self.num_workers == 1


@dataclass
class FailureSection:
    train_max_failures: int = 1   # Ray Train restarts of a trial's worker group (resumes from its checkpoint)
    trial_max_failures: int = 0   # Tune retries of a whole trial


@dataclass
class EvaluationOptions:
    """`evaluate_checkpoints` keyword arguments a sweep may set (``evaluation.options``), each checked."""

    batch_size: int = 32
    subsample: int | None = None     # local tasks' subsample size (scores then NOT comparable to MTEB)
    seed: int = 42
    overwrite: bool = False          # re-run pairs whose results exist
    data_dir: str | None = None      # shared data folder for local tasks

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# (field, check, what it must be): one validator per option
_OPTION_CHECKS = (
    ("batch_size", lambda v: is_int(v) and v >= 1, "an int >= 1"),
    ("subsample", lambda v: v is None or is_int(v) and v >= 1, "an int >= 1 or null"),
    ("seed", is_int, "an int"),
    ("overwrite", lambda v: isinstance(v, bool), "true or false"),
    ("data_dir", lambda v: v is None or isinstance(v, str) and v != "", "a folder path or null"),
)


@dataclass
class EvaluationSection:
    tasks: list = field(default_factory=lambda: ["STSBenchmark", "SICK-R", "SciFact", "Banking77Classification",
                                                 "EmotionClassification", "AmazonCounterfactualClassification"])
    quick: bool = False          # small subsamples for CPU demos (scores not comparable to MTEB)
    num_cpus: float = 1
    num_gpus: float = 0          # per (checkpoint, task) Ray task; fractions share a GPU
    max_retries: int = 2
    top_k: int = 1               # best completed trials per cell to evaluate
    reference: bool = False      # also evaluate the all-MiniLM-L6-v2 encoder reference
    options: Any = field(default_factory=dict)   # EvaluationOptions once parsed


@dataclass
class ReportSection:
    baseline: str = "eos_last+causal"
    correction: str = "holm"
    alpha: float = 0.05


@dataclass
class TrackingSection:
    """Experiment tracking through Ray Tune's own logger callbacks (`ray_jobs.tracking`): None = off, a mapping
    (``true`` = {}) = on with these options. Not part of the fingerprint: it changes where results are mirrored,
    not what the sweep trains."""

    mlflow: dict | None = None   # {tracking_uri: null (= <sweep>/mlruns), experiment: null (= the sweep's name)}
    wandb: dict | None = None    # {project: null (= embed-sweeps), mode: null (= online iff WANDB_API_KEY) | offline
    #                              | online}


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str) and v.strip() != ""


# backend -> (field, check, what it must be): one validator per option
_TRACKING_OPTIONS = {
    "mlflow": (("tracking_uri", _opt_str, "a tracking URI (http://..., sqlite:///..., databricks) or null"),
               ("experiment", _opt_str, "an experiment name or null (the sweep's name)")),
    "wandb": (("project", _opt_str, "a W&B project name or null (embed-sweeps)"),
              ("mode", lambda v: v in (None, "offline", "online"), "offline, online or null (online iff "
                                                                    "WANDB_API_KEY is set)")),
}


@dataclass
class Override:
    match: dict
    model: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)   # {lora_r, lr}: Params (config_parse), e.g. a learning rate per base model

    def matches(self, cell: "Cell") -> bool:
        return all(str(getattr(cell, k)) == str(v) for k, v in self.match.items())


FINGERPRINT_IGNORES = ("storage_path", "tracking", "description", "resources", "failure")
# keys of a section that say how a sweep runs, not what it trains or scores: the fingerprint leaves them out (with
# FINGERPRINT_IGNORES), a merged sweep records them per part (``parts.json``)
RUNS_WITH = {"model": RUNTIME_FIELDS, "evaluation": frozenset({"num_cpus", "num_gpus"})}


def _fingerprint_view(raw: dict[str, Any]) -> dict[str, Any]:
    """The config without what only decides how fast or where it runs: the keys of FINGERPRINT_IGNORES and of
    RUNS_WITH (the model's runtime fields compute the same function; the evaluation's resources), also inside
    overrides. Parts of one sweep may so run on other cards or kernels and still merge."""
    d = {k: copy.deepcopy(v) for k, v in raw.items() if k not in FINGERPRINT_IGNORES}
    overrides = [o for o in d.get("overrides") or [] if isinstance(o, dict)]
    for o in overrides:
        for k in FINGERPRINT_IGNORES:
            o.pop(k, None)
    for section, keys in RUNS_WITH.items():
        for sec in [d.get(section)] + [o.get(section) for o in overrides]:
            if isinstance(sec, dict):
                for k in keys:
                    sec.pop(k, None)
    if isinstance(d.get("overrides"), list):
        d["overrides"] = [o for o in d["overrides"]
                          if not isinstance(o, dict) or any(v for k, v in o.items() if k != "match")]
    return {k: v for k, v in d.items() if v not in ({}, [])}  # a section left empty is one not given


# ====================================================================================== cells
@dataclass(frozen=True)
class Cell:
    """One grid cell: a base model x design x seed. Optuna searches LoRA rank / LR inside it."""

    base_model: str
    pooling: str
    attention: str
    seed: int

    @property
    def design(self) -> str:
        return f"{self.pooling}+{self.attention}"

    @property
    def key(self) -> str:
        """A filesystem- and Tune-safe id: ``<model>-<pooling>-<attention>-s<seed>``."""
        model = _short_model(self.base_model)
        return f"{model}-{self.pooling}-{self.attention}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _short_model(name: str) -> str:
    stem = Path(name.rstrip("/")).name if ("/" in name or os.sep in name) else name
    stem = stem[:-5] if stem.endswith(".gguf") else stem
    safe = "".join(c if c.isalnum() or c in "._" else "_" for c in stem)
    if stem != name:  # a path or hub id: keep it unique with a short hash
        safe += "_" + hashlib.sha1(name.encode()).hexdigest()[:6]
    return safe


# ====================================================================================== the config
@dataclass
class SweepConfig:
    name: str
    storage_path: str
    seeds: list[int]
    base_models: list[str]
    designs: list[tuple[str, str]]
    model: dict
    search: SearchSection
    lora_r: Param
    lr: Param
    scheduler: SchedulerSection
    training: dict
    resources: ResourcesSection
    failure: FailureSection
    evaluation: EvaluationSection
    report: ReportSection
    overrides: list[Override]
    source: str = "<dict>"
    raw: dict = field(default_factory=dict)
    part: dict = field(default_factory=dict)  # run only the cells matching this (`with_part`); not in sweep.json
    sets: tuple = ()  # the command line's --set overrides, already in `raw` (for the resume hint); not in sweep.json
    tracking: TrackingSection = field(default_factory=TrackingSection)

    # ---------------------------------------------------------------- derived
    @property
    def sweep_dir(self) -> Path:
        return Path(os.path.expanduser(self.storage_path)).resolve() / self.name

    def cells(self) -> list[Cell]:
        every = [Cell(m, p, a, s) for m, (p, a), s in itertools.product(self.base_models, self.designs, self.seeds)]
        return [c for c in every if all(str(getattr(c, k)) in v.split("|") for k, v in self.part.items())]

    def with_part(self, spec: str) -> "SweepConfig":
        """This sweep restricted to the cells matching ``key=value[,key=value]`` over base_model, pooling, attention,
        design, seed (``seed=1|2``: either value): one part of a sweep run on its own (another machine, a time-limited job) and merged with the
        others afterwards (`python -m sweeps merge`). The config, and so its fingerprint, stay those of the whole."""
        part = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in ("base_model", "pooling", "attention", "design", "seed"):
                raise ConfigError(f"--part {spec!r}: expected key=value with key in base_model, pooling, attention, "
                                  f"design, seed; got {item!r}")
            part[key] = value
        restricted = dataclasses.replace(self, part=part)
        if not restricted.cells():
            raise ConfigError(f"--part {spec!r} matches no cell of sweep {self.name!r} (base models {self.base_models}, "
                              f"designs {['+'.join(d) for d in self.designs]}, seeds {self.seeds})")
        return restricted

    def _overrides_for(self, cell: Cell) -> list[Override]:
        return [o for o in self.overrides if o.matches(cell)]

    def resources_for(self, cell: Cell) -> ResourcesSection:
        d = dataclasses.asdict(self.resources)
        for o in self._overrides_for(cell):
            d.update(o.resources)
        return ResourcesSection(**d)

    def train_config(self, cell: Cell, lora_r: int, lr: float) -> TrainConfig:
        """The TrainConfig of one trial (ConfigError names the cell)."""
        model = dict(self.model, base_model=cell.base_model, pooling=cell.pooling, attention=cell.attention,
                     lora_r=int(lora_r))
        training = dict(self.training)
        for o in self._overrides_for(cell):
            model.update(o.model)
            training.update(o.training)
        try:
            tcfg = TrainConfig(model=model, seed=cell.seed, lr=float(lr), **training)
            tcfg.validate(self.resources_for(cell).num_workers)  # the batch splits over the cell's workers
            return tcfg
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"sweep config {self.source}: cell {cell.key}: {e}") from None

    def params_for(self, cell: Cell) -> tuple[Param, Param]:
        """The (lora_r, lr) parameters a cell's trials search or fix: ``search``, then the matching overrides'."""
        params = {"lora_r": self.lora_r, "lr": self.lr}
        for o in self._overrides_for(cell):
            params.update(o.search)
        return params["lora_r"], params["lr"]

    def param_source(self, cell: Cell, name: str) -> str:
        """The config key that gives `cell` its parameter `name` (the last matching override wins, as above)."""
        source = f"search.{name}"
        for i, o in enumerate(self.overrides):
            if o.matches(cell) and name in o.search:
                source = f"overrides[{i}].search.{name}"
        return source

    def probe_values(self, cell: Cell) -> tuple[int, float]:
        """A (lora_r, lr) inside `cell`'s search space (its overrides included), for checks that need values."""
        def first(p: Param):
            return p.value if not p.searched else (p.choices[0] if p.choices else p.low)
        lora_r, lr = self.params_for(cell)
        return int(first(lora_r)), float(first(lr))

    def fingerprint(self) -> str:
        """Hash of everything that decides what the sweep trains and evaluates: not where it is stored or tracked,
        its description, the resources and retries it runs with, nor the kernels that compute the same function
        (:func:`_fingerprint_view`): a part run on a bigger GPU, with another GPU share or without compile, is the
        same sweep."""
        d = _fingerprint_view(self.raw)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def runs_with(self) -> dict[str, Any]:
        """What the fingerprint leaves out but a reader of merged results should see: the RUNS_WITH keys that
        were given and the resources."""
        out = {sec: {k: v for k, v in (self.raw.get(sec) or {}).items() if k in keys} for sec, keys in RUNS_WITH.items()}
        return {**out, "resources": dict(self.raw.get("resources") or {})}

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)

    def num_trials(self, cells: int | None = None) -> int:
        """Trials of the whole grid, or of ``cells`` of it (a merged sweep plans the cells its parts ran)."""
        return (len(self.cells()) if cells is None else cells) * self.search.samples_per_cell

    # ---------------------------------------------------------------- checks that read the backbone / data
    def check_storage(self) -> Path:
        """The sweep folder can be created and written: its nearest existing ancestor is a folder, not under a
        kernel filesystem, and a file can be created there (read-only mounts and permissions). ConfigError."""
        where = f"sweep config {self.source}: storage_path"
        target = self.sweep_dir
        if any(str(target).startswith(p) for p in _KERNEL_FS):
            raise ConfigError(f"{where}: {str(target)!r} is under a kernel filesystem ({', '.join(_KERNEL_FS)}): "
                              "give a local or shared folder")
        probe = target
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"{where}: {str(probe)!r} is a file, but the sweep folder {str(target)!r} must be "
                              "below it: give another storage path")
        try:
            with tempfile.NamedTemporaryFile(dir=probe, prefix=".embed-sweeps-write-probe"):
                pass
        except OSError as e:
            raise ConfigError(f"{where}: cannot write in {str(probe)!r} ({e.strerror}): give a writable folder "
                              "(--storage PATH)") from None
        return target

    def preflight(self, check_data: bool = True) -> dict[str, Any]:
        """Check the storage path, every base model's structure (config only, no weights: a GGUF's header),
        every cell's TrainConfig and the training data of each seed, before Ray starts.
        Returns {seed: number of examples}."""
        from embed_core.backbone import preflight  # torch: parsing a config loads none (test_import_graph)
        from embed_core.train_data import TrainData, load_examples

        self.check_storage()

        seen_models: set[str] = set()
        for cell in self.cells():
            lora_r, lr = self.probe_values(cell)
            for r in self.params_for(cell)[0].choices or [lora_r]:
                tcfg = self.train_config(cell, r, lr)  # raises ConfigError naming the cell
                key = json.dumps(tcfg.model.to_dict(), sort_keys=True)
                if key in seen_models:
                    continue
                seen_models.add(key)
                try:
                    preflight(tcfg.model, convert=False)  # a GGUF's header only: no weights are read
                except ConfigError as e:
                    raise ConfigError(f"sweep config {self.source}: cell {cell.key}: {e}") from None
        sizes: dict[str, Any] = {}
        if check_data:
            for seed in self.seeds:
                cell = Cell(self.base_models[0], *self.designs[0], seed)
                tcfg = self.train_config(cell, *self.probe_values(cell))
                examples = load_examples(tcfg)
                TrainData(tcfg, examples)  # DataError: too few examples for a batch / val_size
                sizes[str(seed)] = len(examples)
        return sizes
