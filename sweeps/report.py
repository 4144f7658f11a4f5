"""The sweep's significance report: a results folder in, report.md + report.html + PNGs out.

    python -m sweeps.report RESULTS_DIR [--trials trials.json] [--baseline eos_last+causal] [--out DIR]
                              [--correction holm|bh] [--alpha 0.05] [--resamples 10000]

RESULTS_DIR is the sweep folder (holding ``results/``, and ``trials.json`` which is then used too) or the
``results/`` folder itself: ``<model>/<revision>/<Task>.json`` (mteb TaskResult JSON), ``run_labels.json``
and ``instances/*.json`` per checkpoint (:mod:`sweeps.layout`). No Ray is needed.

Designs (configs) are compared within a base model; checkpoints with the same (base_model, config) are
replicates (seeds) and are averaged. What is tested is in :mod:`sweeps.stats`. Whatever cannot be
compared (a task missing for a config, instance ids that do not match, too few datasets in a category, no
baseline) is listed in the report with the reason, and everything else still renders.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embed_core.errors import ConfigError, DataError

from . import layout, stats

__all__ = [
    "GroupReport",
    "ReportSummary",
    "Results",
    "Run",
    "build_report",
    "console_table",
    "load_results",
    "main",
    "read_task_result",
]

REFERENCE_PREFIX = "reference:"
UNKNOWN_CATEGORY = "unknown"
UNKNOWN_BASE = "(no base model)"


# ====================================================================================== loading
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
    def config(self) -> str:
        return self.labels.config

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
    skip_names = set(layout.RESULT_META_FILES)
    for model_dir in sorted(x for x in root.iterdir() if x.is_dir()):
        for rev_dir in sorted(x for x in model_dir.iterdir() if x.is_dir()):
            task_files = sorted(p for p in rev_dir.glob("*.json")
                                if p.name not in skip_names and not p.name.startswith("."))
            has_labels = (rev_dir / layout.LABELS_FILE).is_file()
            if not task_files and not has_labels:
                continue
            rel = rev_dir.relative_to(root)
            labelled = True
            try:
                labels = layout.RunLabels.read(rev_dir)
            except (DataError, ConfigError, TypeError) as err:
                labelled = False
                labels = layout.RunLabels(config=model_dir.name)
                why = "missing" if not has_labels else f"unreadable ({err})"
                problems.append(f"{rel}: run_labels.json {why}: treated as config {model_dir.name!r} "
                                f"with no base model, seed 0")
            if chosen is not None and labels.checkpoint not in chosen \
                    and not labels.config.startswith(REFERENCE_PREFIX):
                problems.append(f"{rel}: checkpoint {labels.checkpoint or '?'} is not one {layout.CHECKPOINTS_FILE} "
                                "chose (a result of an earlier choice?): left out")
                continue
            run = Run(rev_dir, model_dir.name, rev_dir.name, labels, labelled=labelled)
            for f in task_files:
                try:
                    task, score, what = read_task_result(f, split)
                except DataError as err:
                    problems.append(f"{rel}/{f.name}: skipped, {str(err).removeprefix(f'{f}: ')}")
                    continue
                if not math.isfinite(score):
                    problems.append(f"{rel}/{f.name}: skipped, main score is {score}")
                    continue
                run.scores[task] = score
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
            if not run.scores and has_labels:
                problems.append(f"{rel}: no readable task results (run_labels.json only)")
            if run.scores:
                runs.append(run)
    if not runs:
        raise DataError(f"no checkpoint results under {str(root)!r}: expected <model>/<revision>/<Task>.json "
                        f"(mteb's result layout) with run_labels.json and instances/ (sweeps.layout)")
    categories, source = _categories(runs)
    return Results(root, sweep_dir, runs, categories, source, problems)


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
            import mteb
        except Exception:  # noqa: BLE001
            mteb = None
        for t in rest:
            try:
                cat[t], src[t] = str(mteb.get_task(t).metadata.type), "mteb"
            except Exception:  # noqa: BLE001 - unknown to mteb (custom task) or mteb missing
                cat[t], src[t] = UNKNOWN_CATEGORY, "unknown"
    return {t: cat[t] for t in tasks}, {t: src[t] for t in tasks}


# ====================================================================================== analysis
@dataclass
class GroupReport:
    """Everything the report says about one base model."""

    base_model: str
    baseline: str
    baseline_present: bool
    configs: list[str]                         # baseline first when present
    tasks: list[str]                           # ordered by category, then name
    categories: dict[str, str]                 # task -> category (this group's tasks)
    runs: dict[str, list[Run]]                 # config -> replicates, by seed
    mean: dict[str, dict[str, float]]          # config -> task -> mean over replicates
    sd: dict[str, dict[str, float]]            # config -> task -> sd over replicates (nan for 1)
    count: dict[str, dict[str, int]]           # config -> task -> replicates with a score
    wilcoxon: list[stats.TestResult] = field(default_factory=list)
    instance: list[stats.TestResult] = field(default_factory=list)
    seeds: list[stats.TestResult] = field(default_factory=list)
    friedman: stats.FriedmanResult | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def category_names(self) -> list[str]:
        return sorted(set(self.categories[t] for t in self.tasks))

    def tasks_of(self, category: str) -> list[str]:
        return [t for t in self.tasks if self.categories[t] == category]

    def category_value(self, config: str, category: str) -> tuple[float | None, int, int]:
        """Baseline: mean score over its datasets in the category; other configs: mean difference to the
        baseline over the datasets both have (or the mean score when there is no baseline).
        Returns (value, datasets used, datasets in the category)."""
        ts = self.tasks_of(category)
        return self._avg(config, ts)

    def overall_value(self, config: str) -> tuple[float | None, int, int]:
        return self._avg(config, self.tasks)

    def _avg(self, config: str, ts: list[str]) -> tuple[float | None, int, int]:
        own = self.mean.get(config, {})
        if config == self.baseline or not self.baseline_present:
            vals = [own[t] for t in ts if t in own]
            return (float(np.mean(vals)) if vals else None), len(vals), len(ts)
        base = self.mean[self.baseline]
        both = [t for t in ts if t in own and t in base]
        return (float(np.mean([own[t] - base[t] for t in both])) if both else None), len(both), len(ts)

    def dataset_wins(self, config: str) -> tuple[int, int, int]:
        """(significantly better, significantly worse, tested) datasets of a config in the per-dataset tests."""
        rs = [r for r in self.instance if r.config == config and r.tested]
        up = sum(1 for r in rs if r.significant and (r.delta or 0) > 0)
        down = sum(1 for r in rs if r.significant and (r.delta or 0) < 0)
        return up, down, len(rs)

    def test(self, kind: str, config: str, scope: str) -> stats.TestResult | None:
        for r in getattr(self, kind):
            if r.config == config and r.scope == scope:
                return r
        return None


@dataclass
class ReportSummary:
    """What :func:`build_report` found and wrote (``summary.json`` holds the same, as JSON)."""

    results_root: Path
    out_dir: Path
    files: dict[str, Path]
    baseline: str
    correction: str
    alpha: float
    n_resamples: int
    groups: list[GroupReport]
    references: list[Run]
    categories: dict[str, str]
    category_source: dict[str, str]
    problems: list[str]
    trials_path: Path | None = None
    trials: list[layout.TrialRecord] = field(default_factory=list)
    best_per_cell: list[dict[str, Any]] = field(default_factory=list)
    trials_note: str = ""

    @property
    def skipped(self) -> list[str]:
        """Every comparison that was not made, with the reason (also in the report)."""
        return [s for g in self.groups for s in g.skipped]

    @property
    def markdown(self) -> Path:
        return self.files["markdown"]

    @property
    def html(self) -> Path:
        return self.files["html"]

    def to_dict(self) -> dict[str, Any]:
        def group(g: GroupReport) -> dict[str, Any]:
            return {
                "base_model": g.base_model, "baseline": g.baseline, "baseline_present": g.baseline_present,
                "configs": g.configs, "tasks": g.tasks, "categories": g.categories,
                "runs": {c: [r.name for r in rs] for c, rs in g.runs.items()},
                "seeds": {c: [r.labels.seed for r in rs] for c, rs in g.runs.items()},
                "mean": g.mean, "sd": g.sd,
                "wilcoxon": [r.to_dict() for r in g.wilcoxon],
                "instance": [r.to_dict() for r in g.instance],
                "seed_tests": [r.to_dict() for r in g.seeds],
                "friedman": g.friedman.to_dict() if g.friedman else None,
                "skipped": g.skipped,
            }
        return {
            "format": "embed_sweeps.report/v1",
            "results_root": str(self.results_root), "baseline": self.baseline, "correction": self.correction,
            "alpha": self.alpha, "n_resamples": self.n_resamples,
            "files": {k: str(v) for k, v in self.files.items()},
            "groups": [group(g) for g in self.groups],
            "references": {r.name: r.scores for r in self.references},
            "categories": self.categories, "category_source": self.category_source,
            "problems": self.problems, "skipped": self.skipped,
            "trials_path": str(self.trials_path) if self.trials_path else None,
            "best_per_cell": self.best_per_cell,
        }


def _fmt_scope(task: str, inst: layout.InstanceScores, n_subsets: int) -> str:
    return task if n_subsets == 1 else f"{task} [{inst.subset}]"


def _analyse_group(base: str, runs: list[Run], categories: dict[str, str], *, baseline: str, correction: str,
                   alpha: float, n_resamples: int, seed: int, ci_method: str, min_datasets: int,
                   progress) -> GroupReport:
    by_config: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_config[r.config].append(r)
    for c in by_config:
        by_config[c].sort(key=lambda r: (r.labels.seed, r.name))
    present = baseline in by_config
    configs = ([baseline] if present else []) + sorted(c for c in by_config if c != baseline)
    tasks = sorted({t for r in runs for t in r.scores}, key=lambda t: (categories[t], t))
    g = GroupReport(base, baseline, present, configs, tasks, {t: categories[t] for t in tasks},
                    {c: by_config[c] for c in configs}, {}, {}, {})
    skipped = g.skipped
    for c in configs:
        seeds = [r.labels.seed for r in by_config[c]]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            skipped.append(f"[{base}] {c}: several checkpoints share seed(s) {dup} (different trials?); "
                           f"all {len(seeds)} are averaged as replicates")
        g.mean[c], g.sd[c], g.count[c] = {}, {}, {}
        for t in tasks:
            vals = [r.scores[t] for r in by_config[c] if t in r.scores]
            if vals:
                g.mean[c][t] = float(np.mean(vals))
                g.sd[c][t] = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
                g.count[c][t] = len(vals)
            if len(vals) < len(by_config[c]):
                missing = [f"{r.name} (seed {r.labels.seed})" for r in by_config[c] if t not in r.scores]
                skipped.append(f"[{base}] {c}: no result for {t} in {', '.join(missing)}"
                               + (f"; mean over the other {len(vals)} replicate(s)" if vals else
                                  "; every comparison of this config on this task is skipped"))
    if not present:
        skipped.append(f"[{base}] baseline {baseline!r} is not among this base model's configs "
                       f"({', '.join(configs)}): every comparison against the baseline (Wilcoxon, per-dataset "
                       f"tests, seed tests, deltas) is skipped; scores are shown as absolute values")
    else:
        # ---- the paper's Wilcoxon test per category
        g.wilcoxon = stats.wilcoxon_by_category(
            {c: g.mean[c] for c in configs}, g.categories, baseline, base_model=base, min_datasets=min_datasets)
        for cat in g.category_names:
            rs = [r for r in g.wilcoxon if r.scope == cat]
            n_cat = len(g.tasks_of(cat))
            if rs and n_cat < min_datasets:  # too few datasets in the category itself
                skipped.append(f"[{base}] Wilcoxon, {cat}: not tested for any config: {n_cat} dataset(s) "
                               f"(the paper's test needs at least {min_datasets})")
            else:
                skipped.extend(f"[{base}] Wilcoxon {r.config} vs {baseline}, {cat}: skipped, {r.skipped}"
                               for r in rs if r.skipped)
        stats.correct_family(g.wilcoxon, correction, alpha)
        # ---- per-dataset tests over instances
        jobs = [(c, t) for c in configs if c != baseline for t in tasks]
        for c, t in progress(jobs, desc=f"per-dataset tests [{base}]"):
            g.instance.extend(_instance_tests(g, c, t, n_resamples=n_resamples, seed=seed, ci_method=ci_method))
        for r in g.instance:
            if r.skipped:
                skipped.append(f"[{base}] per-dataset test {r.config} vs {baseline} on {r.scope}: skipped, {r.skipped}")
        stats.correct_family(g.instance, correction, alpha)
        m = sum(r.tested for r in g.instance)
        floor = 2.0 / (n_resamples + 1) * m  # smallest Holm/BH-adjusted p a permutation test can reach
        if m and floor > alpha:
            skipped.append(f"[{base}] per-dataset tests: with {n_resamples} permutations the smallest p-value is "
                           f"{2.0 / (n_resamples + 1):.1e}, which the correction over {m} tests lifts to "
                           f"{min(floor, 1):.3f} > alpha = {alpha}: nothing can be significant; use "
                           f"--resamples {int(math.ceil(20 * m / alpha / 1000) * 1000)} or more")
        # ---- seeds
        g.seeds = _seed_tests(g)
        for r in g.seeds:
            if r.skipped:
                skipped.append(f"[{base}] seed test {r.config} vs {baseline} ({r.scope}): skipped, {r.skipped}")
        single = [c for c in configs if len(g.runs[c]) < 2]
        if len(g.runs[baseline]) < 2:
            several = [c for c in configs if c not in single]
            if several:
                skipped.append(f"[{base}] seed tests: skipped, the baseline has a single seed (configs with "
                               f"several: {', '.join(several)})")
        elif single:
            skipped.append(f"[{base}] seed tests: not possible for config(s) with a single seed: {', '.join(single)}")
        stats.correct_family(g.seeds, correction, alpha)
    # ---- Friedman + Nemenyi over all configs
    g.friedman = stats.friedman_nemenyi({c: g.mean[c] for c in configs}, alpha=alpha)
    if g.friedman.skipped:
        skipped.append(f"[{base}] Friedman / Nemenyi: skipped, {g.friedman.skipped}")
    if g.friedman.left_out and not g.friedman.skipped:
        skipped.append(f"[{base}] Friedman / Nemenyi: dataset(s) left out because some config has no score: "
                       f"{', '.join(g.friedman.left_out)}")
    return g


def _instance_tests(g: GroupReport, config: str, task: str, *, n_resamples: int, seed: int,
                    ci_method: str) -> list[stats.TestResult]:
    base = g.baseline

    def res(scope: str, **kw: Any) -> stats.TestResult:
        return stats.TestResult("instance", g.base_model, config, base, scope, **kw)

    sides = {}
    for label, c in (("config", config), ("baseline", base)):
        runs = [r for r in g.runs[c] if task in r.scores]
        if not runs:
            return [res(task, skipped=f"{c} has no result for {task}")]
        lacking = [r for r in runs if task not in r.instances]
        if lacking:
            names = ", ".join(f"{r.name} (seed {r.labels.seed})" for r in lacking)
            return [res(task, skipped=f"no per-instance scores (instances/{task}*.json) for {names}")]
        sides[label] = runs
    # one test per (split, subset) present in every run of both sides
    keys_per_run = [{(i.split, i.subset) for i in r.instances[task]} for r in sides["config"] + sides["baseline"]]
    common = set.intersection(*keys_per_run)
    every = set.union(*keys_per_run)
    out = []
    n_sub = len(common)
    for split, subset in sorted(every - common):
        out.append(res(f"{task} [{subset}]" if subset != "default" else task,
                       skipped=f"instances of split {split!r}, subset {subset!r} are missing for some runs"))
    for split, subset in sorted(common):
        def pick(r: Run) -> layout.InstanceScores:
            return next(i for i in r.instances[task] if (i.split, i.subset) == (split, subset))
        a = [pick(r) for r in sides["config"]]
        b = [pick(r) for r in sides["baseline"]]
        scope = _fmt_scope(task, a[0], n_sub)
        try:
            o = stats.paired_instance_test(a, b, n_resamples=n_resamples, ci_method=ci_method,
                                           rng=stats.rng_for(seed, g.base_model, config, scope))
        except stats.InstanceMismatch as err:
            out.append(res(scope, skipped=str(err)))
            continue
        note = o.note
        if not (math.isfinite(o.ci_low) and math.isfinite(o.ci_high)):
            note = (note + "; " if note else "") + "CI undefined (some resamples have no defined score)"
        out.append(res(scope, n=o.n, delta=o.delta, statistic=o.statistic, p_value=o.p_value,
                       ci_low=o.ci_low, ci_high=o.ci_high, note=note))
    return out


def _seed_tests(g: GroupReport) -> list[stats.TestResult]:
    base = g.baseline
    out: list[stats.TestResult] = []
    base_runs = g.runs[base]
    for c in g.configs:
        if c == base:
            continue
        runs = g.runs[c]
        if len(runs) < 2 or len(base_runs) < 2:
            continue  # summarised in one line by the caller

        res = functools.partial(stats.TestResult, "seeds", g.base_model, c, base)
        common = [t for t in g.tasks if all(t in r.scores for r in runs + base_runs)]
        if not common:
            out.append(res("overall", skipped="no task scored by every replicate of both"))
            continue
        a = [float(np.mean([r.scores[t] for t in common])) for r in runs]
        b = [float(np.mean([r.scores[t] for t in common])) for r in base_runs]
        out.append(_seed_result(res("overall", n=len(a) + len(b), note=f"mean over {len(common)} task(s)"), a, b))
        for t in g.tasks:
            aa = [r.scores[t] for r in runs if t in r.scores]
            bb = [r.scores[t] for r in base_runs if t in r.scores]
            r0 = res(t, n=len(aa) + len(bb))
            if len(aa) < 2 or len(bb) < 2:
                r0.skipped = f"fewer than 2 seeds with a score ({c}: {len(aa)}, {base}: {len(bb)})"
                out.append(r0)
                continue
            out.append(_seed_result(r0, aa, bb))
    return out


def _seed_result(r: stats.TestResult, a: list[float], b: list[float]) -> stats.TestResult:
    r.delta = float(np.mean(a) - np.mean(b))
    try:
        r.statistic, r.p_value = stats.seed_test(a, b)
    except ValueError as err:
        r.skipped = str(err)
    return r


# ====================================================================================== trials
def _read_trials_file(path: Path) -> list[layout.TrialRecord]:
    p = path / layout.TRIALS_FILE if path.is_dir() else path
    if not p.is_file():
        raise DataError(f"trials file {str(p)!r} does not exist")
    try:
        obj = json.loads(p.read_text())
        return [layout.TrialRecord.from_dict(t) for t in obj.get("trials", [])]
    except (json.JSONDecodeError, AttributeError, TypeError, ConfigError) as err:
        raise DataError(f"trials file {str(p)!r} is not a trials.json (layout.write_trials): {err}") from None


def best_per_cell(trials: list[layout.TrialRecord]) -> list[dict[str, Any]]:
    """Per grid cell: the trial with the highest validation metric (LoRA rank, LR, cost) and trial counts.

    Trials that ran to the end (TERMINATED) are preferred: an ASHA-stopped trial's metric was measured
    after fewer steps. Failed trials (ERROR) are never chosen."""
    cells: dict[str, list[layout.TrialRecord]] = defaultdict(list)
    for t in trials:
        cells[t.cell or f"{t.base_model}/{t.config}"].append(t)
    rows = []
    for cell in sorted(cells):
        ts = cells[cell]
        ok = [t for t in ts if t.val_metric is not None and t.status != "ERROR"
              and math.isfinite(float(t.val_metric))]
        done = [t for t in ok if t.status == "TERMINATED"]  # ASHA-stopped trials were measured earlier
        best = max(done or ok, key=lambda t: t.val_metric) if ok else None
        counts = defaultdict(int)
        for t in ts:
            counts[t.status] += 1
        rows.append({
            "cell": cell, "base_model": ts[0].base_model, "config": ts[0].config,
            "best_trial": best.trial_id if best else None,
            "lora_r": best.lora_r if best else None, "lr": best.lr if best else None,
            "val_metric": best.val_metric if best else None, "steps": best.steps if best else None,
            "trials": len(ts), "status": dict(sorted(counts.items())),
            "gpu_hours": float(sum(t.gpu_hours for t in ts)), "cpu_hours": float(sum(t.cpu_hours for t in ts)),
        })
    return rows


# ====================================================================================== build
def _no_progress(items, desc=""):
    return items


def _tqdm_progress(items, desc=""):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, file=sys.stderr, leave=False)


def build_report(
    results_root: str | Path,
    out_dir: str | Path | None = None,
    *,
    trials: str | Path | bool | None = None,
    baseline: str = layout.BASELINE_CONFIG,
    correction: str = "holm",
    alpha: float = 0.05,
    n_resamples: int = 10_000,
    seed: int = 0,
    ci_method: str = "percentile",
    min_datasets: int = stats.PAPER_MIN_DATASETS,
    split: str = "test",
    plots: bool = True,
    show_progress: bool = True,
) -> ReportSummary:
    """Read a results folder, run every test, write report.md, report.html, PNGs and summary.json.

    results_root: a sweep folder (with ``results/``) or a results folder. out_dir: default the sweep's
    ``report/`` (:data:`sweeps.layout.REPORT_DIR`) beside ``results/``, else ``<results_root>/report``.
    trials: a trials.json (or the folder holding one); None looks for one in the sweep folder; False: none.
    correction: ``holm`` (family-wise error) or ``bh`` (Benjamini-Hochberg false discovery rate), applied
    per base model within each family (Wilcoxon tests, per-dataset tests, seed tests) at level `alpha`.
    n_resamples: bootstrap resamples and permutations per dataset. min_datasets: the paper's rule (> 4).
    """
    if correction not in stats.CORRECTIONS:
        raise ConfigError(f"unknown correction {correction!r}: choose one of {', '.join(stats.CORRECTIONS)}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be >= 1, got {n_resamples}")
    if ci_method not in ("percentile", "BCa", "basic"):
        raise ConfigError(f"unknown ci_method {ci_method!r}: percentile, BCa or basic")
    trials_path: Path | None = None
    trials_note = ""
    trial_records: list[layout.TrialRecord] = []
    if trials not in (None, False, True):
        trials_path = Path(trials)  # type: ignore[arg-type]
        trial_records = _read_trials_file(trials_path)  # an explicit bad file fails here, before any work
    res = load_results(results_root, split=split)
    if trials is None and res.sweep_dir is not None and (res.sweep_dir / layout.TRIALS_FILE).is_file():
        trials_path = res.sweep_dir / layout.TRIALS_FILE
        try:
            trial_records = _read_trials_file(trials_path)
            trials_note = f"found beside the results: {trials_path}"
        except DataError as err:
            res.problems.append(f"{err} (ignored)")
            trials_path = None
    if out_dir is None:
        out_dir = (res.sweep_dir / layout.REPORT_DIR) if res.sweep_dir is not None else (res.root / layout.REPORT_DIR)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    progress = _tqdm_progress if show_progress else _no_progress
    refs = [r for r in res.runs if r.config.startswith(REFERENCE_PREFIX)]
    by_base: dict[str, list[Run]] = defaultdict(list)
    for r in res.runs:
        if r not in refs:
            by_base[r.base_model].append(r)
    groups = [_analyse_group(b, by_base[b], res.categories, baseline=baseline, correction=correction, alpha=alpha,
                             n_resamples=n_resamples, seed=seed, ci_method=ci_method, min_datasets=min_datasets,
                             progress=progress) for b in sorted(by_base, key=lambda b: (b == UNKNOWN_BASE, b))]
    summary = ReportSummary(res.root, out, {}, baseline, correction, alpha, n_resamples, groups, refs,
                            res.categories, res.category_source, res.problems, trials_path, trial_records,
                            best_per_cell(trial_records) if trial_records else [], trials_note)
    from . import report_render

    report_render.write_all(summary, plots=plots)
    layout.atomic_write_json(out / "summary.json", _finite_json(summary.to_dict()))
    summary.files["summary"] = out / "summary.json"
    return summary


def _finite_json(x: Any) -> Any:
    """NaN / inf -> None, so that summary.json is strict JSON (readable outside Python too)."""
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


# ====================================================================================== console
_ABBREV = [("PairClassification", "PairClf"), ("Classification", "Clf"), ("Retrieval", "Retr"),
           ("Clustering", "Clust"), ("Reranking", "Rerank"), ("Summarization", "Summ"), ("Benchmark", "B")]


def _abbrev(name: str, width: int = 12) -> str:
    for long, short in _ABBREV:
        name = name.replace(long, short)
    return name if len(name) <= width else name[: width - 1] + "~"


def _headers(names: list[str], width: int) -> tuple[list[str], list[str]]:
    """Column headers of at most `width` characters that tell the names apart, and a legend for the cut ones.

    A name that fits stays as is (after the usual abbreviations); names that had to be cut, or whose
    abbreviations collide, get a number and a legend line (``[1] = AmazonCounterfactualClassification``)."""
    short = [_abbrev(n, width) for n in names]
    clash = {h for h in short if short.count(h) > 1}
    need = [i for i, (n, h) in enumerate(zip(names, short)) if h.endswith("~") and h != n or h in clash]
    legend = []
    for k, i in enumerate(need, 1):
        tag = f"[{k}]"
        short[i] = _abbrev(names[i], width - len(tag)) + tag
        legend.append(f"{tag} = {names[i]}")
    return short, legend


def console_table(summary: ReportSummary, *, max_tasks: int = 8) -> str:
    """A compact plain-text table per base model: configs x tasks (when at most `max_tasks`) and categories,
    the baseline in absolute terms, other configs as differences to it; ``*`` marks a difference that is
    significant after correction (tasks: per-dataset permutation test; categories: the paper's Wilcoxon
    test); ``°`` a category that could not be tested (too few datasets)."""
    lines: list[str] = []
    corr = {"holm": "Holm", "bh": "Benjamini-Hochberg"}[summary.correction]
    for g in summary.groups:
        tasks = g.tasks if len(g.tasks) <= max_tasks else []
        cats = g.category_names
        task_heads, legend = _headers(tasks, 14)
        cols: list[tuple[str, str, str]] = [("task", t, h) for t, h in zip(tasks, task_heads)]
        cols += [("cat", c, _abbrev(f"{c}({len(g.tasks_of(c))})", 14)) for c in cats]
        cols += [("all", "", "mean")]
        if g.baseline_present:
            cols += [("wins", "", "datasets +/-")]
        if g.baseline_present:
            lines.append(f"== {g.base_model}: {g.baseline} absolute, other configs: difference to it "
                         f"(* significant after {corr} at {summary.alpha}; ° category not tested; datasets +/-: "
                         f"significantly better / worse in the per-dataset tests)")
        else:
            lines.append(f"== {g.base_model}: baseline {g.baseline} missing: absolute scores, no tests")
        labels = {c: (f"{c} (baseline)" if c == g.baseline else c) for c in g.configs}
        lw = max(len(x) for x in labels.values())
        table = []
        for c in g.configs:
            is_base = c == g.baseline or not g.baseline_present
            cells = []
            for kind, key, _ in cols:
                if kind == "task":
                    v = g.mean[c].get(key) if is_base else (
                        g.mean[c][key] - g.mean[g.baseline][key]
                        if key in g.mean[c] and key in g.mean[g.baseline] else None)
                    r = None if is_base else g.test("instance", c, key)
                elif kind == "cat":
                    v = g.category_value(c, key)[0]
                    r = None if is_base else g.test("wilcoxon", c, key)
                elif kind == "all":
                    v, r = g.overall_value(c)[0], None
                else:
                    up, down, n = g.dataset_wins(c)
                    cells.append("" if c == g.baseline else f"{up}+ {down}- /{n}")
                    continue
                cells.append(_cell(v, is_base, r))
            table.append((labels[c], cells))
        widths = [max(len(h), 8, *(len(row[1][i]) for row in table)) for i, (_, _, h) in enumerate(cols)]
        lines.append(" ".join([" " * lw] + [h.rjust(w) for (_, _, h), w in zip(cols, widths)]))
        for label, cells in table:
            lines.append(" ".join([label.ljust(lw)] + [x.rjust(w) for x, w in zip(cells, widths)]))
        lines += ["tasks: " + "; ".join(legend)] if legend else []
        if not tasks:
            lines.append(f"({len(g.tasks)} tasks: per-task differences and tests in the report)")
        if g.skipped:
            lines.append(f"{len(g.skipped)} comparison(s) skipped or caveated: see the report")
        lines.append("")
    if summary.references:
        lines.append("reference models: " + "; ".join(
            f"{r.config[len(REFERENCE_PREFIX):]} mean {np.mean(list(r.scores.values())):.4f}" for r in summary.references))
    lines.append(f"report: {summary.files.get('html', summary.out_dir)}")
    return "\n".join(lines)


def _cell(v: float | None, absolute: bool, r: stats.TestResult | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    s = f"{v:.4f}" if absolute else f"{v:+.4f}"
    if r is not None and r.significant:
        return s + "*"
    if r is not None and not r.tested:
        return s + "°"
    return s if absolute else s + " "


# ====================================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sweeps.report",
        description="Significance report of a sweep's results folder (report.md, report.html, PNGs).")
    ap.add_argument("results", help="sweep folder (with results/) or results folder (<model>/<revision>/...)")
    ap.add_argument("--trials", default=None, help="trials.json for score-vs-cost and best LoRA rank / LR per cell "
                                                   "(default: the sweep folder's, if any)")
    ap.add_argument("--no-trials", action="store_true", help="do not look for trials.json")
    ap.add_argument("--baseline", default=layout.BASELINE_CONFIG, help="config every test compares against")
    ap.add_argument("--out", default=None, help="output folder (default: the sweep's report/)")
    ap.add_argument("--correction", choices=sorted(stats.CORRECTIONS), default="holm")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples / permutations per dataset")
    ap.add_argument("--ci-method", choices=["percentile", "BCa", "basic"], default="percentile")
    ap.add_argument("--min-datasets", type=int, default=stats.PAPER_MIN_DATASETS,
                    help="Wilcoxon per category only with at least this many datasets (the paper: 5)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    try:
        summary = build_report(a.results, a.out, trials=False if a.no_trials else a.trials, baseline=a.baseline,
                               correction=a.correction, alpha=a.alpha, n_resamples=a.resamples, seed=a.seed,
                               ci_method=a.ci_method, min_datasets=a.min_datasets, split=a.split,
                               plots=not a.no_plots, show_progress=not a.quiet)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(console_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
