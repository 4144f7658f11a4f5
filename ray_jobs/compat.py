"""Every reach-in of ray_jobs into a private API of Ray, Tune or Optuna, each with the version it was written
against; tests/test_compat.py checks each against the installed version. (The one reach-in into DeepSpeed,
resetting its cached process groups, is embed_core/distributed.py's `destroy_single_process_group`: embed_core
does not import ray_jobs. Written against DeepSpeed 0.19.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


# Ray 2.60: Ray Train V2's TuneReportCallback hands results to the Tune trial through this queue; a subclass
# that filters / enriches the workers' reports must put its own result there (no public hook does both).
def forward_to_tune(callback: Any, result: dict) -> None:
    """Hand `result` to the Tune trial from inside a `TuneReportCallback.after_report` override."""
    callback._training_actor_item_queue.put(result)


# Ray 2.60: Tune's experiment_state-*.json ({"trial_data": [[trial JSON, runtime JSON], ...]}), read while a
# sweep runs or after its driver died, when no Tune API can load it without resuming the experiment.
def tune_trials(exp_dir: Path) -> dict[str, dict]:
    """trial_id -> Tune's metadata of the trial (status, config) from the newest experiment_state-*.json
    (best effort: {} while none is readable)."""
    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for entry in state.get("trial_data", []):
        try:
            meta = json.loads(entry[0])
            out[meta["trial_id"]] = {"status": meta.get("status", "?"), "config": meta.get("config") or {}}
        except (TypeError, ValueError, KeyError, IndexError):
            continue
    return out


# Ray 2.60: OptunaSearch keeps the Optuna trial of each Tune trial it suggested in `_ot_trials`; a trial restored
# from a checkpoint that this searcher never suggested must not be completed (OptunaSearch raises).
def optuna_search_knows(search: Any, trial_id: str) -> bool:
    """Whether Ray's `OptunaSearch` `search` suggested the Tune trial `trial_id`."""
    return trial_id in search._ot_trials


# Ray 2.60: AsyncHyperBandScheduler counts the trials it stopped in `_num_stopped` (for the status line only).
def asha_num_stopped(scheduler: Any) -> int:
    return int(getattr(scheduler, "_num_stopped", 0))


# Ray 2.60: the session folder of the running Ray, for the hint where workers' logs are; no public API.
def session_logs_dir() -> str:
    import ray

    return f"{ray._private.worker._global_node.get_session_dir_path()}/logs"


# Ray 2.60: the host:port ray.init connects to for a bootstrap address (what it also puts in RAY_ADDRESS).
def canonical_bootstrap_address(address: str) -> str:
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die(address)


# torch 2.11-2.13: torch._dynamo.utils.counters, the compiler's own tallies; "inductor" counts FX-graph cache hits
# and misses, "aot_autograd" AOTAutograd cache hits and misses. Read once a trial's first step has compiled, they
# say whether the sweep's shared compile cache served it (bench/sweep_gpu.py's start-up profile).
def compile_cache_counts() -> dict[str, int]:
    """{"fxgraph_cache_hit": n, "autograd_cache_miss": n, ...} for this process so far; {} without torch."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {k: int(v) for group in ("inductor", "aot_autograd") for k, v in counters[group].items() if "cache" in k}
