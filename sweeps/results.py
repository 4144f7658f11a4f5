"""The report's view of a results folder: every checkpoint's task scores, labels and per-instance scores, read
with the readers of sweeps/layout.py, and every file that could not be used, with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from embed_core.errors import ConfigError, DataError

from . import layout

__all__ = ["REFERENCE_PREFIX", "Results", "Run", "UNKNOWN_BASE", "UNKNOWN_CATEGORY", "load_results"]

REFERENCE_PREFIX = "reference:"
UNKNOWN_CATEGORY = "unknown"
UNKNOWN_BASE = "(no base model)"


@dataclass
class Run:
    """One checkpoint's results folder ``<model>/<revision>/``."""

    dir: Path
    model: str
    revision: str
    labels: layout.RunLabels
    scores: dict[str, float] = field(default_factory=dict)          # task -> main score
    instances: dict[str, list[layout.InstanceScores]] = field(default_factory=dict)  # task -> per subset
    labelled: bool = True

    @property
    def name(self) -> str:
        return f"{self.model}/{self.revision}"

    @property
    def design(self) -> str:
        return self.labels.design

    @property
    def base_model(self) -> str:
        return self.labels.base_model or UNKNOWN_BASE


@dataclass
class Results:
    root: Path
    sweep_dir: Path | None
    runs: list[Run]
    categories: dict[str, str]         # task -> category
    category_source: dict[str, str]    # task -> "instances" | "mteb" | "unknown"
    problems: list[str]                # files that could not be used, and why


def _locate(results_root: str | Path) -> tuple[Path, Path | None]:
    p = Path(results_root)
    if not p.exists():
        raise DataError(f"results folder {str(p)!r} does not exist")
    if not p.is_dir():
        raise DataError(f"results folder {str(p)!r} is not a folder")
    if (p / layout.RESULTS_DIR).is_dir():
        return p / layout.RESULTS_DIR, p
    return p, (p.parent if p.name == layout.RESULTS_DIR else None)


def _chosen_checkpoints(sweep_dir: Path | None) -> set[str] | None:
    """The checkpoint paths a sweep's checkpoints.json chose (None: not a sweep folder, read every result).
    The replicates of a design are its seeds' chosen checkpoints, never every result that happens to lie in
    results/ (a stale result of an earlier choice would count as one more replicate)."""
    if sweep_dir is None or not (sweep_dir / layout.CHECKPOINTS_FILE).is_file():
        return None
    specs = layout.read_checkpoints(sweep_dir)
    return {s.path for s in specs} | {s.labels.checkpoint for s in specs if s.labels.checkpoint}


def load_results(results_root: str | Path, *, split: str = "test") -> Results:
    """Read every ``<model>/<revision>/`` under the results folder (or a sweep folder's ``results/``); in a
    sweep folder with checkpoints.json, only its chosen checkpoints' results (+ references)."""
    root, sweep_dir = _locate(results_root)
    problems: list[str] = []
    runs: list[Run] = []
    chosen = _chosen_checkpoints(sweep_dir)
    for model_dir in sorted(x for x in root.iterdir() if x.is_dir()):
        for rev_dir in sorted(x for x in model_dir.iterdir() if x.is_dir()):
            run = _read_run(root, model_dir, rev_dir, chosen, split, problems)
            if run is not None and run.scores:
                runs.append(run)
    if not runs:
        raise DataError(f"no checkpoint results under {str(root)!r}: expected <model>/<revision>/<Task>.json "
                        f"(mteb's result layout) with run_labels.json and instances/ (sweeps.layout)")
    categories, source = _categories(runs)
    return Results(root, sweep_dir, runs, categories, source, problems)


def _read_run(root: Path, model_dir: Path, rev_dir: Path, chosen: set[str] | None, split: str,
              problems: list[str]) -> Run | None:
    """One checkpoint's results folder: labels, task scores (`split`), instances; what cannot be used goes to
    `problems`. None: nothing there, or a result of a checkpoint the sweep did not choose."""
    skip_names = set(layout.RESULT_META_FILES)
    task_files = sorted(p for p in rev_dir.glob("*.json")
                        if p.name not in skip_names and not p.name.startswith("."))
    has_labels = (rev_dir / layout.LABELS_FILE).is_file()
    if not task_files and not has_labels:
        return None
    rel = rev_dir.relative_to(root)
    labelled = True
    try:
        labels = layout.RunLabels.read(rev_dir)
    except (DataError, ConfigError, TypeError) as err:
        labelled = False
        labels = layout.RunLabels(design=model_dir.name)
        why = "missing" if not has_labels else f"unreadable ({err})"
        problems.append(f"{rel}: run_labels.json {why}: treated as design {model_dir.name!r} "
                        f"with no base model, seed 0")
    if chosen is not None and labels.checkpoint not in chosen \
            and not labels.design.startswith(REFERENCE_PREFIX):
        problems.append(f"{rel}: checkpoint {labels.checkpoint or '?'} is not one {layout.CHECKPOINTS_FILE} "
                        "chose (a result of an earlier choice?): left out")
        return None
    run = Run(rev_dir, model_dir.name, rev_dir.name, labels, labelled=labelled)
    for f in task_files:
        try:
            task, score, what = layout.read_task_result(f, split)
        except DataError as err:
            problems.append(f"{rel}/{f.name}: skipped, {str(err).removeprefix(f'{f}: ')}")
            continue
        if not math.isfinite(score):
            problems.append(f"{rel}/{f.name}: skipped, main score is {score}")
            continue
        run.scores[task] = score
    _read_instances(run, rel, split, problems)
    if not run.scores and has_labels:
        problems.append(f"{rel}: no readable task results (run_labels.json only)")
    return run


def _read_instances(run: Run, rel: Path, split: str, problems: list[str]) -> None:
    """The run's per-instance scores (those of `split` where a task has them), each checked to reproduce the
    value it was written with."""
    rev_dir = run.dir
    inst_dir = rev_dir / layout.INSTANCES_DIR
    inst_files = sorted(p for p in inst_dir.glob("*.json") if not p.name.startswith(".")) \
        if inst_dir.is_dir() else []
    for f in inst_files:
        try:
            inst = layout.InstanceScores.read(f)
        except (DataError, ConfigError, TypeError, KeyError) as err:
            problems.append(f"{rel}/instances/{f.name}: skipped, {err}")
            continue
        run.instances.setdefault(inst.task, []).append(inst)
        try:
            recomputed, why = inst.score(), ""
        except Exception as err:  # noqa: BLE001 - a degenerate file is reported, not fatal
            recomputed, why = math.nan, f" ({err})"
        if not (math.isfinite(recomputed) and abs(recomputed - inst.value) <= 1e-4):
            problems.append(f"{rel}/instances/{f.name}: the instances give {recomputed:.6f}{why} but the "
                            f"file's value is {inst.value:.6f} (kept; check the evaluation job)")
    for task, insts in list(run.instances.items()):
        if any(i.split == split for i in insts):  # the split the task score uses
            run.instances[task] = [i for i in insts if i.split == split]


def _categories(runs: list[Run]) -> tuple[dict[str, str], dict[str, str]]:
    """Task category: InstanceScores.task_type when present, else mteb's task metadata, else unknown."""
    tasks = sorted({t for r in runs for t in r.scores})
    cat: dict[str, str] = {}
    src: dict[str, str] = {}
    for r in runs:
        for t, insts in r.instances.items():
            for i in insts:
                if i.task_type and t not in cat:
                    cat[t], src[t] = i.task_type, "instances"
    rest = [t for t in tasks if t not in cat]
    if rest:
        try:
            import mteb  # torch: only for a category no instance file names (test_import_graph)
        except Exception:  # noqa: BLE001
            mteb = None
        for t in rest:
            try:
                cat[t], src[t] = str(mteb.get_task(t).metadata.type), "mteb"
            except Exception:  # noqa: BLE001 - unknown to mteb (custom task) or mteb missing
                cat[t], src[t] = UNKNOWN_CATEGORY, "unknown"
    return {t: cat[t] for t in tasks}, {t: src[t] for t in tasks}
