"""The report's plots (heatmap, critical-difference diagram, seeds, score vs cost), drawn on matplotlib's Agg
canvas (no pyplot state, no display needed) and saved as PNGs beside the report.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scikit_posthocs as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .report_blocks import num, pval

if TYPE_CHECKING:
    from .analysis import GroupReport, ReportSummary

# ====================================================================================== plots
def _figure(w: float, h: float):

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(g: "GroupReport", path: Path) -> Path:
    """Scores (designs x tasks) and, with a baseline, the differences to it with significance stars."""
    tasks, designs = g.tasks, g.designs
    M = np.array([[g.mean[c].get(t, np.nan) for t in tasks] for c in designs], dtype=float)
    panels = 2 if g.baseline_present and len(designs) > 1 else 1
    w = min(max(3.0 + 0.85 * len(tasks), 7.0), 26)
    h_one = 0.9 + 0.42 * len(designs)
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
    ax.set_yticks(range(len(designs)), designs, fontsize=8)
    ax.set_xticks(range(len(tasks)), labels if panels == 1 else [""] * len(tasks), fontsize=7, rotation=45,
                  ha="right")
    ax.set_title("main score (mean over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    if panels == 2:
        ax = axes[1]
        others = [c for c in designs if c != g.baseline]
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
    """Critical-difference diagram (average ranks; bars join designs the Nemenyi test cannot separate)."""

    f = g.friedman
    if f is None or f.skipped or f.nemenyi is None:
        return None
    k = len(f.designs)
    fig = _figure(8.5, 1.2 + 0.32 * k)
    ax = fig.add_subplot(1, 1, 1)
    sp.critical_difference_diagram(pd.Series(f.avg_ranks), f.nemenyi, ax=ax, alpha=f.alpha,
                                   label_props={"fontsize": 8})
    ax.set_title(f"{g.base_model}: average rank over {len(f.datasets)} datasets (1 = best); "
                 f"Friedman p = {pval(f.p_value)}, Nemenyi CD = {num(f.cd, '.2f')}", fontsize=9, pad=22)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_seeds(g: "GroupReport", path: Path) -> Path | None:
    """Per-seed mean score (over tasks every replicate of the group has) for each design."""
    if not any(len(rs) > 1 for rs in g.runs.values()):
        return None
    runs = [r for rs in g.runs.values() for r in rs]
    common = [t for t in g.tasks if all(t in r.scores for r in runs)]
    if not common:
        return None
    fig = _figure(7.5, 1.0 + 0.45 * len(g.designs))
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(g.designs):
        vals = [float(np.mean([r.scores[t] for t in common])) for r in g.runs[c]]
        jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(1)
        ax.scatter(vals, i + jitter, s=26, zorder=3, alpha=0.85, color="C0" if c == g.baseline else "C1")
        ax.plot([np.mean(vals)] * 2, [i - 0.3, i + 0.3], color="black", lw=1.5)
    ax.set_yticks(range(len(g.designs)), g.designs, fontsize=8)
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
    designs = sorted({t.design for t in trials} | {r.design for r in runs})
    colors = {c: f"C{i % 10}" for i, c in enumerate(designs)}
    bases = sorted({t.base_model for t in trials} | {r.base_model for r in runs})
    markers = {b: m for b, m in zip(bases, "os^Dvp*hX" * 3)}
    if trials:
        ax = axes[0]
        n_err = sum(1 for t in trials if t.status == "ERROR" or t.val_metric is None)
        for t in trials:
            if t.val_metric is None or t.status == "ERROR":
                continue
            ax.scatter(cost(t), t.val_metric, color=colors[t.design], marker=markers.get(t.base_model, "o"),
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

    handles = [Line2D([], [], color=colors[c], marker="o", ls="", label=c) for c in designs]
    handles += [Line2D([], [], color="grey", marker=markers[b], ls="", label=b) for b in bases if len(bases) > 1]
    ncol = min(len(handles), 3 * panels)
    fig.legend(handles=handles, loc="lower center", fontsize=7, frameon=False, ncol=ncol)
    rows = math.ceil(len(handles) / ncol)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 1))
    fig.savefig(path)
    return path, unit
