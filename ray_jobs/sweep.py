"""The sweep job: train the grid with Ray Tune (+ Ray Train V2 per trial), evaluate the best checkpoints on MTEB,
write the significance report. Run it with ``python -m sweeps run CONFIG`` (see sweeps/cli.py) locally or as
``ray job submit --working-dir . -- python -m sweeps run CONFIG`` on a cluster.

Stages, each idempotent and runnable alone on what the previous one left in ``<storage>/<name>/``
(layout: `sweeps.layout`):

1. **prepare** (driver, no Ray): validate the config, check every base model's structure and the training data,
   write ``sweep.json``, the training examples (one JSONL per distinct data recipe, under ``data/``) and each
   cell's plan (``cells/``: its resolved TrainConfig, which a trial completes with its own LoRA rank, LR and seed).
2. **train**: one Tune experiment (``tune/``). The searcher (`ray_jobs.search.CellSearcher`) visits every grid
   cell (base model x design x seed) and samples LoRA rank / LR inside it with one Optuna study per cell; ASHA
   per cell stops weak trials on the trainer's held-out metric. Each Tune trial is a driver function
   (`ray_jobs.trial`) that starts a `TorchTrainer` with the trial's ScalingConfig; a callback forwards the Train
   workers' reports to Tune. Writes ``trials.json`` and ``checkpoints.json`` (best completed trial(s) per cell).
3. **evaluate**: `ray_jobs.evaluate` fans the chosen checkpoints x tasks out as Ray tasks (``results/``).
4. **report**: `sweeps.report` turns ``results/`` (+ ``trials.json``) into ``report/`` and a console table.

Faults: a Train worker that dies is restarted by Ray Train (``failure.train_max_failures``) from the trial's last
checkpoint; a trial that still fails (NaN loss, OOM, ...) is retried by Tune (``failure.trial_max_failures``)
and otherwise recorded as ERROR while the sweep goes on. A killed sweep driver is resumed with ``--resume``:
``Tuner.restore`` keeps finished trials and the searcher's state, and an unfinished trial's TorchTrainer,
rebuilt with the same run name, resumes from that trial's latest checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from embed_core.errors import ConfigError
from sweeps import layout
from sweeps.config import Cell, SweepConfig
from sweeps.layout import SWEEP_FORMAT, TUNE_DIR, data_file

from . import test_hooks, tracking
from .console import say as _say
from .records import UNFINISHED, DriverHeartbeat, collect_trials, select_checkpoints, trial_statuses
from .trial import trainable_with_gpu, trial_dirname

log = logging.getLogger(__name__)


# ====================================================================================== prepare
def prepare(sweep: SweepConfig, resume: bool = False, check_models: bool = True) -> Path:
    """Validate everything checkable before Ray (models' structure, data), create the sweep folder, write
    ``sweep.json``, the training data and each cell's plan. ``resume`` requires the folder to exist with the same
    config."""
    from embed_core.data import write_jsonl
    from embed_core.train_data import TrainData, load_examples

    sweep_dir = sweep.sweep_dir
    stored = sweep_dir / layout.SWEEP_FILE
    if stored.is_file():
        old = json.loads(stored.read_text())
        if not resume:
            raise ConfigError(f"sweep {sweep.name!r} already exists at {sweep_dir}: add --resume to continue it, "
                              "or give the sweep another name (--set name=...) or --storage path")
        if layout.read_sweep(sweep_dir).fingerprint() != sweep.fingerprint():  # as this version computes it
            diff = sorted(k for k in set(old["config"]) | set(sweep.raw)
                          if k != "storage_path" and old["config"].get(k) != sweep.raw.get(k))
            raise ConfigError(f"--resume: the config differs from the one sweep {sweep.name!r} was started with "
                              f"(sections {diff}); resume with the same config, or start a new sweep")
    elif resume and (sweep_dir / TUNE_DIR).exists():
        raise ConfigError(f"--resume: {sweep_dir} has a Tune experiment but no {layout.SWEEP_FILE}")
    sweep.check_storage()
    if check_models:  # converted first: the checks then read each model's config.json, not its GGUF's metadata
        convert_models_once(sweep)
        sweep.preflight(check_data=False)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # the training data of every distinct recipe, checked (DataError) and written once
    written: set[Path] = set()
    for cell in sweep.cells():
        tcfg = sweep.train_config(cell, *sweep.probe_values(cell))
        f = data_file(sweep_dir, tcfg)
        if f in written:
            continue
        written.add(f)
        if f.is_file():
            continue
        examples = load_examples(tcfg)
        TrainData(tcfg, examples)  # DataError: too few examples for one batch / for val_size
        write_jsonl(examples, f)  # atomic: a concurrent or killed prepare never leaves half a file
    write_cell_plans(sweep, from_sweep_json=stored.is_file())  # a resume: as its trials always read it
    if not stored.is_file():
        layout.atomic_write_json(stored, {"format": SWEEP_FORMAT, "fingerprint": sweep.fingerprint(),
                                          "config": sweep.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    else:  # started by a version whose fingerprint left out fewer keys: the field shows the value checks compute
        layout.restate_fingerprint(sweep_dir, sweep.fingerprint())
    return sweep_dir


def write_cell_plans(sweep: SweepConfig, from_sweep_json: bool) -> None:
    """Each cell's plan (`layout.CellPlan`: its resolved TrainConfig, resources, ...), which its trials read instead
    of the sweep's config. A resumed sweep's come from its sweep.json, as its trials' always did (resources and
    retries may differ in the config it is resumed with); a sweep prepared before plans existed gets them here."""
    resolved = layout.read_sweep(sweep.sweep_dir) if from_sweep_json else sweep
    for cell in sweep.cells():
        layout.write_cell_plan(sweep.sweep_dir, layout.CellPlan.of(resolved, cell))


def convert_models_once(sweep: SweepConfig) -> None:
    """Dequantise every GGUF base model into the local model cache now, once, instead of in each trial's
    workers (several trials starting together would each convert it)."""
    from embed_core.backbone import resolve_source

    first: dict[str, Cell] = {}
    for cell in sweep.cells():
        first.setdefault(cell.base_model, cell)
    for cell in first.values():
        resolve_source(sweep.train_config(cell, *sweep.probe_values(cell)).model)


# ====================================================================================== the console


def _status_printer_class():
    from ray import tune

    class TrialStatusLines(tune.Callback):
        """One console line per trial event: start, each forwarded result, end (done / stopped / error)."""

        def __init__(self, metric: str, max_steps: dict[str, int], total: int) -> None:
            self.metric, self.max_steps, self.total = metric, max_steps, total
            self.done = 0
            self.shown: dict[str, float] = {}

        def _head(self, trial) -> str:
            c = trial.config
            return (f"{trial.trial_id} {c.get('cell_key', '?')} r={c.get('lora_r')} lr={c.get('lr', 0):.2e}")

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            _say(f"start  {self._head(trial)}")

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            # held-out evaluations always; progress in between at most once a minute per trial
            now = time.monotonic()
            if result.get("final") or not result.get("evaluated") and now - self.shown.get(trial.trial_id, 0) < 60:
                return
            self.shown[trial.trial_id] = now
            step = result.get("step", "?")
            total = self.max_steps.get(trial.config.get("cell_key"), "?")
            parts = [f"step {step}/{total}"]
            for k in ("loss", self.metric, "tokens_per_s"):
                if isinstance(result.get(k), (int, float)):
                    parts.append(f"{k}={result[k]:.4g}")
            _say(f"result {self._head(trial)} " + " ".join(parts))

        def _finished(self, trials, trial) -> int:  # counts trials restored as finished too (after --resume)
            return 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.done = self._finished(trials, trial)
            r = trial.last_result or {}
            how = "done" if r.get("final") else "stopped early (ASHA)"
            _say(f"{how:6s} {self._head(trial)} {self.metric}={r.get(self.metric, float('nan')):.4g} "
                 f"[{self.done}/{self.total} trials finished]")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.done = self._finished(trials, trial)
            _say(f"ERROR  {self._head(trial)}: see {trial.path}/error.txt "
                 f"[{self.done}/{self.total} trials finished]")

    return TrialStatusLines


# ====================================================================================== train stage
def _resolve_use_gpu(sweep: SweepConfig) -> bool:
    import ray

    if sweep.resources.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(sweep.resources.use_gpu)


def gpu_plan(sweep: SweepConfig, use_gpu: bool) -> dict[str, dict[str, float]]:
    """base model -> {gpus_per_worker, need_gib, training, ahead}: each trial's estimated GPU memory
    (`sweeps.resources`), how many of its trials train on one GPU at once (the configured ``gpus_per_worker``, raised
    to the largest 1/k of this machine's GPU that holds the estimate; a ConfigError when one GPU cannot hold it),
    how many more start up ahead of their turn (``resources.start_ahead``, one-worker trials:
    `embed_core.memory.admission`), and the GPU share each trial asks Ray for, so that Ray places both."""
    from embed_core.data import read_jsonl
    from embed_core.memory import gpu_total_gib, placement
    from sweeps.resources import memory_plan

    if not use_gpu:
        return {}
    first = sweep.cells()[0]
    examples = read_jsonl(data_file(sweep.sweep_dir, sweep.train_config(first, *sweep.probe_values(first))))
    gpu = gpu_total_gib()
    out = {}
    for model, est in memory_plan(sweep, examples).items():
        res = sweep.resources_for(next(c for c in sweep.cells() if c.base_model == model))
        want = res.gpus_per_worker
        entry = {"gpus_per_worker": want, "need_gib": est.total_gib, "training": None, "ahead": 0}
        if gpu:
            try:
                place = placement(est.total_gib, gpu, want, ahead=res.admits_ahead)
            except ValueError as e:
                raise ConfigError(f"sweep config {sweep.source}: a trial of {model} {e}: lower training.batch_size, "
                                  "set training.chunk_size (GradCache) or use more workers") from None
            if place.share != want:
                _say(f"WARNING: resources.gpus_per_worker {want} gives a trial of {model} {want * gpu:.1f} GiB of "
                     f"this {gpu:.0f} GiB GPU, but it needs {est.describe()}: raised to {place.share:.3g} "
                     f"({round(1 / place.share)} trials at a time)")
            # trials admitted ahead wait in the GPU's ledger for one of `training` places (ray_jobs/gpu_ledger.py)
            entry["gpus_per_worker"] = place.ray_share
            if place.admission:
                entry.update(training=place.admission.training, ahead=place.admission.ahead)
        out[model] = entry
    return out


def max_concurrent(sweep: SweepConfig, use_gpu: bool, plan: dict | None = None) -> int:
    """``resources.max_concurrent_trials`` or as many trials as the cluster's CPUs / GPUs hold right now
    (an autoscaling cluster that has no GPU node yet gets 1: set max_concurrent_trials there)."""
    if sweep.resources.max_concurrent_trials:
        return sweep.resources.max_concurrent_trials
    import ray

    have = ray.cluster_resources()
    fits = []
    for cell in sweep.cells()[:1] or []:
        r = sweep.resources_for(cell)
        fits.append(math.floor(have.get("CPU", 0) / max(r.num_workers * r.cpus_per_worker, 1e-9)))
        if use_gpu:
            gpus = max([p["gpus_per_worker"] for p in (plan or {}).values()] or [r.gpus_per_worker])
            fits.append(math.floor(have.get("GPU", 0) / max(r.num_workers * gpus, 1e-9) + 1e-9))
    return max(1, min(fits + [sweep.num_trials()]))


def train_stage(sweep: SweepConfig, resume: bool = False):
    """Run (or resume) the Tune experiment; write trials.json and checkpoints.json. Ray must be initialised."""
    from ray import tune

    from .search import CellSearcher, make_scheduler

    sweep_dir = sweep.sweep_dir
    exp_dir = sweep_dir / TUNE_DIR
    use_gpu = _resolve_use_gpu(sweep)
    plan = gpu_plan(sweep, use_gpu)
    trainable = tune.with_parameters(trainable_with_gpu(use_gpu, plan, test_hooks.faults("train")),
                                     sweep_dir=str(sweep_dir))
    # The trial driver only starts the TorchTrainer, whose workers hold the CPUs / GPUs in their own placement
    # group. Tune needs a non-empty bundle per trial: a token amount of memory (1 MiB), no CPU.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 2**20})
    max_steps = {c.key: sweep.train_config(c, *sweep.probe_values(c)).max_steps for c in sweep.cells()}
    printer = _status_printer_class()(sweep.scheduler.metric, max_steps, sweep.num_trials())
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        _say(f"resuming the Tune experiment at {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        concurrency = max_concurrent(sweep, use_gpu, plan)
        ahead = "".join(f"; {m}: {p['training']} train on a GPU at once, {p['ahead']} more start up ahead"
                        for m, p in plan.items() if p.get("ahead"))
        _say(f"{len(sweep.cells())} cells x {sweep.search.samples_per_cell} samples = {sweep.num_trials()} trials, "
             f"{concurrency} at a time, {'GPU' if use_gpu else 'CPU'}{ahead}; "
             f"TensorBoard: tensorboard --logdir {sweep_dir}")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=CellSearcher(sweep, sweep.scheduler.metric, sweep.scheduler.mode),
                scheduler=make_scheduler(sweep), num_samples=sweep.num_trials(),
                max_concurrent_trials=concurrency, trial_dirname_creator=trial_dirname,
                trial_name_creator=trial_dirname),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=sweep.failure.trial_max_failures),
                                      callbacks=[printer, *tracking.callbacks(sweep)]),
        )
    with SigintWatch() as sigint:
        grid = tuner.fit()
    trials = collect_trials(sweep, grid, use_gpu)
    layout.write_trials(sweep_dir, trials)
    check_finished(sweep, trials, sigint.caught)
    specs = select_checkpoints(sweep, trials)
    layout.write_checkpoints(sweep_dir, specs)
    n = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "STOPPED", "ERROR")}
    _say(f"training done: {n['TERMINATED']} trials completed, {n['STOPPED']} stopped early by ASHA, "
         f"{n['ERROR']} failed; {len(specs)} checkpoints chosen for evaluation ({sweep_dir / layout.CHECKPOINTS_FILE})")
    missing = sorted({c.key for c in sweep.cells()} - {s.labels.cell for s in specs})
    if missing:
        _say(f"WARNING: no completed trial in cell(s) {missing}: they are missing from the evaluation")
    return trials, specs


# ====================================================================================== evaluate / report stages
def check_evaluation_tasks(sweep: SweepConfig) -> None:
    """Resolve the evaluation tasks (names, spec files) now: a bad task fails before any worker starts."""
    from embed_core.task_spec import resolve_tasks

    resolve_tasks(sweep.evaluation.tasks, data_dir=sweep.evaluation.options.data_dir)


def evaluate_stage(sweep: SweepConfig):
    """Evaluate checkpoints.json's models (+ the MiniLM reference if configured) on the sweep's tasks."""
    from .evaluate import evaluate_checkpoints

    sweep_dir = sweep.sweep_dir
    specs = layout.read_checkpoints(sweep_dir)
    if sweep.evaluation.reference:
        from .evaluate import reference_spec

        specs.append(reference_spec())
    if not specs:
        raise RuntimeError(f"no checkpoint to evaluate in {sweep_dir / layout.CHECKPOINTS_FILE}: did every trial fail?")
    e = sweep.evaluation
    _say(f"evaluating {len(specs)} checkpoints x {len(e.tasks)} tasks as Ray tasks "
         f"({'quick subsamples: NOT comparable to MTEB' if e.quick else 'full tasks'})")
    return evaluate_checkpoints(specs, e.tasks, sweep_dir / layout.RESULTS_DIR, num_cpus=e.num_cpus,
                                num_gpus=e.num_gpus, max_retries=e.max_retries, quick=e.quick, **e.options.kwargs())


def report_stage(sweep: SweepConfig):
    from sweeps.report import build_report, console_table

    sweep_dir = sweep.sweep_dir
    trials = sweep_dir / layout.TRIALS_FILE
    summary = build_report(sweep_dir / layout.RESULTS_DIR, sweep_dir / layout.REPORT_DIR,
                           trials=trials if trials.is_file() else None, baseline=sweep.report.baseline,
                           correction=sweep.report.correction, alpha=sweep.report.alpha)
    print(console_table(summary), flush=True)
    tracking.log_report(sweep, summary.files["summary"])
    _say(f"report: {sweep_dir / layout.REPORT_DIR / 'report.html'}")
    return summary


def init_ray(address: str | None = None, **kwargs) -> bool:
    """Connect to ``address`` / $RAY_ADDRESS (a cluster, or the one `ray job submit` runs in), else start a new
    local Ray with the dashboard, never auto-detect another one; every process of the cluster gets its address
    (`ray_jobs.ray_cluster`). The dashboard is not optional: Ray Train's placement-group cleaner queries the
    State API it serves, and without it a trial stopped by ASHA leaks its workers' placement group.
    Returns True when a local Ray was started."""
    from .ray_cluster import given_address, start_or_connect

    local = not given_address(address)
    ctx = start_or_connect(address, **({**kwargs, "include_dashboard": True} if local else kwargs))
    if ctx is not None:
        url = getattr(ctx, "dashboard_url", None)
        _say(f"local Ray started at {os.environ.get('RAY_ADDRESS')}" + (f"; dashboard: http://{url}" if url else ""))
    if kwargs.get("log_to_driver") is False:
        from .console import worker_logs_dir

        _say(f"workers' output (training, evaluation) goes to {worker_logs_dir()}/worker-*; --verbose shows it here")
    return ctx is not None


class SweepInterrupted(Exception):
    """The driver was stopped (Ctrl-C) before the training stage finished: no checkpoint is chosen, nothing is
    evaluated or reported; ``--resume`` continues. The CLI exits 130."""


class SigintWatch:
    """Whether Tune caught a SIGINT during ``tuner.fit()``. Tune's handler stops the experiment, saves its state
    and puts back the handler it found, and fit() returns as if it had finished; after a fit that saw no
    SIGINT, Tune's handler is still installed. So: install ours, and after fit ours back in place = caught."""

    def __init__(self) -> None:
        self.caught = False

    def _handler(self, signum, frame) -> None:  # a second Ctrl-C after Tune's: stop now
        raise KeyboardInterrupt

    def __enter__(self) -> "SigintWatch":
        import signal
        import threading

        self._main = threading.current_thread() is threading.main_thread()
        if self._main:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._main:
            self.caught = signal.getsignal(signal.SIGINT) == self._handler
            signal.signal(signal.SIGINT, self._previous)


def check_finished(sweep: SweepConfig, trials: list[layout.TrialRecord], sigint: bool) -> None:
    """SweepInterrupted unless every planned trial finished (TERMINATED, STOPPED or ERROR)."""
    open_ = [t for t in trials if t.status == "INTERRUPTED"]
    missing = sweep.num_trials() - len(trials)
    if sigint or open_ or missing > 0:
        raise SweepInterrupted(f"training interrupted: {len(open_)} trial(s) INTERRUPTED, {max(missing, 0)} not "
                               f"created yet (recorded in {sweep.sweep_dir / layout.TRIALS_FILE}); nothing was "
                               "evaluated or reported")


def run_command(sweep: SweepConfig, python: str = "python") -> list[str]:
    """`sweeps run ... --resume` of this sweep: its config file with the same --set overrides and --part (a resume
    with another config is refused by the fingerprint check)."""
    return [python, "-m", "sweeps", "run", sweep.source, "--storage", str(sweep.storage_path),
            *[f"--set={s}" for s in sweep.sets],
            *(["--part", ",".join(f"{k}={v}" for k, v in sweep.part.items())] if sweep.part else []), "--resume"]


def resume_hint(sweep: SweepConfig) -> str:
    """The command that continues this sweep (`run_command`). A config built in Python has no file for
    `sweeps run`: its hint is the call."""
    import shlex

    if sweep.source == "<dict>":
        return "resume with: run_pipeline(<the same SweepConfig>, resume=True)"
    return f"resume with: {shlex.join(run_command(sweep))}"


def run_pipeline(sweep: SweepConfig, resume: bool = False, stages: tuple[str, ...] = ("train", "evaluate", "report"),
                 ray_address: str | None = None, ray_init_kwargs: dict | None = None) -> dict[str, Any]:
    """prepare -> train -> evaluate -> report (each stage skipped when not in `stages`). Stops with
    SweepInterrupted (nothing evaluated) when training did not finish; a failure of the training driver
    itself (a full disk, ...) still leaves trials.json, from the trials' own files."""
    t0 = time.time()
    if "evaluate" in stages:
        check_evaluation_tasks(sweep)  # a bad task name or spec fails now, not after hours of training
    tracking.check(sweep)
    sweep_dir = prepare(sweep, resume=resume or "train" not in stages)
    _say(f"sweep {sweep.name}: {sweep_dir}")
    out: dict[str, Any] = {"sweep_dir": str(sweep_dir)}
    with DriverHeartbeat(sweep_dir):
        if "train" in stages or "evaluate" in stages:
            init_ray(ray_address, **(ray_init_kwargs or {}))
        if "train" in stages:
            try:
                out["trials"], out["checkpoints"] = train_stage(sweep, resume=resume)
            except (SweepInterrupted, KeyboardInterrupt):
                raise
            except Exception as err:
                _record_from_files(sweep, err)
                raise
        if "evaluate" in stages:
            out["evaluation"] = evaluate_stage(sweep)
        if "report" in stages:
            out["report"] = report_stage(sweep)
    _say(f"finished in {time.time() - t0:.0f} s")
    return out


def _record_from_files(sweep: SweepConfig, err: BaseException) -> None:
    """After the training driver failed: trials.json from the trials' files (unfinished ones INTERRUPTED), and
    whether the sweep's disk is full (Tune then fails in ways that do not say so, e.g. EOFError)."""
    import shutil

    try:
        free = shutil.disk_usage(sweep.sweep_dir).free
        if free < 64 * 2**20:
            _say(f"the disk holding {sweep.sweep_dir} is full ({free / 2**20:.1f} MiB free): free space, then "
                 f"{resume_hint(sweep)}")
    except OSError:
        pass
    try:
        rows = trial_statuses(sweep.sweep_dir)
        recs = [layout.TrialRecord(trial_id=r.trial_id, cell=r.cell, design="", base_model="", lora_r=int(r.lora_r),
                                   lr=float(r.lr), seed=0, status="INTERRUPTED" if r.status in UNFINISHED + ("?",)
                                   else r.status, val_metric=r.metric, steps=r.step,
                                   error=f"driver failed: {type(err).__name__}: {err}"[:500]) for r in rows]
        layout.write_trials(sweep.sweep_dir, recs)
        _say(f"training driver failed ({type(err).__name__}: {err}); {len(recs)} trials recorded in "
             f"{sweep.sweep_dir / layout.TRIALS_FILE}")
    except Exception as e2:  # noqa: BLE001 - the disk may be full: the original error matters more
        _say(f"training driver failed ({type(err).__name__}: {err}); could not write trials.json: {e2}")


__all__ = ["SweepInterrupted", "evaluate_stage", "init_ray", "max_concurrent", "prepare", "report_stage",
           "resume_hint", "run_command", "run_pipeline", "train_stage"]
