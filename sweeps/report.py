"""The sweep's significance report: a results folder in, report.md + report.html + PNGs out.

    python -m sweeps.report RESULTS_DIR [--trials trials.json] [--baseline eos_last+causal] [--out DIR]
                              [--correction holm|bh] [--alpha 0.05] [--resamples 10000]

RESULTS_DIR is the sweep folder (holding ``results/``, and ``trials.json`` which is then used too) or the
``results/`` folder itself: ``<model>/<revision>/<Task>.json`` (mteb TaskResult JSON), ``run_labels.json``
and ``instances/*.json`` per checkpoint (:mod:`sweeps.layout`). No Ray is needed.

Designs are compared within a base model; checkpoints with the same (base_model, design) are
replicates (seeds) and are averaged. What is tested is in :mod:`sweeps.stats`. Whatever cannot be
compared (a task missing for a design, instance ids that do not match, too few datasets in a category, no
baseline) is listed in the report with the reason, and everything else still renders.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from embed_core.errors import ConfigError, DataError

from . import layout, report_render, stats
from .analysis import GroupReport, ReportSummary, analyse_group, best_per_cell
from .results import REFERENCE_PREFIX, UNKNOWN_BASE, Run, load_results

__all__ = ["build_report", "console_table", "main"]



# ====================================================================================== build
def _no_progress(items, desc=""):
    return items


def _tqdm_progress(items, desc=""):

    return tqdm(items, desc=desc, file=sys.stderr, leave=False)


def build_report(
    results_root: str | Path,
    out_dir: str | Path | None = None,
    *,
    trials: str | Path | bool | None = None,
    baseline: str = layout.BASELINE_DESIGN,
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
    _check_options(correction, alpha, n_resamples, ci_method)
    trials_path: Path | None = None
    trials_note = ""
    trial_records: list[layout.TrialRecord] = []
    if trials not in (None, False, True):
        trials_path = Path(trials)  # type: ignore[arg-type]
        trial_records = layout.read_trials(trials_path)  # an explicit bad file fails here, before any work
    res = load_results(results_root, split=split)
    if trials is None and res.sweep_dir is not None and (res.sweep_dir / layout.TRIALS_FILE).is_file():
        trials_path = res.sweep_dir / layout.TRIALS_FILE
        try:
            trial_records = layout.read_trials(trials_path)
            trials_note = f"found beside the results: {trials_path}"
        except DataError as err:
            res.problems.append(f"{err} (ignored)")
            trials_path = None
    if out_dir is None:
        out_dir = (res.sweep_dir / layout.REPORT_DIR) if res.sweep_dir is not None else (res.root / layout.REPORT_DIR)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    groups, refs = _groups(res, baseline=baseline, correction=correction, alpha=alpha, n_resamples=n_resamples,
                           seed=seed, ci_method=ci_method, min_datasets=min_datasets,
                           progress=_tqdm_progress if show_progress else _no_progress)
    summary = ReportSummary(res.root, out, {}, baseline, correction, alpha, n_resamples, groups, refs,
                            res.categories, res.category_source, res.problems, trials_path, trial_records,
                            best_per_cell(trial_records) if trial_records else [], trials_note)
    report_render.write_all(summary, plots=plots)
    layout.atomic_write_json(out / layout.SUMMARY_FILE, _finite_json(summary.to_dict()))
    summary.files["summary"] = out / layout.SUMMARY_FILE
    return summary


def _groups(res, **analysis: Any) -> tuple[list[GroupReport], list[Run]]:
    """The analysis of each base model (an unknown base model last) and the reference encoders' runs, which are
    shown as absolute scores and tested against nothing."""
    refs = [r for r in res.runs if r.design.startswith(REFERENCE_PREFIX)]
    by_base: dict[str, list[Run]] = defaultdict(list)
    for r in res.runs:
        if r not in refs:
            by_base[r.base_model].append(r)
    order = sorted(by_base, key=lambda b: (b == UNKNOWN_BASE, b))
    return [analyse_group(b, by_base[b], res.categories, **analysis) for b in order], refs


def _check_options(correction: str, alpha: float, n_resamples: int, ci_method: str) -> None:
    if correction not in stats.CORRECTIONS:
        raise ConfigError(f"unknown correction {correction!r}: choose one of {', '.join(stats.CORRECTIONS)}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be >= 1, got {n_resamples}")
    if ci_method not in ("percentile", "BCa", "basic"):
        raise ConfigError(f"unknown ci_method {ci_method!r}: percentile, BCa or basic")


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
    """A compact plain-text table per base model: designs x tasks (when at most `max_tasks`) and categories,
    the baseline in absolute terms, other designs as differences to it; ``*`` marks a difference that is
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
            lines.append(f"== {g.base_model}: {g.baseline} absolute, other designs: difference to it "
                         f"(* significant after {corr} at {summary.alpha}; ° category not tested; datasets +/-: "
                         f"significantly better / worse in the per-dataset tests)")
        else:
            lines.append(f"== {g.base_model}: baseline {g.baseline} missing: absolute scores, no tests")
        labels = {c: (f"{c} (baseline)" if c == g.baseline else c) for c in g.designs}
        lw = max(len(x) for x in labels.values())
        table = []
        for c in g.designs:
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
            f"{r.design[len(REFERENCE_PREFIX):]} mean {np.mean(list(r.scores.values())):.4f}" for r in summary.references))
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
def print_report(results_root: str | Path, **settings: Any) -> int:
    """`python -m sweeps report` with settings of its own: the report of a folder, its console table printed;
    exit status 2 with the reason when the folder cannot be read."""
    try:
        summary = build_report(results_root, **settings)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(console_table(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeps.report ARGS``: ``python -m sweeps report ARGS``."""
    from .cli import main as cli_main  # the CLI imports this module's neighbours: at call time only

    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
