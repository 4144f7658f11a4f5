"""Rendering of the significance report: what it says (one list of blocks, report_blocks.py) for the summary and
each base model, written as report.md and a self-contained report.html with the PNG plots (report_plots.py)
embedded and saved beside them."""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .report_blocks import (Block, BulletList, Heading, Image, Paragraph, Table, TableCell, delta_cell, num, pval, slug,
                            to_html, to_markdown)
from .report_plots import plot_cd, plot_cost, plot_heatmap, plot_seeds

if TYPE_CHECKING:
    from .analysis import GroupReport, ReportSummary

__all__ = ["build_blocks", "write_all"]

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
    """Everything the report says about one base model, section by section."""
    b: list[Block] = [Heading(2, f"Base model: {g.base_model}", slug("base-" + g.base_model))]
    corr = "Holm" if s.correction == "holm" else "Benjamini-Hochberg"
    sections = [_designs_blocks, _category_blocks, _task_blocks]
    if g.baseline_present:
        sections += [_wilcoxon_blocks, _instance_test_blocks]
    for section in sections + [_friedman_blocks, _seed_blocks]:
        b += section(s, g, images, corr)
    return b


def _designs_blocks(s: "ReportSummary", g: "GroupReport", images: dict[str, Path], corr: str) -> list[Block]:
    """The checkpoints compared: one row per design."""
    b: list[Block] = []
    rows = []
    for c in g.designs:
        rs = g.runs[c]
        lr = sorted({r.labels.lora_r for r in rs if r.labels.lora_r is not None})
        lrs = sorted({r.labels.lr for r in rs if r.labels.lr is not None})
        rows.append([c + (" (baseline)" if c == g.baseline else ""), len(rs),
                     ", ".join(str(r.labels.seed) for r in rs),
                     ", ".join(map(str, lr)) or "-", ", ".join(f"{x:g}" for x in lrs) or "-",
                     num(sum(r.labels.gpu_hours for r in rs), ".2f"), num(sum(r.labels.cpu_hours for r in rs), ".3f"),
                     f"{sum(1 for t in g.tasks if t in g.mean[c])}/{len(g.tasks)}"])
    b.append(Table(["design", "checkpoints", "seed(s)", "LoRA r", "LR", "GPU-h", "CPU-h", "tasks"], rows,
                   "Checkpoints compared (replicates = same base model and design, different seeds)."))
    if not g.baseline_present:
        b.append(Paragraph(f"The baseline `{g.baseline}` is not among this base model's designs: scores are absolute "
                   f"and no comparison against a baseline was made (see Skipped).", "warn"))
    return b


def _category_blocks(s: "ReportSummary", g: "GroupReport", images: dict[str, Path], corr: str) -> list[Block]:
    """The paper's table: mean score (difference to the baseline) per category."""
    b: list[Block] = []
    cats = g.category_names
    b.append(Heading(3, "Per category (the paper's table)"))
    rows = []
    for c in g.designs:
        is_base = c == g.baseline or not g.baseline_present
        row: list[Any] = [c + (" (baseline)" if c == g.baseline else "")]
        for cat in cats + ["__all__"]:
            v, used, total = (g.overall_value(c) if cat == "__all__" else g.category_value(c, cat))
            if is_base:
                cell = TableCell(num(v), "base")
            else:
                cell = delta_cell(v, None if cat == "__all__" else g.test("wilcoxon", c, cat))
            if used < total and v is not None:
                cell.text += f" ({used}/{total})"
            row.append(cell)
        if g.baseline_present:
            up, down, n = g.dataset_wins(c)
            row.append("" if c == g.baseline else f"{up} better, {down} worse of {n}")
        rows.append(row)
    heads = ["design"] + [f"{cat} ({len(g.tasks_of(cat))})" for cat in cats] + ["average"]
    if g.baseline_present:
        heads.append("per-dataset tests")
    cap = ("Mean main score per category (number of datasets in brackets). "
           + (f"Baseline in absolute terms, other designs as the mean difference to it over the datasets both "
              f"have. * = the paper's Wilcoxon signed-rank test over the category's datasets is significant "
              f"after {corr} correction; ° = not tested (the category has fewer than 5 datasets, see below). "
              f"(k/n) = difference over k of the category's n datasets. Last column: datasets where the "
              f"per-dataset test finds the design significantly better / worse (after correction)."
              if g.baseline_present else "Absolute scores (no baseline)."))
    b.append(Table(heads, rows, cap))
    return b


def _task_blocks(s: "ReportSummary", g: "GroupReport", images: dict[str, Path], corr: str) -> list[Block]:
    """Main score (difference to the baseline) per task, and the heatmap."""
    b: list[Block] = []
    b.append(Heading(3, "Per task"))
    rows = []
    for t in g.tasks:
        row: list[Any] = [g.categories[t], t]
        for c in g.designs:
            if c == g.baseline or not g.baseline_present:
                v = g.mean[c].get(t)
                sd = g.sd[c].get(t, math.nan)
                row.append(TableCell(num(v) + (f" ± {sd:.4f}" if sd is not None and math.isfinite(sd) else ""), "base"))
            else:
                v = (g.mean[c][t] - g.mean[g.baseline][t]) if t in g.mean[c] and t in g.mean[g.baseline] else None
                row.append(delta_cell(v, g.test("instance", c, t)))
        rows.append(row)
    heads = ["category", "task"] + [c + (" (baseline)" if c == g.baseline else "") for c in g.designs]
    b.append(Table(heads, rows,
                   ("Main score per task, mean over seeds (± sd across seeds where there are several). "
                    + (f"Other designs: difference to the baseline; * = the per-dataset paired permutation test "
                       f"over instances is significant after {corr} correction; ° = not tested (see Skipped)."
                       if g.baseline_present else "")), align_left=2))
    if "heatmap" in images:
        b.append(Image(images["heatmap"], f"heatmap {g.base_model}",
                     "Heatmap of the scores (top) and of the differences to the baseline (bottom)."
                     if g.baseline_present and len(g.designs) > 1 else "Heatmap of the scores."))
    return b


def _wilcoxon_blocks(s: "ReportSummary", g: "GroupReport", images: dict[str, Path], corr: str) -> list[Block]:
    """The paper's test: Wilcoxon signed-rank per category (with a baseline only)."""
    b: list[Block] = []
    cats = g.category_names
    b.append(Heading(3, "The paper's test: Wilcoxon signed-rank per category"))
    untestable = [cat for cat in cats
                  if all(r.skipped and r.n == len(g.tasks_of(cat)) for r in g.wilcoxon if r.scope == cat)]
    rows = []
    for r in g.wilcoxon:
        if r.scope in untestable:
            continue
        rows.append([r.design, r.scope, r.n, delta_cell(r.delta, r), num(r.statistic, ".1f"), pval(r.p_value),
                     pval(r.p_adjusted), _sig(r), r.skipped or r.note])
    if rows:
        b.append(Table(["design", "category", "datasets", "mean Δ", "W", "p", f"p ({corr})", "significant",
                        "note"], rows,
                       "Paired over the category's datasets (design vs baseline, mean over seeds), two-sided, "
                       "exact for small n. Applied only where a category has at least 5 datasets, as in the "
                       "paper; with exactly 5 datasets the smallest possible two-sided p is 0.0625, so 6 or "
                       "more are needed to reach 0.05."))
    if untestable:
        b.append(Paragraph("Not tested, too few datasets for the paper's test: "
                   + ", ".join(f"{cat} ({len(g.tasks_of(cat))})" for cat in untestable)
                   + ". See the per-dataset tests below for these categories.", "warn"))
    return b


def _instance_test_blocks(s: "ReportSummary", g: "GroupReport", images: dict[str, Path], corr: str) -> list[Block]:
    """Per-dataset paired tests over instances (with a baseline only)."""
    b: list[Block] = []
    b.append(Heading(3, "Per-dataset tests over instances"))
    rows = []
    for r in g.instance:
        ci = f"[{num(r.ci_low)}, {num(r.ci_high)}]" if r.tested else "-"
        rows.append([r.design, r.scope, r.n or "-", delta_cell(r.delta, r), ci, pval(r.p_value), pval(r.p_adjusted),
                     _sig(r), r.skipped or r.note])
    b.append(Table(["design", "dataset", "instances", "Δ", "95% CI (bootstrap)", "p (permutation)",
                    f"p ({corr})", "significant", "note"], rows,
                   f"Paired over the dataset's instances (queries, pairs, examples) matched by id. CI: paired "
                   f"bootstrap percentile interval of the difference ({s.n_resamples} resamples, not adjusted "
                   f"for multiplicity). p: paired permutation test ({s.n_resamples} random swaps of the two "
                   f"models per instance, exact when 2^n is smaller), adjusted across all datasets and designs "
                   f"of this base model."))
    return b


def _friedman_blocks(s: "ReportSummary", g: "GroupReport", images: dict[str, Path], corr: str) -> list[Block]:
    """All designs: Friedman test, Nemenyi post-hoc, critical difference."""
    b: list[Block] = []
    f = g.friedman
    b.append(Heading(3, "All designs: Friedman test, Nemenyi post-hoc, critical difference"))
    if f is None or f.skipped:
        b.append(Paragraph(f"Not computed: {f.skipped if f else 'no data'}.", "warn"))
    else:
        b.append(Paragraph(f"Friedman chi² = {f.statistic:.3f}, p = {pval(f.p_value)} over {len(f.datasets)} datasets and "
                   f"{len(f.designs)} designs"
                   + (f" ({', '.join(f.left_out)} left out: not scored by every design)" if f.left_out else "")
                   + f". Nemenyi critical difference at alpha = {f.alpha}: CD = {f.cd:.3f} (average ranks further "
                   f"apart than CD differ significantly). Datasets of all categories count alike here."))
        order = sorted(f.avg_ranks, key=f.avg_ranks.get)
        rows = [[c, num(f.avg_ranks[c], ".2f")] + [pval(float(f.nemenyi.loc[c, d])) if c != d else "" for d in order]
                for c in order]
        b.append(Table(["design", "average rank"] + [f"p vs {d}" for d in order], rows,
                       "Average rank (1 = best) and Nemenyi post-hoc p-values (already adjusted for all pairs)."))
        if "cd" in images:
            b.append(Image(images["cd"], f"critical difference diagram {g.base_model}",
                         "Critical-difference diagram: designs joined by a bar are not significantly different "
                         "(Nemenyi)."))
    return b


def _seed_blocks(s: "ReportSummary", g: "GroupReport", images: dict[str, Path], corr: str) -> list[Block]:
    """Spread across seeds and the seed tests."""
    b: list[Block] = []
    multi = [c for c in g.designs if len(g.runs[c]) > 1]
    b.append(Heading(3, "Seeds"))
    if not multi:
        b.append(Paragraph("Every design ran with a single seed: no spread across seeds to report or test."))
    else:
        rows = []
        runs = [r for rs in g.runs.values() for r in rs]
        common = [t for t in g.tasks if all(t in r.scores for r in runs)]
        for c in g.designs:
            rs = g.runs[c]
            per_seed = [float(np.mean([r.scores[t] for t in common])) for r in rs] if common else []
            sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan
            rng = (max(per_seed) - min(per_seed)) if len(per_seed) > 1 else math.nan
            med_task_sd = np.nanmedian([g.sd[c].get(t, math.nan) for t in g.tasks]) if len(rs) > 1 else math.nan
            rows.append([c, len(rs), num(float(np.mean(per_seed)) if per_seed else None),
                         num(sd), num(rng), num(float(med_task_sd))])
        b.append(Table(["design", "seeds", f"mean over {len(common)} common task(s)", "sd across seeds",
                        "range", "median per-task sd"], rows,
                       "Spread across seeds (replicates). sd uses n - 1."))
        if g.seeds:
            rows = [[r.design, r.scope, r.n, delta_cell(r.delta, r), num(r.statistic, ".2f"), pval(r.p_value),
                     pval(r.p_adjusted), _sig(r), r.skipped or r.note] for r in g.seeds]
            b.append(Table(["design", "scope", "runs", "Δ", "t", "p", f"p ({corr})", "significant", "note"], rows,
                           "Welch's t-test of the design's per-seed scores against the baseline's (unpaired, unequal "
                           "variances). With 2-3 seeds per side it only detects differences that are large "
                           "compared with the seed spread."))
        if "seeds" in images:
            b.append(Image(images["seeds"], f"seeds {g.base_model}", "Per-seed mean score of each design."))
    return b


def _sig(r) -> TableCell:
    if not r.tested:
        return TableCell("not tested", "muted")
    return TableCell("yes", "pos" if (r.delta or 0) > 0 else "neg") if r.significant else TableCell("no")


def _methods() -> list[Block]:
    return [
        Heading(2, "Methods and caveats", "methods"),
        BulletList([
            "Scores: mteb's main score per task (mean over subsets of the test split), averaged over the "
            "replicates (seeds) of each (base model, design). Designs are compared within a base model only.",
            "Wilcoxon (the paper): two-sided signed-rank test of design vs baseline over a category's datasets "
            "(scipy.stats.wilcoxon, zero differences dropped), only with at least 5 datasets in the category. "
            "It tests whether a design wins across datasets, not on any one dataset; with 5 datasets the "
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
            "Friedman test over datasets x designs (datasets scored by every design) with the Nemenyi post-hoc "
            "(scikit-posthocs) and Demšar's critical difference CD = q_alpha sqrt(k(k+1)/(6N)). It ranks designs "
            "within each dataset, so a small but consistent win counts as much as a large one; with few datasets "
            "it has little power.",
            "Seeds: mean ± sd across seeds; Welch's t-test of per-seed scores (overall and per task). With 2-3 "
            "seeds these tests have little power; a difference smaller than the seed spread is not a finding.",
            "A per-dataset test says whether the difference on that dataset's instances is larger than instance "
            "sampling noise; it does not account for training randomness (use seeds for that).",
        ]),
    ]


def build_blocks(s: "ReportSummary", images: dict[str, Any], cost_note: str) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Sweep significance report"), BulletList(_meta_items(s))]
    n_skip = len(s.skipped)
    if n_skip or s.problems:
        blocks.append(Paragraph(f"{n_skip} comparison(s) skipped or caveated and {len(s.problems)} file problem(s): "
                        f"see [Skipped comparisons and data problems](#skipped).", "warn"))
    for g in s.groups:
        blocks.extend(_group_blocks(s, g, images.get(g.base_model, {})))
    if s.references:
        blocks.append(Heading(2, "Reference models"))
        tasks = sorted({t for r in s.references for t in r.scores})
        rows = [[r.design[len("reference:"):] or r.design, r.name] + [num(r.scores.get(t)) for t in tasks]
                for r in s.references]
        blocks.append(Table(["model", "result folder"] + tasks, rows,
                            "Reference encoders (design `reference:*`): absolute scores, not tested."))
    blocks.append(Heading(2, "Sweep: score vs cost, best LoRA rank / LR per cell", "sweep"))
    if "__cost__" in images:
        blocks.append(Image(images["__cost__"], "score vs cost",
                          f"Left: every trial's validation metric vs {cost_note}; right: mean MTEB score of each "
                          f"evaluated checkpoint vs {cost_note}." if s.trials else
                          f"Mean MTEB score of each evaluated checkpoint vs {cost_note} (no trials.json)."))
    elif cost_note:
        blocks.append(Paragraph(f"No score-vs-cost plot: {cost_note}."))
    if s.best_per_cell:
        rows = []
        for c in s.best_per_cell:
            st = ", ".join(f"{k} {v}" for k, v in c["status"].items())
            rows.append([c["cell"], c["design"], c["best_trial"] or "-", c["lora_r"] if c["lora_r"] is not None else "-",
                         f"{c['lr']:g}" if c["lr"] is not None else "-", num(c["val_metric"]),
                         c["steps"] if c["steps"] is not None else "-", c["trials"], st, num(c["gpu_hours"], ".2f")])
        blocks.append(Table(["cell", "design", "best trial", "LoRA r", "LR", "val metric", "steps", "trials",
                             "status", "GPU-h (all trials)"], rows,
                            "Best trial per grid cell = highest validation metric among the trials that ran to the end (among "
                            "early-stopped ones only when none did; failed trials never)."))
    else:
        blocks.append(Paragraph("No trials.json: pass `--trials PATH` (or run on the sweep folder) for the sweep's "
                        "best LoRA rank / LR per cell and the per-trial cost plot."))
    blocks.append(Heading(2, "Skipped comparisons and data problems", "skipped"))
    if s.skipped:
        blocks.append(Paragraph("Comparisons not made (or made on less data), and why:"))
        blocks.append(BulletList(list(s.skipped)))
    else:
        blocks.append(Paragraph("None: every comparison was made."))
    if s.problems:
        blocks.append(Paragraph("Files that could not be used as they are:"))
        blocks.append(BulletList(list(s.problems)))
    blocks.extend(_methods())
    return blocks


# ====================================================================================== write
def write_all(s: "ReportSummary", *, plots: bool = True) -> None:
    """Write the PNGs, report.md and report.html into ``s.out_dir`` and record them in ``s.files``."""
    out = s.out_dir
    images: dict[str, Any] = {}
    cost_note = ""
    if plots:
        for g in s.groups:
            base = slug(g.base_model)
            gi: dict[str, Path] = {}
            if g.tasks and g.designs:
                gi["heatmap"] = plot_heatmap(g, out / f"heatmap_{base}.png")
            p = plot_cd(g, out / f"cd_{base}.png")
            if p:
                gi["cd"] = p
            p = plot_seeds(g, out / f"seeds_{base}.png")
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


