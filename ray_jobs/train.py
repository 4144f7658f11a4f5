"""Distributed contrastive training on Ray Train (V2) with DeepSpeed ZeRO: one `Trainer` per worker.

    from embed_core.train_config import TrainConfig
    from ray_jobs.train import run_training
    out = run_training(TrainConfig(model={"base_model": "smollm2-135m", "pooling": "mean"},
                                   builders=["stsb"], batch_size=64, chunk_size=16, max_steps=200),
                       num_workers=2, use_gpu=True, storage_path="/shared/runs", name="mean-causal")
    out.metrics, out.model_dir            # final metrics, the checkpoint's model/ (EmbeddingModel.load)

or from the shell::

    python -m sweeps train --base-model smollm2-135m --pooling mean --attention causal \
        --num-workers 2 --zero-stage 2 --max-steps 3 --batch-size 16 --max-length 64 \
        --train-data train.jsonl --output /tmp/runs

What happens:

1. `run_training` validates the config (``ConfigError``) and loads + checks the data (``DataError``)
   in the driver, BEFORE any Ray worker starts; the examples are written once to
   ``<storage_path>/<name>/train_data.jsonl`` and every worker reads that file.
2. `train_loop_per_worker` runs on each Ray Train worker. Ray Train has already initialised the
   torch.distributed process group (gloo on CPU, nccl on GPU); DeepSpeed reuses it. The worker
   resumes from ``ray.train.get_checkpoint()`` when there is one (after a worker failure, with
   ``FailureConfig(max_failures > 0)``), then trains, calling ``ray.train.report`` (a barrier across
   workers) when `Cadence` says so: at checkpoints (every ``checkpoint_every`` steps, every
   ``checkpoint_every_s`` seconds, at the end), held-out evaluations, and every ``report_every_s`` seconds.
3. Checkpoints: every worker writes its own local temporary directory -- rank 0 the ``model/``
   folder, ``trainer_state.json`` and its DeepSpeed shards, other ranks only their DeepSpeed shards
   (distinct file names, ``zero_pp_rank_<r>_...``) -- and reports it under the same
   ``checkpoint_dir_name``. Ray Train V2 syncs that name from rank 0 and copies every worker's files
   into ONE directory ``<storage_path>/<name>/checkpoint_<step>/`` (a merge: files of the same
   relative path would overwrite each other, last writer wins, so no two ranks write the same name).

A NaN / inf loss raises FloatingPointError on every rank. Ray Train retries any worker error
while ``max_failures`` allows; since a divergence would only repeat, rank 0 also leaves a
``DIVERGED.json`` marker tagged with this call's run token and a retried worker group re-raises at
once. `run_training` re-raises the FloatingPointError itself.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embed_core.errors import ConfigError
from embed_core.train_config import TrainConfig
from embed_core.train_data import TrainData, load_examples
from embed_core.trainer import MODEL_DIR, read_trainer_state
from sweeps.layout import GPU_WAIT_FILE

from . import compat, test_hooks

log = logging.getLogger(__name__)

__all__ = ["TrainingResult", "build_trainer", "fit", "prepare_run", "run_training", "train_loop_per_worker",
           "training_result", "config_from_args", "main"]

DATA_FILE = "train_data.jsonl"
DIVERGED_FILE = "DIVERGED.json"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


# ====================================================================================== worker side
def _maybe_inject_fault(fault: dict | None, step: int, rank: int) -> None:
    """Test hook: SIGKILL this worker once, after optimizer step `fault['step']` on rank `fault['rank']`.

    The marker file makes it happen once per run (the retried worker group finds it). ``delay_s``
    gives the Ray Train controller time to register the checkpoint reported just before."""
    if not fault or step != int(fault["step"]) or rank != int(fault.get("rank", 0)):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"step": step, "rank": rank, "pid": os.getpid(), "time": time.time()}))
    time.sleep(float(fault.get("delay_s", 0.0)))
    os.kill(os.getpid(), signal.SIGKILL)


def _diverged_marker(config: dict) -> Path | None:
    run_dir = config.get("run_dir")
    return Path(run_dir) / DIVERGED_FILE if run_dir else None


def _raise_if_diverged_before(config: dict) -> None:
    marker = _diverged_marker(config)
    if marker is None or not marker.is_file():
        return
    with_token = json.loads(marker.read_text())
    if with_token.get("run_token") == config.get("run_token"):
        raise FloatingPointError(f"not retrying: this run already diverged: {with_token.get('error')}")


@dataclass
class Cadence:
    """When a Train worker reports to the driver, and when it checkpoints.

    ``ray.train.report`` is a barrier across the workers that hands one result to the Train controller through a
    queue of one; the controller takes it when it polls the workers (every 2 s in Ray 2.60). Reporting every step
    therefore paces training at one step per poll: a trial in a sweep ran at a fraction of the same Trainer alone.
    A worker reports when it must (a checkpoint, a held-out evaluation for the scheduler, the last step), after
    its first step (so the driver sees training start) and otherwise every ``report_every_s`` seconds; every
    step still goes to TensorBoard. It checkpoints every ``checkpoint_every`` steps and every
    ``checkpoint_every_s`` seconds, so a killed trial loses at most that much work."""

    max_steps: int
    checkpoint_every: int = 0
    checkpoint_every_s: float = 0.0
    report_every_s: float = 10.0
    last_report: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, tcfg: TrainConfig) -> "Cadence":
        return cls(tcfg.max_steps, tcfg.checkpoint_every, tcfg.checkpoint_every_s, tcfg.report_every_s)

    def due(self, step: int, evaluated: bool, first: bool, now: float) -> tuple[bool, bool]:
        """(report, checkpoint) after optimizer step `step` (1-based); `first`: the first step of this attempt."""
        checkpoint = (step == self.max_steps or bool(self.checkpoint_every and step % self.checkpoint_every == 0)
                      or bool(self.checkpoint_every_s and now - self.last_checkpoint >= self.checkpoint_every_s))
        report = checkpoint or evaluated or first or now - self.last_report >= self.report_every_s
        return report, checkpoint

    def done(self, report: bool, checkpoint: bool, now: float) -> None:
        if report:
            self.last_report = now
        if checkpoint:
            self.last_checkpoint = now


def agree(flags: tuple[bool, ...], device) -> tuple[bool, ...]:
    """The flags any rank raised, on every rank: reports and checkpoints are collectives, and the ranks' clocks
    differ, so a time-based decision is taken jointly (one tiny all-reduce; nothing on one worker)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(x) for x in t.tolist())


def _report(trainer, metrics: dict, checkpoint: bool) -> None:
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="embed_ckpt_") as d:
        trainer.save_checkpoint(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_dir_name(trainer.step))


def _gpu_gate(config: dict, device):
    """The Trainer's gate of a trial admitted ahead of its turn: wait in the GPU's memory ledger (None otherwise;
    on a CPU, the tests' ledger of ``test_ledger`` if given: ray_jobs/test_hooks.py)."""
    admission, test = config.get("gpu_admission"), config.get("test_ledger")
    if not admission or (device.type != "cuda" and not test):
        return None
    from .gpu_ledger import GpuLedger, device_ledger, gate

    ledger = (device_ledger(device, say=log.warning) if device.type == "cuda" else
              GpuLedger(test["key"], float(test["budget_gib"]), root=Path(test["root"]), say=log.warning))
    training, ahead = admission
    run_dir = config.get("run_dir")
    return gate(ledger, int(training), int(ahead), mark=Path(run_dir) / GPU_WAIT_FILE if run_dir else None)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker function (``TorchTrainer(train_loop_per_worker, train_loop_config=config)``).

    config keys: ``train_config`` (TrainConfig.to_dict()), optional ``run_dir`` and ``run_token``
    (divergence marker), optional ``fault_injection`` ({step, rank, marker, delay_s}; tests only),
    optional ``env`` (variables set before the model is built: compile caches shared by a sweep's trials),
    optional ``gpu_admission`` ([training, ahead]: a sweep trial admitted ahead of its turn; the model waits on
    the host until the GPU memory ledger, `ray_jobs.gpu_ledger`, has room for one of `training` trials).
    """
    started = time.time()
    import ray.train
    import ray.train.torch

    from embed_core.trainer import Trainer

    os.environ.update(config.get("env") or {})
    tcfg = TrainConfig.from_dict(config["train_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _raise_if_diverged_before(config)

    device = ray.train.torch.get_device()
    trainer = Trainer(tcfg, device=device, gate=_gpu_gate(config, device))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = trainer.load_checkpoint(d)
        if rank == 0:
            log.warning("resumed from %s at step %d (epoch %d, batch %d)", checkpoint.path, state["step"],
                        state["epoch"], state["batch_in_epoch"])
    cadence, first = Cadence.of(tcfg), True
    ready = time.time()
    try:
        while trainer.step < tcfg.max_steps:
            metrics = trainer.run_step()
            if first:  # where a trial's start-up time goes (bench/sweep_gpu.py reads it from the history)
                metrics.update({"worker_started_at": started, "trainer_ready_at": ready,
                                **{f"build_{k}_s": round(v, 2) for k, v in trainer.build_s.items()},
                                **{f"compile_{k}": v for k, v in compat.compile_cache_counts().items()}})
            metrics["world_size"] = world
            metrics["resumed_from_step"] = trainer.resumes[-1] if trainer.resumes else -1
            _maybe_inject_fault(config.get("fault_injection"), trainer.step, rank)
            now = time.monotonic()
            report, save = agree(cadence.due(trainer.step, "val_acc" in metrics, first, now), trainer.device)
            metrics["reported"] = report  # kept in the history (trainer_state.json): which steps the driver saw
            if report:
                _report(trainer, metrics, save)
            cadence.done(report, save, now)
            first = False
    except FloatingPointError as err:
        marker = _diverged_marker(config)
        if rank == 0 and marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"run_token": config.get("run_token"), "error": str(err),
                                          "step": trainer.step + 1}))
        raise
    finally:
        trainer.close()


# ====================================================================================== driver side
@dataclass
class TrainingResult:
    """What `run_training` returns.

    metrics: the final step's metrics (rank 0); checkpoint_path: the last checkpoint directory;
    model_dir: its ``model/`` (``EmbeddingModel.load(model_dir)``); history: per-step metrics from
    trainer_state.json; resumes: steps the run was resumed from after failures; result: the Ray Result.
    """

    metrics: dict[str, Any]
    checkpoint_path: str
    model_dir: str
    run_dir: str
    history: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    result: Any = None


def _floating_point_cause(err: BaseException) -> str | None:
    """The message of a FloatingPointError raised in a worker, if that is what failed the run."""
    seen: list[BaseException] = [err]
    failures = getattr(err, "worker_failures", None) or {}
    seen.extend(failures.values())
    for e in list(seen):
        for attr in ("cause", "__cause__", "__context__"):
            c = getattr(e, attr, None)
            if isinstance(c, BaseException):
                seen.append(c)
    for e in seen:
        if isinstance(e, FloatingPointError):
            return str(e)
    for e in seen:
        text = str(e)
        if "FloatingPointError" in text:
            return text[text.index("FloatingPointError"):].splitlines()[0]
    return None


def prepare_run(tcfg: TrainConfig, num_workers: int, storage_path: str | os.PathLike,
                name: str) -> tuple[TrainConfig, Path]:
    """Validate config and data (before Ray), write the examples to ``<run_dir>/train_data.jsonl`` and
    return the workers' config (reading that file) and the run directory."""
    from embed_core.data import write_jsonl

    tcfg.validate(num_workers)
    storage = str(storage_path)
    if "://" in storage:
        raise ConfigError(f"storage_path {storage!r} must be a local or shared filesystem path (the workers "
                          "read the training data and write TensorBoard logs there)")
    examples = load_examples(tcfg)
    TrainData(tcfg, examples)  # raises DataError: too few examples for one batch / for val_size
    run_dir = Path(storage).expanduser().resolve() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    data_file = write_jsonl(examples, run_dir / DATA_FILE)
    worker_cfg = tcfg.replace(train_data=[str(data_file)], builders=[], max_bad_fraction=0.0,
                              log_dir=tcfg.log_dir or str(run_dir / "tensorboard"))
    return worker_cfg, run_dir


def build_trainer(worker_cfg: TrainConfig, run_dir: Path, num_workers: int = 1, use_gpu: bool = False,
                  max_failures: int = 0, *, num_to_keep: int | None = 2,
                  resources_per_worker: dict[str, float] | None = None, fault_injection: dict | None = None,
                  callbacks: list | None = None, env: dict[str, str] | None = None,
                  gpu_admission: tuple[int, int] | None = None):
    """The `TorchTrainer` of one training run whose data is ready (`prepare_run`): ``num_workers`` Ray Train
    workers running `train_loop_per_worker`, Train run ``run_dir.name`` stored under ``run_dir.parent``;
    ``env``: variables every worker sets before it builds the model (a sweep's shared compile caches);
    ``gpu_admission``: (training, ahead): each worker waits in its GPU's memory ledger until one of `training` trials
    at once fits beside `ahead` waiting ones, before its model goes there.

    A TorchTrainer built again with the same ``run_dir`` (a restarted sweep trial, say) resumes from that
    run's latest checkpoint: Ray Train V2 restores its checkpoint manager from storage."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not isinstance(max_failures, int) or max_failures < -1:
        raise ConfigError(f"max_failures must be an int >= -1 (-1: retry forever), got {max_failures!r}")
    if num_to_keep is not None and (not isinstance(num_to_keep, int) or num_to_keep < 1):
        raise ConfigError(f"num_to_keep must be an int >= 1 or None (keep all), got {num_to_keep!r}")
    resources = resources_per_worker or ({"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1})
    loop_config = {"train_config": worker_cfg.to_dict(), "run_dir": str(run_dir), "run_token": uuid.uuid4().hex,
                   "fault_injection": fault_injection, "env": dict(env or {}),
                   "gpu_admission": gpu_admission, "test_ledger": test_hooks.cpu_ledger()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
                             callbacks=callbacks),
    )


def fit(trainer, run_dir: Path):
    """``trainer.fit()``, re-raising a diverged run as FloatingPointError; returns the Ray Result."""
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - re-raise divergence as itself, the rest unchanged
        cause = _floating_point_cause(err)
        if cause is not None:
            raise FloatingPointError(f"training diverged: {cause}") from err
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint under {run_dir}")
    return result


def training_result(result, run_dir: Path) -> TrainingResult:
    """A `TrainingResult` from the Ray Result of a finished run (its last checkpoint's trainer_state)."""
    ckpt = result.checkpoint.path
    state = read_trainer_state(ckpt)
    return TrainingResult(metrics=dict(result.metrics or {}), checkpoint_path=ckpt,
                          model_dir=str(Path(ckpt) / MODEL_DIR), run_dir=str(run_dir),
                          history=state.get("history", []), resumes=state.get("resumes", []), result=result)


def run_training(tcfg: TrainConfig, num_workers: int = 1, use_gpu: bool = False,
                 storage_path: str | os.PathLike = "~/ray_results", name: str | None = None,
                 max_failures: int = 0, *, num_to_keep: int | None = 2,
                 resources_per_worker: dict[str, float] | None = None,
                 fault_injection: dict | None = None, ray_init_kwargs: dict | None = None,
                 gpu_admission: tuple[int, int] | None = None) -> TrainingResult:
    """Validate, then run `train_loop_per_worker` on `num_workers` Ray Train workers; return the result.

    Config (ConfigError) and data (DataError) problems are raised here before Ray starts. A run
    whose loss turns NaN / inf raises FloatingPointError. Other failures beyond ``max_failures``
    raise Ray's TrainingFailedError. ``ray.init(**ray_init_kwargs)`` is called if Ray is not running.
    ``gpu_admission``: see `build_trainer`.
    """
    if not isinstance(max_failures, int) or max_failures < -1:
        raise ConfigError(f"max_failures must be an int >= -1 (-1: retry forever), got {max_failures!r}")
    if num_to_keep is not None and (not isinstance(num_to_keep, int) or num_to_keep < 1):
        raise ConfigError(f"num_to_keep must be an int >= 1 or None (keep all), got {num_to_keep!r}")
    name = name or time.strftime("embed_train_%Y%m%d_%H%M%S")
    worker_cfg, run_dir = prepare_run(tcfg, num_workers, storage_path, name)

    import ray

    if not ray.is_initialized():
        ray.init(**(ray_init_kwargs or {}))
    trainer = build_trainer(worker_cfg, run_dir, num_workers, use_gpu, max_failures, num_to_keep=num_to_keep,
                            resources_per_worker=resources_per_worker, fault_injection=fault_injection,
                            gpu_admission=gpu_admission)
    return training_result(fit(trainer, run_dir), run_dir)


if __name__ == "__main__":  # an alias of `python -m sweeps train`
    from sweeps.cli import alias

    alias("train")
