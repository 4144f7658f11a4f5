"""The product on one GPU: `python -m sweeps run` end to end (prepare, Tune trials on Ray Train + DeepSpeed, the MTEB
fan-out, the report), against the same Trainer shape run alone in the same call (device machine; CI has no GPU).

    source .devstage1/gpu_env.sh && python -m bench.sweep_gpu --config study --part seed=0 \
        --storage /tmp/sweeps --out $OUT/sweep_gpu.json --archive $OUT/part-seed0.tar.gz

What it measures (written to --out as the run goes, so a run cut short still leaves its numbers):

1. ``isolated``: the sweep's first cell as a plain `Trainer` in its own process (1-rank NCCL group, no Ray), its
   step wall times and tokens/s after ``--warmup`` steps (compile);
2. the sweep itself, one `sweeps run` subprocess for all its stages as a user runs it (training ends when it writes
   checkpoints.json), with NVML sampled every 0.25 s (GPU utilisation, memory of each process);
3. from the trials' ``trainer_state.json`` histories (every step's wall time and tokens): each trial's time to its
   first optimizer step, its step times, and the aggregate throughput of the trials training at each second.

``in_sweep_vs_isolated`` is the median, over the seconds of the training stage during which at least one trial
steps, of (tokens/s of all trials stepping then) / (tokens/s of the Trainer alone): trials share the GPU, so a
trial's own step is slower than alone by design; what Ray / Tune / the sweep may not cost is the GPU's
throughput. ``gpu_busy_fraction_training`` is NVML's utilisation (share of time a kernel ran) averaged over the
training stage. ``--time-limit`` stops the sweep with SIGINT in time for the call's limit; ``--resume`` continues.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from sweeps.layout import TRAIN_DIR, TUNE_DIR

REPO = Path(__file__).resolve().parent.parent


# ====================================================================================== GPU sampling
class Sampler(threading.Thread):
    """NVML every `period` s: (time, utilisation %, used MiB) and the peak memory of each compute process."""

    def __init__(self, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self.peaks = period, [], {}
        self.halt = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no GPU (a CPU smoke run of this script): nothing to sample
            self.nv = None

    def run(self) -> None:
        while self.nv is not None and not self.halt.is_set():
            try:
                u = self.nv.nvmlDeviceGetUtilizationRates(self.h).gpu
                used = self.nv.nvmlDeviceGetMemoryInfo(self.h).used / 2**20
                for p in self.nv.nvmlDeviceGetComputeRunningProcesses(self.h):
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), (p.usedGpuMemory or 0) / 2**20)
                self.samples.append((time.time(), u, used))
            except Exception:  # noqa: BLE001 - a missed sample is not worth the run
                pass
            self.halt.wait(self.period)

    def busy(self, t0: float, t1: float) -> float | None:
        us = [u for t, u, _ in self.samples if t0 <= t <= t1]
        return round(statistics.fmean(us) / 100, 4) if us else None


class FileMark(threading.Thread):
    """When `path` was (re)written after this object was made: polled every 0.25 s until `stop`."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.since, self.at = path, time.time(), None
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.halt.wait(0.25) and self.at is None:
            try:
                if self.path.stat().st_mtime >= self.since:
                    self.at = time.time()
            except FileNotFoundError:
                pass

    def stop(self) -> float | None:
        self.halt.set()
        self.join()
        if self.at is None and self.path.is_file() and self.path.stat().st_mtime >= self.since:
            self.at = self.path.stat().st_mtime
        return self.at


# ====================================================================================== the Trainer alone
def isolated(config: str, part: str | None, sets: list[str], steps: int, warmup: int) -> dict:
    """Run in a subprocess: the first cell's TrainConfig, a plain Trainer, `steps` timed steps after `warmup`."""
    import torch

    from embed_core.distributed import init_single_process_group
    from embed_core.train_data import load_examples
    from embed_core.trainer import Trainer
    from sweeps.config_parse import load_sweep_config

    sweep = load_sweep_config(config, sets)
    sweep = sweep.with_part(part) if part else sweep
    cell = sweep.cells()[0]
    tcfg = sweep.train_config(cell, *sweep.probe_values(cell)).replace(
        max_steps=warmup + steps, warmup_steps=0, eval_every=0, checkpoint_every=0, checkpoint_every_s=0.0,
        log_dir=None)
    examples = load_examples(tcfg)
    init_single_process_group("nccl" if torch.cuda.is_available() else "gloo")
    t0 = time.time()
    trainer = Trainer(tcfg, examples=examples)
    built = time.time()
    walls, tokens = [], []
    for _ in range(warmup + steps):
        m = trainer.run_step()
        walls.append(m["wall_time"])
        tokens.append(m["tokens_per_s"] * m["step_time_s"])
    trainer.close()
    dts = [b - a for a, b in zip(walls[warmup - 1:], walls[warmup:])]
    return {"cell": cell.key, "build_s": round(built - t0, 2), "first_step_s": round(walls[0] - t0, 2),
            "step_s": round(statistics.median(dts), 4), "tokens_per_s": round(sum(tokens[warmup:]) / sum(dts), 1),
            "steps": steps, "warmup": warmup}


# ====================================================================================== reading the sweep
def trial_histories(sweep_dir: Path) -> dict[str, list[dict]]:
    """trial run folder name -> its latest checkpoint's per-step history."""
    out = {}
    for run in sorted((sweep_dir / TRAIN_DIR).glob("*")):
        ckpts = sorted(run.glob("checkpoint_0*/trainer_state.json"))
        if ckpts:
            out[run.name] = json.loads(ckpts[-1].read_text()).get("history", [])
    return out


def tune_finals(sweep_dir: Path) -> dict[str, dict]:
    """Tune trial id -> its final result (time_to_first_step_s, ...)."""
    out = {}
    for rf in (sweep_dir / TUNE_DIR).glob("*/result.json"):
        lines = [json.loads(x) for x in rf.read_text().splitlines() if x.strip()]
        finals = [r for r in lines if r.get("final")]
        if finals:
            out[rf.parent.name] = finals[-1]
    return out


def startup_profile(histories: dict[str, list[dict]], finals: dict[str, dict]) -> dict:
    """Per trial, where the time to the first step went: the worker group's start (trial start -> worker function;
    split into the trial driver's own work before `fit` and Ray starting the workers), the Trainer's construction
    (imports, data, model, DeepSpeed), the first step (compile).
    A resumed trial's history holds each run's first step; the profile is the last run's, the one whose final
    result (and ``trial_started_at``) Tune kept. A last run that took no step (restored after its final step)
    has no start-up to profile: the trial is left out."""
    out = {}
    for run, hist in histories.items():
        first = next((h for h in reversed(hist) if "worker_started_at" in h), None)
        fin = next((f for name, f in finals.items() if run.rsplit("-", 1)[-1] in name), None)
        if first and fin and "trial_started_at" in fin and first["worker_started_at"] >= fin["trial_started_at"]:
            out[run] = {"worker_group_s": round(first["worker_started_at"] - fin["trial_started_at"], 1),
                        **({"driver_s": round(fin["fit_started_at"] - fin["trial_started_at"], 1),
                            "ray_workers_s": round(first["worker_started_at"] - fin["fit_started_at"], 1)}
                           if "fit_started_at" in fin else {}),
                        "trainer_build_s": round(first["trainer_ready_at"] - first["worker_started_at"], 1),
                        "first_step_s": round(first["wall_time"] - first["trainer_ready_at"], 1),
                        # the Trainer's data / model / DeepSpeed phases (the rest of the build: imports, CUDA),
                        # Inductor cache hits
                        **{k: v for k, v in first.items() if k.startswith(("build_", "compile_"))}}
    return out


def eval_profile(results_dir: Path, since: float) -> dict:
    """Per task, where the evaluation's time went, from mteb's own phases in each task JSON written after `since`
    (this call's): mean seconds a checkpoint of the whole task, its encoding and mteb's scoring, over n files."""
    def span(p: dict) -> float:
        return p["end"] - p["start"]

    acc: dict[str, list[tuple[float, float, float]]] = {}
    for f in results_dir.glob("*/*/*.json"):
        if f.stat().st_mtime < since:
            continue
        d = json.loads(f.read_text())
        phases = d.get("evaluation_phases") if isinstance(d, dict) else None
        if not phases:
            continue
        acc.setdefault(d["task_name"], []).append(
            (d.get("evaluation_time", 0.0), sum(span(p) for p in phases if p["name"].startswith("Encoding")),
             sum(span(p) for p in phases if p["name"] == "Scoring")))
    return {t: {"n": len(v), **{k: round(statistics.mean(x[i] for x in v), 2)
                                for i, k in enumerate(("task_s", "encoding_s", "scoring_s"))}}
            for t, v in sorted(acc.items())}


def throughput(histories: dict[str, list[dict]], iso_tokens_per_s: float | None) -> dict:
    """Per-trial step times and, second by second, the tokens/s of all trials stepping, against the Trainer alone."""
    spans, per_trial = [], {}
    for name, hist in histories.items():
        steps = [h for h in hist if "wall_time" in h]
        dts = [b["wall_time"] - a["wall_time"] for a, b in zip(steps, steps[1:])
               if not b.get("val_acc") and b["step"] == a["step"] + 1]
        if dts:
            per_trial[name] = round(statistics.median(dts), 4)
        for a, b in zip(steps, steps[1:]):
            if b["step"] == a["step"] + 1 and b["wall_time"] > a["wall_time"]:
                spans.append((a["wall_time"], b["wall_time"], b["tokens_per_s"] * b["step_time_s"]))
    if not spans:
        return {"in_sweep_step_s": None, "per_trial_step_s": per_trial}
    t0, t1 = min(s[0] for s in spans), max(s[1] for s in spans)
    agg, conc = [], []
    for i in range(int(t1 - t0)):
        t = t0 + i + 0.5
        live = [(tok / (b - a)) for a, b, tok in spans if a <= t < b]
        if live:
            agg.append(sum(live))
            conc.append(len(live))
    out = {"in_sweep_step_s": round(statistics.median(per_trial.values()), 4) if per_trial else None,
           "per_trial_step_s": per_trial, "aggregate_tokens_per_s_median": round(statistics.median(agg), 1),
           "concurrent_trials_median": statistics.median(conc), "training_seconds_observed": len(agg)}
    if iso_tokens_per_s:
        out["in_sweep_vs_isolated"] = round(statistics.median(agg) / iso_tokens_per_s, 3)
    return out


def memory_estimates(sweep) -> dict:
    """embed_core.memory's estimate per base model, to hold against the measured peaks."""
    try:
        from embed_core.data import read_jsonl
        from sweeps.layout import data_file
        from sweeps.resources import memory_plan

        first = sweep.cells()[0]
        examples = read_jsonl(data_file(sweep.sweep_dir, sweep.train_config(first, *sweep.probe_values(first))))
        return {m: e.total_gib for m, e in memory_plan(sweep, examples).items()}
    except Exception as err:  # noqa: BLE001 - the estimate is a side figure
        return {"error": repr(err)}


# ====================================================================================== the run
def versions() -> dict:
    import importlib

    def version(name: str) -> str:
        try:
            return str(importlib.import_module(name).__version__)
        except Exception as err:  # noqa: BLE001 - a missing version is not worth the run
            return f"unknown ({type(err).__name__})"

    return {p: version(p) for p in ("torch", "transformers", "peft", "deepspeed", "ray", "mteb", "optuna")}


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def kill_loss(sweep_dir: Path, killed_at: float) -> dict[str, float]:
    """Per trial run that the SIGKILL at `killed_at` interrupted, the seconds of training it lost: from the wall
    time of the step its resumed run continued from (the last checkpoint before the kill) to the kill. A run
    with no checkpoint yet starts again from scratch: it loses all of its first run (wall.json's first entry)."""
    from sweeps.layout import read_wall

    out = {}
    for run in sorted((sweep_dir / TRAIN_DIR).glob("*")):
        states = sorted(run.glob("checkpoint_0*/trainer_state.json"))
        state = json.loads(states[-1].read_text()) if states else {}
        at = {h["step"]: h["wall_time"] for h in state.get("history", []) if "wall_time" in h}
        resumed = [r for r in state.get("resumes", []) if r in at and at[r] <= killed_at]
        runs = list(read_wall(run).values())
        if resumed:
            out[run.name] = round(killed_at - at[resumed[-1]], 1)
        elif len(runs) > 1:
            out[run.name] = round(runs[0], 1)
    return out


def finished(result: dict) -> bool:
    """A bench JSON says its sweep ran every stage it was given to the end: training, and the stages after it
    unless it was run with ``--after-train none``. The device scripts mark a step done on this (``--finished``)."""
    trained = result.get("train_rc") == 0 and not result.get("train_interrupted")
    return trained and (result.get("after_train") is None
                        or (result.get("eval_rc") == 0 and not result.get("eval_interrupted")))


STOP_GRACE_S = 30.0  # after SIGINT, the sweep's time to record what it has before SIGKILL


def run_stage(sweep, stages: str, deadline: float, log, kill: bool = False) -> tuple[int, float, bool]:
    """Run stages of the sweep in a subprocess; at the deadline, SIGINT it (the sweep records what it has and
    `--resume` continues; SIGKILL after STOP_GRACE_S more), or with `kill`, SIGKILL its whole process group (Ray
    included) as a lost machine would. Returns (exit status, seconds, interrupted)."""
    from ray_jobs.sweep import run_command

    cmd = [*run_command(sweep, python=sys.executable), "--stages", stages]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    interrupted = False
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        interrupted = True
        if kill:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(), round(time.time() - t0, 1), True
        os.killpg(proc.pid, signal.SIGINT)  # the sweep stops and records what it has; --resume continues
        try:
            rc = proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    return rc, round(time.time() - t0, 1), interrupted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="study")
    p.add_argument("--part", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override, as for sweeps run")
    p.add_argument("--storage", default="/tmp/sweeps")
    p.add_argument("--out", required=True)
    p.add_argument("--archive", default=None, help="tar.gz of the sweep folder without checkpoints / Tune state")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds for the whole call")
    p.add_argument("--isolated-steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--skip-isolated", action="store_true")
    p.add_argument("--after-train", default="evaluate,report",
                   help="the stages after training (`evaluate` alone: a part whose report is built after merging; "
                        "`none`: training only, e.g. a learning-rate check)")
    p.add_argument("--kill-after", type=float, default=None,
                   help="SIGKILL the train stage this many seconds in, then --resume it: kill_loss_s per trial")
    p.add_argument("--isolated", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--finished", action="store_true",
                   help="only check the JSON at --out: exit 0 when its sweep ran every stage it was given to the end")
    args = p.parse_args()
    if args.finished:
        return 0 if finished(json.loads(Path(args.out).read_text())) else 1
    if args.isolated:
        print(json.dumps(isolated(args.config, args.part, args.sets, args.isolated_steps, args.warmup)))
        return 0
    start = time.time()
    deadline = start + args.time_limit
    from ray_jobs.trial import compile_cache_env
    from sweeps import layout
    from sweeps.config_parse import load_sweep_config

    sweep = load_sweep_config(args.config, args.sets, args.storage)
    sweep = sweep.with_part(args.part) if args.part else sweep
    out = {"device": device_name(), "versions": versions(), "config": sweep.raw, "part": args.part,
           "storage": args.storage}

    def save() -> None:  # the GPU samples so far too: a call cut short keeps its timeline
        out["gpu_samples"] = [(round(t - start, 2), u, round(m)) for t, u, m in sampler.samples[::4]]
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))

    sampler = Sampler()
    sampler.start()
    log = open(Path(args.out).with_suffix(".log"), "a")
    # the other base models' GGUF conversion (CPU) runs while the isolated Trainer has the GPU; the sweep's
    # prepare then finds them converted
    others = sorted({c.base_model for c in sweep.cells()} - {sweep.cells()[0].base_model})
    convert = subprocess.Popen([sys.executable, "-c", "import sys\nfrom embed_core.backbone import resolve_source\n"
                                "from embed_core.config import EmbedConfig\n"
                                "for m in sys.argv[1:]: print(resolve_source(EmbedConfig(base_model=m)).path)",
                                *others], cwd=REPO, stdout=log, stderr=subprocess.STDOUT) if others else None
    if not args.skip_isolated:
        t = time.time()
        r = subprocess.run([sys.executable, "-m", "bench.sweep_gpu", "--isolated", "--config", args.config,
                            *(["--part", args.part] if args.part else []), *[f"--set={x}" for x in args.sets],
                            "--out", args.out,
                            "--isolated-steps", str(args.isolated_steps), "--warmup", str(args.warmup)],
                           cwd=REPO, capture_output=True, text=True, timeout=max(60, deadline - time.time()),
                           env={**os.environ, **compile_cache_env(sweep.sweep_dir)})  # the trials reuse its kernels
        log.write(r.stderr[-20000:])
        out["isolated"] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-3000:]}
        out["isolated"]["wall_s"] = round(time.time() - t, 1)
        out["isolated_gpu_busy"] = sampler.busy(t, time.time())
        save()
    if convert is not None:
        convert.wait()
    t_train = time.time()
    sweep_dir = sweep.sweep_dir
    if args.kill_after and not (sweep_dir / layout.TRIALS_FILE).is_file():  # a part that has not finished training
        rc, out["killed_after_s"], killed = run_stage(sweep, "train", min(deadline - STOP_GRACE_S, t_train + args.kill_after),
                                                      log, kill=True)
        out["killed_at"] = time.time() if killed else None
    # one `sweeps run` for every stage, as a user runs it (one Ray, one prepare); training ends when the sweep
    # writes checkpoints.json (its train stage's last act)
    stages = "train" if args.after_train == "none" else f"train,{args.after_train}"
    mark = FileMark(sweep_dir / layout.CHECKPOINTS_FILE)
    rc, _, cut = run_stage(sweep, stages, deadline - STOP_GRACE_S, log)
    t_end, trained = time.time(), mark.stop()
    t_train_end = trained or t_end
    out["train_stage_s"] = round(t_train_end - t_train, 1)
    out["train_rc"], out["train_interrupted"] = (0, False) if trained else (rc, cut)
    out["gpu_busy_fraction_training"] = sampler.busy(t_train, t_train_end)
    save()
    if out.get("killed_at"):
        out["kill_loss_s"] = kill_loss(sweep_dir, out["killed_at"])
        save()
    if trained and args.after_train != "none":
        out["eval_stage_s"], out["eval_interrupted"] = round(t_end - t_train_end, 1), cut
        out["after_train"] = args.after_train
        out["eval_rc"] = rc
        out["eval_gpu_busy"] = sampler.busy(t_train_end, t_end)
        out["eval_profile"] = eval_profile(sweep_dir / layout.RESULTS_DIR, t_train_end)
        save()
    sampler.halt.set()
    out["total_s"] = round(time.time() - start, 1)
    hist = trial_histories(sweep_dir)
    iso = (out.get("isolated") or {}).get("tokens_per_s")
    out.update(throughput(hist, iso))
    if iso and out.get("in_sweep_step_s") and "step_s" in out["isolated"]:
        out["isolated_step_s"] = out["isolated"]["step_s"]
    finals = tune_finals(sweep_dir)
    out["time_to_first_step_s"] = {k: round(v.get("time_to_first_step_s", float("nan")), 1) for k, v in finals.items()}
    out["startup_profile_s"] = startup_profile(hist, finals)
    # a trial admitted ahead of its turn (resources.start_ahead) waits for GPU memory on purpose: its start-up
    # proper is the time to its first step less that wait
    out["time_to_first_step_less_gpu_wait_s"] = {
        k: round(v["worker_group_s"] + v["trainer_build_s"] + v["first_step_s"] - v.get("build_gpu_wait_s", 0.0), 1)
        for k, v in out["startup_profile_s"].items()}
    starts = [f["trial_started_at"] for f in finals.values() if "trial_started_at" in f]
    if starts and t_train_end > min(starts):  # from the first trial's start: without prepare and Ray's start
        out["gpu_busy_fraction_trials"] = sampler.busy(max(t_train, min(starts)), t_train_end)
        out["trials_span_s"] = round(t_train_end - max(t_train, min(starts)), 1)
    trials = sweep_dir / layout.TRIALS_FILE
    if trials.is_file():
        recs = json.loads(trials.read_text())["trials"]
        out["trials_error"] = [f"{t['cell']}: {t.get('error', '')}" for t in recs if t["status"] == "ERROR"]
        out["trials_status"] = {t["cell"]: t["status"] for t in recs}
    out["gpu_mem_peak_per_process_gib"] = sorted(round(v / 1024, 2) for v in sampler.peaks.values())
    out["memory_estimate_gib"] = memory_estimates(sweep)
    save()
    if args.archive and sweep_dir.is_dir():
        with tarfile.open(args.archive, "w:gz") as tar:
            for name in (layout.SWEEP_FILE, layout.TRIALS_FILE, layout.CHECKPOINTS_FILE, layout.RESULTS_DIR,
                         layout.REPORT_DIR):
                if (sweep_dir / name).exists():
                    tar.add(sweep_dir / name, arcname=f"{sweep.name}/{name}")
            for run, h in hist.items():  # the training curves, without weights
                tar.addfile(*_json_member(f"{sweep.name}/{layout.HISTORIES_DIR}/{run}.json", h))
    print(json.dumps({k: out.get(k) for k in ("device", "isolated_step_s", "in_sweep_step_s", "in_sweep_vs_isolated",
                                               "gpu_busy_fraction_training", "gpu_busy_fraction_trials",
                                               "train_stage_s", "eval_stage_s",
                                               "total_s", "trials_error")}, indent=1, default=str))
    return 0


def _json_member(name: str, obj) -> tuple:
    import io

    data = json.dumps(obj).encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    return info, io.BytesIO(data)


if __name__ == "__main__":
    sys.exit(main())
