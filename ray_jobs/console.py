"""What the console of ``python -m sweeps run`` shows: the sweep's own lines (``[sweep ...]``, ``[evaluate]``),
warnings that need the user and the results table. Ray workers' output (Ray Train's per-report INFO lines,
DeepSpeed / transformers chatter, tqdm bars, mteb) stays in Ray's session logs unless ``--verbose``.

Ray copies every worker's stdout / stderr to the driver's console unless ``ray.init(log_to_driver=False)``; the
workers still write it to ``<session>/logs/worker-*.out|err`` (and a failed trial's traceback to its
``error.txt``, which the ERROR line names), so nothing is lost, only not shown.
"""
from __future__ import annotations

import logging
import os
import time

def say(msg: str) -> None:
    """One line of the sweep driver's own console output (``[sweep HH:MM:SS] ...``)."""
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


#: the driver's own loggers that speak at INFO during a sweep besides Ray's (MLflow's database set-up, ...):
#: WARNING and above still show
DRIVER_LOGGERS = ("mlflow", "alembic", "deepspeed", "transformers")


def ray_init_kwargs(verbose: bool) -> dict:
    """`ray.init` arguments: quiet keeps the workers' output in the session logs, off the console, and the
    driver's "ray" logger (which ray.init resets to `logging_level`: Tune's INFO lines) at WARNING."""
    return {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}


def setup_driver(verbose: bool) -> None:
    """The driver's console: mteb's superseded-task warnings never (the config named those tasks); unless
    verbose, the chatty loggers at WARNING and Tune's legacy output engine, which at ``verbose=0`` prints nothing
    (the new one prints its experiment banner whatever the verbosity)."""
    drop_superseded_warnings()
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in DRIVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def worker_logs_dir() -> str | None:
    """Where this Ray session's worker logs are (on the node that ran the worker, for a cluster)."""
    try:
        from .compat import session_logs_dir

        return session_logs_dir()
    except Exception:  # noqa: BLE001 - best effort: only used in a hint
        return None


class DropSuperseded(logging.Filter):
    """mteb warns (logging and warnings) that a task is superseded by a newer version; the sweep evaluates the
    tasks its config names, on purpose (the local v1 tasks, a paper's benchmark)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is superseded by" not in record.getMessage()


def drop_superseded_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*is superseded by.*")
    logging.getLogger("mteb.abstasks.abstask").addFilter(DropSuperseded())
