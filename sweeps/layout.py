# Over 500 lines: every path and record a sweep writes, with their only readers, is in this one module.
"""Every path a sweep writes and the formats its stages exchange (prepare -> train -> evaluate -> report), with
the only readers of them. Each path is named once, here.

No Ray and no torch import: the sweep driver, the MTEB fan-out job and the report all read and write these
files, and each stage can run alone on what an earlier stage left (a results folder copied from a cluster, say).

Layout under the sweep's storage path (``<storage>/<sweep name>/``)::

    sweep.json                        the resolved sweep config + its fingerprint (:func:`read_sweep`)
    cells/<cell>.json                 each cell's resolved TrainConfig + what its trials run with (:class:`CellPlan`)
    data/train-<key>.jsonl            training examples, one file per data recipe (:func:`data_file`)
    tune/                             the one Ray Tune experiment: trial dirs ``<cell>-<trial id>``, searcher state
    train/<cell>-<trial id>/          each trial's Ray Train run: checkpoint_*/ (model + DeepSpeed state)
    trials.json                       one TrialRecord per trial, every cell (status, hyper-params, cost)
    checkpoints.json                  the CheckpointSpecs chosen for evaluation
    driver.json                       the running sweep driver (pid, host; touched as a heartbeat)
    results/<model>/<revision>/<Task>.json          mteb TaskResult JSON (mteb's own cache layout)
    results/<model>/<revision>/model_meta.json      mteb's model meta
    results/<model>/<revision>/run_labels.json      RunLabels: which design / seed / trial this is
    results/<model>/<revision>/instances/<Task>.json  InstanceScores: per-instance scores
    report/report.md, report.html, *.png, summary.json  the significance report
    histories/<cell>-<trial id>.json  a trial's per-step metrics (a part brought back without its train/ folder)
    parts.json                        a merged sweep: each part's cells and runtime settings (sweeps.merge)
    mlruns/mlflow.db, mlruns/artifacts/             MLflow's store when ``tracking.mlflow`` has no tracking_uri
    wandb/                                          W&B's run files (``tracking.wandb``; offline runs: wandb sync)

and beside the sweeps of a storage path, ``<storage>/.compile_cache/`` (torch.compile's caches, shared).

``<model>`` is the mteb model name with ``/`` replaced by ``__`` (mteb's rule) and ``<revision>`` the
checkpoint's content fingerprint, so mteb's result cache never mixes two checkpoints.

Per-instance scores let the report test differences on one dataset (paired bootstrap, permutation):
``aggregate`` says how the instances make the main score:

* ``mean``: ``values`` per instance (per-query nDCG@10, per-example correctness averaged over mteb's
  classification experiments, ...); the main score is their mean;
* ``spearman`` / ``pearson``: ``pred`` (the model's similarity) and ``gold`` per pair; the main score is
  the correlation between them (STS);
* ``average_precision``: ``pred`` (similarity) and ``gold`` (0/1) per pair; the main score is the
  average precision (pair classification's ``max_ap``, or ``ap``).

:func:`aggregate` recomputes a main score from any subset of the instances; the evaluation job checks that
over all instances it equals mteb's main score.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embed_core import files
from embed_core.config import dataclass_from_dict, read_versioned_json
from embed_core.errors import ConfigError, DataError
from embed_core.train_config import TrainConfig
from sweeps.config import Cell, ResourcesSection, SweepConfig
from sweeps.config_parse import parse_sweep_config

__all__ = [
    "AGGREGATES",
    "BASELINE_DESIGN",
    "CellPlan",
    "CheckpointSpec",
    "InstanceScores",
    "RunLabels",
    "TrialRecord",
    "aggregate",
    "atomic_write_json",
    "design_id",
    "DRIVER_FILE",
    "RESULT_META_FILES",
    "model_dir_name",
    "read_cell_plan",
    "read_checkpoints",
    "read_parts",
    "read_summary",
    "read_trials",
    "restate_fingerprint",
    "result_dir",
    "write_cell_plan",
    "write_checkpoints",
    "write_parts",
    "write_trials",
]

SWEEP_FILE = "sweep.json"
CELLS_DIR = "cells"  # cells/<cell key>.json: what prepare resolved for one cell's trials (:class:`CellPlan`)
CELL_FORMAT = "embed_sweeps.cell/v1"
TRIALS_FILE = "trials.json"
CHECKPOINTS_FILE = "checkpoints.json"
RESULTS_DIR = "results"
REPORT_DIR = "report"
HISTORIES_DIR = "histories"  # histories/<trial run>.json: a trial's per-step metrics, kept when train/ is not
PARTS_FILE = "parts.json"  # a merged sweep's parts: which cells each ran, with what runtime (sweeps.merge)
SUMMARY_FILE = "summary.json"  # in REPORT_DIR: the report as JSON (:func:`read_summary`)
LABELS_FILE = "run_labels.json"
INSTANCES_DIR = "instances"
DRIVER_FILE = "driver.json"  # the running sweep driver (pid, host; touched as a heartbeat)
MLFLOW_DIR = "mlruns"  # the sweep's own MLflow store (SQLite + artifacts: MLflow 3 refuses a plain file store)
WANDB_DIR = "wandb"
TUNE_DIR = "tune"
TRAIN_DIR = "train"
WALL_FILE = "wall.json"  # in a trial's train/<cell>-<trial>/: {run of its driver: wall seconds}, summed over resumes
GPU_WAIT_FILE = "gpu_wait.json"  # in a trial's train/<cell>-<trial>/ while its worker waits for GPU memory (pid, host)
DATA_DIR = "data"
COMPILE_CACHE_DIR = ".compile_cache"  # beside the sweeps of a storage path: torch.compile's Inductor / Triton caches
SWEEP_FORMAT = "embed_sweeps.sweep/v1"
#: files in a checkpoint's results folder that are not task results
RESULT_META_FILES = ("model_meta.json", LABELS_FILE)

AGGREGATES = ("mean", "spearman", "pearson", "average_precision")

#: The paper's baseline design, the reference of every significance test unless configured otherwise.
BASELINE_DESIGN = "eos_last+causal"


def design_id(pooling: str, attention: str) -> str:
    """The design's name in tables and tests: ``<pooling>+<attention>`` (e.g. ``eos_last+causal``)."""
    return f"{pooling}+{attention}"


def model_dir_name(model_name: str) -> str:
    """mteb's folder name for a model name (``org/name`` -> ``org__name``)."""
    return model_name.replace("/", "__").replace(" ", "_")


def result_dir(results_root: str | os.PathLike, model_name: str, revision: str) -> Path:
    """``<results_root>/<model>/<revision>/``: where one checkpoint's mteb JSON and instances live."""
    return Path(results_root) / model_dir_name(model_name) / revision


def read_wall(run_dir: str | os.PathLike) -> dict[str, float]:
    """A trial's wall-time ledger (``WALL_FILE``): one entry per run of its driver; {} when absent or unreadable."""
    try:
        return {str(k): float(v) for k, v in json.loads((Path(run_dir) / WALL_FILE).read_text()).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (embed_core.files), numpy scalars / arrays and paths included."""
    return files.atomic_write_json(path, obj, default=_json_default)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{what} {str(path)!r} is not valid JSON: {err}") from None


def _without_format(d: dict[str, Any], fmt: str, what: str) -> dict[str, Any]:
    """A record's fields: `d` without its "format", which must be `fmt` (DataError: "<what> format ...")."""
    d = dict(d)
    found = d.pop("format", None)
    if found != fmt:
        raise DataError(f"{what} format {found!r}, this version reads {fmt!r}")
    return d


# ====================================================================================== records
def _renamed_design(d: dict[str, Any], old: str = "config", new: str = "design") -> dict[str, Any]:
    """A record as read: run_labels.json / trials.json / summary.json written before the design id was renamed
    call it ``config`` (one name for it, beside SweepConfig / TrainConfig / EmbedConfig, is now ``design``)."""
    if old in d and new not in d:
        d = {(new if k == old else k): v for k, v in d.items()}
    return d


def read_summary(sweep_dir: Path) -> dict[str, Any] | None:
    """The report's summary.json of a sweep (None when there is none), in today's names: a summary written
    before the design rename reads as one written now (``configs`` -> ``designs``, each test's and best cell's
    ``config`` -> ``design``)."""
    path = Path(sweep_dir) / REPORT_DIR / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = _read_json(path, "report summary")
    summary["groups"] = [_renamed_group(g) for g in summary.get("groups", [])]
    summary["best_per_cell"] = [_renamed_design(r) for r in summary.get("best_per_cell", [])]
    return summary


def _renamed_group(g: dict[str, Any]) -> dict[str, Any]:
    g = _renamed_design(g, "configs", "designs")
    if g.get("friedman"):
        g["friedman"] = _renamed_design(g["friedman"], "configs", "designs")
    return {**g, **{kind: [_renamed_design(r) for r in g.get(kind, [])] for kind in ("wilcoxon", "instance", "seed_tests")}}


@dataclass
class RunLabels:
    """What a checkpoint is, for the report: its design, base model, hyper-parameters and cost.

    design: the design id (:func:`design_id`), or e.g. ``reference:all-MiniLM-L6-v2`` for a reference model
        (files written before the rename call it ``config``: read as design).
    seed: replicate seed; checkpoints with the same (base_model, design) and different seeds are replicates.
    gpu_hours / cpu_hours: resources the trial held x wall time (the report plots score vs cost).
    """

    design: str
    base_model: str = ""
    pooling: str = ""
    attention: str = ""
    lora_r: int | None = None
    lr: float | None = None
    seed: int = 0
    trial_id: str = ""
    cell: str = ""
    steps: int | None = None
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0
    checkpoint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunLabels":
        return dataclass_from_dict(cls, _renamed_design(d))

    def write(self, directory: str | os.PathLike) -> Path:
        return atomic_write_json(Path(directory) / LABELS_FILE, self.to_dict())

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "RunLabels":
        return cls.from_dict(_read_json(Path(directory) / LABELS_FILE, "run labels"))


@dataclass
class CheckpointSpec:
    """One model for the evaluation job.

    name: the mteb model name (``org/name``); path: a saved EmbeddingModel directory, or
    ``reference:all-MiniLM-L6-v2`` for the encoder reference; labels: its RunLabels.
    """

    name: str
    path: str
    labels: RunLabels

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "labels": self.labels.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckpointSpec":
        labels = d.get("labels") or {}
        return cls(name=d["name"], path=d["path"],
                   labels=labels if isinstance(labels, RunLabels) else RunLabels.from_dict(labels))


@dataclass
class TrialRecord:
    """One Tune trial of a sweep (the report's score-vs-cost plot and best hyper-parameters per cell)."""

    trial_id: str
    cell: str
    design: str
    base_model: str
    lora_r: int
    lr: float
    seed: int
    status: str  # TERMINATED (ran to the end), STOPPED (ASHA), ERROR (failed after retries)
    val_metric: float | None = None
    steps: int = 0
    wall_s: float = 0.0
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0
    checkpoint: str = ""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialRecord":
        return dataclass_from_dict(cls, _renamed_design(d))


def write_trials(sweep_dir: str | os.PathLike, trials: Sequence[TrialRecord]) -> Path:
    return atomic_write_json(Path(sweep_dir) / TRIALS_FILE,
                             {"format": "embed_sweeps.trials/v1", "trials": [t.to_dict() for t in trials]})


def read_trials(path: str | os.PathLike) -> list[TrialRecord]:
    """A trials.json (or the sweep folder holding one); DataError naming the file when it is not one."""
    p = Path(path)
    if p.is_dir():
        p = p / TRIALS_FILE
    obj = _read_json(p, "trials file")
    try:
        return [TrialRecord.from_dict(t) for t in obj.get("trials", [])]
    except (AttributeError, TypeError, ConfigError) as err:
        raise DataError(f"trials file {str(p)!r} is not a trials.json (layout.write_trials): {err}") from None


def write_checkpoints(sweep_dir: str | os.PathLike, specs: Sequence[CheckpointSpec]) -> Path:
    return atomic_write_json(Path(sweep_dir) / CHECKPOINTS_FILE,
                             {"format": "embed_sweeps.checkpoints/v1", "checkpoints": [s.to_dict() for s in specs]})


def read_checkpoints(path: str | os.PathLike) -> list[CheckpointSpec]:
    """A checkpoints.json (or the sweep folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINTS_FILE
    obj = _read_json(p, "checkpoints file")
    return [CheckpointSpec.from_dict(c) for c in obj.get("checkpoints", [])]


# ====================================================================================== per-instance scores
@dataclass
class InstanceScores:
    """Per-instance scores of one checkpoint on one task split (``results/<model>/<revision>/instances/``).

    ids: instance ids, unique, stable across checkpoints (query id, pair index, example index), so two
    checkpoints' scores pair up by id. value: mteb's main score for this split / subset.
    """

    task: str
    task_type: str
    split: str
    subset: str
    main_score: str
    value: float
    aggregate: str
    ids: list[str]
    values: list[float] | None = None
    pred: list[float] | None = None
    gold: list[float] | None = None

    FORMAT = "embed_sweeps.instances/v1"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise DataError(f"instances of {self.task}: unknown aggregate {self.aggregate!r}, one of {AGGREGATES}")
        n = len(self.ids)
        if len(set(self.ids)) != n:
            raise DataError(f"instances of {self.task}/{self.split}: instance ids are not unique")
        need = ("values",) if self.aggregate == "mean" else ("pred", "gold")
        for name in need:
            arr = getattr(self, name)
            if arr is None or len(arr) != n:
                raise DataError(f"instances of {self.task}/{self.split}: aggregate {self.aggregate!r} needs "
                                f"{name!r} with one entry per id ({n}), got {None if arr is None else len(arr)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = self.FORMAT
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InstanceScores":
        return dataclass_from_dict(cls, _without_format(d, cls.FORMAT, "instance scores have"))

    @staticmethod
    def file_name(task: str, split: str = "test", subset: str = "default") -> str:
        parts = [task] + ([subset] if subset not in ("default", "") else []) + ([split] if split != "test" else [])
        return "__".join(parts) + ".json"

    def write(self, checkpoint_result_dir: str | os.PathLike) -> Path:
        path = Path(checkpoint_result_dir) / INSTANCES_DIR / self.file_name(self.task, self.split, self.subset)
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike) -> "InstanceScores":
        return cls.from_dict(_read_json(Path(path), "instance scores"))

    @classmethod
    def read_all(cls, checkpoint_result_dir: str | os.PathLike) -> list["InstanceScores"]:
        d = Path(checkpoint_result_dir) / INSTANCES_DIR
        return [cls.read(p) for p in sorted(d.glob("*.json"))] if d.is_dir() else []

    def score(self, index: np.ndarray | Sequence[int] | None = None) -> float:
        """The main score over the instances at `index` (all by default): see :func:`aggregate`."""
        return aggregate(self.aggregate, values=self.values, pred=self.pred, gold=self.gold, index=index)


def aggregate(kind: str, *, values=None, pred=None, gold=None, index=None) -> float:
    """Main score from per-instance data: mean of `values`, or correlation / average precision of
    (`pred`, `gold`), over the rows at `index` (all rows when None; repeats allowed, as in a bootstrap)."""
    def pick(a):
        a = np.asarray(a, dtype=np.float64)
        return a if index is None else a[np.asarray(index)]

    if kind == "mean":
        return float(np.mean(pick(values)))
    p, g = pick(pred), pick(gold)
    if kind == "spearman":
        from scipy.stats import spearmanr  # scipy / sklearn: a second to import, for the evaluation and report
        return float(spearmanr(p, g).statistic)
    if kind == "pearson":
        from scipy.stats import pearsonr
        return float(pearsonr(p, g).statistic)
    if kind == "average_precision":
        from sklearn.metrics import average_precision_score
        return float(average_precision_score(g.astype(int), p))
    raise DataError(f"unknown aggregate {kind!r}: one of {AGGREGATES}")


# ====================================================================================== sweep.json, training data
PARTS_FORMAT = "embed_sweeps.parts/v1"


def read_parts(sweep_dir: str | os.PathLike) -> list[dict]:
    """A merged sweep's parts.json entries ({from, cells, runs_with}); [] before its first merge."""
    if not (Path(sweep_dir) / PARTS_FILE).is_file():
        return []
    return list(read_versioned_json(sweep_dir, PARTS_FILE, PARTS_FORMAT, "a merged sweep")["parts"])


def write_parts(sweep_dir: str | os.PathLike, parts: list[dict]) -> None:
    atomic_write_json(Path(sweep_dir) / PARTS_FILE, {"format": PARTS_FORMAT, "parts": parts})


def read_sweep(sweep_dir: str | os.PathLike) -> SweepConfig:
    """The SweepConfig a sweep folder was started with (``sweep.json``)."""
    p = Path(sweep_dir) / SWEEP_FILE
    obj = read_versioned_json(sweep_dir, SWEEP_FILE, SWEEP_FORMAT, "a sweep folder")
    cfg = parse_sweep_config(obj["config"], source=str(p))
    cfg.storage_path = str(Path(sweep_dir).resolve().parent)  # the folder may have moved (copied off a cluster)
    return cfg


def restate_fingerprint(sweep_dir: str | os.PathLike, fingerprint: str) -> None:
    """Set ``sweep.json``'s `fingerprint` field. It is written when a sweep is created and only informs a reader
    (every check recomputes it from the config): a sweep created before the fingerprint left out some runtime
    keys shows an older value until its folder is restated (``prepare --resume`` and ``sweeps merge`` do)."""
    path = Path(sweep_dir) / SWEEP_FILE
    stored = json.loads(path.read_text())
    if stored.get("fingerprint") != fingerprint:
        atomic_write_json(path, {**stored, "fingerprint": fingerprint})


def data_key(tcfg) -> str:
    """Training data is a function of these fields only: trials with equal keys share one JSONL file."""
    d = {k: getattr(tcfg, k) for k in ("train_data", "builders", "data_dir", "max_per_source", "seed",
                                       "max_bad_fraction")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def data_file(sweep_dir: Path, tcfg) -> Path:
    """The JSONL file `prepare` writes for the training data of `tcfg` (a TrainConfig)."""
    return Path(sweep_dir) / DATA_DIR / f"train-{data_key(tcfg)}.jsonl"


# ====================================================================================== each cell's plan
@dataclass(frozen=True)
class CellPlan:
    """What `prepare` resolved for one grid cell, once, for each of its trials (``cells/<cell key>.json``): a
    trial reads this instead of the sweep's config.

    train_config: the cell's TrainConfig (``to_dict()``): the sweep's model and training sections with the cell's
        overrides applied, validated for the cell's number of workers; the values a trial owns (``model.lora_r``,
        ``lr``, ``seed``) are null until :meth:`trial_config` sets them.
    data_file: the cell's training examples, relative to the sweep folder (:func:`data_file`).
    resources / train_max_failures / metric: the cell's resources (after its overrides), Ray Train's restarts of
        its worker group, the scheduler's metric. source: the config file it came from, for error messages.
    """

    cell: str
    train_config: dict
    data_file: str
    resources: ResourcesSection
    train_max_failures: int
    metric: str
    source: str = "<dict>"

    FORMAT = CELL_FORMAT

    @classmethod
    def of(cls, sweep: SweepConfig, cell: Cell) -> "CellPlan":
        """The plan of `cell` of `sweep` (ConfigError naming the cell)."""
        tcfg = sweep.train_config(cell, *sweep.probe_values(cell))  # validated here, for every trial of the cell
        d = tcfg.to_dict()
        d["model"]["lora_r"] = d["lr"] = d["seed"] = None  # placeholders: each trial sets its own
        return cls(cell=cell.key, train_config=d, data_file=data_file(Path(), tcfg).as_posix(),
                   resources=sweep.resources_for(cell), train_max_failures=sweep.failure.train_max_failures,
                   metric=sweep.scheduler.metric, source=sweep.source)

    def trial_config(self, lora_r: int, lr: float, seed: int, **worker: Any) -> TrainConfig:
        """The trial's TrainConfig: this cell's with the trial's `lora_r`, `lr`, `seed` (equal to
        ``SweepConfig.train_config(cell, lora_r, lr)``), and `worker`'s fields (what the trial's workers read
        instead: the data file, say); validated once (ConfigError naming the cell)."""
        d = dict(self.train_config, model=dict(self.train_config["model"], lora_r=int(lora_r)), lr=float(lr),
                 seed=int(seed), **worker)
        try:
            return TrainConfig.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"sweep config {self.source}: cell {self.cell}: {e}") from None

    def data_path(self, sweep_dir: str | os.PathLike) -> Path:
        """The cell's training data file in `sweep_dir` (wherever the sweep folder is now)."""
        return Path(sweep_dir) / self.data_file

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "format": self.FORMAT}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CellPlan":
        d = _without_format(d, cls.FORMAT, "cell plan has")
        d["resources"] = dataclass_from_dict(ResourcesSection, d.get("resources") or {})
        return dataclass_from_dict(cls, d)


def cell_plan_file(sweep_dir: str | os.PathLike, cell_key: str) -> Path:
    return Path(sweep_dir) / CELLS_DIR / f"{cell_key}.json"


def write_cell_plan(sweep_dir: str | os.PathLike, plan: CellPlan) -> Path:
    return atomic_write_json(cell_plan_file(sweep_dir, plan.cell), plan.to_dict())


def read_cell_plan(sweep_dir: str | os.PathLike, cell_key: str) -> CellPlan:
    """The plan `prepare` wrote for cell `cell_key` of the sweep in `sweep_dir`; DataError naming the file."""
    p = cell_plan_file(sweep_dir, cell_key)
    if not p.is_file():
        raise DataError(f"cell plan {str(p)!r} does not exist: the sweep was not prepared for cell {cell_key!r} "
                        "(run it again with --resume: prepare writes it)")
    try:
        return CellPlan.from_dict(_read_json(p, "cell plan"))
    except (AttributeError, TypeError, ConfigError) as err:
        raise DataError(f"cell plan {str(p)!r} is not one (layout.write_cell_plan): {err}") from None


# ====================================================================================== mteb results
def read_task_result(path: str | Path, split: str = "test") -> tuple[str, float, str]:
    """(task name, main score, what was averaged) from an mteb TaskResult JSON.

    The main score is the mean of ``main_score`` over the subsets of `split` (mteb's convention); without
    that split, the mean over every split present. Raises DataError naming the file and field.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict) or "task_name" not in obj or not isinstance(obj.get("scores"), dict):
        raise DataError(f"{path}: not an mteb TaskResult (needs 'task_name' and a 'scores' object)")
    scores = obj["scores"]
    splits = [split] if split in scores else sorted(scores)
    vals = []
    for sp in splits:
        entries = scores[sp]
        if not isinstance(entries, list):
            raise DataError(f"{path}: scores[{sp!r}] is not a list of subset scores")
        for e in entries:
            if not isinstance(e, dict) or "main_score" not in e:
                raise DataError(f"{path}: scores[{sp!r}] has an entry without 'main_score'")
            vals.append(float(e["main_score"]) if e["main_score"] is not None else math.nan)
    if not vals:
        raise DataError(f"{path}: no scores")
    what = f"split {splits[0]}" if len(splits) == 1 else f"mean over splits {', '.join(splits)}"
    if len(vals) > 1:
        what += f", mean over {len(vals)} subsets"
    return str(obj["task_name"]), float(np.mean(vals)), what
