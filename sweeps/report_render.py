"""Rendering of the significance report: one list of blocks -> report.md and a self-contained report.html
(PNG plots embedded as base64 and also saved beside them). Plots use matplotlib's Agg canvas (no pyplot
state, no display needed)."""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .analysis import GroupReport, ReportSummary

__all__ = ["build_blocks", "plot_cd", "plot_cost", "plot_heatmap", "plot_seeds", "to_html", "to_markdown", "write_all"]

# ====================================================================================== blocks


@dataclass
class Cell:
    text: str
    cls: str = ""  # html class: pos / neg (significant), up / down (not significant), base, muted


@dataclass
class H:
    level: int
    text: str
    anchor: str = ""


@dataclass
class P:
    text: str
    cls: str = ""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""
    align_left: int = 1  # leading columns aligned left


@dataclass
class Img:
    path: Path
    alt: str
    caption: str = ""


@dataclass
class UL:
    items: list[str] = field(default_factory=list)


Block = H | P | Table | Img | UL


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def _f(x: float | None, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def _p(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def _delta_cell(v: float | None, r) -> Cell:
    """A difference to the baseline, '*' and coloured where significant after correction."""
    if v is None or not math.isfinite(v):
        return Cell("-", "muted")
    sig = r is not None and r.significant
    text = f"{v:+.4f}" + ("*" if sig else "")
    if r is not None and not r.tested:
        text += "°"
    cls = ("pos" if v > 0 else "neg") if sig else ("up" if v > 0 else "down" if v < 0 else "")
    return Cell(text, cls)


# ====================================================================================== plots
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(g: "GroupReport", path: Path) -> Path:
    """Scores (configs x tasks) and, with a baseline, the differences to it with significance stars."""
    tasks, configs = g.tasks, g.configs
    M = np.array([[g.mean[c].get(t, np.nan) for t in tasks] for c in configs], dtype=float)
    panels = 2 if g.baseline_present and len(configs) > 1 else 1
    w = min(max(3.0 + 0.85 * len(tasks), 7.0), 26)
    h_one = 0.9 + 0.42 * len(configs)
    fig = _figure(w, h_one * panels + 1.4)
    labels = [f"{t}\n({g.categories[t]})" for t in tasks]
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    ax = axes[0]
    im = ax.imshow(M, aspect="auto", cmap="viridis")
    annotate = len(tasks) <= 30  # beyond that the numbers no longer fit in the cells
    for i in range(M.shape[0] if annotate else 0):
        for j in range(M.shape[1]):
            if np.isfinite(M[i, j]):
                lum = im.cmap(im.norm(M[i, j]))
                color = "black" if (0.299 * lum[0] + 0.587 * lum[1] + 0.114 * lum[2]) > 0.5 else "white"
                ax.text(j, i, f"{M[i, j]:.3f}", ha="center", va="center", fontsize=7, color=color)
            else:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
    ax.set_yticks(range(len(configs)), configs, fontsize=8)
    ax.set_xticks(range(len(tasks)), labels if panels == 1 else [""] * len(tasks), fontsize=7, rotation=45,
                  ha="right")
    ax.set_title("main score (mean over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    if panels == 2:
        ax = axes[1]
        others = [c for c in configs if c != g.baseline]
        b = np.array([g.mean[g.baseline].get(t, np.nan) for t in tasks])
        D = np.array([[g.mean[c].get(t, np.nan) for t in tasks] for c in others]) - b[None, :]
        lim = np.nanmax(np.abs(D)) if np.isfinite(D).any() else 1.0
        im2 = ax.imshow(D, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim)
        for i, c in enumerate(others if annotate else []):
            for j, t in enumerate(tasks):
                if np.isfinite(D[i, j]):
                    r = g.test("instance", c, t)
                    star = "*" if r is not None and r.significant else ""
                    ax.text(j, i, f"{D[i, j]:+.3f}{star}", ha="center", va="center", fontsize=7,
                            color="white" if abs(D[i, j]) > 0.6 * lim else "black")
                else:
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
        ax.set_yticks(range(len(others)), others, fontsize=8)
        ax.set_xticks(range(len(tasks)), labels, fontsize=7, rotation=45, ha="right")
        ax.set_title(f"difference to {g.baseline} (* significant after correction)", fontsize=9)
        fig.colorbar(im2, ax=ax, fraction=0.025, pad=0.01)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_cd(g: "GroupReport", path: Path) -> Path | None:
    """Critical-difference diagram (average ranks; bars join configs the Nemenyi test cannot separate)."""
    import pandas as pd
    import scikit_posthocs as sp

    f = g.friedman
    if f is None or f.skipped or f.nemenyi is None:
        return None
    k = len(f.configs)
    fig = _figure(8.5, 1.2 + 0.32 * k)
    ax = fig.add_subplot(1, 1, 1)
    sp.critical_difference_diagram(pd.Series(f.avg_ranks), f.nemenyi, ax=ax, alpha=f.alpha,
                                   label_props={"fontsize": 8})
    ax.set_title(f"{g.base_model}: average rank over {len(f.datasets)} datasets (1 = best); "
                 f"Friedman p = {_p(f.p_value)}, Nemenyi CD = {_f(f.cd, '.2f')}", fontsize=9, pad=22)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_seeds(g: "GroupReport", path: Path) -> Path | None:
    """Per-seed mean score (over tasks every replicate of the group has) for each config."""
    if not any(len(rs) > 1 for rs in g.runs.values()):
        return None
    runs = [r for rs in g.runs.values() for r in rs]
    common = [t for t in g.tasks if all(t in r.scores for r in runs)]
    if not common:
        return None
    fig = _figure(7.5, 1.0 + 0.45 * len(g.configs))
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(g.configs):
        vals = [float(np.mean([r.scores[t] for t in common])) for r in g.runs[c]]
        jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(1)
        ax.scatter(vals, i + jitter, s=26, zorder=3, alpha=0.85, color="C0" if c == g.baseline else "C1")
        ax.plot([np.mean(vals)] * 2, [i - 0.3, i + 0.3], color="black", lw=1.5)
    ax.set_yticks(range(len(g.configs)), g.configs, fontsize=8)
    ax.set_xlabel(f"mean main score over {len(common)} task(s); dots = seeds, bar = mean", fontsize=8)
    ax.set_title(f"{g.base_model}: seeds", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_cost(summary: "ReportSummary", path: Path) -> tuple[Path | None, str]:
    """Score vs GPU-hours: every trial's validation metric (trials.json) and every evaluated checkpoint's
    mean MTEB score (run_labels.json). CPU-hours when no GPU-hours were recorded."""
    trials = summary.trials
    runs = [r for g in summary.groups for rs in g.runs.values() for r in rs]
    use_gpu = any(t.gpu_hours > 0 for t in trials) or any(r.labels.gpu_hours > 0 for r in runs)
    use_cpu = not use_gpu and (any(t.cpu_hours > 0 for t in trials) or any(r.labels.cpu_hours > 0 for r in runs))
    if not use_gpu and not use_cpu:
        return None, "no cost recorded (gpu_hours and cpu_hours are 0 in trials.json and run_labels.json)"
    unit = "GPU-hours" if use_gpu else "CPU-hours"

    def cost(x) -> float:
        return float(x.gpu_hours if use_gpu else x.cpu_hours)

    panels = 2 if trials else 1
    fig = _figure(6.0 * panels + 1.0, 5.2)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    configs = sorted({t.config for t in trials} | {r.config for r in runs})
    colors = {c: f"C{i % 10}" for i, c in enumerate(configs)}
    bases = sorted({t.base_model for t in trials} | {r.base_model for r in runs})
    markers = {b: m for b, m in zip(bases, "os^Dvp*hX" * 3)}
    if trials:
        ax = axes[0]
        n_err = sum(1 for t in trials if t.status == "ERROR" or t.val_metric is None)
        for t in trials:
            if t.val_metric is None or t.status == "ERROR":
                continue
            ax.scatter(cost(t), t.val_metric, color=colors[t.config], marker=markers.get(t.base_model, "o"),
                       s=30, alpha=0.9 if t.status == "TERMINATED" else 0.45,
                       edgecolors="black" if t.status == "TERMINATED" else "none")
        ax.set_xlabel(unit)
        ax.set_ylabel("validation metric (trainer)")
        ax.set_title(f"trials (filled edge: ran to the end; faded: stopped early; {n_err} failed, not shown)",
                     fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for g in summary.groups:
        for c, rs in g.runs.items():
            for r in rs:
                ts = [t for t in g.tasks if t in r.scores]
                if ts:
                    ax.scatter(cost(r.labels), np.mean([r.scores[t] for t in ts]), color=colors[c],
                               marker=markers.get(r.base_model, "o"), s=36, edgecolors="black")
    ax.set_xlabel(unit)
    ax.set_ylabel("mean MTEB main score (evaluated checkpoints)")
    ax.set_title("evaluated checkpoints", fontsize=8)
    ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[c], marker="o", ls="", label=c) for c in configs]
    handles += [Line2D([], [], color="grey", marker=markers[b], ls="", label=b) for b in bases if len(bases) > 1]
    ncol = min(len(handles), 3 * panels)
    fig.legend(handles=handles, loc="lower center", fontsize=7, frameon=False, ncol=ncol)
    rows = math.ceil(len(handles) / ncol)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 1))
    fig.savefig(path)
    return path, unit


# ====================================================================================== content
def _meta_items(s: "ReportSummary") -> list[str]:
    corr = {"holm": "Holm (family-wise error rate)", "bh": "Benjamini-Hochberg (false discovery rate)"}[s.correction]
    items = [
        f"results: `{s.results_root}`",
        f"generated: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"baseline: `{s.baseline}`; correction: {corr} at alpha = {s.alpha}, per base model and family",
        f"resamples: {s.n_resamples} bootstrap resamples and {s.n_resamples} permutations per dataset",
        f"base models: {', '.join(g.base_model for g in s.groups) or '-'}",
    ]
    if s.trials_path:
        items.append(f"trials: `{s.trials_path}`" + (f" ({s.trials_note})" if s.trials_note else ""))
    unknown = [t for t, c in s.categories.items() if c == "unknown"]
    if unknown:
        items.append(f"task(s) of unknown category (no task_type in the instances, unknown to mteb): "
                     f"{', '.join(unknown)}")
    return items


def _group_blocks(s: "ReportSummary", g: "GroupReport", images: dict[str, Path]) -> list[Block]:
    b: list[Block] = [H(2, f"Base model: {g.base_model}", _slug("base-" + g.base_model))]
    corr = "Holm" if s.correction == "holm" else "Benjamini-Hochberg"
    # ---- configs
    rows = []
    for c in g.configs:
        rs = g.runs[c]
        lr = sorted({r.labels.lora_r for r in rs if r.labels.lora_r is not None})
        lrs = sorted({r.labels.lr for r in rs if r.labels.lr is not None})
        rows.append([c + (" (baseline)" if c == g.baseline else ""), len(rs),
                     ", ".join(str(r.labels.seed) for r in rs),
                     ", ".join(map(str, lr)) or "-", ", ".join(f"{x:g}" for x in lrs) or "-",
                     _f(sum(r.labels.gpu_hours for r in rs), ".2f"), _f(sum(r.labels.cpu_hours for r in rs), ".3f"),
                     f"{sum(1 for t in g.tasks if t in g.mean[c])}/{len(g.tasks)}"])
    b.append(Table(["config", "checkpoints", "seed(s)", "LoRA r", "LR", "GPU-h", "CPU-h", "tasks"], rows,
                   "Checkpoints compared (replicates = same base model and config, different seeds)."))
    if not g.baseline_present:
        b.append(P(f"The baseline `{g.baseline}` is not among this base model's configs: scores are absolute "
                   f"and no comparison against a baseline was made (see Skipped).", "warn"))
    # ---- paper-style table
    cats = g.category_names
    b.append(H(3, "Per category (the paper's table)"))
    rows = []
    for c in g.configs:
        is_base = c == g.baseline or not g.baseline_present
        row: list[Any] = [c + (" (baseline)" if c == g.baseline else "")]
        for cat in cats + ["__all__"]:
            v, used, total = (g.overall_value(c) if cat == "__all__" else g.category_value(c, cat))
            if is_base:
                cell = Cell(_f(v), "base")
            else:
                cell = _delta_cell(v, None if cat == "__all__" else g.test("wilcoxon", c, cat))
            if used < total and v is not None:
                cell.text += f" ({used}/{total})"
            row.append(cell)
        if g.baseline_present:
            up, down, n = g.dataset_wins(c)
            row.append("" if c == g.baseline else f"{up} better, {down} worse of {n}")
        rows.append(row)
    heads = ["config"] + [f"{cat} ({len(g.tasks_of(cat))})" for cat in cats] + ["average"]
    if g.baseline_present:
        heads.append("per-dataset tests")
    cap = ("Mean main score per category (number of datasets in brackets). "
           + (f"Baseline in absolute terms, other configs as the mean difference to it over the datasets both "
              f"have. * = the paper's Wilcoxon signed-rank test over the category's datasets is significant "
              f"after {corr} correction; ° = not tested (the category has fewer than 5 datasets, see below). "
              f"(k/n) = difference over k of the category's n datasets. Last column: datasets where the "
              f"per-dataset test finds the config significantly better / worse (after correction)."
              if g.baseline_present else "Absolute scores (no baseline)."))
    b.append(Table(heads, rows, cap))
    # ---- per-task table (tasks as rows: there are usually more tasks than configs)
    b.append(H(3, "Per task"))
    rows = []
    for t in g.tasks:
        row: list[Any] = [g.categories[t], t]
        for c in g.configs:
            if c == g.baseline or not g.baseline_present:
                v = g.mean[c].get(t)
                sd = g.sd[c].get(t, math.nan)
                row.append(Cell(_f(v) + (f" ± {sd:.4f}" if sd is not None and math.isfinite(sd) else ""), "base"))
            else:
                v = (g.mean[c][t] - g.mean[g.baseline][t]) if t in g.mean[c] and t in g.mean[g.baseline] else None
                row.append(_delta_cell(v, g.test("instance", c, t)))
        rows.append(row)
    heads = ["category", "task"] + [c + (" (baseline)" if c == g.baseline else "") for c in g.configs]
    b.append(Table(heads, rows,
                   ("Main score per task, mean over seeds (± sd across seeds where there are several). "
                    + (f"Other configs: difference to the baseline; * = the per-dataset paired permutation test "
                       f"over instances is significant after {corr} correction; ° = not tested (see Skipped)."
                       if g.baseline_present else "")), align_left=2))
    if "heatmap" in images:
        b.append(Img(images["heatmap"], f"heatmap {g.base_model}",
                     "Heatmap of the scores (top) and of the differences to the baseline (bottom)."
                     if g.baseline_present and len(g.configs) > 1 else "Heatmap of the scores."))
    if g.baseline_present:
        # ---- Wilcoxon details
        b.append(H(3, "The paper's test: Wilcoxon signed-rank per category"))
        untestable = [cat for cat in cats
                      if all(r.skipped and r.n == len(g.tasks_of(cat)) for r in g.wilcoxon if r.scope == cat)]
        rows = []
        for r in g.wilcoxon:
            if r.scope in untestable:
                continue
            rows.append([r.config, r.scope, r.n, _delta_cell(r.delta, r), _f(r.statistic, ".1f"), _p(r.p_value),
                         _p(r.p_adjusted), _sig(r), r.skipped or r.note])
        if rows:
            b.append(Table(["config", "category", "datasets", "mean Δ", "W", "p", f"p ({corr})", "significant",
                            "note"], rows,
                           "Paired over the category's datasets (config vs baseline, mean over seeds), two-sided, "
                           "exact for small n. Applied only where a category has at least 5 datasets, as in the "
                           "paper; with exactly 5 datasets the smallest possible two-sided p is 0.0625, so 6 or "
                           "more are needed to reach 0.05."))
        if untestable:
            b.append(P("Not tested, too few datasets for the paper's test: "
                       + ", ".join(f"{cat} ({len(g.tasks_of(cat))})" for cat in untestable)
                       + ". See the per-dataset tests below for these categories.", "warn"))
        # ---- per-dataset tests
        b.append(H(3, "Per-dataset tests over instances"))
        rows = []
        for r in g.instance:
            ci = f"[{_f(r.ci_low)}, {_f(r.ci_high)}]" if r.tested else "-"
            rows.append([r.config, r.scope, r.n or "-", _delta_cell(r.delta, r), ci, _p(r.p_value), _p(r.p_adjusted),
                         _sig(r), r.skipped or r.note])
        b.append(Table(["config", "dataset", "instances", "Δ", "95% CI (bootstrap)", "p (permutation)",
                        f"p ({corr})", "significant", "note"], rows,
                       f"Paired over the dataset's instances (queries, pairs, examples) matched by id. CI: paired "
                       f"bootstrap percentile interval of the difference ({s.n_resamples} resamples, not adjusted "
                       f"for multiplicity). p: paired permutation test ({s.n_resamples} random swaps of the two "
                       f"models per instance, exact when 2^n is smaller), adjusted across all datasets and configs "
                       f"of this base model."))
    # ---- Friedman / Nemenyi
    f = g.friedman
    b.append(H(3, "All configs: Friedman test, Nemenyi post-hoc, critical difference"))
    if f is None or f.skipped:
        b.append(P(f"Not computed: {f.skipped if f else 'no data'}.", "warn"))
    else:
        b.append(P(f"Friedman chi² = {f.statistic:.3f}, p = {_p(f.p_value)} over {len(f.datasets)} datasets and "
                   f"{len(f.configs)} configs"
                   + (f" ({', '.join(f.left_out)} left out: not scored by every config)" if f.left_out else "")
                   + f". Nemenyi critical difference at alpha = {f.alpha}: CD = {f.cd:.3f} (average ranks further "
                   f"apart than CD differ significantly). Datasets of all categories count alike here."))
        order = sorted(f.avg_ranks, key=f.avg_ranks.get)
        rows = [[c, _f(f.avg_ranks[c], ".2f")] + [_p(float(f.nemenyi.loc[c, d])) if c != d else "" for d in order]
                for c in order]
        b.append(Table(["config", "average rank"] + [f"p vs {d}" for d in order], rows,
                       "Average rank (1 = best) and Nemenyi post-hoc p-values (already adjusted for all pairs)."))
        if "cd" in images:
            b.append(Img(images["cd"], f"critical difference diagram {g.base_model}",
                         "Critical-difference diagram: configs joined by a bar are not significantly different "
                         "(Nemenyi)."))
    # ---- seeds
    multi = [c for c in g.configs if len(g.runs[c]) > 1]
    b.append(H(3, "Seeds"))
    if not multi:
        b.append(P("Every config ran with a single seed: no spread across seeds to report or test."))
    else:
        rows = []
        runs = [r for rs in g.runs.values() for r in rs]
        common = [t for t in g.tasks if all(t in r.scores for r in runs)]
        for c in g.configs:
            rs = g.runs[c]
            per_seed = [float(np.mean([r.scores[t] for t in common])) for r in rs] if common else []
            sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan
            rng = (max(per_seed) - min(per_seed)) if len(per_seed) > 1 else math.nan
            med_task_sd = np.nanmedian([g.sd[c].get(t, math.nan) for t in g.tasks]) if len(rs) > 1 else math.nan
            rows.append([c, len(rs), _f(float(np.mean(per_seed)) if per_seed else None),
                         _f(sd), _f(rng), _f(float(med_task_sd))])
        b.append(Table(["config", "seeds", f"mean over {len(common)} common task(s)", "sd across seeds",
                        "range", "median per-task sd"], rows,
                       "Spread across seeds (replicates). sd uses n - 1."))
        if g.seeds:
            rows = [[r.config, r.scope, r.n, _delta_cell(r.delta, r), _f(r.statistic, ".2f"), _p(r.p_value),
                     _p(r.p_adjusted), _sig(r), r.skipped or r.note] for r in g.seeds]
            b.append(Table(["config", "scope", "runs", "Δ", "t", "p", f"p ({corr})", "significant", "note"], rows,
                           "Welch's t-test of the config's per-seed scores against the baseline's (unpaired, unequal "
                           "variances). With 2-3 seeds per side it only detects differences that are large "
                           "compared with the seed spread."))
        if "seeds" in images:
            b.append(Img(images["seeds"], f"seeds {g.base_model}", "Per-seed mean score of each config."))
    return b


def _sig(r) -> Cell:
    if not r.tested:
        return Cell("not tested", "muted")
    return Cell("yes", "pos" if (r.delta or 0) > 0 else "neg") if r.significant else Cell("no")


def _methods() -> list[Block]:
    return [
        H(2, "Methods and caveats", "methods"),
        UL([
            "Scores: mteb's main score per task (mean over subsets of the test split), averaged over the "
            "replicates (seeds) of each (base model, config). Configs are compared within a base model only.",
            "Wilcoxon (the paper): two-sided signed-rank test of config vs baseline over a category's datasets "
            "(scipy.stats.wilcoxon, zero differences dropped), only with at least 5 datasets in the category. "
            "It tests whether a config wins across datasets, not on any one dataset; with 5 datasets the "
            "smallest attainable p is 0.0625.",
            "Per-dataset tests: instances (queries, sentence pairs, examples; for clustering, mteb's experiments) "
            "paired by id. Paired bootstrap (scipy.stats.bootstrap, percentile) for the CI of the difference; "
            "paired permutation test (each instance's two models swapped with probability 1/2) for the p-value. "
            "For correlation scores (Spearman, Pearson) and average precision the score is a property of the "
            "whole set, so instances are resampled / swapped and the score is recomputed each time; before "
            "swapping, predictions are put on a common scale that leaves the score unchanged (ranks for "
            "Spearman and average precision, z-scores for Pearson). Replicates: the bootstrap averages all "
            "replicates of each side; the permutation test pairs replicates in seed order. Instances are "
            "assumed independent (true for queries and pairs; classification examples share mteb's "
            "training subsamples).",
            "Multiple comparisons: Holm (default; controls the family-wise error rate) or Benjamini-Hochberg "
            "(controls the false discovery rate), applied separately to each family of a base model: the "
            "Wilcoxon tests, the per-dataset tests and the seed tests. Bootstrap CIs are not adjusted.",
            "Friedman test over datasets x configs (datasets scored by every config) with the Nemenyi post-hoc "
            "(scikit-posthocs) and Demšar's critical difference CD = q_alpha sqrt(k(k+1)/(6N)). It ranks configs "
            "within each dataset, so a small but consistent win counts as much as a large one; with few datasets "
            "it has little power.",
            "Seeds: mean ± sd across seeds; Welch's t-test of per-seed scores (overall and per task). With 2-3 "
            "seeds these tests have little power; a difference smaller than the seed spread is not a finding.",
            "A per-dataset test says whether the difference on that dataset's instances is larger than instance "
            "sampling noise; it does not account for training randomness (use seeds for that).",
        ]),
    ]


def build_blocks(s: "ReportSummary", images: dict[str, Any], cost_note: str) -> list[Block]:
    blocks: list[Block] = [H(1, "Sweep significance report"), UL(_meta_items(s))]
    n_skip = len(s.skipped)
    if n_skip or s.problems:
        blocks.append(P(f"{n_skip} comparison(s) skipped or caveated and {len(s.problems)} file problem(s): "
                        f"see [Skipped comparisons and data problems](#skipped).", "warn"))
    for g in s.groups:
        blocks.extend(_group_blocks(s, g, images.get(g.base_model, {})))
    if s.references:
        blocks.append(H(2, "Reference models"))
        tasks = sorted({t for r in s.references for t in r.scores})
        rows = [[r.config[len("reference:"):] or r.config, r.name] + [_f(r.scores.get(t)) for t in tasks]
                for r in s.references]
        blocks.append(Table(["model", "result folder"] + tasks, rows,
                            "Reference encoders (config `reference:*`): absolute scores, not tested."))
    blocks.append(H(2, "Sweep: score vs cost, best LoRA rank / LR per cell", "sweep"))
    if "__cost__" in images:
        blocks.append(Img(images["__cost__"], "score vs cost",
                          f"Left: every trial's validation metric vs {cost_note}; right: mean MTEB score of each "
                          f"evaluated checkpoint vs {cost_note}." if s.trials else
                          f"Mean MTEB score of each evaluated checkpoint vs {cost_note} (no trials.json)."))
    elif cost_note:
        blocks.append(P(f"No score-vs-cost plot: {cost_note}."))
    if s.best_per_cell:
        rows = []
        for c in s.best_per_cell:
            st = ", ".join(f"{k} {v}" for k, v in c["status"].items())
            rows.append([c["cell"], c["config"], c["best_trial"] or "-", c["lora_r"] if c["lora_r"] is not None else "-",
                         f"{c['lr']:g}" if c["lr"] is not None else "-", _f(c["val_metric"]),
                         c["steps"] if c["steps"] is not None else "-", c["trials"], st, _f(c["gpu_hours"], ".2f")])
        blocks.append(Table(["cell", "config", "best trial", "LoRA r", "LR", "val metric", "steps", "trials",
                             "status", "GPU-h (all trials)"], rows,
                            "Best trial per grid cell = highest validation metric among the trials that ran to the end (among "
                            "early-stopped ones only when none did; failed trials never)."))
    else:
        blocks.append(P("No trials.json: pass `--trials PATH` (or run on the sweep folder) for the sweep's "
                        "best LoRA rank / LR per cell and the per-trial cost plot."))
    blocks.append(H(2, "Skipped comparisons and data problems", "skipped"))
    if s.skipped:
        blocks.append(P("Comparisons not made (or made on less data), and why:"))
        blocks.append(UL(list(s.skipped)))
    else:
        blocks.append(P("None: every comparison was made."))
    if s.problems:
        blocks.append(P("Files that could not be used as they are:"))
        blocks.append(UL(list(s.problems)))
    blocks.extend(_methods())
    return blocks


# ====================================================================================== markdown / html
def _md_cell(x: Any) -> str:
    t = x.text if isinstance(x, Cell) else str(x)
    return t.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, H):
            if b.anchor:
                out.append(f'<a id="{b.anchor}"></a>\n')
            out.append("#" * b.level + " " + b.text + "\n")
        elif isinstance(b, P):
            out.append(b.text + "\n")
        elif isinstance(b, UL):
            out.append("\n".join(f"- {i}" for i in b.items) + "\n")
        elif isinstance(b, Img):
            out.append(f"![{b.alt}]({b.path.relative_to(out_dir).as_posix()})\n" + (f"\n*{b.caption}*\n" if b.caption else ""))
        elif isinstance(b, Table):
            if b.caption:
                out.append(b.caption + "\n")
            if not b.rows:
                out.append("(none)\n")
                continue
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join(":---" if i < b.align_left else "---:" for i in range(len(b.headers))) + "|")
            for r in b.rows:
                out.append("| " + " | ".join(_md_cell(x) for x in r) + " |")
            out.append("")
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1400px;padding:0 16px;color:#1f2328;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:6px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{margin-top:26px}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #d0d7de;padding:3px 8px;white-space:nowrap}th{background:#f6f8fa;white-space:normal;max-width:190px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.pos{color:#116329;font-weight:600;background:#dafbe1}td.neg{color:#a40e26;font-weight:600;background:#ffebe9}
td.up{color:#1a7f37}td.down{color:#cf222e}td.base{font-weight:600}td.muted{color:#8c959f}
.caption{font-size:12.5px;color:#57606a;margin:2px 0 10px;max-width:1100px}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;border-radius:6px}
img{max-width:100%;border:1px solid #d0d7de;border-radius:4px;margin-top:6px}
code{background:#f6f8fa;padding:1px 4px;border-radius:4px;font-size:90%}
li{margin:2px 0}
"""


def _html_inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\[([^\]]+)\]\(#([A-Za-z0-9_-]+)\)", r'<a href="#\2">\1</a>', t)
    return t


def _is_num(t: str) -> bool:
    return bool(re.match(r"^[-+]?[\d.]+(e[-+]?\d+)?([*°]|\s|±|\(|\)|/|\d|\.)*$", t.strip())) if t.strip() else False


def to_html(blocks: list[Block], title: str = "Sweep significance report") -> str:
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, H):
            aid = f' id="{b.anchor}"' if b.anchor else ""
            out.append(f"<h{b.level}{aid}>{_html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, P):
            cls = f' class="{b.cls}"' if b.cls else ""
            out.append(f"<p{cls}>{_html_inline(b.text)}</p>")
        elif isinstance(b, UL):
            out.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Img):
            data = base64.b64encode(b.path.read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(b.alt)}' src='data:image/png;base64,{data}'>"
                       + (f"<figcaption class='caption'>{_html_inline(b.caption)}</figcaption>" if b.caption else "")
                       + "</figure>")
        elif isinstance(b, Table):
            if not b.rows:
                out.append(f"<p class='caption'>{_html_inline(b.caption)} (none)</p>")
                continue
            rows = ["<tr>" + "".join(f"<th>{_html_inline(str(h)).replace('+', '+&#8203;')}</th>"
                                     for h in b.headers) + "</tr>"]
            for r in b.rows:
                tds = []
                for i, x in enumerate(r):
                    text = x.text if isinstance(x, Cell) else str(x)
                    cls = [x.cls] if isinstance(x, Cell) and x.cls else []
                    if i >= b.align_left and _is_num(text):
                        cls.append("num")
                    c = f' class="{" ".join(cls)}"' if cls else ""
                    tds.append(f"<td{c}>{_html_inline(text)}</td>")
                rows.append("<tr>" + "".join(tds) + "</tr>")
            out.append("<table>" + "".join(rows) + "</table>")
            if b.caption:
                out.append(f"<p class='caption'>{_html_inline(b.caption)}</p>")
    out.append("</body></html>")
    return "\n".join(out)


# ====================================================================================== write
def write_all(s: "ReportSummary", *, plots: bool = True) -> None:
    """Write the PNGs, report.md and report.html into ``s.out_dir`` and record them in ``s.files``."""
    out = s.out_dir
    images: dict[str, Any] = {}
    cost_note = ""
    if plots:
        for g in s.groups:
            slug = _slug(g.base_model)
            gi: dict[str, Path] = {}
            if g.tasks and g.configs:
                gi["heatmap"] = plot_heatmap(g, out / f"heatmap_{slug}.png")
            p = plot_cd(g, out / f"cd_{slug}.png")
            if p:
                gi["cd"] = p
            p = plot_seeds(g, out / f"seeds_{slug}.png")
            if p:
                gi["seeds"] = p
            images[g.base_model] = gi
            for k, v in gi.items():
                s.files[f"{k}:{g.base_model}"] = v
        p, cost_note = plot_cost(s, out / "score_vs_cost.png")
        if p:
            images["__cost__"] = p
            s.files["cost"] = p
    blocks = build_blocks(s, images, cost_note)
    md = out / "report.md"
    md.write_text(to_markdown(blocks, out))
    h = out / "report.html"
    h.write_text(to_html(blocks))
    s.files["markdown"] = md
    s.files["html"] = h


