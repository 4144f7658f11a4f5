"""Hooks for the test suite, read from the environment here and nowhere else (none is part of a sweep config).

``EMBED_TEST_FAULTS``: JSON, faults to inject, for the fault-tolerance tests::

    {"train":    [{"match": {"pooling": "mean", "attention": "causal"}, "step": 3, "rank": 0, "delay_s": 2.0}],
     "evaluate": [{"task": "SciFact", "times": 2, "checkpoint": "org/name"}]}

  * ``train``: a Train worker of each trial whose cell matches ``match`` (cell fields: base_model, pooling,
    attention, seed; every one given must be equal) is SIGKILLed once, after optimizer step ``step``, on rank
    ``rank`` (``delay_s`` after writing the marker ``FAULT_INJECTED.json`` in the trial's run folder). The last
    matching entry wins.
  * ``evaluate``: the (checkpoint, task) evaluation raises its first ``times`` attempts (``checkpoint``: only
    that checkpoint's; default every checkpoint's).

``EMBED_TEST_CPU_LEDGER``: JSON ``{"key": ..., "budget_gib": ..., "root": ...}``: a training run's CPU workers given
``gpu_admission`` wait in that ledger (`ray_jobs.gpu_ledger`) as GPU workers wait in their GPU's, so that the
start-ahead path runs on a machine without a GPU (read where the run is built, passed in the workers' config).

``EMBED_EVAL_RAY_CPUS``: the CPUs of the local Ray that the evaluation fan-out starts when no Ray is running
(default: every core of the machine); the tests pin it so that results do not depend on the machine.

The sweep driver reads the faults when it starts the Tune experiment and passes each trial its own (the trial
runs in a Ray actor, which need not see the driver's environment).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from embed_core.errors import ConfigError
from sweeps.layout import model_dir_name

FAULTS_ENV = "EMBED_TEST_FAULTS"
CPU_LEDGER_ENV = "EMBED_TEST_CPU_LEDGER"
EVAL_RAY_CPUS_ENV = "EMBED_EVAL_RAY_CPUS"
FAULT_MARKER = "FAULT_INJECTED.json"
_KINDS = ("train", "evaluate")


def faults(kind: str) -> list[dict[str, Any]]:
    """The ``kind`` ("train" or "evaluate") entries of $EMBED_TEST_FAULTS ([] when unset)."""
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return []
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"${FAULTS_ENV} is not JSON ({err}): unset it outside the tests") from None
    if not isinstance(obj, dict) or set(obj) - set(_KINDS):
        raise ConfigError(f"${FAULTS_ENV} must be an object with keys {_KINDS}, got {raw!r}")
    items = obj.get(kind) or []
    need = "match" if kind == "train" else "task"
    if not isinstance(items, list) or not all(isinstance(f, dict) and need in f for f in items):
        raise ConfigError(f"${FAULTS_ENV}[{kind!r}] must be a list of objects with {need!r}, got {items!r}")
    return items


def train_fault(entries: list[dict[str, Any]] | None, cell, run_dir: Path) -> dict[str, Any] | None:
    """The worker fault of one trial (ray_jobs.train's ``fault_injection``), or None."""
    mine = [f for f in entries or [] if all(str(getattr(cell, k)) == str(v) for k, v in f["match"].items())]
    if not mine:
        return None
    f = mine[-1]
    return {"step": int(f.get("step", 1)), "rank": int(f.get("rank", 0)), "delay_s": float(f.get("delay_s", 2.0)),
            "marker": str(run_dir / FAULT_MARKER)}


def cpu_ledger() -> dict[str, Any] | None:
    """$EMBED_TEST_CPU_LEDGER as a dict, or None."""
    raw = os.environ.get(CPU_LEDGER_ENV)
    return json.loads(raw) if raw else None


def eval_ray_cpus() -> int | None:
    """$EMBED_EVAL_RAY_CPUS as an int, or None (Ray's default: every core)."""
    v = os.environ.get(EVAL_RAY_CPUS_ENV)
    return int(v) if v else None


def inject_eval_fault(run_tmp: Path, checkpoint: str, task: str, times: int) -> None:
    """Raise for the first `times` attempts of (checkpoint, task) in this evaluation run (counted in run_tmp)."""
    counter = run_tmp / "faults" / f"{model_dir_name(checkpoint)}__{task}.count"
    counter.parent.mkdir(parents=True, exist_ok=True)
    n = int(counter.read_text()) + 1 if counter.is_file() else 1
    counter.write_text(str(n))
    if n <= times:
        raise RuntimeError(f"injected fault {n}/{times} for {checkpoint} / {task}")
