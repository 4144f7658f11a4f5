"""The GPU memory ledger (ray_jobs/gpu_ledger.py) that lets a sweep's trials start ahead of their turn, with real
processes: holders never reserve more than the budget, waiters enter as memory frees, a SIGKILLed holder's place is
taken back; and the admission arithmetic (embed_core.memory.admission) that decides how many start ahead."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embed_core.memory import WAITING_GIB, admission

REPO = Path(__file__).resolve().parent.parent

# one process: register in the ledger, wait for `need` GiB, hold it for `hold` s (forever if < 0), log the span
WORKER = """
import json, sys, time
from pathlib import Path
from ray_jobs.gpu_ledger import GpuLedger
root, need, hold, log = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
ledger = GpuLedger("GPU-test", budget_gib=10.0, root=root)
waited = ledger.acquire(need, poll_s=0.05)
t0 = time.time()
with log.open("a") as fh:
    fh.write(json.dumps({"event": "in", "t": t0, "waited": waited}) + "\\n")
if hold < 0:
    time.sleep(3600)
time.sleep(hold)
with log.open("a") as fh:
    fh.write(json.dumps({"event": "out", "t": time.time()}) + "\\n")
"""


def _spawn(root: Path, need: float, hold: float, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(need), str(hold), str(log)], cwd=REPO)


def _events(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []


def test_placement_raises_the_share_to_fit_then_admits_and_asks_ray_for_all():
    from embed_core.memory import placement

    # 0.2 of 79.6 GiB (15.9) does not hold 17 GiB: raised to 1/4; 4 train, the 11.6 GiB left hold 4 waiting
    p = placement(17.0, 79.6, 0.2)
    assert p.share == pytest.approx(0.25) and (p.admission.training, p.admission.ahead) == (4, 4)
    assert p.ray_share == pytest.approx(1 / 8)
    assert placement(17.0, 79.6, 0.2, ahead=False).ray_share == pytest.approx(0.25)
    assert placement(10.0, 79.6, 2.0) == type(p)(2.0, None)  # a worker of two GPUs: nothing shares them
    with pytest.raises(ValueError, match="needs ~90.0 GiB"):
        placement(90.0, 79.6, 0.5)


def test_admission_fits_training_trials_and_waiting_contexts(tmp_path):
    # SmolLM2's study estimate on an 80 GB H100: 5 train at once, the 1.6 GiB left over holds 2 waiting contexts
    a = admission(15.6, 79.6, 0.2)
    assert (a.training, a.ahead) == (5, 2) and a.share == pytest.approx(1 / 7)
    assert a.training * 15.6 + a.ahead * WAITING_GIB <= 79.6
    # Gemma's (13.0 GiB): a whole second wave starts ahead (at most `training` of them)
    assert (admission(13.0, 79.6, 0.2).training, admission(13.0, 79.6, 0.2).ahead) == (5, 5)
    assert admission(13.0, 79.6, 0.2, ahead=False).ahead == 0
    # a share larger than the memory allows is lowered to what fits; a whole-GPU trial gets one ahead
    assert admission(30.0, 79.6, 0.25).training == 2
    assert (admission(70.0, 79.6, 1.0).training, admission(70.0, 79.6, 1.0).ahead) == (1, 1)
    assert admission(79.5, 79.6, 1.0).ahead == 0
    # in the ledger a training trial reserves 1/k of what the waiting contexts leave, from the GPU's own size: k
    # train at once beside the waiting ones, however much larger than the estimates the GPU is, and not k + 1
    from ray_jobs.gpu_ledger import GpuLedger

    r = GpuLedger("GPU-x", 139.0, root=tmp_path).reservation(5, 5)
    assert r == pytest.approx((139.0 - 5 * WAITING_GIB) / 5)
    assert 5 * r + 4 * WAITING_GIB <= 139.0 < 6 * r + 4 * WAITING_GIB


def test_ledger_never_overcommits_and_lets_waiters_in_as_memory_frees(tmp_path):
    """Budget 10 GiB, 4 processes of 4 GiB each holding 1.5 s: two hold at once (a third would need 8 + 4 plus the
    fourth's waiting context), all four get in, and each waited for an earlier one to leave but the first two."""
    log = tmp_path / "log.jsonl"
    procs = [_spawn(tmp_path / "ledger", 4.0, 1.5, log) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    ev = sorted(_events(log), key=lambda e: e["t"])
    assert [e["event"] for e in ev].count("in") == 4
    inside = peak = 0
    for e in ev:
        inside += 1 if e["event"] == "in" else -1
        peak = max(peak, inside)
    assert peak == 2
    assert sum(e["waited"] > 0.5 for e in ev if e["event"] == "in") >= 2
    # the exited processes' entries stay until the next process sweeps them: one needing the whole GPU gets in
    assert _spawn(tmp_path / "ledger", 10.0, 0.0, log).wait(timeout=120) == 0
    assert len(list((tmp_path / "ledger" / "GPU-test").glob("*.json"))) == 1  # its own, left at its exit


def test_a_sigkilled_holder_gives_its_memory_back(tmp_path):
    """A holder killed without warning (its flock dies with it) does not keep a waiter out: the waiter deletes the
    dead entry and enters."""
    log = tmp_path / "log.jsonl"
    holder = _spawn(tmp_path / "ledger", 8.0, -1, log)
    deadline = time.time() + 120
    while not _events(log) and time.time() < deadline:
        time.sleep(0.1)
    assert _events(log), "the first process never entered"
    waiter = _spawn(tmp_path / "ledger", 8.0, 0.0, log)
    time.sleep(1.0)
    assert waiter.poll() is None and len(_events(log)) == 1  # 8 + 8 > 10: it waits
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert waiter.wait(timeout=120) == 0
    assert [e["event"] for e in _events(log)] == ["in", "in", "out"]
