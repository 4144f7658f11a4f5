"""The sweep's side of `python -m sweeps export`: each base model's best checkpoint by the report, and the
model card's evaluation section (the checkpoint's own scores and its design's tests from report/summary.json).
The sentence-transformers folder itself is written by embed_core/export.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embed_core import export as core_export
from embed_core.errors import ConfigError
from embed_core.model import CONFIG_FILE, read_meta

from . import layout

__all__ = ["best_checkpoints", "export_best", "export_checkpoint", "run_scores", "sweep_card_facts"]


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, merge_lora: bool = False,
                      dtype: str = "fp32") -> Path:
    """embed_core.export.export_checkpoint, with the card's evaluation section when the checkpoint is listed in
    the checkpoints.json of a sweep folder above it."""
    ckpt = Path(checkpoint)
    card = sweep_card_facts(ckpt, read_meta(ckpt)) if (ckpt / CONFIG_FILE).is_file() else None
    return core_export.export_checkpoint(ckpt, out, merge_lora=merge_lora, dtype=dtype, card=card)


def _find_sweep(ckpt: Path) -> Path | None:
    for parent in ckpt.resolve().parents:
        if (parent / layout.SWEEP_FILE).is_file():
            return parent
    return None


def sweep_card_facts(ckpt: Path, meta: dict, sweep_dir: Path | None = None) -> dict[str, Any] | None:
    """The sweep's view of `ckpt` (its checkpoints.json entry, its own mteb scores, its design's means and
    tests from report/summary.json), or None when the checkpoint is not part of a sweep with a report."""
    sweep_dir = sweep_dir or _find_sweep(ckpt)
    summary = layout.read_summary(sweep_dir) if sweep_dir else None
    if summary is None or not (sweep_dir / layout.CHECKPOINTS_FILE).is_file():
        return None
    spec = next((s for s in layout.read_checkpoints(sweep_dir)
                 if Path(s.path).resolve() == ckpt.resolve()), None)
    key = _run_name(spec.name, meta) if spec else None
    group = next((g for g in summary["groups"] if key in sum(g["runs"].values(), [])), None)
    if spec is None or group is None:
        return None
    c, base = spec.labels.design, summary["baseline"]
    sweep_file = sweep_dir / layout.SWEEP_FILE  # {"config": the sweep config as written, ...}
    raw = json.loads(sweep_file.read_text()).get("config") or {} if sweep_file.is_file() else {}
    recipe = raw.get("training") or {}
    training = {"lr": spec.labels.lr, "steps": spec.labels.steps, "builders": recipe.get("builders"),
                "max_per_source": recipe.get("max_per_source"), "train_files": recipe.get("train_data"),
                "batch_size": recipe.get("batch_size"), "num_negatives": recipe.get("num_negatives")}
    return {"sweep": raw.get("name") or sweep_dir.name, "name": spec.name, "design": c, "seed": spec.labels.seed, "baseline": base,
            "training": training,
            "correction": summary["correction"], "alpha": summary["alpha"], "tasks": group["tasks"],
            "task_types": group.get("categories", {}), "mean": group["mean"].get(c, {}),
            "baseline_mean": group["mean"].get(base, {}) if c != base else {},
            "scores": run_scores(sweep_dir, spec.name, meta.get("fingerprint", "")),
            "instance": {r["scope"]: r for r in group["instance"] if r["design"] == c},
            "wilcoxon": [r for r in group["wilcoxon"] if r["design"] == c]}


def _run_name(name: str, meta: dict) -> str:
    """The report's name of a checkpoint's results (``sweeps.results.Run.name``: <model folder>/<revision>)."""
    return f"{layout.model_dir_name(name)}/{meta.get('fingerprint', '')}"


def _sweep_checkpoints(sweep_dir: Path) -> dict[str, Any]:
    """Report run name -> CheckpointSpec, for the checkpoints of checkpoints.json that are saved models."""
    return {_run_name(s.name, read_meta(Path(s.path))): s for s in layout.read_checkpoints(sweep_dir)
            if (Path(s.path) / CONFIG_FILE).is_file()}


def run_scores(sweep_dir: Path, name: str, revision: str) -> dict[str, float]:
    """One checkpoint's mteb main scores, read from results/<model>/<revision>/<Task>.json."""
    folder = layout.result_dir(sweep_dir / layout.RESULTS_DIR, name, revision)
    scores = {}
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if f.name in ("model_meta.json", layout.LABELS_FILE):
            continue
        task, score, _ = layout.read_task_result(f)
        scores[task] = score
    return scores


def best_checkpoints(sweep_dir: str | Path) -> list[tuple[str, Path]]:
    """Per base model: the design with the best report mean (over its tasks and seeds), then, of its seeds,
    the checkpoint with the best own mean. Returns (base model, checkpoint path) pairs."""
    sweep_dir = Path(sweep_dir)
    summary = layout.read_summary(sweep_dir)
    if summary is None:
        raise ConfigError(f"{sweep_dir / layout.REPORT_DIR / layout.SUMMARY_FILE} is missing: "
                          f"run `python -m sweeps report {sweep_dir}` first")
    specs = _sweep_checkpoints(sweep_dir)
    chosen = []
    for g in summary["groups"]:
        ranked = sorted(g["designs"], key=lambda c: _design_rank(g, c), reverse=True)
        if not ranked:
            continue
        runs = [specs[n] for n in g["runs"][ranked[0]] if n in specs]
        if not runs:
            raise ConfigError(f"{sweep_dir}: the runs of {ranked[0]} ({g['base_model']}) are not in checkpoints.json")
        best = max(runs, key=lambda s: _own_mean(sweep_dir, s))
        chosen.append((g["base_model"], Path(best.path)))
    return chosen


def _design_rank(group: dict, design: str) -> tuple[int, float]:
    """(tasks covered, mean over them): a design scored on fewer tasks never wins on an easier subset."""
    vals = [group["mean"].get(design, {}).get(t) for t in group["tasks"]]
    vals = [v for v in vals if v is not None]
    return len(vals), (sum(vals) / len(vals) if vals else float("-inf"))


def _own_mean(sweep_dir: Path, spec) -> float:
    scores = run_scores(sweep_dir, spec.name, read_meta(Path(spec.path)).get("fingerprint", ""))
    return sum(scores.values()) / len(scores) if scores else float("-inf")


def export_best(sweep_dir: str | Path, out_dir: str | Path, *, merge_lora: bool = False,
                dtype: str = "fp32") -> list[Path]:
    """`export_checkpoint` for each base model's winner, into out_dir/<base model>__<design>."""
    sweep_dir = Path(sweep_dir)
    written = []
    for base, ckpt in best_checkpoints(sweep_dir):
        meta = read_meta(ckpt)
        card = sweep_card_facts(ckpt, meta, sweep_dir)
        name = layout.model_dir_name(f"{Path(base).name}__{card['design'] if card else ckpt.name}").replace("+", "_")
        written.append(core_export.export_checkpoint(ckpt, Path(out_dir) / name, merge_lora=merge_lora, dtype=dtype, card=card))
    return written
