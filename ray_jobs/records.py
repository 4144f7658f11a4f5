"""What a sweep's Tune experiment left, read back: one TrialRecord per trial (trials.json), the checkpoints chosen
for evaluation (checkpoints.json), each trial's status while the sweep runs or after it died, and the driver's
heartbeat (driver.json) that tells a running driver from a dead one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps import layout
from sweeps.config import Cell, SweepConfig
from sweeps.layout import TRAIN_DIR, TUNE_DIR, read_sweep
from sweeps.search import cell_of

from . import compat
from .trial import CHECKPOINT_PATH_KEY

#: Tune states of a trial that had not finished when the driver stopped (Ctrl-C, a killed driver)
UNFINISHED = ("RUNNING", "PENDING", "PAUSED")


def collect_trials(sweep: SweepConfig, grid, use_gpu: bool) -> list[layout.TrialRecord]:
    """One TrialRecord per trial of the experiment: TERMINATED (trained to the end), STOPPED (ASHA), ERROR,
    INTERRUPTED (the driver stopped before the trial finished: ``--resume`` continues it). Trials the
    ResultGrid leaves out (no result reported yet) come from the experiment state."""
    exp_dir = sweep.sweep_dir / TUNE_DIR
    states = {tid: meta.get("status", "?") for tid, meta in compat.tune_trials(exp_dir).items()}
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
    for tid, meta in compat.tune_trials(exp_dir).items():
        cfg = meta.get("config") or {}
        if tid not in out and "cell_key" in cfg:
            status = "ERROR" if meta.get("status") == "ERROR" else "INTERRUPTED"
            out[tid] = _trial_record(sweep, cfg, tid, status, {}, exp_dir / f"{cfg['cell_key']}-{tid}", use_gpu, "")
    return sorted(out.values(), key=lambda t: (t.cell, t.trial_id))


def _trial_record(sweep: SweepConfig, cfg: dict, tid: str, status: str, m: dict, trial_dir: Path, use_gpu: bool,
                  error: str) -> layout.TrialRecord:
    cell = cell_of(cfg)
    res = sweep.resources_for(cell)
    ledger = layout.read_wall(sweep.sweep_dir / TRAIN_DIR / f"{cell.key}-{tid}")
    wall = sum(ledger.values()) if ledger else _wall_s(trial_dir, float(m.get("time_total_s") or 0.0))
    metric = m.get(sweep.scheduler.metric)
    return layout.TrialRecord(
        trial_id=tid, cell=cell.key, design=cell.design, base_model=cell.base_model, lora_r=int(cfg["lora_r"]),
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
    """Wall time over every run of a trial without a ``wall.json`` (a sweep of an earlier version): Tune's
    ``time_total_s`` of each run, a drop marking a new run."""
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
            labels = layout.RunLabels(design=cell.design, base_model=cell.base_model, pooling=cell.pooling,
                                      attention=cell.attention, lora_r=t.lora_r, lr=t.lr, seed=cell.seed,
                                      trial_id=t.trial_id, cell=cell.key, steps=t.steps, gpu_hours=t.gpu_hours,
                                      cpu_hours=t.cpu_hours, checkpoint=str(Path(t.checkpoint) / MODEL_DIR),
                                      extra={"sweep": sweep.name, sweep.scheduler.metric: t.val_metric})
            specs.append(layout.CheckpointSpec(name=f"{sweep.name}/{cell.key}", path=labels.checkpoint,
                                               labels=labels))
    return specs


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
    tune_trials = compat.tune_trials(exp_dir)
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
                               sweep.train_config(cell, *sweep.probe_values(cell)).max_steps, last.get(metric)))
    return out


HEARTBEAT_S = 30.0


def driver_state(sweep_dir: str | os.PathLike) -> tuple[bool, str]:
    """(alive, description) of the sweep driver from ``driver.json``: alive when its process exists on this
    host (or, seen from another host, when its heartbeat is fresh)."""
    f = Path(sweep_dir) / layout.DRIVER_FILE
    try:
        d = json.loads(f.read_text())
        age = time.time() - f.stat().st_mtime
    except (OSError, json.JSONDecodeError):
        return False, "no driver running"
    where = f"pid {d.get('pid')} on {d.get('host')}"
    alive = _marked_process_alive(d, elsewhere=age < 3 * HEARTBEAT_S)
    return alive, (f"driver running ({where})" if alive else
                   f"driver DEAD ({where}, last heartbeat {age:.0f} s ago): resume with --resume")


def _waiting_for_gpu(run_dir: Path) -> bool:
    """Whether a trial's worker is waiting in its GPU's memory ledger now: its mark names a live process (one
    SIGKILLed while waiting leaves a stale mark). A worker on another host is trusted: the mark has no heartbeat."""
    try:
        d = json.loads((run_dir / layout.GPU_WAIT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return _marked_process_alive(d, elsewhere=True)


def _marked_process_alive(mark: dict, *, elsewhere: bool) -> bool:
    """Whether the process a mark names ({pid, host}) still runs. Only this host's processes can be asked; for
    another host's the caller's own evidence (`elsewhere`) decides."""
    import socket

    if mark.get("host") != socket.gethostname():
        return elsewhere
    pid = int(mark.get("pid") or 0)
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


def status_text(sweep_dir: str | os.PathLike) -> str:
    sweep_dir = Path(sweep_dir)
    sweep = read_sweep(sweep_dir)
    rows = trial_statuses(sweep_dir)
    if not rows and (sweep_dir / layout.TRIALS_FILE).is_file():  # merged or copied: the records, no Tune folder
        max_steps = int(sweep.training.get("max_steps") or 0)
        rows = [TrialStatus(t.trial_id, t.cell, t.lora_r, t.lr, t.status, t.steps, max_steps, t.val_metric)
                for t in layout.read_trials(sweep_dir)]
    parts = layout.read_parts(sweep_dir)  # a merged sweep plans what its parts ran, not the config's whole grid
    cells = {c for p in parts for c in p["cells"]} if parts else {c.key for c in sweep.cells()}
    merged = f" (from {len(parts)} merged part(s); the config's grid has {len(sweep.cells())})" if parts else ""
    lines = [f"sweep {sweep.name} at {sweep_dir}: {len(cells)} cells{merged}, "
             f"{sweep.num_trials(len(cells))} trials planned, {len(rows)} started; "
             f"{driver_state(sweep_dir)[1]}"]
    lines.append(f"{'trial':10s} {'cell':52s} {'lora_r':>6s} {'lr':>9s} {'status':10s} {'step':>9s} "
                 f"{sweep.scheduler.metric:>10s}")
    for r in rows:
        if r.status == "RUNNING" and _waiting_for_gpu(sweep_dir / TRAIN_DIR / f"{r.cell}-{r.trial_id}"):
            r = dataclasses.replace(r, status="WAITING")  # started ahead of its turn (resources.start_ahead)
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
