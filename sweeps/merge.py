"""Merging the folders of a sweep run in parts (``run --part``) into one: records, results, one sweep.json."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from embed_core.errors import ConfigError

from . import layout
from .config import SweepConfig
from .layout import read_sweep


def _record_parts(out: Path, parts: list[Path], sweeps: list[SweepConfig], cells: dict[Path, list[str]]) -> None:
    """parts.json: one entry per merged folder with its cells and `runs_with` (the first merge also records what
    `out` already held)."""
    known = layout.read_parts(out)
    if not known and cells.get(out):
        known.append({"from": str(out), "cells": cells[out], "runs_with": read_sweep(out).runs_with()})
    for p, sw in zip(parts, sweeps):
        known = [k for k in known if k["from"] != str(p)]
        known.append({"from": str(p), "cells": cells.get(p, []), "runs_with": sw.runs_with()})
    layout.write_parts(out, known)


def merge_parts(out_dir: str | os.PathLike, part_dirs: list[str | os.PathLike]) -> Path:
    """Merge sweep folders that each ran a part of the same sweep (``run --part``) into `out_dir`: one
    ``sweep.json`` (the fingerprints must agree), the union of ``trials.json`` and ``checkpoints.json``, every
    result file (a checkpoint evaluated in two parts, the reference say, is kept once) and training history, and
    ``parts.json`` saying which cells each part ran with which kernels and resources (the fingerprint allows
    them to differ). ``sweeps report OUT`` then builds the report of the whole. Training folders (tune/, train/)
    are not copied."""

    out = Path(out_dir)
    parts = [Path(p) for p in part_dirs]
    sweeps = [read_sweep(p) for p in parts]
    prints = {s.fingerprint() for s in sweeps}
    if len(prints) != 1:
        raise ConfigError(f"cannot merge {[str(p) for p in parts]}: they ran different sweep configs "
                          "(sweep.json fingerprints differ)")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / layout.SWEEP_FILE).is_file():
        shutil.copy2(parts[0] / layout.SWEEP_FILE, out / layout.SWEEP_FILE)
    elif read_sweep(out).fingerprint() not in prints:
        raise ConfigError(f"{out} holds another sweep (its sweep.json fingerprint differs from the parts')")
    layout.restate_fingerprint(out, prints.pop())
    trials, specs, cells = {}, {}, {}
    for src in [out, *parts]:
        if (src / layout.TRIALS_FILE).is_file():
            records = layout.read_trials(src)
            cells[src] = sorted({t.cell for t in records})
            trials.update({(t.cell, t.trial_id): t for t in records})
        if (src / layout.CHECKPOINTS_FILE).is_file():
            specs.update({(s.name, s.labels.trial_id): s for s in layout.read_checkpoints(src)})
        for sub in (layout.RESULTS_DIR, layout.HISTORIES_DIR) if src != out else ():
            tree = src / sub
            for f in sorted(tree.rglob("*")) if tree.is_dir() else []:
                dest = out / sub / f.relative_to(tree)
                if f.is_file() and not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, dest)
    _record_parts(out, parts, sweeps, cells)
    layout.write_trials(out, sorted(trials.values(), key=lambda t: (t.cell, t.trial_id)))
    layout.write_checkpoints(out, sorted(specs.values(), key=lambda s: (s.name, s.labels.trial_id)))
    return out
