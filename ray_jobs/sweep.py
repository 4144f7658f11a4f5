"""The sweep job: train the grid with Ray Tune (+ Ray Train V2 per trial), evaluate the best checkpoints on MTEB,
write the significance report. Run it with ``python -m sweeps run CONFIG`` (see sweeps/cli.py) locally or as
``ray job submit --working-dir . -- python -m sweeps run CONFIG`` on a cluster.

Stages, each idempotent and runnable alone on what the previous one left in ``<storage>/<name>/``
(layout: `sweeps.layout`):

1. **prepare** (driver, no Ray): validate the config, check every base model's structure and the training data,
   write ``sweep.json`` and the training examples (one JSONL per distinct data recipe, under ``data/``).
2. **train**: one Tune experiment (``tune/``). The searcher (`ray_jobs.search.CellSearcher`) visits every grid
   cell (base model x design x seed) and samples LoRA rank / LR inside it with one Optuna study per cell; ASHA
   per cell stops weak trials on the trainer's held-out metric. Each Tune trial is a driver function
   (`trial_driver`) that starts a `TorchTrainer` with the trial's ScalingConfig; a callback forwards the Train
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embed_core.errors import ConfigError
from sweeps.config import Cell, SweepConfig
from sweeps.search import cell_of

from sweeps import layout
from sweeps.layout import COMPILE_CACHE_DIR, SWEEP_FORMAT, TRAIN_DIR, TUNE_DIR, data_file, read_sweep

from . import test_hooks, tracking

log = logging.getLogger(__name__)

CHECKPOINT_PATH_KEY = "checkpoint_path"


def _say(msg: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ====================================================================================== prepare
def prepare(sweep: SweepConfig, resume: bool = False, check_models: bool = True) -> Path:
    """Validate everything checkable before Ray (models' structure, data), create the sweep folder, write
    ``sweep.json`` and the training data. ``resume`` requires the folder to exist with the same config."""
    from embed_core.data import write_jsonl
    from embed_core.train_data import TrainData, load_examples

    sweep_dir = sweep.sweep_dir
    stored = sweep_dir / layout.SWEEP_FILE
    if stored.is_file():
        old = json.loads(stored.read_text())
        if not resume:
            raise ConfigError(f"sweep {sweep.name!r} already exists at {sweep_dir}: add --resume to continue it, "
                              "or give the sweep another name (--set name=...) or --storage path")
        if old.get("fingerprint") != sweep.fingerprint():
            diff = sorted(k for k in set(old["config"]) | set(sweep.raw)
                          if k != "storage_path" and old["config"].get(k) != sweep.raw.get(k))
            raise ConfigError(f"--resume: the config differs from the one sweep {sweep.name!r} was started with "
                              f"(sections {diff}); resume with the same config, or start a new sweep")
    elif resume and (sweep_dir / TUNE_DIR).exists():
        raise ConfigError(f"--resume: {sweep_dir} has a Tune experiment but no {layout.SWEEP_FILE}")
    sweep.check_storage()
    if check_models:
        sweep.preflight(check_data=False)
        convert_models_once(sweep)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # the training data of every distinct recipe, checked (DataError) and written once
    written: set[Path] = set()
    for cell in sweep.cells():
        tcfg = sweep.train_config(cell, *sweep.probe_values())
        f = data_file(sweep_dir, tcfg)
        if f in written:
            continue
        written.add(f)
        if f.is_file():
            continue
        examples = load_examples(tcfg)
        TrainData(tcfg, examples)  # DataError: too few examples for one batch / for val_size
        write_jsonl(examples, f)  # atomic: a concurrent or killed prepare never leaves half a file
    if not stored.is_file():
        layout.atomic_write_json(stored, {"format": SWEEP_FORMAT, "fingerprint": sweep.fingerprint(),
                                          "config": sweep.to_dict(), "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return sweep_dir


def convert_models_once(sweep: SweepConfig) -> None:
    """Dequantise every GGUF base model into the local model cache now, once, instead of in each trial's
    workers (several trials starting together would each convert it)."""
    from embed_core.backbone import resolve_source

    first: dict[str, Cell] = {}
    for cell in sweep.cells():
        first.setdefault(cell.base_model, cell)
    for cell in first.values():
        resolve_source(sweep.train_config(cell, *sweep.probe_values()).model)


def compile_cache_env(sweep_dir: Path) -> dict[str, str]:
    """torch.compile's caches beside the sweep folder, in its storage path: a trial reuses the kernels an earlier
    trial of the same shape compiled, and a resumed sweep, or another sweep of the same models, reuses them all."""
    root = Path(sweep_dir).parent / COMPILE_CACHE_DIR
    return {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}


# ====================================================================================== trial side
def _report_callback_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        """Forward rank 0's Train reports to Tune once they carry the scheduler's metric (the held-out
        evaluation runs every ``eval_every`` steps; later reports carry its last value forward), with the
        checkpoint path when there is one. Tune requires the metric in every result it receives."""

        def __init__(self, metric: str) -> None:
            super().__init__()
            self._metric = metric
            self._carry: dict[str, float] = {}

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str, bool))}
            m["evaluated"] = self._metric in m  # a fresh held-out evaluation, not one carried forward
            for k in ("val_acc", "val_margin"):
                if k in m:
                    self._carry[k] = m[k]
                elif k in self._carry:
                    m[k] = self._carry[k]
            if self._metric not in m:
                return
            if checkpoint:
                m[CHECKPOINT_PATH_KEY] = checkpoint.path
            self._training_actor_item_queue.put(m)

    return SweepReportCallback


def trial_driver(config: dict, sweep_dir: str) -> None:
    """One Tune trial (Ray Train V2 pattern): build the trial's TrainConfig, start a `TorchTrainer` with the
    trial's ScalingConfig, and report its final metrics + checkpoint path to Tune. A run that failed on a CUDA
    out-of-memory error while other trials share the GPU is started again (from its last checkpoint) once
    memory has freed, up to ``OOM_RETRIES`` times, instead of ending as ERROR."""
    import ray.tune

    from embed_core.trainer import read_trainer_state

    from .train import build_trainer, fit

    started = time.time()
    sweep = read_sweep(sweep_dir)
    cell = cell_of(config)
    tcfg = sweep.train_config(cell, config["lora_r"], config["lr"])
    res = sweep.resources_for(cell)
    run_dir = Path(sweep_dir) / TRAIN_DIR / f"{cell.key}-{ray.tune.get_context().get_trial_id()}"
    worker_cfg = tcfg.replace(train_data=[str(data_file(Path(sweep_dir), tcfg))], builders=[],
                              max_bad_fraction=0.0, log_dir=str(run_dir / "tensorboard"))
    use_gpu = bool(config["use_gpu"])
    gpus = float(config.get("gpus_per_worker") or res.gpus_per_worker)
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": gpus} if use_gpu else {})}
    for attempt in range(OOM_RETRIES + 1):
        trainer = build_trainer(worker_cfg, run_dir, res.num_workers, use_gpu, sweep.failure.train_max_failures,
                                num_to_keep=1, resources_per_worker=per_worker,
                                fault_injection=test_hooks.train_fault(config.get("test_faults"), cell, run_dir),
                                callbacks=[_report_callback_class()(sweep.scheduler.metric)],
                                env=compile_cache_env(Path(sweep_dir)))
        try:
            result = fit(trainer, run_dir)
            break
        except Exception as err:  # noqa: BLE001 - only a shared GPU's OOM is retried
            if not (use_gpu and gpus < 1 and attempt < OOM_RETRIES and is_cuda_oom(err)):
                raise
            _say(f"trial {cell.key}: CUDA out of memory beside other trials; retrying from its last checkpoint "
                 f"once GPU memory frees (attempt {attempt + 2}/{OOM_RETRIES + 1})")
            wait_for_gpu_memory(float(config.get("gpu_mem_need_gib") or 0.0))
    state = read_trainer_state(result.checkpoint.path)
    history = state.get("history") or [{}]
    final = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
    for h in reversed(history):  # the last held-out evaluation
        if sweep.scheduler.metric in h:
            final.setdefault(sweep.scheduler.metric, h[sweep.scheduler.metric])
            break
    mine = [h["wall_time"] for h in history if h.get("wall_time", 0) >= started]
    final.update({CHECKPOINT_PATH_KEY: result.checkpoint.path, "step": state["step"], "final": True,
                  "resumes": len(state.get("resumes", [])), "trial_started_at": started,
                  "time_to_first_step_s": (mine[0] - started) if mine else float("nan")})
    if sweep.scheduler.metric not in final:
        final[sweep.scheduler.metric] = float("nan")
    ray.tune.report(final)


OOM_RETRIES = 3


def is_cuda_oom(err: BaseException) -> bool:
    """Whether a failed Train run's root cause is a CUDA out-of-memory error (Ray wraps the worker's error)."""
    text = f"{err}\n" + "\n".join(str(e) for e in (getattr(err, "worker_failures", None) or {}).values())
    return "OutOfMemoryError" in text or "CUDA out of memory" in text


def wait_for_gpu_memory(need_gib: float, timeout_s: float = 600.0, poll_s: float = 5.0) -> None:
    """Until every visible GPU has ``need_gib`` free (NVML), or `timeout_s`; without NVML, one pause."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML here: a fixed pause, then the retry
        time.sleep(min(60.0, timeout_s))
        return
    deadline = time.time() + timeout_s
    need = max(need_gib, 1.0) * 2**30
    while time.time() < deadline:
        free = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free
                for i in range(pynvml.nvmlDeviceGetCount())]
        if free and max(free) >= need:
            return
        time.sleep(poll_s)


def trial_dirname(trial) -> str:
    return f"{trial.config.get('cell_key', 'trial')}-{trial.trial_id}"


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
    """base model -> {gpus_per_worker, need_gib}: each trial's estimated GPU memory (`sweeps.resources`) and the
    GPU share its workers get: the configured ``gpus_per_worker``, raised to the largest 1/k of this machine's GPU
    that holds the estimate when trials sharing a GPU would not fit (a ConfigError when one GPU cannot hold it)."""
    from embed_core.data import read_jsonl
    from embed_core.memory import gpu_share, gpu_total_gib
    from sweeps.resources import memory_plan

    if not use_gpu:
        return {}
    first = sweep.cells()[0]
    examples = read_jsonl(data_file(sweep.sweep_dir, sweep.train_config(first, *sweep.probe_values())))
    gpu = gpu_total_gib()
    out = {}
    for model, est in memory_plan(sweep, examples).items():
        want = sweep.resources_for(next(c for c in sweep.cells() if c.base_model == model)).gpus_per_worker
        try:
            share = gpu_share(est.total_gib, gpu, want) if gpu else want
        except ValueError as e:
            raise ConfigError(f"sweep config {sweep.source}: a trial of {model} {e}: lower training.batch_size, "
                              "set training.chunk_size (GradCache) or use more workers") from None
        if share != want:
            _say(f"WARNING: resources.gpus_per_worker {want} gives a trial of {model} {want * gpu:.1f} GiB of this "
                 f"{gpu:.0f} GiB GPU, but it needs {est.describe()}: raised to {share:.3g} "
                 f"({round(1 / share)} trials at a time)")
        out[model] = {"gpus_per_worker": share, "need_gib": est.total_gib}
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
    trainable = tune.with_parameters(_trainable_with_gpu(use_gpu, plan, test_hooks.faults("train")),
                                     sweep_dir=str(sweep_dir))
    # The trial driver only starts the TorchTrainer, whose workers hold the CPUs / GPUs in their own placement
    # group. Tune needs a non-empty bundle per trial: a token amount of memory (1 MiB), no CPU.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 2**20})
    max_steps = {c.key: sweep.train_config(c, *sweep.probe_values()).max_steps for c in sweep.cells()}
    printer = _status_printer_class()(sweep.scheduler.metric, max_steps, sweep.num_trials())
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        _say(f"resuming the Tune experiment at {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        concurrency = max_concurrent(sweep, use_gpu, plan)
        _say(f"{len(sweep.cells())} cells x {sweep.search.samples_per_cell} samples = {sweep.num_trials()} trials, "
             f"{concurrency} at a time, {'GPU' if use_gpu else 'CPU'}; TensorBoard: tensorboard --logdir {sweep_dir}")
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


def _trainable_with_gpu(use_gpu: bool, plan: dict[str, dict[str, float]], test_faults: list | None = None):
    """Tune trainables take (config, **with_parameters): the resolved use_gpu, GPU plan and the tests' injected
    faults (ray_jobs/test_hooks.py) travel in the config."""
    import functools

    return functools.partial(_trial_entry, use_gpu=use_gpu, plan=plan, test_faults=test_faults or [])


def _trial_entry(config: dict, sweep_dir: str, use_gpu: bool, plan: dict | None = None,
                 test_faults: list | None = None) -> None:
    mine = (plan or {}).get(config["base_model"], {})
    trial_driver(dict(config, use_gpu=use_gpu, gpus_per_worker=mine.get("gpus_per_worker"),
                      gpu_mem_need_gib=mine.get("need_gib"), test_faults=test_faults or []), sweep_dir)


#: Tune states of a trial that had not finished when the driver stopped (Ctrl-C, a killed driver)
UNFINISHED = ("RUNNING", "PENDING", "PAUSED")


def collect_trials(sweep: SweepConfig, grid, use_gpu: bool) -> list[layout.TrialRecord]:
    """One TrialRecord per trial of the experiment: TERMINATED (trained to the end), STOPPED (ASHA), ERROR,
    INTERRUPTED (the driver stopped before the trial finished: ``--resume`` continues it). Trials the
    ResultGrid leaves out (no result reported yet) come from the experiment state."""
    exp_dir = sweep.sweep_dir / TUNE_DIR
    states = {tid: meta.get("status", "?") for tid, meta in _tune_trials(exp_dir).items()}
    out = {}
    for result in grid:
        cfg = result.config or _params(Path(result.path))
        if "cell_key" not in cfg:
            continue
        m = result.metrics or {}
        tid = str(m.get("trial_id") or Path(result.path).name.rsplit("-", 1)[-1])
        if result.error is not None:
            status = "ERROR"
        elif m.get("final"):
            status = "TERMINATED"
        elif states.get(tid) in UNFINISHED or not m:
            status = "INTERRUPTED"
        else:
            status = "STOPPED"
        out[tid] = _trial_record(sweep, cfg, tid, status, m, Path(result.path), use_gpu,
                                 "" if result.error is None else error_summary(result.error))
    for tid, meta in _tune_trials(exp_dir).items():
        cfg = meta.get("config") or {}
        if tid not in out and "cell_key" in cfg:
            status = "ERROR" if meta.get("status") == "ERROR" else "INTERRUPTED"
            out[tid] = _trial_record(sweep, cfg, tid, status, {}, exp_dir / f"{cfg['cell_key']}-{tid}", use_gpu, "")
    return sorted(out.values(), key=lambda t: (t.cell, t.trial_id))


def _trial_record(sweep: SweepConfig, cfg: dict, tid: str, status: str, m: dict, trial_dir: Path, use_gpu: bool,
                  error: str) -> layout.TrialRecord:
    cell = cell_of(cfg)
    res = sweep.resources_for(cell)
    wall = _wall_s(trial_dir, float(m.get("time_total_s") or 0.0))
    metric = m.get(sweep.scheduler.metric)
    return layout.TrialRecord(
        trial_id=tid, cell=cell.key, config=cell.design, base_model=cell.base_model, lora_r=int(cfg["lora_r"]),
        lr=float(cfg["lr"]), seed=cell.seed, status=status,
        val_metric=None if metric is None or (isinstance(metric, float) and math.isnan(metric)) else float(metric),
        steps=max(int(m.get("step") or 0), _checkpoint_step(sweep.sweep_dir, cell, tid)), wall_s=wall,
        gpu_hours=wall / 3600 * res.num_workers * res.gpus_per_worker if use_gpu else 0.0,
        cpu_hours=wall / 3600 * res.num_workers * res.cpus_per_worker,
        checkpoint=str(m.get(CHECKPOINT_PATH_KEY) or ""), error=error)


def _params(trial_dir: Path) -> dict:
    try:
        return json.loads((trial_dir / "params.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _results(trial_dir: Path) -> list[dict]:
    """The trial's reported results (``result.json``, one per line; a line being written is skipped)."""
    out = []
    try:
        lines = (trial_dir / "result.json").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _wall_s(trial_dir: Path, fallback: float) -> float:
    """Wall time over every run of the trial: Tune restarts ``time_total_s`` from 0 when a resumed driver
    restarts the trial, so each run's last value is summed (the costs add up across resumes)."""
    total, prev = 0.0, 0.0
    for r in _results(trial_dir):
        t = float(r.get("time_total_s") or 0.0)
        if t < prev:
            total += prev
        prev = t
    return total + prev if prev or total else fallback


def _checkpoint_step(sweep_dir: Path, cell: Cell, trial_id: str) -> int:
    """The step of the trial's newest Train checkpoint (after a SIGKILL it is ahead of the last Tune result)."""
    steps = [0]
    for f in (Path(sweep_dir) / TRAIN_DIR / f"{cell.key}-{trial_id}").glob("checkpoint_*/trainer_state.json"):
        try:
            steps.append(int(json.loads(f.read_text()).get("step") or 0))
        except (OSError, ValueError, TypeError):
            continue
    return max(steps)


def error_summary(err: BaseException) -> str:
    """The root cause of a trial's error in one line (Ray wraps it in tracebacks of its actors)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    causes = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]*(Error|Exception|Interrupt): ", ln)]
    line = causes[-1] if causes else next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
    return f"{type(err).__name__}: {line}"[:500]


def select_checkpoints(sweep: SweepConfig, trials: list[layout.TrialRecord]) -> list[layout.CheckpointSpec]:
    """The ``evaluation.top_k`` best TERMINATED trials of each cell by the scheduler metric."""
    from embed_core.trainer import MODEL_DIR

    sign = 1.0 if sweep.scheduler.mode == "max" else -1.0
    specs = []
    for cell in sweep.cells():
        done = [t for t in trials if t.cell == cell.key and t.status == "TERMINATED" and t.checkpoint]
        done.sort(key=lambda t: -sign * (t.val_metric if t.val_metric is not None else -sign * math.inf))
        for t in done[: sweep.evaluation.top_k]:
            labels = layout.RunLabels(config=cell.design, base_model=cell.base_model, pooling=cell.pooling,
                                      attention=cell.attention, lora_r=t.lora_r, lr=t.lr, seed=cell.seed,
                                      trial_id=t.trial_id, cell=cell.key, steps=t.steps, gpu_hours=t.gpu_hours,
                                      cpu_hours=t.cpu_hours, checkpoint=str(Path(t.checkpoint) / MODEL_DIR),
                                      extra={"sweep": sweep.name, sweep.scheduler.metric: t.val_metric})
            specs.append(layout.CheckpointSpec(name=f"{sweep.name}/{cell.key}", path=labels.checkpoint,
                                               labels=labels))
    return specs


# ====================================================================================== status
@dataclass
class TrialStatus:
    trial_id: str
    cell: str
    lora_r: Any
    lr: Any
    status: str
    step: int
    max_steps: int
    metric: float | None


def trial_statuses(sweep_dir: str | os.PathLike) -> list[TrialStatus]:
    """Per-trial progress read from the Tune experiment's files alone (works while the sweep runs, without Ray).
    A trial Tune last saw running while no driver is alive is INTERRUPTED (``--resume`` continues it)."""
    sweep = read_sweep(sweep_dir)
    metric = sweep.scheduler.metric
    exp_dir = Path(sweep_dir) / TUNE_DIR
    tune_trials = _tune_trials(exp_dir)
    states = {tid: meta["status"] for tid, meta in tune_trials.items()}
    driver_alive = driver_state(sweep_dir)[0]
    trial_dirs = {p.name.rsplit("-", 1)[-1]: p for p in exp_dir.glob("*-*") if (p / "params.json").is_file()}
    for tid, meta in tune_trials.items():  # created, not started: no params.json yet
        if tid not in trial_dirs and "cell_key" in meta["config"]:
            trial_dirs[tid] = exp_dir / f"{meta['config']['cell_key']}-{tid}"
    out = []
    for tid, trial_dir in sorted(trial_dirs.items(), key=lambda kv: kv[1].name):
        params = _params(trial_dir) or tune_trials[tid]["config"]
        results = _results(trial_dir)
        last = results[-1] if results else {}
        cell = cell_of(params)
        status = states.get(tid, "PENDING")
        if (trial_dir / "error.txt").is_file():
            status = "ERROR"
        elif status == "TERMINATED" and not last.get("final"):
            status = "STOPPED"
        elif status in UNFINISHED and not driver_alive:
            status = "INTERRUPTED"
        step = max(int(last.get("step") or 0), _checkpoint_step(Path(sweep_dir), cell, tid))
        out.append(TrialStatus(tid, cell.key, params.get("lora_r"), params.get("lr"), status, step,
                               sweep.train_config(cell, *sweep.probe_values()).max_steps, last.get(metric)))
    return out


# ====================================================================================== the driver's liveness
HEARTBEAT_S = 30.0


def driver_state(sweep_dir: str | os.PathLike) -> tuple[bool, str]:
    """(alive, description) of the sweep driver from ``driver.json``: alive when its process exists on this
    host (or, seen from another host, when its heartbeat is fresh)."""
    import socket

    f = Path(sweep_dir) / layout.DRIVER_FILE
    try:
        d = json.loads(f.read_text())
        age = time.time() - f.stat().st_mtime
    except (OSError, json.JSONDecodeError):
        return False, "no driver running"
    where = f"pid {d.get('pid')} on {d.get('host')}"
    if d.get("host") == socket.gethostname():
        alive = _pid_alive(int(d.get("pid") or 0))
    else:
        alive = age < 3 * HEARTBEAT_S
    return alive, (f"driver running ({where})" if alive else
                   f"driver DEAD ({where}, last heartbeat {age:.0f} s ago): resume with --resume")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DriverHeartbeat:
    """While the pipeline runs: ``driver.json`` names this process and is touched every HEARTBEAT_S; removed
    when the driver ends in any way but a kill (then `status` tells the dead pid / stale heartbeat)."""

    def __init__(self, sweep_dir: Path) -> None:
        import threading

        self.file = Path(sweep_dir) / layout.DRIVER_FILE
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="sweep-heartbeat")

    def __enter__(self) -> "DriverHeartbeat":
        import socket

        layout.atomic_write_json(self.file, {"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.file)
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.file.unlink(missing_ok=True)


def _tune_trials(exp_dir: Path) -> dict[str, dict]:
    """trial_id -> Tune's metadata of the trial (status, config) from the newest experiment_state-*.json
    (best effort: {} while none is readable)."""
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for entry in state.get("trial_data", []):
        try:
            meta = json.loads(entry[0])
            out[meta["trial_id"]] = {"status": meta.get("status", "?"), "config": meta.get("config") or {}}
        except (TypeError, ValueError, KeyError, IndexError):
            continue
    return out


def _tune_trial_states(exp_dir: Path) -> dict[str, str]:
    """trial_id -> Tune status (see `_tune_trials`)."""
    return {tid: meta["status"] for tid, meta in _tune_trials(exp_dir).items()}


def status_text(sweep_dir: str | os.PathLike) -> str:
    sweep_dir = Path(sweep_dir)
    sweep = read_sweep(sweep_dir)
    rows = trial_statuses(sweep_dir)
    lines = [f"sweep {sweep.name} at {sweep_dir}: {len(sweep.cells())} cells, {sweep.num_trials()} trials planned, "
             f"{len(rows)} started; {driver_state(sweep_dir)[1]}"]
    lines.append(f"{'trial':10s} {'cell':52s} {'lora_r':>6s} {'lr':>9s} {'status':10s} {'step':>9s} "
                 f"{sweep.scheduler.metric:>10s}")
    for r in rows:
        lr = f"{r.lr:.2e}" if isinstance(r.lr, (int, float)) else str(r.lr)
        m = f"{r.metric:.4f}" if isinstance(r.metric, (int, float)) else "-"
        lines.append(f"{r.trial_id:10s} {r.cell:52s} {r.lora_r!s:>6s} {lr:>9s} {r.status:10s} "
                     f"{f'{r.step}/{r.max_steps}':>9s} {m:>10s}")
    ck = sweep_dir / layout.CHECKPOINTS_FILE
    if ck.is_file():
        specs = layout.read_checkpoints(ck)
        results = sweep_dir / layout.RESULTS_DIR
        done = sum(p.name not in layout.RESULT_META_FILES for p in results.glob("*/*/*.json")) \
            if results.is_dir() else 0
        lines.append(f"evaluation: {len(specs)} checkpoints chosen; {done} result files under {results}")
    rep = sweep_dir / layout.REPORT_DIR / "report.html"
    lines.append(f"report: {rep if rep.is_file() else 'not written yet'}")
    return "\n".join(lines)


# ====================================================================================== parts
def merge_parts(out_dir: str | os.PathLike, part_dirs: list[str | os.PathLike]) -> Path:
    """Merge sweep folders that each ran a part of the same sweep (``run --part``) into `out_dir`: one
    ``sweep.json`` (the fingerprints must agree), the union of ``trials.json`` and ``checkpoints.json``, and every
    result file (a checkpoint evaluated in two parts, the reference say, is kept once). ``sweeps report OUT``
    then builds the report of the whole. Training folders (tune/, train/) are not copied."""
    import shutil

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
    _say(f"merged {len(parts)} part(s) into {out}: {len(trials)} trials, {len(specs)} checkpoints")
    return out


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


def resume_hint(sweep: SweepConfig) -> str:
    src = sweep.source if sweep.source != "<dict>" else str(sweep.sweep_dir)
    return f"resume with: python -m sweeps run {src} --storage {sweep.storage_path} --resume"


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
        recs = [layout.TrialRecord(trial_id=r.trial_id, cell=r.cell, config="", base_model="", lora_r=int(r.lora_r),
                                   lr=float(r.lr), seed=0, status="INTERRUPTED" if r.status in UNFINISHED + ("?",)
                                   else r.status, val_metric=r.metric, steps=r.step,
                                   error=f"driver failed: {type(err).__name__}: {err}"[:500]) for r in rows]
        layout.write_trials(sweep.sweep_dir, recs)
        _say(f"training driver failed ({type(err).__name__}: {err}); {len(recs)} trials recorded in "
             f"{sweep.sweep_dir / layout.TRIALS_FILE}")
    except Exception as e2:  # noqa: BLE001 - the disk may be full: the original error matters more
        _say(f"training driver failed ({type(err).__name__}: {err}); could not write trials.json: {e2}")


__all__ = ["CHECKPOINT_PATH_KEY", "SweepInterrupted", "collect_trials", "driver_state", "evaluate_stage",
           "init_ray", "max_concurrent", "resume_hint",
           "prepare", "report_stage", "run_pipeline", "select_checkpoints", "status_text",
           "train_stage", "trial_driver", "trial_statuses"]
