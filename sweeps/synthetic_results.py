"""A synthetic sweep in the exact on-disk layout of :mod:`sweeps.layout`, with known effects.

For the report's tests and for a preview of the report before any real sweep has run::

    python -m sweeps.synthetic_results OUT_DIR        # writes OUT_DIR/results/..., OUT_DIR/trials.json
    python -m sweeps.report OUT_DIR                   # -> OUT_DIR/report/report.html

Every checkpoint folder holds what the evaluation job writes: an mteb 2.26 TaskResult JSON per task
(``<Task>.json``), ``model_meta.json``, ``run_labels.json`` and ``instances/<Task>.json``
(:class:`~sweeps.layout.InstanceScores`); the sweep folder holds ``trials.json``. The main score in each
TaskResult is recomputed from the instances (rounded to 6 digits, as mteb writes it).

Scores come from a latent quality per design (:data:`DEFAULT_EFFECTS`, in logit-like units): a positive
effect raises every dataset's score, zero is a null effect. Models share per-instance difficulty and part
of their prediction noise, so paired tests have the power they have on real data. Task names are made up
(``SynSTS-1``...) and carry their category in ``InstanceScores.task_type``; they are not mteb tasks.
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layout

__all__ = ["DEFAULT_EFFECTS", "DEFAULT_TASKS", "SyntheticSweep", "mteb_task_result", "write_synthetic_sweep"]

#: design -> latent effect vs the baseline (0 = no difference).
DEFAULT_EFFECTS: dict[str, float] = {
    "eos_last+causal": 0.0,
    "mean+causal": 0.0,
    "last_layer_trainable+causal": -0.5,
    "multi_layer_trainable+causal": 0.35,
    "multi_layer_trainable+bidirectional": 0.8,
}

#: task -> (category, aggregate, main score name).
DEFAULT_TASKS: dict[str, tuple[str, str, str]] = {
    **{f"SynSTS-{i}": ("STS", "spearman", "cosine_spearman") for i in range(1, 7)},
    **{f"SynClassification-{i}": ("Classification", "mean", "accuracy") for i in range(1, 6)},
    **{f"SynRetrieval-{i}": ("Retrieval", "mean", "ndcg_at_10") for i in range(1, 3)},
    "SynPairClassification-1": ("PairClassification", "average_precision", "max_ap"),
    "SynSTS-pearson": ("STS", "pearson", "cosine_pearson"),
    "SynClustering-1": ("Clustering", "mean", "v_measure"),  # instances = mteb's 10 clustering experiments
}

MTEB_VERSION = "2.26.24"


@dataclass
class SyntheticSweep:
    sweep_dir: Path
    results_dir: Path
    trials_path: Path | None
    effects: dict[str, float]
    tasks: dict[str, tuple[str, str, str]]
    run_dirs: list[Path] = field(default_factory=list)


def mteb_task_result(task: str, main_score_name: str, value: float, *, split: str = "test",
                     subset: str = "default", revision: str = "synthetic") -> dict:
    """A TaskResult JSON object as mteb 2.26 writes it (the fields the report and mteb's loader use)."""
    v = round(float(value), 6)
    return {
        "dataset_revision": revision,
        "task_name": task,
        "mteb_version": MTEB_VERSION,
        "scores": {split: [{main_score_name: v, "main_score": v, "hf_subset": subset,
                            "languages": ["eng-Latn"], "mteb_version": MTEB_VERSION}]},
        "evaluation_time": 1.0,
        "kg_co2_emissions": None,
        "date": 1_700_000_000.0,
        "evaluation_phases": [],
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _instances(task: str, category: str, kind: str, main: str, q: float, shared: dict, rng: np.random.Generator,
               n: int) -> layout.InstanceScores:
    ids = [f"{task}-{i}" for i in range(n)]
    common = dict(task=task, task_type=category, split="test", subset="default", main_score=main, value=0.0,
                  aggregate=kind, ids=ids)
    if kind == "mean" and category == "Classification":
        p = _sigmoid(shared["easy"] + q)
        values = rng.binomial(10, p) / 10.0  # fraction of mteb's 10 experiments correct
        inst = layout.InstanceScores(**common, values=values.tolist())
    elif kind == "mean":
        values = _sigmoid(shared["easy"] - 0.5 + q + 0.8 * rng.normal(size=n))  # per-query nDCG-like
        inst = layout.InstanceScores(**common, values=values.tolist())
    elif kind in ("spearman", "pearson"):
        s = 1.6 * np.exp(-q)
        pred = 0.1 * shared["gold"] + 0.1 * s * (0.6 * shared["noise"] + 0.8 * rng.normal(size=n))
        inst = layout.InstanceScores(**common, pred=pred.tolist(), gold=shared["gold"].tolist())
    else:  # average_precision
        pred = shared["label"] * (1.0 + q) + 0.6 * shared["noise"] + 0.8 * rng.normal(size=n)
        inst = layout.InstanceScores(**common, pred=pred.tolist(), gold=shared["label"].tolist())
    inst.value = round(inst.score(), 6)
    return inst


def write_synthetic_sweep(
    sweep_dir: str | Path,
    *,
    base_models: tuple[str, ...] = ("synthetic/base-A",),
    effects: dict[str, float] | None = None,
    seeds: dict[str, list[int]] | None = None,
    tasks: dict[str, tuple[str, str, str]] | None = None,
    n_instances: int = 200,
    seed: int = 0,
    trials: bool = True,
) -> SyntheticSweep:
    """Write ``<sweep_dir>/results/<model>/<revision>/...`` and ``<sweep_dir>/trials.json``.

    effects: design -> latent effect (default :data:`DEFAULT_EFFECTS`, baseline ``eos_last+causal`` = 0);
    seeds: design -> replicate seeds (default: 3 seeds for the baseline and multi_layer_trainable+bidirectional,
    1 for the others); tasks: task -> (category, aggregate, main score) (default :data:`DEFAULT_TASKS`).
    """
    sweep_dir = Path(sweep_dir)
    effects = dict(DEFAULT_EFFECTS if effects is None else effects)
    tasks = dict(DEFAULT_TASKS if tasks is None else tasks)
    if seeds is None:
        seeds = {c: ([0, 1, 2] if c in (layout.BASELINE_DESIGN, "multi_layer_trainable+bidirectional") else [0])
                 for c in effects}
    results = sweep_dir / layout.RESULTS_DIR
    out = SyntheticSweep(sweep_dir, results, None, effects, tasks)
    records: list[layout.TrialRecord] = []
    for bi, base in enumerate(base_models):
        shared = _shared_data(np.random.default_rng([seed, bi]), tasks, n_instances)
        base_offset = 0.2 * bi
        for ci, (design, effect) in enumerate(effects.items()):
            pooling, _, attention = design.partition("+")
            cell = f"{base.split('/')[-1]}/{design}"
            cell_trials = _cell_trials(seed, bi, ci, base, cell, design, effect)
            records.extend(cell_trials)
            best = max((t for t in cell_trials if t.status == "TERMINATED"), key=lambda t: t.val_metric or 0.0)
            for s in seeds.get(design, [0]):
                rng = np.random.default_rng([seed, bi, ci, 1000 + s])
                q = effect + base_offset + (0.03 * rng.normal() if s else 0.0)
                name = f"{base.split('/')[-1]}-sweep/{design}-seed{s}"
                revision = hashlib.sha256(f"{base}|{design}|{s}|{seed}".encode()).hexdigest()[:16]
                d = layout.result_dir(results, name, revision)
                d.mkdir(parents=True, exist_ok=True)
                if s:
                    records.append(_replicate_trial(best, s, rng))
                layout.RunLabels(design=design, base_model=base, pooling=pooling, attention=attention,
                                 lora_r=best.lora_r, lr=best.lr, seed=s, trial_id=best.trial_id + (f"-s{s}" if s else ""),
                                 cell=cell, steps=best.steps, gpu_hours=best.gpu_hours,
                                 checkpoint=f"tune/{cell}/{best.trial_id}/checkpoint_000009").write(d)
                layout.atomic_write_json(d / "model_meta.json", {"name": name, "revision": revision})
                for task, (cat, kind, main) in tasks.items():
                    inst = _instances(task, cat, kind, main, q, shared[task], rng, len(shared[task]["gold"]))
                    inst.write(d)
                    layout.atomic_write_json(d / f"{task}.json", mteb_task_result(task, main, inst.value))
                out.run_dirs.append(d)
    if trials:
        out.trials_path = layout.write_trials(sweep_dir, records)
    return out


def _replicate_trial(best: layout.TrialRecord, s: int, rng: np.random.Generator) -> layout.TrialRecord:
    """The record of seed `s`'s rerun of a cell's best trial: its hyper-parameters, a slightly different metric."""
    return layout.TrialRecord(
        trial_id=f"{best.trial_id}-s{s}", cell=best.cell, design=best.design, base_model=best.base_model,
        lora_r=best.lora_r, lr=best.lr, seed=s, status="TERMINATED",
        val_metric=float(np.round((best.val_metric or 0) + 0.01 * rng.normal(), 4)),
        steps=best.steps, wall_s=best.wall_s, gpu_hours=best.gpu_hours)


def _shared_data(base_rng, tasks: dict, n_instances: int) -> dict[str, dict]:
    """Per task, what every design of one base model shares: gold scores / labels, difficulty, noise."""
    shared = {}
    for task in tasks:
        n = 10 if tasks[task][0] == "Clustering" else n_instances
        gold = np.round(base_rng.uniform(0, 5, n), 1)
        shared[task] = {"easy": base_rng.normal(1.0, 1.5, n), "gold": gold, "noise": base_rng.normal(size=n),
                        "label": (base_rng.random(n) < 0.4).astype(float)}
    return shared


def _cell_trials(seed: int, bi: int, ci: int, base: str, cell: str, design: str,
                 effect: float) -> list[layout.TrialRecord]:
    """The cell's Tune trials: a few LoRA ranks / LRs, one stopped early, one failed."""
    cell_trials = []
    for k, (r, lr, status) in enumerate([(8, 3e-5, "STOPPED"), (16, 1e-5, "TERMINATED"),
                                         (32, 2e-5, "TERMINATED"), (16, 5e-4, "ERROR")]):
        trng = np.random.default_rng([seed, bi, ci, k])
        gpu_h = float(np.round((0.5 if status == "STOPPED" else 1.5 + 0.3 * (r / 16)) * (1 + bi), 3))
        val = None if status == "ERROR" else float(np.round(0.6 + 0.05 * effect + 0.02 * trng.normal(), 4))
        cell_trials.append(layout.TrialRecord(
            trial_id=f"t{bi}{ci}{k}", cell=cell, design=design, base_model=base, lora_r=r, lr=lr, seed=0,
            status=status, val_metric=val, steps=100 if status == "STOPPED" else 1000,
            wall_s=gpu_h * 3600, gpu_hours=gpu_h if status != "ERROR" else 0.1,
            error="CUDA out of memory" if status == "ERROR" else ""))
    return cell_trials


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweeps.synthetic_results", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="sweep folder to write (results/ and trials.json)")
    ap.add_argument("--base-models", nargs="+", default=["synthetic/base-A", "synthetic/base-B"])
    ap.add_argument("--instances", type=int, default=200, help="instances per dataset")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    s = write_synthetic_sweep(a.out, base_models=tuple(a.base_models), n_instances=a.instances, seed=a.seed)
    print(f"wrote {len(s.run_dirs)} checkpoint result folders under {s.results_dir} and {s.trials_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
