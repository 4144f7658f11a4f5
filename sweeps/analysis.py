"""The report's analysis: per base model, the designs' mean scores over replicates and every significance test
against the baseline (sweeps/stats.py), and the best trial per grid cell. Rendering is in report_render.py.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import layout, stats
from .results import Run

__all__ = ["GroupReport", "ReportSummary", "analyse_group", "best_per_cell"]


@dataclass
class GroupReport:
    """Everything the report says about one base model."""

    base_model: str
    baseline: str
    baseline_present: bool
    designs: list[str]                         # baseline first when present
    tasks: list[str]                           # ordered by category, then name
    categories: dict[str, str]                 # task -> category (this group's tasks)
    runs: dict[str, list[Run]]                 # design -> replicates, by seed
    mean: dict[str, dict[str, float]]          # design -> task -> mean over replicates
    sd: dict[str, dict[str, float]]            # design -> task -> sd over replicates (nan for 1)
    count: dict[str, dict[str, int]]           # design -> task -> replicates with a score
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

    def category_value(self, design: str, category: str) -> tuple[float | None, int, int]:
        """Baseline: mean score over its datasets in the category; other designs: mean difference to the
        baseline over the datasets both have (or the mean score when there is no baseline).
        Returns (value, datasets used, datasets in the category)."""
        ts = self.tasks_of(category)
        return self._avg(design, ts)

    def overall_value(self, design: str) -> tuple[float | None, int, int]:
        return self._avg(design, self.tasks)

    def _avg(self, design: str, ts: list[str]) -> tuple[float | None, int, int]:
        own = self.mean.get(design, {})
        if design == self.baseline or not self.baseline_present:
            vals = [own[t] for t in ts if t in own]
            return (float(np.mean(vals)) if vals else None), len(vals), len(ts)
        base = self.mean[self.baseline]
        both = [t for t in ts if t in own and t in base]
        return (float(np.mean([own[t] - base[t] for t in both])) if both else None), len(both), len(ts)

    def dataset_wins(self, design: str) -> tuple[int, int, int]:
        """(significantly better, significantly worse, tested) datasets of a design in the per-dataset tests."""
        rs = [r for r in self.instance if r.design == design and r.tested]
        up = sum(1 for r in rs if r.significant and (r.delta or 0) > 0)
        down = sum(1 for r in rs if r.significant and (r.delta or 0) < 0)
        return up, down, len(rs)

    def test(self, kind: str, design: str, scope: str) -> stats.TestResult | None:
        for r in getattr(self, kind):
            if r.design == design and r.scope == scope:
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
                "designs": g.designs, "tasks": g.tasks, "categories": g.categories,
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


def analyse_group(base: str, runs: list[Run], categories: dict[str, str], *, baseline: str, correction: str,
                   alpha: float, n_resamples: int, seed: int, ci_method: str, min_datasets: int,
                   progress) -> GroupReport:
    by_design: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_design[r.design].append(r)
    for c in by_design:
        by_design[c].sort(key=lambda r: (r.labels.seed, r.name))
    present = baseline in by_design
    designs = ([baseline] if present else []) + sorted(c for c in by_design if c != baseline)
    tasks = sorted({t for r in runs for t in r.scores}, key=lambda t: (categories[t], t))
    g = GroupReport(base, baseline, present, designs, tasks, {t: categories[t] for t in tasks},
                    {c: by_design[c] for c in designs}, {}, {}, {})
    _replicate_means(g, base)
    if not present:
        g.skipped.append(f"[{base}] baseline {baseline!r} is not among this base model's designs "
                         f"({', '.join(designs)}): every comparison against the baseline (Wilcoxon, per-dataset "
                         f"tests, seed tests, deltas) is skipped; scores are shown as absolute values")
    else:
        _wilcoxon(g, base, correction=correction, alpha=alpha, min_datasets=min_datasets)
        _per_dataset(g, base, correction=correction, alpha=alpha, n_resamples=n_resamples, seed=seed,
                     ci_method=ci_method, progress=progress)
        _seeds(g, base, correction=correction, alpha=alpha)
    # ---- Friedman + Nemenyi over all designs
    g.friedman = stats.friedman_nemenyi({c: g.mean[c] for c in designs}, alpha=alpha)
    if g.friedman.skipped:
        g.skipped.append(f"[{base}] Friedman / Nemenyi: skipped, {g.friedman.skipped}")
    if g.friedman.left_out and not g.friedman.skipped:
        g.skipped.append(f"[{base}] Friedman / Nemenyi: dataset(s) left out because some design has no score: "
                         f"{', '.join(g.friedman.left_out)}")
    return g


def _replicate_means(g: GroupReport, base: str) -> None:
    """Mean / sd / count over each design's replicates per task; replicates sharing a seed or missing a task."""
    skipped, tasks, designs = g.skipped, g.tasks, g.designs
    by_design = g.runs
    for c in designs:
        seeds = [r.labels.seed for r in by_design[c]]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            skipped.append(f"[{base}] {c}: several checkpoints share seed(s) {dup} (different trials?); "
                           f"all {len(seeds)} are averaged as replicates")
        g.mean[c], g.sd[c], g.count[c] = {}, {}, {}
        for t in tasks:
            vals = [r.scores[t] for r in by_design[c] if t in r.scores]
            if vals:
                g.mean[c][t] = float(np.mean(vals))
                g.sd[c][t] = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
                g.count[c][t] = len(vals)
            if len(vals) < len(by_design[c]):
                missing = [f"{r.name} (seed {r.labels.seed})" for r in by_design[c] if t not in r.scores]
                skipped.append(f"[{base}] {c}: no result for {t} in {', '.join(missing)}"
                               + (f"; mean over the other {len(vals)} replicate(s)" if vals else
                                  "; every comparison of this design on this task is skipped"))


def _wilcoxon(g: GroupReport, base: str, *, correction: str, alpha: float, min_datasets: int) -> None:
    """The paper's Wilcoxon signed-rank test per category, corrected as one family."""
    skipped, designs, baseline = g.skipped, g.designs, g.baseline
    g.wilcoxon = stats.wilcoxon_by_category(
        {c: g.mean[c] for c in designs}, g.categories, baseline, base_model=base, min_datasets=min_datasets)
    for cat in g.category_names:
        rs = [r for r in g.wilcoxon if r.scope == cat]
        n_cat = len(g.tasks_of(cat))
        if rs and n_cat < min_datasets:  # too few datasets in the category itself
            skipped.append(f"[{base}] Wilcoxon, {cat}: not tested for any design: {n_cat} dataset(s) "
                           f"(the paper's test needs at least {min_datasets})")
        else:
            skipped.extend(f"[{base}] Wilcoxon {r.design} vs {baseline}, {cat}: skipped, {r.skipped}"
                           for r in rs if r.skipped)
    stats.correct_family(g.wilcoxon, correction, alpha)


def _per_dataset(g: GroupReport, base: str, *, correction: str, alpha: float, n_resamples: int, seed: int,
                 ci_method: str, progress) -> None:
    """Paired tests over the instances of each dataset, corrected as one family; warns when the permutations are
    too few for anything to be significant after the correction."""
    skipped, designs, tasks, baseline = g.skipped, g.designs, g.tasks, g.baseline
    jobs = [(c, t) for c in designs if c != baseline for t in tasks]
    g.instance.extend(_run_instance_tests(g, jobs, progress, n_resamples=n_resamples, seed=seed, ci_method=ci_method))
    for r in g.instance:
        if r.skipped:
            skipped.append(f"[{base}] per-dataset test {r.design} vs {baseline} on {r.scope}: skipped, {r.skipped}")
    stats.correct_family(g.instance, correction, alpha)
    m = sum(r.tested for r in g.instance)
    floor = 2.0 / (n_resamples + 1) * m  # smallest Holm/BH-adjusted p a permutation test can reach
    if m and floor > alpha:
        skipped.append(f"[{base}] per-dataset tests: with {n_resamples} permutations the smallest p-value is "
                       f"{2.0 / (n_resamples + 1):.1e}, which the correction over {m} tests lifts to "
                       f"{min(floor, 1):.3f} > alpha = {alpha}: nothing can be significant; use "
                       f"--resamples {int(math.ceil(20 * m / alpha / 1000) * 1000)} or more")


def _seeds(g: GroupReport, base: str, *, correction: str, alpha: float) -> None:
    """Welch's t-test of each design's per-seed scores against the baseline's, corrected as one family."""
    skipped, designs, baseline = g.skipped, g.designs, g.baseline
    g.seeds = _seed_tests(g)
    for r in g.seeds:
        if r.skipped:
            skipped.append(f"[{base}] seed test {r.design} vs {baseline} ({r.scope}): skipped, {r.skipped}")
    single = [c for c in designs if len(g.runs[c]) < 2]
    if len(g.runs[baseline]) < 2:
        several = [c for c in designs if c not in single]
        if several:
            skipped.append(f"[{base}] seed tests: skipped, the baseline has a single seed (designs with "
                           f"several: {', '.join(several)})")
    elif single:
        skipped.append(f"[{base}] seed tests: not possible for design(s) with a single seed: {', '.join(single)}")
    stats.correct_family(g.seeds, correction, alpha)


POOL_MIN_INSTANCES = 20_000  # per-dataset tests over fewer instances in all run serially (seconds)


def _test_workers() -> int:
    """Processes for the per-dataset tests: the CPUs this process may use (``EMBED_REPORT_WORKERS`` caps them)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, int(os.environ.get("EMBED_REPORT_WORKERS", n))))


def _run_instance_tests(g: GroupReport, jobs: list[tuple[str, str]], progress, **kw: Any) -> list[stats.TestResult]:
    """`_instance_tests` of every (design, task) in `jobs`, in order, in a pool of processes: a test of 10,000
    resamples over TwitterURLCorpus's pairs takes a minute of one core, and there are (designs - 1) x tasks of
    them. Each test draws from its own generator (`stats.rng_for` over its names), so the results are those of a
    serial run. A job carries only its two designs' runs, each with only its task's instances."""
    desc = f"per-dataset tests [{g.base_model}]"
    size = sum(len(i.ids) for _, t in jobs for r in g.runs[g.baseline] for i in r.instances.get(t, ()))
    workers = min(len(jobs), _test_workers()) if size >= POOL_MIN_INSTANCES else 1  # a pool starts in ~2 s
    if workers <= 1:
        return [r for c, t in progress(jobs, desc=desc) for r in _instance_tests(g, c, t, **kw)]
    # spawn: forking a process that holds Ray's gRPC threads can deadlock the child
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_instance_tests, _slim(g, c, t), c, t, **kw) for c, t in jobs]
        for _ in progress(_Completed(futures), desc=desc):  # the bar counts tests as they finish...
            pass
        return [r for f in futures for r in f.result()]  # ...the results keep the jobs' order


class _Completed:
    """Futures in the order they finish, with a length (a progress bar's total)."""

    def __init__(self, futures: list) -> None:
        self.futures = futures

    def __len__(self) -> int:
        return len(self.futures)

    def __iter__(self):
        return as_completed(self.futures)


def _slim(g: GroupReport, design: str, task: str) -> GroupReport:
    """`g` with only the runs of `design` and the baseline, each holding only `task`'s instances."""
    def only(r: Run) -> Run:
        return dataclasses.replace(r, instances={task: r.instances[task]} if task in r.instances else {})

    return dataclasses.replace(g, runs={c: [only(r) for r in g.runs[c]] for c in {design, g.baseline}})


def _instance_tests(g: GroupReport, design: str, task: str, *, n_resamples: int, seed: int,
                    ci_method: str) -> list[stats.TestResult]:
    base = g.baseline

    def res(scope: str, **kw: Any) -> stats.TestResult:
        return stats.TestResult("instance", g.base_model, design, base, scope, **kw)

    sides = {}
    for label, c in (("design", design), ("baseline", base)):
        runs = [r for r in g.runs[c] if task in r.scores]
        if not runs:
            return [res(task, skipped=f"{c} has no result for {task}")]
        lacking = [r for r in runs if task not in r.instances]
        if lacking:
            names = ", ".join(f"{r.name} (seed {r.labels.seed})" for r in lacking)
            return [res(task, skipped=f"no per-instance scores (instances/{task}*.json) for {names}")]
        sides[label] = runs
    # one test per (split, subset) present in every run of both sides
    keys_per_run = [{(i.split, i.subset) for i in r.instances[task]} for r in sides["design"] + sides["baseline"]]
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
        a = [pick(r) for r in sides["design"]]
        b = [pick(r) for r in sides["baseline"]]
        scope = _fmt_scope(task, a[0], n_sub)
        try:
            o = stats.paired_instance_test(a, b, n_resamples=n_resamples, ci_method=ci_method,
                                           rng=stats.rng_for(seed, g.base_model, design, scope))
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
    for c in g.designs:
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


def best_per_cell(trials: list[layout.TrialRecord]) -> list[dict[str, Any]]:
    """Per grid cell: the trial with the highest validation metric (LoRA rank, LR, cost) and trial counts.

    Trials that ran to the end (TERMINATED) are preferred: an ASHA-stopped trial's metric was measured
    after fewer steps. Failed trials (ERROR) are never chosen."""
    cells: dict[str, list[layout.TrialRecord]] = defaultdict(list)
    for t in trials:
        cells[t.cell or f"{t.base_model}/{t.design}"].append(t)
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
            "cell": cell, "base_model": ts[0].base_model, "design": ts[0].design,
            "best_trial": best.trial_id if best else None,
            "lora_r": best.lora_r if best else None, "lr": best.lr if best else None,
            "val_metric": best.val_metric if best else None, "steps": best.steps if best else None,
            "trials": len(ts), "status": dict(sorted(counts.items())),
            "gpu_hours": float(sum(t.gpu_hours for t in ts)), "cpu_hours": float(sum(t.cpu_hours for t in ts)),
        })
    return rows
