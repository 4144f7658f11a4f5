"""The sweep job with real processes: real Ray (local and `ray start --head` + `ray job submit`), real Tune, Ray Train,
DeepSpeed and mteb, on a tiny random Llama (fast) and real shared data.

* a killed sweep driver is resumed by ``--resume`` with no trial lost or run twice;
* a trial whose worker is SIGKILLed is restarted by Ray Train from its checkpoint; a trial that diverges (NaN) is
  retried by Tune and then marked ERROR while the sweep completes;
* ``ray job submit --working-dir . -- python -m sweeps run CONFIG`` against a ``ray start --head`` cluster runs the
  whole pipeline (train, evaluate, report) and ``python -m sweeps status`` reads the result.
"""
from __future__ import annotations

import json
import shutil
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sweeps import layout

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"})
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def write_config(path: Path, tiny: Path, storage: Path, name: str, designs: list[str], **sections) -> Path:
    raw = {
        "name": name, "storage_path": str(storage), "seeds": [0],
        "grid": {"base_models": [str(tiny)], "designs": designs},
        "model": {"max_length": 32},
        "search": {"lora_r": 4, "lr": 1e-3, "samples_per_cell": 1},
        "scheduler": {"type": "fifo", "metric": "val_margin"},
        "training": {"builders": ["stsb"], "max_per_source": 200, "batch_size": 8, "max_steps": 4,
                     "eval_every": 2, "val_size": 16, "checkpoint_every": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "failure": {"train_max_failures": 1, "trial_max_failures": 0},
        "evaluation": {"tasks": ["STSBenchmark"], "quick": True},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sweeps", *args]


def run_cli(*args: str, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(sweep_cmd(*args), cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        print(p.stdout[-5000:], p.stderr[-8000:])
    return p


def trainer_state(run_dir: Path) -> dict:
    ckpts = sorted(run_dir.glob("checkpoint_0*"))
    assert ckpts, f"no checkpoint under {run_dir}"
    return json.loads((ckpts[-1] / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def tiny(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


def test_config_errors_exit_2_before_ray_starts(tmp_path, tiny) -> None:
    cfg = write_config(tmp_path / "bad.yaml", tiny, tmp_path / "runs", "bad", ["eos_last+causal"],
                       training={"batch_size": 0})
    p = run_cli("run", str(cfg), timeout=120)
    assert p.returncode == 2
    assert "sweep config" in p.stderr and "batch_size must be an int >= 1" in p.stderr
    assert "Started a local Ray instance" not in p.stdout + p.stderr
    cfg = write_config(tmp_path / "nodata.yaml", tiny, tmp_path / "runs", "nodata", ["eos_last+causal"],
                       training={"builders": [], "train_data": [str(tmp_path / "missing.jsonl")]})
    p = run_cli("run", str(cfg), timeout=120)
    assert p.returncode == 2 and "missing.jsonl" in p.stderr
    assert not (tmp_path / "runs" / "nodata" / "tune").exists()
    # a bad evaluation task fails the run before training, not after hours of it
    cfg = write_config(tmp_path / "notask.yaml", tiny, tmp_path / "runs", "notask", ["eos_last+causal"],
                       evaluation={"tasks": ["STSBenchmark", str(tmp_path / "missing_task.yaml")]})
    p = run_cli("run", str(cfg), timeout=120)
    assert p.returncode == 2 and "missing_task.yaml" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "runs" / "notask").exists()


def test_killed_driver_resumes_without_losing_or_repeating_trials(tmp_path, tiny) -> None:
    cfg = write_config(tmp_path / "k.yaml", tiny, tmp_path / "runs", "kill", ["eos_last+causal", "mean+causal"],
                       training={"max_steps": 10})
    sweep_dir = tmp_path / "runs" / "kill"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(sweep_cmd("run", str(cfg), "--stages", "train"), cwd=REPO, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    # kill the driver (its whole process group, Ray included) once trial 1 finished and Ray Train registered a
    # checkpoint of trial 2 (its checkpoint manager snapshot names one)
    deadline = time.time() + 600
    second = None

    def registered(run: Path) -> bool:
        snap = run / "checkpoint_manager_snapshot.json"
        return snap.is_file() and "checkpoint_0000" in snap.read_text()

    while time.time() < deadline:
        runs = sorted((sweep_dir / "train").glob("*")) if (sweep_dir / "train").is_dir() else []
        done = [r for r in runs if (r / "checkpoint_00000010").is_dir()]
        started = [r for r in runs if r not in done and registered(r)]
        if done and started:
            second = started[0]
            break
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    assert second is not None, "the sweep did not reach the kill point"
    first = done[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    time.sleep(3)
    steps_before = trainer_state(second)["step"]
    assert steps_before < 10

    p = run_cli("run", str(cfg), "--stages", "train", "--resume")
    assert p.returncode == 0
    assert "resuming the Tune experiment" in p.stdout
    trials = layout.read_trials(sweep_dir)
    assert len(trials) == 2 and {t.status for t in trials} == {"TERMINATED"}
    assert sorted(t.cell for t in trials) == sorted({t.cell for t in trials})  # one trial per cell: none repeated
    assert len([d for d in (sweep_dir / "tune").iterdir() if d.is_dir()]) == 2
    # the finished trial was not run again: no file of its run changed after the kill, no resume recorded
    assert trainer_state(first)["resumes"] == []
    assert max(f.stat().st_mtime for f in first.rglob("*") if f.is_file()) < killed_at
    # the interrupted trial continued from its checkpoint (not from scratch) to the end
    state = trainer_state(second)
    assert state["step"] == 10 and len(state["resumes"]) == 1 and 2 <= state["resumes"][0] <= steps_before
    assert [h["step"] for h in state["history"]] == list(range(1, 11))
    assert len(layout.read_checkpoints(sweep_dir)) == 2
    # a second --resume of a finished sweep changes nothing
    p = run_cli("run", str(cfg), "--stages", "train", "--resume")
    assert p.returncode == 0 and len(layout.read_trials(sweep_dir)) == 2
    # the config must match the one the sweep started with
    cfg2 = write_config(tmp_path / "k2.yaml", tiny, tmp_path / "runs", "kill", ["eos_last+causal", "mean+causal"],
                        training={"max_steps": 12})
    p = run_cli("run", str(cfg2), "--resume", timeout=120)
    assert p.returncode == 2 and "differs from the one sweep 'kill' was started with" in p.stderr
    p = run_cli("run", str(cfg), timeout=120)
    assert p.returncode == 2 and "already exists" in p.stderr


def test_failed_trials_are_retried_then_marked_while_the_sweep_completes(tmp_path, tiny) -> None:
    """mean+causal: a Train worker is SIGKILLed after step 3, Ray Train restarts the worker group from the step-2
    checkpoint. mean+bidirectional: temperature 1e-40 makes the loss NaN at step 1; Tune retries the trial once
    (failure.trial_max_failures=1), it diverges again and is recorded as ERROR. The sweep completes."""
    cfg = write_config(
        tmp_path / "f.yaml", tiny, tmp_path / "runs", "faults", ["eos_last+causal", "mean+causal", "mean+bidirectional"],
        failure={"train_max_failures": 1, "trial_max_failures": 1},
        resources={"num_workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        overrides=[{"match": {"pooling": "mean", "attention": "bidirectional"}, "training": {"temperature": 1e-40}}])
    kill = {"train": [{"match": {"pooling": "mean", "attention": "causal"}, "step": 3}]}
    p = run_cli("run", str(cfg), "--stages", "train", EMBED_TEST_FAULTS=json.dumps(kill))
    assert p.returncode == 0
    sweep_dir = tmp_path / "runs" / "faults"
    trials = {t.design: t for t in layout.read_trials(sweep_dir)}
    assert set(trials) == {"eos_last+causal", "mean+causal", "mean+bidirectional"}
    assert trials["eos_last+causal"].status == "TERMINATED"
    killed = trials["mean+causal"]
    assert killed.status == "TERMINATED" and killed.steps == 4
    run = next((sweep_dir / "train").glob(f"{killed.cell}-*"))
    assert (run / "FAULT_INJECTED.json").is_file()
    assert trainer_state(run)["resumes"] == [2]
    nan = trials["mean+bidirectional"]
    assert nan.status == "ERROR" and "non-finite training loss" in nan.error
    assert "ERROR" in p.stdout and "1 failed" in p.stdout
    tune_state = json.loads((sweep_dir / "tune" / next(
        f for f in os.listdir(sweep_dir / "tune") if f.startswith("experiment_state")))
        .read_text())
    failures = {json.loads(a)["trial_id"]: json.loads(b)["num_failures"] for a, b in tune_state["trial_data"]}
    assert failures[nan.trial_id] == 2  # the first attempt + Tune's one retry
    chosen = layout.read_checkpoints(sweep_dir)
    assert sorted(s.labels.design for s in chosen) == ["eos_last+causal", "mean+causal"]
    assert "no completed trial in cell(s)" in p.stdout


# ====================================================================================== ray job submit
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start --head --block` cluster in its own process group and temp dir; torn down afterwards."""
    port, dash = _free_port(), _free_port()
    # Ray's socket paths live under the temp dir and must stay under 107 bytes (AF_UNIX): pytest's tmp_path is
    # too deep for them on CI, so the cluster gets a short folder of its own.
    raytmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    # token auth (Ray >= 2.59) with a token of its own: `ray start` does not create one, and a fresh machine has
    # no ~/.ray/auth_token; the head and the `ray job submit` client read the same file
    token = raytmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = _env(RAY_TMPDIR=str(raytmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = open(tmp_path / "head.log", "w")
    # every port of its own: the dashboard agent's default HTTP port (52365) is taken by any other Ray head on
    # the machine, and a head whose agent cannot bind never accepts a job ("No available agent to submit job")
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
                             *agent_ports, "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
                             f"--temp-dir={raytmp}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", dash), timeout=1):
                break
        except OSError:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
    # the dashboard answers before the job agent registers ("No available agent to submit job" on a busy
    # machine): the project's bounded wait, as users' scripts call it
    w = subprocess.run([sys.executable, "-m", "ray_jobs.ray_cluster", "wait-for-jobs", address, "--timeout", "300"],
                       cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=360)
    try:
        assert w.returncode == 0 and "accepts jobs" in w.stdout, w.stdout + w.stderr[-3000:]
    except AssertionError:
        os.killpg(head.pid, signal.SIGKILL)
        raise
    yield {"address": address, "env": env, "ray": ray_bin, "port": port}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(raytmp, ignore_errors=True)


JOB_REQUEST_LIMIT = 100 * 2**20  # the Ray job server's limit on a request body: the zipped working_dir


def test_the_repo_uploads_as_a_job_working_dir_far_below_the_job_servers_limit() -> None:
    """`ray job submit --working-dir .` zips what Ray's own traversal keeps (.gitignore, .rayignore): the committed
    studies and git's history stay out (with them the upload passed 100 MiB and the job server refused it)."""
    from ray._private.runtime_env import packaging

    sizes: dict[str, int] = {}

    def add(p: Path) -> None:
        if p.is_file():
            top = p.relative_to(REPO).parts[0]
            sizes[top] = sizes.get(top, 0) + p.stat().st_size

    packaging._dir_travel(REPO, [packaging._get_excludes(REPO, [])], add, include_gitignore=True)
    assert "sweeps" in sizes and "studies" not in sizes and ".git" not in sizes
    assert sum(sizes.values()) < JOB_REQUEST_LIMIT / 4, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]


def test_ray_job_submit_runs_the_whole_pipeline(tmp_path, tiny, ray_head) -> None:
    cfg = write_config(tmp_path / "job.yaml", tiny, tmp_path / "runs", "job", ["eos_last+causal", "mean+bidirectional"],
                       search={"lora_r": [4, 8], "lr": {"low": 1e-4, "high": 1e-2, "log": True},
                               "samples_per_cell": 2},
                       scheduler={"type": "asha", "metric": "val_margin", "grace_period": 2, "reduction_factor": 2},
                       resources={"num_workers": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
                       evaluation={"tasks": ["STSBenchmark", "SciFact"], "quick": True, "reference": True})
    env = ray_head["env"]
    p = subprocess.run([ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--working-dir", ".",
                        "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1",
                                                                       "EMBED_DATA_DIR": os.environ.get(
                                                                           "EMBED_DATA_DIR", "")}}),
                        "--", "python", "-m", "sweeps", "run", str(cfg)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "succeeded" in out
    sweep_dir = tmp_path / "runs" / "job"
    trials = layout.read_trials(sweep_dir)
    assert len(trials) == 4 and all(t.status in ("TERMINATED", "STOPPED") for t in trials)
    assert {t.cell for t in trials if t.status == "TERMINATED"} == {t.cell for t in trials}  # each cell finished one
    specs = layout.read_checkpoints(sweep_dir)
    assert sorted(s.labels.design for s in specs) == ["eos_last+causal", "mean+bidirectional"]
    results = sweep_dir / layout.RESULTS_DIR
    for spec in specs:
        d = next(results.glob(f"{layout.model_dir_name(spec.name)}/*"))
        assert (d / "STSBenchmark.json").is_file() and (d / "SciFact.json").is_file()
        assert layout.RunLabels.read(d).trial_id == spec.labels.trial_id
        assert {i.task for i in layout.InstanceScores.read_all(d)} == {"STSBenchmark", "SciFact"}
    assert (sweep_dir / layout.REPORT_DIR / "report.html").is_file()
    assert (sweep_dir / layout.REPORT_DIR / "report.md").is_file()
    assert "eos_last+causal" in out and "mean+bidirectional" in out  # the console table
    status = run_cli("status", str(sweep_dir), timeout=120)
    assert status.returncode == 0
    assert status.stdout.count("TERMINATED") + status.stdout.count("STOPPED") == 4
    assert "report.html" in status.stdout
