"""`prepare` writes each cell's resolved TrainConfig once (``cells/<cell>.json``, `sweeps.layout.CellPlan`); a trial
reads its cell's and sets only its own LoRA rank, LR and seed, without the sweep's config. No Ray, no model."""
from __future__ import annotations

import json
import shutil

import pytest

from embed_core.errors import DataError
from embed_core.train_config import TrainConfig
from ray_jobs.sweep import prepare
from ray_jobs.trial import trial_config
from sweeps import layout, search
from sweeps.config_parse import parse_sweep_config

OVERRIDE = {"match": {"pooling": "multi_layer_trainable", "seed": 1}, "model": {"max_length": 48},
            "training": {"temperature": 0.1}, "resources": {"num_workers": 2}}


def raw_config(tmp_path, **resources) -> dict:
    return {"name": "plans", "storage_path": str(tmp_path / "runs"), "seeds": [0, 1],
            "grid": {"base_models": ["m1", "m2"], "designs": ["eos_last+causal", "multi_layer_trainable+bidirectional"]},
            "model": {"max_length": 32},
            "search": {"lora_r": [4, 8], "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "samples_per_cell": 2},
            "scheduler": {"type": "fifo", "metric": "val_margin"},
            "training": {"builders": ["stsb"], "max_per_source": 50, "batch_size": 8, "max_steps": 4, "eval_every": 2,
                         "val_size": 8},
            "resources": {"num_workers": 1, "cpus_per_worker": 1, **resources},
            "failure": {"train_max_failures": 3}, "overrides": [OVERRIDE]}


@pytest.fixture
def prepared(tmp_path):
    sweep = parse_sweep_config(raw_config(tmp_path), source="plans.yaml")
    return sweep, prepare(sweep, check_models=False)


def test_prepare_writes_one_resolved_config_per_cell(prepared) -> None:
    sweep, sweep_dir = prepared
    cells = sweep.cells()
    assert sorted(p.stem for p in (sweep_dir / layout.CELLS_DIR).glob("*.json")) == sorted(c.key for c in cells)
    overridden = [c for c in cells if c.pooling == "multi_layer_trainable" and c.seed == 1]
    assert len(cells) == 8 and len(overridden) == 2
    for cell in cells:
        plan = layout.read_cell_plan(sweep_dir, cell.key)
        # what a trial owns is a placeholder until the trial sets it
        assert plan.train_config["model"]["lora_r"] is None and plan.train_config["lr"] is None
        assert plan.train_config["seed"] is None
        assert plan.resources == sweep.resources_for(cell) and plan.train_max_failures == 3
        assert plan.metric == "val_margin" and plan.data_path(sweep_dir) == layout.data_file(
            sweep_dir, sweep.train_config(cell, *sweep.probe_values(cell)))
        for r, lr in ((4, 1e-4), (8, 3.3e-3)):
            assert plan.trial_config(r, lr, cell.seed) == sweep.train_config(cell, r, lr)
    plan = layout.read_cell_plan(sweep_dir, overridden[0].key)
    tcfg = plan.trial_config(8, 2e-3, overridden[0].seed)
    assert tcfg.model.max_length == 48 and tcfg.temperature == 0.1 and plan.resources.num_workers == 2
    assert tcfg.model.lora_r == 8 and tcfg.lr == 2e-3 and tcfg.seed == 1


def test_a_trial_builds_its_config_without_the_sweep_config(prepared, tmp_path, monkeypatch) -> None:
    """The trial's workers' TrainConfig, as the trial built it from sweep.json before: the same, validated once,
    from the cell's plan alone (no sweep.json, no parser), in a sweep folder that has moved."""
    sweep, sweep_dir = prepared
    cell = next(c for c in sweep.cells() if c.pooling == "multi_layer_trainable" and c.seed == 1)
    old = sweep.train_config(cell, 8, 3e-4)
    moved = tmp_path / "elsewhere" / sweep.name
    shutil.move(str(sweep_dir), moved)
    (moved / layout.SWEEP_FILE).unlink()

    def no_parse(*a, **k):
        raise AssertionError("a trial parsed the sweep config")

    monkeypatch.setattr(layout, "read_sweep", no_parse)
    monkeypatch.setattr(layout, "parse_sweep_config", no_parse)
    validations = []
    validate = TrainConfig.validate
    monkeypatch.setattr(TrainConfig, "validate", lambda self, *a: validations.append(a) or validate(self, *a))
    run_dir = moved / layout.TRAIN_DIR / f"{cell.key}-t1"
    config = search.trial_config(cell, {"lora_r": 8, "lr": 3e-4}, sample=0)
    plan, worker_cfg = trial_config(config, moved, run_dir)
    assert len(validations) == 1
    data = layout.data_file(moved, old)
    assert data.is_file() and plan.resources.num_workers == 2
    assert worker_cfg.to_dict() == {**old.to_dict(), "train_data": [str(data)], "builders": [],
                                    "max_bad_fraction": 0.0, "log_dir": str(run_dir / "tensorboard")}


def test_resuming_a_sweep_prepared_before_plans_writes_them_from_its_sweep_json(prepared, tmp_path) -> None:
    """A sweep folder without cells/ (prepared by an earlier version) gets them on --resume, from the config it
    was started with, as its trials read it then (resources may differ in the config it is resumed with)."""
    sweep, sweep_dir = prepared
    shutil.rmtree(sweep_dir / layout.CELLS_DIR)
    resumed = parse_sweep_config(raw_config(tmp_path, cpus_per_worker=2), source="plans.yaml")
    assert resumed.fingerprint() == sweep.fingerprint()
    stored = json.loads((sweep_dir / layout.SWEEP_FILE).read_text())  # an older fingerprint definition's value
    (sweep_dir / layout.SWEEP_FILE).write_text(json.dumps({**stored, "fingerprint": "0123456789abcdef"}))
    prepare(resumed.with_part("seed=0"), resume=True, check_models=False)
    assert json.loads((sweep_dir / layout.SWEEP_FILE).read_text())["fingerprint"] == sweep.fingerprint()
    plans = {p.stem for p in (sweep_dir / layout.CELLS_DIR).glob("*.json")}
    assert plans == {c.key for c in sweep.cells() if c.seed == 0}
    cell = next(c for c in sweep.cells() if c.seed == 0)
    plan = layout.read_cell_plan(sweep_dir, cell.key)
    assert plan.resources.cpus_per_worker == 1 and plan.trial_config(4, 1e-3, 0) == sweep.train_config(cell, 4, 1e-3)
    with pytest.raises(DataError, match="cell plan .* does not exist"):
        layout.read_cell_plan(sweep_dir, next(c for c in sweep.cells() if c.seed == 1).key)
