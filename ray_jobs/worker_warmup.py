"""A Ray Train worker's imports, begun when its process starts so that they overlap Ray's own worker set-up.

Ray Train (V2) sends the training function to its workers only after it has placed, created and set up all of
them (placement group, actors, the torch process group): ~12-15 s on one H100 host in which a worker's Python
mostly waits for the controller (`bench/worker_start.py`). Only then does the loop import what the model build
needs, ~8 s more of transformers, peft and DeepSpeed (`bench/results/worker_imports_h100.json`). `start` is the
workers' process set-up hook (`runtime_env()`, given to ``RunConfig(worker_runtime_env=...)``): it begins
those imports in a daemon thread and returns at once, so Ray's set-up goes on beside them. The loop's first act is
`wait`: transformers is a lazy module, and a `from transformers import X` in one thread while another is still
importing transformers fails with ImportError (seen on this project's CPU tests), so the loop imports nothing until
the thread is done. A module that fails in the thread fails again, with its real traceback, where the loop
imports it.
"""
from __future__ import annotations

import importlib
import threading
import time

# what `Trainer(...)` imports on its way to the first step, heaviest last: peft's import alone builds transformers'
# lazy model mappings (~5 s), which `AutoModel` would pay anyway
MODULES = ("torch", "embed_core.trainer", "transformers", "deepspeed", "peft", "embed_core.model")
_started_at: float | None = None
_thread: threading.Thread | None = None


def runtime_env(env: dict[str, str] | None = None) -> dict:
    """The Train workers' runtime env: variables `env` from the process's start (before these imports: the
    compile caches' folders, say), and `start` run as it starts."""
    from . import compat

    return {"env_vars": {**(env or {}), **compat.setup_hook_env(f"{__name__}.start")}}


def start() -> threading.Thread:
    """Begin importing `MODULES` in a daemon thread; returns it (already started)."""
    global _started_at, _thread
    _started_at = time.time()
    _thread = threading.Thread(target=load, name="embed-warm-imports", daemon=True)
    _thread.start()
    return _thread


def wait() -> float:
    """Block until `start`'s imports are done (at once where it never ran); returns the seconds waited."""
    t = time.time()
    if _thread is not None:
        _thread.join()
    return round(time.time() - t, 2)


def lead_s(now: float) -> float | None:
    """Seconds the imports had been under way at `now` (the loop's start); None where `start` never ran."""
    return None if _started_at is None else round(now - _started_at, 2)


def load(modules: tuple[str, ...] = MODULES) -> list[str]:
    """Import `modules` in order, stopping at the first that fails; returns the ones imported."""
    done = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the loop's own import raises it where it is understood
            break
        done.append(name)
    return done
