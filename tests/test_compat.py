"""Each reach-in of ray_jobs/compat.py still finds what it reaches for in the installed Ray / Tune / Optuna (and the
DeepSpeed one of embed_core/distributed.py in DeepSpeed): an upgrade that moves one fails here, by name, instead
of in the middle of a sweep."""
from __future__ import annotations

import json

import pytest

from ray_jobs import compat


def test_forward_to_tune_uses_the_queue_tune_report_callback_puts_its_results_in():
    import inspect
    import queue

    from ray.tune.integration.ray_train import TuneReportCallback

    assert "self._training_actor_item_queue.put(" in inspect.getsource(TuneReportCallback)

    class Probe:  # the queue is created when a Train run starts; the hand-over itself is what is checked here
        _training_actor_item_queue = queue.Queue()

    compat.forward_to_tune(Probe, {"step": 1})
    assert Probe._training_actor_item_queue.get_nowait() == {"step": 1}


def test_tune_trials_reads_an_experiment_state_file(tmp_path):
    (tmp_path / "experiment_state-2026.json").write_text(json.dumps(
        {"trial_data": [[json.dumps({"trial_id": "t1", "status": "RUNNING", "config": {"lr": 0.1}}), "{}"],
                        ["not json", "{}"]]}))
    assert compat.tune_trials(tmp_path) == {"t1": {"status": "RUNNING", "config": {"lr": 0.1}}}
    assert compat.tune_trials(tmp_path / "missing") == {}


def test_optuna_search_knows_its_trials():
    pytest.importorskip("optuna")
    import optuna.distributions as od
    from ray.tune.search.optuna import OptunaSearch

    s = OptunaSearch(space={"x": od.FloatDistribution(0.0, 1.0)}, metric="m", mode="max")
    assert not compat.optuna_search_knows(s, "a")
    s.suggest("a")
    assert compat.optuna_search_knows(s, "a")


def test_asha_counts_stopped_trials():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    assert compat.asha_num_stopped(AsyncHyperBandScheduler(time_attr="step", metric="m", mode="max")) == 0
    assert hasattr(AsyncHyperBandScheduler(), "_num_stopped")


def test_ray_private_helpers_exist():
    from ray._private import services, worker

    assert callable(services.canonicalize_bootstrap_address_or_die) and hasattr(worker, "_global_node")
    assert compat.canonical_bootstrap_address("127.0.0.1:6379").endswith(":6379")


def test_deepspeed_groups_reset_targets_exist():
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "mesh_device",
                 "_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        assert hasattr(groups, name), name


def test_compile_cache_counts_read_the_compilers_own_tallies(tmp_path, monkeypatch):
    """A function compiled in a fresh Inductor cache counts a miss (the counters are per process: a second
    process would count the hit, as bench/NOTES.md records for a FlexAttention layer)."""
    import torch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    before = compat.compile_cache_counts()
    torch.compile(lambda x: torch.nn.functional.gelu(x) * 2)(torch.randn(8))
    after = compat.compile_cache_counts()
    assert after.get("fxgraph_cache_miss", 0) + after.get("fxgraph_cache_hit", 0) > \
        before.get("fxgraph_cache_miss", 0) + before.get("fxgraph_cache_hit", 0)
