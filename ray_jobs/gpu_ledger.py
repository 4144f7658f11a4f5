"""Trials that share a GPU start ahead of their turn: the GPU memory ledger of one host.

A trial's start-up is CPU work (a fresh Ray worker process, ~14 s of imports, the data, the model built on the
host: ~30 s on an H100 machine, bench/results/worker_imports_h100.json) and, in a sweep of waves, the GPU idles
through each of them. So the sweep admits more trials to a GPU than its memory holds at once (how many:
`embed_core.memory.admission`), and each trial's worker does its start-up while earlier trials train, then waits
here, between building its model on the host and moving it to the device, until the GPU's memory has room for it.

The ledger is a folder per GPU (its UUID) under the host's temp directory. Each worker process registers one
entry file there, holding the GiB it reserves, and keeps an exclusive ``flock`` on it for its lifetime:

1. register as *waiting*: it reserves ``WAITING_GIB``, the CUDA context Ray Train's worker already created on
   the device before the training function ran;
2. under the folder's own lock, sum the reservations of the other live entries; an entry whose lock can be taken
   belongs to a process that died (a SIGKILL releases a ``flock`` too) and is deleted;
3. if the others' sum plus this trial's reservation fits the GPU (or no other entry is live), become *holding*
   with that reservation and return; otherwise release the folder lock, wait ``poll_s``, go to 2. A trial
   reserves 1/k of what the waiting contexts leave (`GpuLedger.reservation`): k train at once, as planned.

The entry stays until the process ends or calls `release`. Progress is guaranteed when the plan that admitted the
trials fits: with nobody holding, the first waiter's need plus the other waiters' contexts fit
(`embed_core.memory.admission`).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from embed_core.memory import WAITING_GIB
from sweeps.layout import atomic_write_json

LEDGER_DIR = "embed_sweeps_gpu_ledger"
_LOCK = ".lock"


def ledger_root() -> Path:
    return Path(tempfile.gettempdir()) / LEDGER_DIR


class GpuLedger:
    """This process's entry in the ledger of the GPU ``key`` (`acquire` / `release`); ``budget_gib``: the GPU's
    memory. ``say``: where the one "waiting" line goes."""

    def __init__(self, key: str, budget_gib: float, root: Path | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.dir = (root or ledger_root()) / key.replace("/", "_")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.budget = float(budget_gib)
        self.say = say
        self.path = self.dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self._fd: int | None = None

    # ------------------------------------------------------------------ entries
    def _write(self, state: str, gib: float) -> None:
        assert self._fd is not None
        data = json.dumps({"pid": os.getpid(), "state": state, "gib": gib, "since": time.time()}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _others(self) -> list[dict]:
        """The live entries of other processes; dead ones are deleted (call under the folder lock)."""
        live = []
        for p in self.dir.glob("*.json"):
            if p == self.path:
                continue
            try:
                fd = os.open(p, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its owner lives
                    try:
                        live.append(json.loads(os.pread(fd, 4096, 0) or b"{}"))
                    except ValueError:  # being written: count it as a waiter
                        live.append({"state": "waiting", "gib": WAITING_GIB})
                    continue
                p.unlink(missing_ok=True)  # its owner died without releasing
            finally:
                os.close(fd)
        return live

    def _locked(self):
        fd = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def reservation(self, training: int, ahead: int) -> float:
        """What a training trial reserves where `training` train at once and `ahead` more wait: its 1/training of
        what the waiting contexts leave, from this GPU's own size (the plan's, from NVML, may differ slightly)."""
        return (self.budget - ahead * WAITING_GIB) / training

    # ------------------------------------------------------------------ protocol
    def acquire(self, need_gib: float, poll_s: float = 0.5) -> float:
        """Wait until the GPU has room for `need_gib` beside the other entries; returns the seconds waited."""
        t0, said = time.monotonic(), False
        lock = self._locked()  # created and locked under the folder's lock: no reader can take it for a dead one
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._write("waiting", WAITING_GIB)
        finally:
            os.close(lock)
        while True:
            lock = self._locked()
            try:
                others = self._others()
                reserved = sum(float(o.get("gib", 0)) for o in others)
                if not others or reserved + need_gib <= self.budget * (1 + 1e-9):
                    self._write("holding", float(need_gib))
                    return time.monotonic() - t0
            finally:
                os.close(lock)
            if not said and self.say:
                held = sum(o.get("state") == "holding" for o in others)
                self.say(f"waiting for GPU memory: {need_gib:.1f} GiB needed, {reserved:.1f} of "
                         f"{self.budget:.1f} GiB reserved by {held} training and {len(others) - held} waiting trial(s)")
                said = True
            time.sleep(poll_s)

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def device_key(device) -> str:
    """A GPU's identity on this host, the same in every process whatever CUDA_VISIBLE_DEVICES says: its UUID."""
    import torch

    props = torch.cuda.get_device_properties(device)
    if getattr(props, "uuid", None):
        return f"GPU-{props.uuid}"
    index = torch.device(device).index or 0  # no UUID (older torch): the physical index Ray's CUDA_VISIBLE_DEVICES names
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    return f"cuda-{visible[index] if index < len(visible) else index}"


def gate(ledger: GpuLedger, training: int, ahead: int, mark: Path | None = None) -> Callable[[], None]:
    """The Trainer's ``gate``: this worker's place in `ledger` as one of `training` trials at once with `ahead`
    waiting, kept until the process ends. While it waits, `mark` (a trial's ``GPU_WAIT_FILE``) names this process,
    so that `sweeps status` can tell a waiting trial from a training one (Tune sees both RUNNING)."""
    def acquire() -> None:
        if mark is not None:
            atomic_write_json(mark, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        try:
            ledger.acquire(ledger.reservation(training, ahead))
        finally:
            if mark is not None:
                mark.unlink(missing_ok=True)

    acquire.ledger = ledger  # type: ignore[attr-defined]
    return acquire


def device_ledger(device, say: Callable[[str], None] | None = None) -> GpuLedger:
    """The ledger of a CUDA device, sized by the device itself."""
    import torch

    return GpuLedger(device_key(device), torch.cuda.get_device_properties(device).total_memory / 2**30, say=say)


__all__ = ["GpuLedger", "device_key", "device_ledger", "gate", "ledger_root"]
