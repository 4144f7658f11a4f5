"""The CLI commands that run on Ray (or read Tune's files): `python -m sweeps` (sweeps/cli.py) parses the command
line and validates the config without Ray, then calls one of these. This is the only module of `ray_jobs` the
`sweeps` package imports, and only inside the CLI function that dispatches to it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from embed_core.errors import ConfigError
from embed_core.train_config import TrainConfig
from sweeps import layout
from sweeps.config import SweepConfig
from sweeps.merge import merge_parts

from . import console, evaluate as evaluation, records, sweep as job, tracking
from .console import say
from .ray_cluster import wait_for_job_agent
from .train import run_training

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
        print(f"interrupted: {str(err) or 'Ctrl-C'}; {job.resume_hint(sweep)}", file=sys.stderr, flush=True)
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


def train(cfg: TrainConfig, *, num_workers: int, use_gpu: bool, output: str, name: str | None, max_failures: int,
          ray_address: str | None) -> int:
    """`sweeps train`: one run on Ray Train; exit status 2 on a divergence (a NaN / inf loss) as on a config error."""
    try:
        out = run_training(cfg, num_workers=num_workers, use_gpu=use_gpu, storage_path=output, name=name,
                           max_failures=max_failures, ray_init_kwargs={"address": ray_address} if ray_address else None)
    except FloatingPointError as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"final_metrics": out.metrics}, indent=2, sort_keys=True, default=str))
    print(f"checkpoint: {out.checkpoint_path}")
    print(f"model: {out.model_dir}")
    return 0


def evaluate(args) -> int:
    """`sweeps evaluate --checkpoints ...`: checkpoints outside a sweep's stage 3; exit status 1 when a (checkpoint,
    task) failed after its retries (everything that finished is saved)."""
    from embed_core.mteb_tasks import DEFAULT_TASKS  # mteb: only when evaluating

    specs = evaluation.specs_from_args(args.checkpoints or [], args.reference)
    summary = evaluation.evaluate_checkpoints(
        specs, args.tasks or list(DEFAULT_TASKS), _results_root(args.checkpoints or [], args.results),
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_retries=args.max_retries, quick=args.quick,
        subsample=args.subsample, seed=args.seed, batch_size=args.batch_size, show_progress=not args.no_progress,
        overwrite=args.overwrite, data_dir=args.data_dir, ray_address=args.address, raise_on_failure=False)
    if args.json:
        layout.atomic_write_json(args.json, summary.to_dict())
    print(evaluation.summary_table(summary))
    if summary.failed:
        print(str(evaluation.EvaluationFailed(summary)), file=sys.stderr)
        return 1
    return 0


def _results_root(checkpoints: list[str], results: str | None) -> str:
    """--results, or the results/ of the one sweep folder given as --checkpoints."""
    if results is not None:
        return results
    sweeps = [Path(c) for c in checkpoints if Path(c).is_dir() and (Path(c) / layout.CHECKPOINTS_FILE).is_file()]
    if len(sweeps) != 1 or len(checkpoints) != 1:
        raise ConfigError("--results is required unless --checkpoints is one sweep folder")
    return str(sweeps[0] / layout.RESULTS_DIR)


def wait_for_jobs(address: str, timeout: float) -> int:
    """`sweeps wait-for-jobs`: for scripts that start a Ray head and submit a job next."""
    try:
        waited = wait_for_job_agent(address, timeout)
    except TimeoutError as err:
        print(f"error: {err}")
        return 1
    print(f"ok: {address} accepts jobs (waited {waited:.0f} s)")
    return 0
