"""Merging the folders of a sweep run in parts (``run --part``) into one: records, results, one sweep.json."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from embed_core.errors import ConfigError

from . import layout
from .layout import read_sweep

def merge_parts(out_dir: str | os.PathLike, part_dirs: list[str | os.PathLike]) -> Path:
    """Merge sweep folders that each ran a part of the same sweep (``run --part``) into `out_dir`: one
    ``sweep.json`` (the fingerprints must agree), the union of ``trials.json`` and ``checkpoints.json``, and every
    result file (a checkpoint evaluated in two parts, the reference say, is kept once). ``sweeps report OUT``
    then builds the report of the whole. Training folders (tune/, train/) are not copied."""

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
    trials, specs = {}, {}
    for src in [out, *parts]:
        if (src / layout.TRIALS_FILE).is_file():
            trials.update({(t.cell, t.trial_id): t for t in layout.read_trials(src)})
        if (src / layout.CHECKPOINTS_FILE).is_file():
            specs.update({(s.name, s.labels.trial_id): s for s in layout.read_checkpoints(src)})
        results = src / layout.RESULTS_DIR
        for f in sorted(results.rglob("*")) if src != out and results.is_dir() else []:
            dest = out / layout.RESULTS_DIR / f.relative_to(results)
            if f.is_file() and not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
    layout.write_trials(out, sorted(trials.values(), key=lambda t: (t.cell, t.trial_id)))
    layout.write_checkpoints(out, sorted(specs.values(), key=lambda s: (s.name, s.labels.trial_id)))
    return out
