"""Experiment tracking from the sweep config's ``tracking:`` section: Ray Tune's own logger callbacks
(`ray.air.integrations.mlflow.MLflowLoggerCallback`, `ray.air.integrations.wandb.WandbLoggerCallback`) log each
trial's config and every result that reaches Tune; after evaluation, `log_report` adds what only exists then
(each trial's MTEB scores, the report's summary.json) to MLflow.

MLflow's store defaults to the sweep folder (``<sweep>/mlruns``: SQLite + artifacts, since MLflow 3 refuses a
plain file store); the Tune callback runs on the driver, so one local store serves a whole cluster's sweep.
W&B runs offline (``<sweep>/wandb``, upload later with ``wandb sync``) unless WANDB_API_KEY is set.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from embed_core.errors import ConfigError
from sweeps.config import SweepConfig

from sweeps import layout

from .console import say as _say

MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "artifacts"
WANDB_PROJECT = "embed-sweeps"
SWEEP_TAG = "sweep"              # on every run of the sweep (trials and the report run)
TRIAL_TAG = "trial_name"         # Ray's MLflowLoggerCallback names a trial's run with this tag: <cell>-<trial id>
REPORT_RUN = "{name}-report"     # the MLflow run holding the report's summary.json
MTEB_METRIC = "mteb/{task}"      # a trial's main score on one evaluation task
_INSTALL = "pip install 'embed-sweeps[tracking]'"




# ====================================================================================== resolved options
def mlflow_uri(sweep: SweepConfig) -> str:
    """The user's tracking URI, else the sweep folder's own SQLite store."""
    uri = (sweep.tracking.mlflow or {}).get("tracking_uri")
    return uri or f"sqlite:///{sweep.sweep_dir / layout.MLFLOW_DIR / MLFLOW_DB}"


def experiment_name(sweep: SweepConfig) -> str:
    return (sweep.tracking.mlflow or {}).get("experiment") or sweep.name


def wandb_mode(sweep: SweepConfig) -> str:
    """offline unless set, or unless WANDB_API_KEY is set (then online)."""
    mode = (sweep.tracking.wandb or {}).get("mode")
    return mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def check(sweep: SweepConfig) -> None:
    """ConfigError before Ray starts: a backend turned on whose package is missing; W&B online without a key."""
    if sweep.tracking.wandb is not None and wandb_mode(sweep) == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError(f"sweep config {sweep.source}: tracking.wandb.mode: online needs WANDB_API_KEY in the "
                          "environment: set it, or use mode: offline (then `wandb sync <sweep>/wandb/...`)")
    for backend in ("mlflow", "wandb"):
        if getattr(sweep.tracking, backend) is not None and importlib.util.find_spec(backend) is None:
            raise ConfigError(f"sweep config {sweep.source}: tracking.{backend}: the {backend} package is not "
                              f"installed: {_INSTALL} (or pip install {backend}), or set tracking.{backend}: false")


# ====================================================================================== during training
def callbacks(sweep: SweepConfig) -> list:
    """Ray Tune's logger callbacks for the backends the config turns on (the Tuner's RunConfig.callbacks)."""
    check(sweep)
    out = []
    if sweep.tracking.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        ensure_experiment(sweep)
        out.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(sweep), experiment_name=experiment_name(sweep),
                                        tags={SWEEP_TAG: sweep.name}))
    if sweep.tracking.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        wdir = sweep.sweep_dir / layout.WANDB_DIR
        wdir.mkdir(parents=True, exist_ok=True)
        if wandb_mode(sweep) == "offline":  # Ray's callback asks for an API key unless WANDB_MODE says offline
            os.environ["WANDB_MODE"] = "offline"
        out.append(WandbLoggerCallback(project=sweep.tracking.wandb.get("project") or WANDB_PROJECT,
                                       group=sweep.name, mode=wandb_mode(sweep), dir=str(wdir)))
    return out


def client(sweep: SweepConfig):
    from mlflow.tracking import MlflowClient

    if not (sweep.tracking.mlflow or {}).get("tracking_uri"):
        (sweep.sweep_dir / layout.MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=mlflow_uri(sweep))


def ensure_experiment(sweep: SweepConfig) -> str:
    """The experiment's id. Created here, before Ray's callback reuses it by name, so that with the sweep's own
    store the artifacts land in ``<sweep>/mlruns/artifacts`` (MLflow would use the current directory)."""
    c = client(sweep)
    exp = c.get_experiment_by_name(experiment_name(sweep))
    if exp is not None:
        return exp.experiment_id
    own = not (sweep.tracking.mlflow or {}).get("tracking_uri")
    where = (sweep.sweep_dir / layout.MLFLOW_DIR / MLFLOW_ARTIFACTS).as_uri() if own else None
    return c.create_experiment(experiment_name(sweep), artifact_location=where)


# ====================================================================================== after evaluation
def log_report(sweep: SweepConfig, summary_file: Path) -> None:
    """Each evaluated trial's MTEB main scores onto its MLflow run (found by Ray's trial-name tag), and
    summary.json as an artifact of the ``<sweep>-report`` run. A tracking server that fails here costs a
    warning, not the finished sweep."""
    if sweep.tracking.mlflow is None:
        return
    try:
        n = _log_scores(sweep)
        run_id = _report_run(sweep)
        client(sweep).log_artifact(run_id, str(summary_file))
        _say(f"MLflow: MTEB scores of {n} trial(s) and {Path(summary_file).name} logged to experiment "
             f"{experiment_name(sweep)!r} at {mlflow_uri(sweep)}")
    except Exception as err:  # noqa: BLE001 - the report on disk is the record; the mirror is best effort
        _say(f"WARNING: MLflow logging of the report failed ({type(err).__name__}: {err}); the report is in "
             f"{Path(summary_file).parent}")


def _log_scores(sweep: SweepConfig) -> int:
    from sweeps.results import load_results

    c, exp = client(sweep), ensure_experiment(sweep)
    logged = 0
    for run in load_results(sweep.sweep_dir).runs:
        tid = run.labels.trial_id
        if not tid or not run.scores:  # a reference model: no trial
            continue
        found = c.search_runs([exp], filter_string=f"tags.{TRIAL_TAG} LIKE '%-{tid}'", max_results=5)
        for r in found:
            for task, score in run.scores.items():
                c.log_metric(r.info.run_id, MTEB_METRIC.format(task=_metric_safe(task)), float(score))
        logged += bool(found)
    return logged


def _report_run(sweep: SweepConfig) -> str:
    """The sweep's report run, created once (a rebuilt report logs to the same run)."""
    c, exp = client(sweep), ensure_experiment(sweep)
    name = REPORT_RUN.format(name=sweep.name)
    found = c.search_runs([exp], filter_string=f"tags.`mlflow.runName` = '{name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=name, tags={SWEEP_TAG: sweep.name})
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def _metric_safe(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . space and /."""
    return re.sub(r"[^\w\-. /]", "_", name)
