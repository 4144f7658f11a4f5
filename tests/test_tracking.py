"""Experiment tracking (``tracking:``): the section's validation, and one real tiny sweep logged by Ray Tune's own
MLflowLoggerCallback into the sweep's MLflow store, read back with MLflow's client (and by WandbLoggerCallback,
offline, into the sweep's wandb/ folder)."""
from __future__ import annotations

import math

import pytest

from embed_core.errors import ConfigError
from sweeps.config_parse import parse_sweep_config

from .test_sweep_job import run_cli, write_config


def _raw(**tracking) -> dict:
    return {"name": "t", "grid": {"base_models": ["smollm2-135m"], "designs": ["eos_last+causal"]},
            "training": {"builders": ["stsb"], "eval_every": 2, "val_size": 16, "batch_size": 8},
            "tracking": tracking}


@pytest.mark.parametrize("tracking, field", [
    ({"mlflow": "yes"}, "tracking.mlflow"),
    ({"mlflow": {"uri": "x"}}, "tracking.mlflow"),
    ({"mlflow": {"tracking_uri": ""}}, "tracking.mlflow.tracking_uri"),
    ({"mlflow": {"experiment": 3}}, "tracking.mlflow.experiment"),
    ({"wandb": {"mode": "disabled"}}, "tracking.wandb.mode"),
    ({"tensorboard": True}, "tracking"),
])
def test_bad_tracking_options_name_the_field(tracking, field) -> None:
    with pytest.raises(ConfigError, match=rf"{field.replace('.', '[.]')}: "):
        parse_sweep_config(_raw(**tracking))


def test_tracking_defaults_and_fingerprint() -> None:
    off = parse_sweep_config(_raw())
    assert off.tracking.mlflow is None and off.tracking.wandb is None
    on = parse_sweep_config(_raw(mlflow=True, wandb={"project": "p", "mode": "offline"}))
    assert on.tracking.mlflow == {"tracking_uri": None, "experiment": None}
    assert on.tracking.wandb == {"project": "p", "mode": "offline"}
    # tracking says where results are mirrored, not what is trained: --resume may turn it on
    assert on.fingerprint() == off.fingerprint()


def test_wandb_online_needs_a_key(monkeypatch) -> None:
    from ray_jobs import tracking

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep = parse_sweep_config(_raw(wandb=True))
    assert tracking.wandb_mode(sweep) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert tracking.wandb_mode(sweep) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.raises(ConfigError, match="tracking.wandb.mode: online needs WANDB_API_KEY"):
        tracking.check(parse_sweep_config(_raw(wandb={"mode": "online"})))


@pytest.mark.slow
def test_sweep_logs_trials_scores_and_report_to_mlflow(tmp_path, tiny_dirs) -> None:
    from mlflow.tracking import MlflowClient

    from ray_jobs import tracking
    from sweeps.layout import read_sweep

    cfg = write_config(tmp_path / "t.yaml", tiny_dirs["llama"], tmp_path / "runs", "tracked", ["eos_last+causal"],
                       training={"max_steps": 4, "eval_every": 2},
                       tracking={"mlflow": True, "wandb": {"mode": "offline"}})
    p = run_cli("run", str(cfg), timeout=900, WANDB_API_KEY="")
    assert p.returncode == 0, p.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "tracked"
    assert (sweep_dir / "mlruns" / tracking.MLFLOW_DB).is_file()
    client = MlflowClient(tracking_uri=tracking.mlflow_uri(read_sweep(sweep_dir)))
    exp = client.get_experiment_by_name("tracked")
    assert exp is not None and exp.artifact_location.startswith((sweep_dir / "mlruns").as_uri())
    runs = client.search_runs([exp.experiment_id], filter_string="tags.sweep = 'tracked'")
    trials = [r for r in runs if "trial_name" in r.data.tags]
    report = [r for r in runs if r.info.run_name == "tracked-report"]
    assert len(trials) == 1 and len(report) == 1, [r.info.run_name for r in runs]
    t = trials[0]
    # the trial's config as params (Ray's callback), its per-report metrics with history, its MTEB score
    assert t.data.params["lora_r"] == "4" and float(t.data.params["lr"]) == pytest.approx(1e-3)
    assert t.data.params["pooling"] == "eos_last" and t.data.params["attention"] == "causal"
    assert t.info.status == "FINISHED"
    history = client.get_metric_history(t.info.run_id, "val_margin")
    assert len(history) >= 2 and all(math.isfinite(m.value) for m in history)
    assert [m.value for m in client.get_metric_history(t.info.run_id, "step")][-1] == 4
    score = t.data.metrics["mteb/STSBenchmark"]
    assert math.isfinite(score) and -1 <= score <= 1
    assert [a.path for a in client.list_artifacts(report[0].info.run_id)] == ["summary.json"]
    assert "MLflow: MTEB scores of 1 trial(s)" in p.stdout
    # the quiet console (no --verbose): workers' lines stay in Ray's session logs, named at the start
    out = p.stdout + p.stderr
    assert "workers' output (training, evaluation) goes to" in p.stdout
    assert "Reporting training result" not in out and "is superseded by" not in out, out[-3000:]
    # W&B offline: Ray's WandbLoggerCallback wrote the trial's run (config + history) under <sweep>/wandb
    offline = list((sweep_dir / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), offline
    assert t.data.tags["trial_name"].endswith(offline[0].name.rsplit("-", 1)[-1])
