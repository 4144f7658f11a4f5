"""One Tune trial of a sweep: the driver function Tune runs (it starts the trial's Ray Train `TorchTrainer`, retries
a run that hit CUDA out-of-memory beside other trials, and reports the final metrics and checkpoint to Tune),
the callback that forwards the Train workers' reports to Tune, and the trial's folder names and environment.
"""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from embed_core.train_config import TrainConfig
from sweeps.layout import COMPILE_CACHE_DIR, TRAIN_DIR, WALL_FILE, CellPlan, atomic_write_json, read_cell_plan, read_wall
from sweeps.search import cell_of

from . import compat, test_hooks
from .console import say as _say

CHECKPOINT_PATH_KEY = "checkpoint_path"


def compile_cache_env(sweep_dir: Path) -> dict[str, str]:
    """torch.compile's caches beside the sweep folder, in its storage path: a trial reuses the kernels an earlier
    trial of the same shape compiled, and a resumed sweep, or another sweep of the same models, reuses them all."""
    root = Path(sweep_dir).parent / COMPILE_CACHE_DIR
    return {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}


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
            compat.forward_to_tune(self, m)

    return SweepReportCallback


def trial_config(config: dict, sweep_dir: str | Path, run_dir: Path) -> tuple[CellPlan, TrainConfig]:
    """The plan `prepare` wrote for the trial's cell and the TrainConfig of the trial's workers: the cell's, with the
    trial's own lora_r, lr and seed, reading the cell's training data file. The sweep's config is not read."""
    plan = read_cell_plan(sweep_dir, cell_of(config).key)
    return plan, plan.trial_config(config["lora_r"], config["lr"], config["seed"],
                                   train_data=[str(plan.data_path(sweep_dir))], builders=[], max_bad_fraction=0.0,
                                   log_dir=str(run_dir / "tensorboard"))


def trial_driver(config: dict, sweep_dir: str) -> None:
    """One Tune trial (Ray Train V2 pattern): build the trial's TrainConfig (`trial_config`), start a `TorchTrainer`
    with the trial's ScalingConfig, and report its final metrics + checkpoint path to Tune. A run that failed on a
    CUDA out-of-memory error while other trials share the GPU is started again (from its last checkpoint) once
    memory has freed, up to ``OOM_RETRIES`` times, instead of ending as ERROR. A trial admitted ahead of its turn
    (``gpu_admission``) has its workers wait in the GPU's memory ledger before their models go to the device."""
    import ray.tune

    from embed_core.trainer import read_trainer_state

    from .train import build_trainer, fit

    started = time.time()
    cell = cell_of(config)
    run_dir = Path(sweep_dir) / TRAIN_DIR / f"{cell.key}-{ray.tune.get_context().get_trial_id()}"
    plan, worker_cfg = trial_config(config, sweep_dir, run_dir)
    res, metric = plan.resources, plan.metric
    use_gpu = bool(config["use_gpu"])
    gpus = float(config.get("gpus_per_worker") or res.gpus_per_worker)
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": gpus} if use_gpu else {})}
    with WallLedger(run_dir):  # this run's wall time, summed with the trial's other runs in trials.json
        for attempt in range(OOM_RETRIES + 1):
            trainer = build_trainer(worker_cfg, run_dir, res.num_workers, use_gpu, plan.train_max_failures,
                                    num_to_keep=1, resources_per_worker=per_worker,
                                    fault_injection=test_hooks.train_fault(config.get("test_faults"), cell, run_dir),
                                    callbacks=[_report_callback_class()(metric)],
                                    env=compile_cache_env(Path(sweep_dir)),
                                    gpu_admission=config.get("gpu_admission"))
            fit_started = time.time()  # the trial's own work before Ray starts its workers ends here
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
        if metric in h:
            final.setdefault(metric, h[metric])
            break
    mine = [h["wall_time"] for h in history if h.get("wall_time", 0) >= started]
    final.update({CHECKPOINT_PATH_KEY: result.checkpoint.path, "step": state["step"], "final": True,
                  "resumes": len(state.get("resumes", [])), "trial_started_at": started, "fit_started_at": fit_started,
                  "time_to_first_step_s": (mine[0] - started) if mine else float("nan")})
    if metric not in final:
        final[metric] = float("nan")
    ray.tune.report(final)


OOM_RETRIES = 3
WALL_TICK_S = 2.0


class WallLedger(threading.Thread):
    """This run of a trial's driver writes its wall time so far into the trial's ``wall.json`` every
    ``WALL_TICK_S`` seconds and when it ends. A resumed trial is a new run with its own entry, so the entries sum to
    the trial's wall time over every run, whatever Tune restores its own clock (``time_total_s``) to; a run
    killed without warning loses at most one tick."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.key, self.t0 = Path(run_dir) / WALL_FILE, uuid.uuid4().hex[:12], time.time()
        self.earlier = read_wall(run_dir)  # the trial's earlier runs: no other run writes while this one runs
        self.halt = threading.Event()

    def __enter__(self) -> "WallLedger":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join()  # its last tick must not land after the final value
        self.write()

    def run(self) -> None:
        while not self.halt.wait(WALL_TICK_S):
            self.write()

    def write(self) -> None:
        atomic_write_json(self.path, {**self.earlier, self.key: round(time.time() - self.t0, 2)})


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


def trainable_with_gpu(use_gpu: bool, plan: dict[str, dict[str, float]], test_faults: list | None = None):
    """Tune trainables take (config, **with_parameters): the resolved use_gpu, GPU plan and the tests' injected
    faults (ray_jobs/test_hooks.py) travel in the config."""
    import functools

    return functools.partial(_trial_entry, use_gpu=use_gpu, plan=plan, test_faults=test_faults or [])


def _trial_entry(config: dict, sweep_dir: str, use_gpu: bool, plan: dict | None = None,
                 test_faults: list | None = None) -> None:
    mine = (plan or {}).get(config["base_model"], {})
    trial_driver(dict(config, use_gpu=use_gpu, gpus_per_worker=mine.get("gpus_per_worker"),
                      gpu_mem_need_gib=mine.get("need_gib"),
                      gpu_admission=(mine["training"], mine["ahead"]) if mine.get("ahead") else None,
                      test_faults=test_faults or []), sweep_dir)
