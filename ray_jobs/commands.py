"""The CLI commands that run on Ray (or read Tune's files): `python -m sweeps` (sweeps/cli.py) parses the command
line and validates the config without Ray, then calls one of these. This is the only module of `ray_jobs` the
`sweeps` package imports, and only inside the CLI function that dispatches to it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sweeps import layout
from sweeps.config import SweepConfig
from sweeps.merge import merge_parts

from . import console, records, sweep as job, tracking
from .console import say

STAGES = ("train", "evaluate", "report")


def check(sweep: SweepConfig) -> None:
    """What `sweeps check` adds to the config's own validation: the evaluation tasks and the tracking setup."""
    job.check_evaluation_tasks(sweep)
    tracking.check(sweep)


def run(sweep: SweepConfig, *, resume: bool, stages: str, address: str | None, verbose: bool) -> int:
    """`sweeps run`: the pipeline's stages; exit status 130 (with how to go on) on Ctrl-C."""
    chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
    bad = [s for s in chosen if s not in STAGES]
    if bad:
        print(f"error: unknown stage(s) {bad}: choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    console.setup_driver(verbose)
    try:
        job.run_pipeline(sweep, resume=resume, stages=chosen, ray_address=address,
                         ray_init_kwargs=console.ray_init_kwargs(verbose))
    except (job.SweepInterrupted, KeyboardInterrupt) as err:  # Ctrl-C: stop, say how to go on
        print(f"interrupted: {err or 'Ctrl-C'}; {job.resume_hint(sweep)}", file=sys.stderr, flush=True)
        return 130
    return 0


def merge(out: str, parts: list[str]) -> int:
    merged = merge_parts(out, parts)
    say(f"merged {len(parts)} part(s) into {merged}: {len(layout.read_trials(merged))} trials, "
        f"{len(layout.read_checkpoints(merged))} checkpoints")
    return 0


def on_folder(command: str, sweep_dir: Path, address: str | None = None) -> int:
    """`status`, `evaluate` (stage 3 alone) or `report` (stage 4 alone) on an existing sweep folder."""
    if command == "status":
        print(records.status_text(sweep_dir))
        return 0
    sweep = layout.read_sweep(sweep_dir)
    if command == "evaluate":
        job.init_ray(address)
        job.evaluate_stage(sweep)
    elif command == "report":
        job.report_stage(sweep)
    return 0
