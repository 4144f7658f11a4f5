"""Fault probes (issues 18 and 16): each fault class is a TABLE of cases: what is wrong, how it is made, what
must happen. A new fault goes into the table of its class; a new class gets a table and one test over it.

* CONFIG_FAULTS: `sweeps check` exits 2 with a ConfigError naming the field, before Ray and without weights;
* STATS_FAULTS: what the significance report may not do with bad per-instance data or stale results;
* RECORD_FAULTS: what the sweep's records must say after a crash, a kill or a resume;
* the process faults (Ctrl-C, a second Ray instance, a fresh head's job agent) share one real sweep at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from sweeps import layout
from tests.test_sweep_job import REPO, _env, ray_head, run_cli, sweep_cmd, tiny, write_config  # noqa: F401


def _base(tmp: Path, tiny_dir: Path) -> dict:
    return yaml.safe_load(write_config(tmp / "base.yaml", tiny_dir, tmp / "runs", "probe",
                                       ["eos_last+causal", "mean+causal"]).read_text())


def _ro_mount(tmp: Path) -> Path:
    """A read-only tmpfs (root only; the probe is skipped elsewhere)."""
    d = tmp / "ro"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    return d


def _not_a_gguf(tmp: Path) -> str:
    f = tmp / "model.gguf"
    f.write_text("<html>404 Not Found</html>")  # a download that went wrong
    return str(f)


# ====================================================================================== config faults (18.4, 16)
# (id, how the config is broken: fn(raw, tmp), what the error must name)
CONFIG_FAULTS = [
    ("options-typo", lambda r, t: r["evaluation"].update(options={"batch_sise": 8}),
     "evaluation.options: unknown field(s) ['batch_sise']"),
    ("options-type", lambda r, t: r["evaluation"].update(options={"batch_size": "big"}),
     "evaluation.options.batch_size: must be an int >= 1"),
    ("options-no-fault-field", lambda r, t: r["evaluation"].update(options={"fault_injection": {"times": 1}}),
     "evaluation.options: unknown field(s) ['fault_injection']"),  # faults are a test hook: ray_jobs/test_hooks.py
    ("override-no-fault-field", lambda r, t: r.update(overrides=[{"match": {"pooling": "mean"},
                                                                  "fault_injection": {"step": 1}}]),
     "fault_injection"),
    ("baseline-typo", lambda r, t: r.update(report={"baseline": "eos_lst+causal"}),
     "report.baseline: 'eos_lst+causal' is not one of the grid's designs"),
    ("baseline-not-trained", lambda r, t: r.update(report={"baseline": "mean+bidirectional"}), "report.baseline"),
    ("storage-proc", lambda r, t: r.update(storage_path="/proc/embed-sweeps"), "kernel filesystem"),
    ("storage-under-file", lambda r, t: (t.joinpath("afile").write_text("x"),
                                         r.update(storage_path=str(t / "afile" / "runs"))), "is a file"),
    ("storage-read-only", lambda r, t: r.update(storage_path=str(_ro_mount(t) / "runs")), "cannot write in"),
    ("gguf-not-gguf", lambda r, t: r["grid"].update(base_models=[_not_a_gguf(t)]), "is not a GGUF file"),
    *[(f"override-{sect}.{f}", (lambda s, f, v: lambda r, t: r.update(
        overrides=[{"match": {"pooling": "mean"}, s: {f: v}}]))(sect, f, v), f"overrides[0].{sect}.{f}")
      for sect, f, v in (("model", "lora_r", 64), ("model", "pooling", "mean"), ("model", "attention", "causal"),
                         ("model", "base_model", "other"), ("training", "seed", 3), ("training", "lr", 0.1))],
]


@pytest.mark.parametrize("fix,mutate,message", CONFIG_FAULTS, ids=[c[0] for c in CONFIG_FAULTS])
def test_config_fault_is_a_check_error_naming_the_field(fix, mutate, message, tmp_path, tiny, capsys) -> None:
    from sweeps.cli import main

    raw = _base(tmp_path, tiny)
    try:
        mutate(raw, tmp_path)
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        rc = main(["check", str(cfg)])
    finally:
        if (tmp_path / "ro").is_dir():
            subprocess.run(["umount", str(tmp_path / "ro")], capture_output=True)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "ConfigError" in err and message in err, err
    assert "Traceback" not in err


def test_check_reads_a_ggufs_header_not_its_weights(tmp_path, tiny, capsys, monkeypatch) -> None:
    from embed_core.backbone import smollm2_gguf_path
    from sweeps.cli import main

    gguf = tmp_path / "m.gguf"
    shutil.copy(smollm2_gguf_path(), gguf)
    monkeypatch.setenv("EMBED_CACHE_DIR", str(tmp_path / "cache"))
    raw = _base(tmp_path, tiny)
    raw["grid"]["base_models"] = [str(gguf)]
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(raw))
    t0 = time.time()
    rc = main(["check", str(tmp_path / "g.yaml")])
    assert rc == 0, capsys.readouterr().err
    assert not list((tmp_path / "cache").glob("models/*")), "check converted the GGUF (read its weights)"
    print(f"check of a GGUF model: {time.time() - t0:.1f} s")


# ====================================================================================== stats faults (18.3)
def _sts(ids, pred, gold):
    return layout.InstanceScores(task="STS", task_type="STS", split="test", subset="default", main_score="spearman",
                                 value=0.0, aggregate="spearman", ids=ids, pred=list(pred), gold=list(gold))


def _nan_baseline():
    """A null effect (config = baseline + noise) whose baseline has NaN predictions on 3 of 60 instances."""
    rng = np.random.default_rng(0)
    gold = rng.normal(size=60)
    base = gold + rng.normal(scale=1.0, size=60)
    conf = base + rng.normal(scale=0.3, size=60)
    nan_base = base.copy()
    nan_base[[3, 17, 40]] = np.nan
    ids = [str(i) for i in range(60)]
    keep = [i for i in range(60) if i not in (3, 17, 40)]
    clean = ([_sts([ids[i] for i in keep], conf[keep], gold[keep])],
             [_sts([ids[i] for i in keep], base[keep], gold[keep])])
    return ([_sts(ids, conf, gold)], [_sts(ids, nan_base, gold)]), clean


def _probe_nonfinite():
    from sweeps.stats import paired_instance_test

    (a, b), (ca, cb) = _nan_baseline()
    got = paired_instance_test(a, b, n_resamples=2000, rng=0)
    want = paired_instance_test(ca, cb, n_resamples=2000, rng=0)
    assert got.n == 57 and "3 of 60 instances left out" in got.note
    assert got.p_value == pytest.approx(want.p_value) and got.delta == pytest.approx(want.delta)
    assert got.p_value > 0.05  # noise stays noise


def _probe_stale_result(tmp: Path):
    from sweeps.results import load_results
    from sweeps.synthetic_results import write_synthetic_sweep

    write_synthetic_sweep(tmp, effects={"eos_last+causal": 0.0, "mean+causal": 0.0}, seeds={
        "eos_last+causal": [0], "mean+causal": [0]}, n_instances=40)
    runs = {r.labels.checkpoint: r for r in load_results(tmp).runs}
    specs = [layout.CheckpointSpec(name=r.model, path=ck, labels=r.labels) for ck, r in runs.items()]
    layout.write_checkpoints(tmp, specs)
    chosen = next(r for r in runs.values() if r.design == "mean+causal")
    stale = chosen.dir.with_name(chosen.revision + "-stale")  # an earlier choice of the same cell
    shutil.copytree(chosen.dir, stale)
    lab = layout.RunLabels.read(stale)
    lab.checkpoint, lab.trial_id = "tune/old/checkpoint_000003", "old"
    lab.write(stale)
    res = load_results(tmp)
    assert sorted(r.labels.checkpoint for r in res.runs) == sorted(runs)
    assert any("-stale" in p and "left out" in p for p in res.problems), res.problems


# (id, probe(tmp))
STATS_FAULTS = [
    ("nan-predictions-left-out-with-caveat", lambda tmp: _probe_nonfinite()),
    ("stale-result-not-a-replicate", _probe_stale_result),
]


@pytest.mark.parametrize("fix,probe", STATS_FAULTS, ids=[c[0] for c in STATS_FAULTS])
def test_stats_fault(fix, probe, tmp_path) -> None:
    probe(tmp_path)


# ====================================================================================== record faults (18.5)
def _fake_sweep(tmp: Path, tiny_dir: Path, trial_state: str = "RUNNING", driver_pid: int | None = None):
    """A sweep folder as a killed driver leaves it: sweep.json, one Tune trial (state `trial_state`), its
    results, a Train checkpoint ahead of them, and driver.json naming `driver_pid`."""
    from sweeps.config_parse import load_sweep_config

    cfg = load_sweep_config(write_config(tmp / "s.yaml", tiny_dir, tmp / "runs", "rec", ["eos_last+causal"]))
    d = cfg.sweep_dir
    layout.atomic_write_json(d / layout.SWEEP_FILE, {"format": layout.SWEEP_FORMAT, "config": cfg.to_dict()})
    cell = cfg.cells()[0]
    tdir = d / layout.TUNE_DIR / f"{cell.key}-abc12"
    tdir.mkdir(parents=True)
    (tdir / "params.json").write_text(json.dumps({**cell.to_dict(), "lora_r": 4, "lr": 1e-3, "cell_key": cell.key}))
    # two runs of the trial: 0-10 s, then after a resume 0-6 s (Tune restarts time_total_s)
    (tdir / "result.json").write_text("".join(json.dumps({"step": s, "time_total_s": t}) + "\n"
                                              for s, t in ((0, 5.0), (0, 10.0), (0, 3.0), (0, 6.0))))
    (d / layout.TUNE_DIR / "experiment_state-2026.json").write_text(json.dumps(
        {"trial_data": [[json.dumps({"trial_id": "abc12", "status": trial_state}), "{}"]]}))
    ck = d / layout.TRAIN_DIR / f"{cell.key}-abc12" / "checkpoint_000001"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 2}))
    res = d / layout.RESULTS_DIR / "m" / "rev"
    layout.atomic_write_json(res / "STS.json", {"task_name": "STS", "scores": {}})
    for meta in ("model_meta.json", "run_labels.json"):  # not task results
        layout.atomic_write_json(res / meta, {})
    if driver_pid is not None:
        layout.atomic_write_json(d / "driver.json", {"pid": driver_pid, "host": os.uname().nodename})
    layout.write_checkpoints(d, [])
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _probe_dead_driver(tmp, tiny_dir):
    from ray_jobs.records import status_text

    text = status_text(_fake_sweep(tmp, tiny_dir, driver_pid=_dead_pid()))
    assert "driver DEAD" in text and "INTERRUPTED" in text and "RUNNING" not in text, text


def _probe_live_driver(tmp, tiny_dir):
    from ray_jobs.records import status_text

    text = status_text(_fake_sweep(tmp, tiny_dir, driver_pid=os.getpid()))
    assert "driver running" in text and "RUNNING" in text, text


def _probe_step_from_checkpoint(tmp, tiny_dir):
    from ray_jobs.records import trial_statuses

    (row,) = trial_statuses(_fake_sweep(tmp, tiny_dir))
    assert row.step == 2  # the results say 0; the checkpoint after a SIGKILL says 2


def _probe_wall_adds_up(tmp, tiny_dir):
    from ray_jobs.records import _wall_s
    from sweeps.layout import TUNE_DIR

    d = _fake_sweep(tmp, tiny_dir)
    assert _wall_s(next((d / TUNE_DIR).glob("*-abc12")), 0.0) == pytest.approx(16.0)


def _probe_waiting_for_gpu(tmp, tiny_dir):
    from ray_jobs.records import status_text

    d = _fake_sweep(tmp, tiny_dir, driver_pid=os.getpid())
    mark = next((d / layout.TRAIN_DIR).glob("*-abc12")) / layout.GPU_WAIT_FILE
    layout.atomic_write_json(mark, {"pid": os.getpid(), "host": os.uname().nodename})  # a live waiting worker
    assert " WAITING " in status_text(d) and " RUNNING " not in status_text(d)
    layout.atomic_write_json(mark, {"pid": _dead_pid(), "host": os.uname().nodename})  # SIGKILLed while waiting
    assert " RUNNING " in status_text(d) and "WAITING" not in status_text(d)


def _probe_status_counts_results_only(tmp, tiny_dir):
    from ray_jobs.records import status_text

    assert "1 result files" in status_text(_fake_sweep(tmp, tiny_dir))


def _probe_world_readable(tmp, tiny_dir):
    d = _fake_sweep(tmp, tiny_dir)
    for f in (d / layout.RESULTS_DIR / "m" / "rev" / "STS.json", d / layout.CHECKPOINTS_FILE):
        assert f.stat().st_mode & 0o777 == 0o644, f


# (id, probe(tmp, tiny))
RECORD_FAULTS = [
    ("dead-driver-is-not-running", _probe_dead_driver),
    ("live-driver-is-running", _probe_live_driver),
    ("waiting-for-gpu-memory-is-shown", _probe_waiting_for_gpu),
    ("step-from-checkpoint-after-sigkill", _probe_step_from_checkpoint),
    ("wall-time-adds-up-across-resumes", _probe_wall_adds_up),
    ("status-counts-task-results-only", _probe_status_counts_results_only),
    ("result-files-world-readable", _probe_world_readable),
]


@pytest.mark.parametrize("fix,probe", RECORD_FAULTS, ids=[c[0] for c in RECORD_FAULTS])
def test_record_fault(fix, probe, tmp_path, tiny) -> None:
    probe(tmp_path, tiny)


# ================================================================================= process faults (18.1, 18.2, 18.6)
def _wait_for(cond, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, log.read_text()[-5000:]
        assert time.time() < deadline, log.read_text()[-5000:]
        time.sleep(1)


def _trial_progress(sweep_dir: Path) -> tuple[int, int]:
    """(trials finished, trials that reported a result and are not finished) from Tune's result files."""
    done = running = 0
    for rf in (sweep_dir / "tune").glob("*-*/result.json"):
        rows = [json.loads(line) for line in rf.read_text().splitlines() if line.strip().endswith("}")]
        done += any(r.get("final") for r in rows)
        running += bool(rows) and not any(r.get("final") for r in rows)
    return done, running


@pytest.mark.slow
def test_ctrl_c_beside_another_ray_stops_then_resume_runs_each_trial_once(tmp_path, tiny, ray_head) -> None:
    """Item 6: a fresh head accepts jobs after the bounded wait. Item 1: with that head running beside it, the
    sweep starts its own Ray (not the head) and its ASHA-stopped trials release their placement groups (no
    'multiple active Ray instances'). Item 2: SIGINT stops the sweep with 130, INTERRUPTED trials and no
    evaluation; --resume finishes every trial exactly once."""
    # item 6: the fixture waited for the head's job agent (ray_jobs.ray_cluster wait-for-jobs) and asserted it
    cfg = write_config(tmp_path / "c.yaml", tiny, tmp_path / "runs", "ctrlc", ["eos_last+causal", "mean+causal"],
                       search={"lora_r": 4, "lr": [1e-4, 3e-3], "samples_per_cell": 2},
                       scheduler={"type": "asha", "metric": "val_margin", "grace_period": 2, "reduction_factor": 2},
                       training={"max_steps": 6},
                       # the second trial (mean) is the one cut: with 6 steps it could end before the SIGINT lands
                       overrides=[{"match": {"pooling": "mean"},
                                   "training": {"max_steps": 16, "checkpoint_every": 4}}])
    sweep_dir = tmp_path / "runs" / "ctrlc"
    raytmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # this sweep's Ray logs (short: AF_UNIX paths)
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(sweep_cmd("run", str(cfg)), cwd=REPO, env=_env(RAY_TMPDIR=str(raytmp)), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: min(_trial_progress(sweep_dir)) >= 1, 900, proc, log)  # one done, one mid-way
        proc.send_signal(signal.SIGINT)  # Ctrl-C to the driver
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc == 130, out[-5000:]
    assert "resume with: python -m sweeps run" in out and "--resume" in out
    assert "finished in" not in out and "evaluating" not in out
    first = {t.trial_id: t for t in layout.read_trials(sweep_dir)}
    assert any(t.status == "INTERRUPTED" for t in first.values()), first
    assert not (sweep_dir / layout.CHECKPOINTS_FILE).exists() and not (sweep_dir / layout.REPORT_DIR).exists()
    started = [ln for ln in out.splitlines() if "local Ray started at" in ln]
    assert started and f":{ray_head['port']}" not in started[0], started  # its own Ray, not the head

    p = run_cli("run", str(cfg), "--resume", timeout=1500, RAY_TMPDIR=str(raytmp))
    out2 = p.stdout + p.stderr
    assert p.returncode == 0, out2[-6000:]
    trials = layout.read_trials(sweep_dir)
    assert len(trials) == 4 and len({t.trial_id for t in trials}) == 4
    assert all(t.status in ("TERMINATED", "STOPPED") for t in trials), trials
    done_first = {k for k, t in first.items() if t.status in ("TERMINATED", "STOPPED")}
    assert done_first <= {t.trial_id for t in trials}
    for t in trials:  # costs add up over the interrupted run and the resumed one (each run's wall.json entry)
        assert t.wall_s > 0
        if t.trial_id in first:
            assert t.wall_s >= first[t.trial_id].wall_s, (t, first[t.trial_id])
    assert (sweep_dir / layout.REPORT_DIR / "report.html").is_file()
    logs = out + out2 + "".join(f.read_text(errors="replace") for f in raytmp.rglob("*.err") if f.is_file())
    assert "multiple active Ray instances" not in logs
    assert "WorkerGroupStartupTimeoutError" not in logs
    shutil.rmtree(raytmp, ignore_errors=True)


@pytest.mark.slow
def test_full_disk_mid_training_ends_with_a_clear_record(tmp_path, tiny) -> None:
    """Item 4: the storage fills up while a trial trains. Not recovered from (README): the driver must end (no
    hang), say the disk is full and how to go on, and leave trials.json when space allows it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cfg = write_config(tmp_path / "f.yaml", tiny, disk / "runs", "full", ["eos_last+causal"],
                           training={"max_steps": 40, "checkpoint_every": 2})
        log = tmp_path / "full.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(sweep_cmd("run", str(cfg), "--stages", "train"), cwd=REPO, env=_env(),
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(lambda: any((disk / "runs" / "full" / "train").glob("*/checkpoint_*")), 600, proc, log)
            with open(disk / "filler", "wb") as f:  # take every byte that is left
                try:
                    while True:
                        f.write(b"\0" * 2**20)
                except OSError:
                    pass
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        out = log.read_text()
        assert rc != 0, out[-4000:]
        assert "is full" in out and "--resume" in out, out[-4000:]
        (disk / "filler").unlink()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_wall_ledger_adds_up_the_runs_of_a_trial(tmp_path, monkeypatch) -> None:
    """Each run of a trial's driver keeps its own entry in wall.json, written while it runs and when it ends, so
    a resumed trial's cost is the sum of its runs (Tune's own clock restarts or restores on a resume)."""
    import ray_jobs.trial as sw

    monkeypatch.setattr(sw, "WALL_TICK_S", 0.05)
    with sw.WallLedger(tmp_path / "run"):
        time.sleep(0.3)
        assert 0.1 < sum(sw.read_wall(tmp_path / "run").values()) < 0.35  # written while the run is going
    with sw.WallLedger(tmp_path / "run"):
        time.sleep(0.2)
    runs = sw.read_wall(tmp_path / "run")
    assert len(runs) == 2 and sum(runs.values()) == pytest.approx(0.5, abs=0.1)
    (tmp_path / "run" / sw.WALL_FILE).write_text("[not a mapping")
    assert sw.read_wall(tmp_path / "run") == {}
