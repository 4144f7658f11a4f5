"""sweeps.config / ray_jobs.search: config errors name the field, presets validate, the searcher covers every cell with
its own Optuna study and survives save/restore, ASHA stops trials only against their own cell. No Ray cluster."""
from __future__ import annotations

import copy

import pytest

from embed_core.errors import ConfigError
from sweeps.config_parse import load_sweep_config, parse_sweep_config, presets
from ray_jobs.search import CellSearcher, PerCellASHA, make_scheduler

BASE = {
    "name": "t",
    "storage_path": "/tmp/x",
    "grid": {"base_models": ["m1", "m2"], "designs": ["eos_last+causal", "multi_layer_trainable+bidirectional"]},
    "search": {"lora_r": [4, 8], "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "samples_per_cell": 3},
    "scheduler": {"type": "asha", "metric": "val_margin", "grace_period": 1, "reduction_factor": 2},
    "training": {"builders": ["stsb"], "batch_size": 8, "max_steps": 4, "eval_every": 1, "val_size": 8},
    "seeds": [0, 1],
}


def cfg(**changes):
    raw = copy.deepcopy(BASE)
    for dotted, v in changes.items():
        cur = raw
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        if v is _DEL:
            cur.pop(keys[-1], None)
        else:
            cur[keys[-1]] = v
    return parse_sweep_config(raw, source="t.yaml")


_DEL = object()


def test_valid_config_makes_the_grid() -> None:
    c = cfg()
    assert len(c.cells()) == 2 * 2 * 2 and c.num_trials() == 24
    assert {cell.design for cell in c.cells()} == {"eos_last+causal", "multi_layer_trainable+bidirectional"}
    assert len({cell.key for cell in c.cells()}) == 8
    assert c.lora_r.choices == [4, 8] and c.lr.log and c.lr.low == 1e-4
    t = c.train_config(c.cells()[0], 8, 3e-4)
    assert t.lr == 3e-4 and t.model.lora_r == 8 and t.seed == 0 and t.max_steps == 4


def test_pooling_times_attention_grid() -> None:
    c = cfg(grid={"base_models": ["m"], "pooling": ["eos_last", "mean"], "attention": ["causal", "bidirectional"]})
    assert sorted(d for d in {x.design for x in c.cells()}) == sorted(
        ["eos_last+causal", "eos_last+bidirectional", "mean+causal", "mean+bidirectional"])


@pytest.mark.parametrize("changes, match", [
    ({"bogus": 1}, r"<top level>: unknown section\(s\) \['bogus'\]"),
    ({"name": "a/b"}, "name: must be a non-empty name"),
    ({"storage_path": "s3://bucket/x"}, "storage_path: 's3://bucket/x': use a local or shared filesystem"),
    ({"seeds": [0, 0]}, "seeds: must be a list of distinct ints"),
    ({"grid__designs": ["eos_last+sideways"]}, r"grid.designs\[0\]: unknown attention 'sideways'"),
    ({"grid__designs": ["max+causal"]}, r"grid.designs\[0\]: unknown pooling 'max'"),
    ({"grid__designs": ["eos_last"]}, r"grid.designs\[0\]: 'eos_last' is not '<pooling>\+<attention>'"),
    ({"grid__pooling": ["mean"]}, "grid: give either designs"),
    ({"grid__base_models": []}, "grid.base_models: must be a non-empty list"),
    ({"model": {"pooling": "mean"}}, r"model: \['pooling'\] are set per trial"),
    ({"model": {"max_length": 1}}, "model: max_length must be >= 2"),
    ({"search__lr": {"low": 1e-2, "high": 1e-4}}, "search.lr: low 0.01 must be < high 0.0001"),
    ({"search__lr": 2.0}, "search.lr: learning rates must be < 1"),
    ({"search__lora_r": [4, "x"]}, r"search.lora_r\[1\]: must be an int"),
    ({"search__lora_r": []}, "search.lora_r: an empty list"),
    ({"search__samples_per_cell": 0}, "search.samples_per_cell: must be an int >= 1"),
    ({"search__sampler": "sobol"}, "search.sampler: unknown sampler 'sobol'"),
    ({"resources__start_ahead": "yes"}, "resources.start_ahead: must be true or false"),
    ({"search": {"lr": {"low": 1e-4, "high": 1e-3}, "sampler": "grid"}}, "search.lr: the grid sampler needs a list"),
    ({"search": {"lr": [1e-4, 2e-4], "lora_r": [4, 8], "sampler": "grid", "samples_per_cell": 2}},
      "search.samples_per_cell: the grid sampler runs each of the 4 combinations once: set 4, got 2"),
    ({"overrides": [{"match": {"seed": 0}, "search": {"samples_per_cell": 2}}]},
     r"overrides\[0\].search: unknown key\(s\) \['samples_per_cell'\]"),
    ({"overrides": [{"match": {"seed": 0}, "search": {"lr": 3.0}}]}, r"overrides\[0\].search.lr: learning rates"),
    ({"search": {"lr": [1e-4, 2e-4], "sampler": "grid", "samples_per_cell": 2},
      "overrides": [{"match": {"seed": 0}, "search": {"lr": [1e-4, 2e-4, 4e-4]}}]},
     "the grid sampler runs each of the 3 combinations once: set 3, got 2 \\(cell "),
    ({"search": {"lr": [1e-4, 2e-4], "sampler": "grid", "samples_per_cell": 2},
      "overrides": [{"match": {"seed": 0}, "search": {"lr": {"low": 1e-4, "high": 1e-3}}}]},
     r"overrides\[0\].search.lr: the grid sampler needs a list of values, not a range \(cell "),
    ({"scheduler__type": "pbt"}, "scheduler.type: unknown scheduler 'pbt'"),
    ({"scheduler__metric": "ndcg"}, "scheduler.metric: 'ndcg' is not a trainer metric"),
    ({"training__eval_every": 0}, "training.eval_every: scheduler.metric 'val_margin' needs the held-out evaluation"),
    ({"training__seed": 3}, r"training: \['seed'\] are set per trial"),
    ({"training__max_steps": 0}, r"cell m1-eos_last-causal-s0: max_steps must be an int >= 1"),
    ({"training__batch_size": 3, "resources": {"num_workers": 2}}, "global batch_size 3 is not divisible"),
    ({"resources": {"num_workers": 0}}, "resources.num_workers: must be an int >= 1"),
    ({"resources": {"use_gpu": "yes"}}, "resources.use_gpu: must be true, false or auto"),
    ({"failure": {"trial_max_failures": -2}}, "failure.trial_max_failures: must be an int >= -1"),
    ({"evaluation": {"tasks": []}}, "evaluation.tasks: must be a non-empty list"),
    ({"evaluation": {"num_gpus": -1}}, "evaluation.num_gpus: must be a number >= 0"),
    ({"report": {"correction": "bonferroni"}}, "report.correction: must be holm or bh"),
    ({"overrides": [{"match": {"pooling": "mean"}, "training": {"batch_size": 4}}]}, "selects no grid cell"),
    ({"overrides": [{"match": {"colour": "red"}}]}, r"overrides\[0\].match: unknown key\(s\) \['colour'\]"),
])
def test_bad_config_names_file_and_field(changes, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        cfg(**changes)
    assert str(info.value).startswith("sweep config t.yaml: ")


def test_a_config_extends_a_preset_or_file_and_states_only_what_it_changes(tmp_path) -> None:
    (tmp_path / "base.yaml").write_text("extends: demo\nname: base\ntraining: {max_steps: 3}\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\nname: top\nseeds: [4]\ngrid: {designs: [eos_last+causal]}\n")
    demo, top = load_sweep_config("demo"), load_sweep_config(tmp_path / "top.yaml")
    assert (top.name, top.seeds, top.training["max_steps"]) == ("top", [4], 3)  # each level's own keys win
    assert [c.design for c in top.cells()] == ["eos_last+causal"]            # a list is replaced, not merged
    assert top.base_models == demo.base_models and top.training["batch_size"] == demo.training["batch_size"]
    assert load_sweep_config(tmp_path / "top.yaml", ["training.max_steps=5"]).training["max_steps"] == 5
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends: 'loop.yaml' extends this file again"):
        load_sweep_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("extends: nowhere\n")
    with pytest.raises(ConfigError, match="'nowhere': no such file and no such preset"):
        load_sweep_config(tmp_path / "bad.yaml")


def test_overrides_apply_to_matching_cells_only() -> None:
    c = cfg(overrides=[{"match": {"base_model": "m2"}, "training": {"batch_size": 4}, "resources": {"num_workers": 2},
                        "model": {"num_latents": 8}}])
    for cell in c.cells():
        t = c.train_config(cell, 4, 1e-3)
        big = cell.base_model == "m2"
        assert t.batch_size == (4 if big else 8) and t.model.num_latents == (8 if big else 32)
        assert c.resources_for(cell).num_workers == (2 if big else 1)


def test_presets_validate_and_cli_sets_apply() -> None:
    assert {"demo", "paper"} <= set(presets())
    demo = load_sweep_config("demo")
    assert [c.design for c in demo.cells()] == ["eos_last+causal", "last_layer_trainable+causal",
                                                "multi_layer_trainable+causal", "last_layer_trainable+bidirectional",
                                                "multi_layer_trainable+bidirectional"]
    study = load_sweep_config("study")  # each base model at its learning-rate check's choice
    assert {c.base_model: study.probe_values(c)[1] for c in study.cells()} == {"smollm2-135m": 4e-4,
                                                                             "gemma3-270m": 2e-4}
    paper = load_sweep_config("paper")
    t = paper.train_config(paper.cells()[0], *paper.probe_values(paper.cells()[0]))
    assert (t.batch_size, t.max_steps, t.lr, t.model.lora_r, t.temperature) == (2048, 1000, 1e-5, 16, 0.05)
    assert {c.base_model for c in paper.cells()} == {"Qwen/Qwen2-0.5B", "mistralai/Mistral-7B-v0.1"}
    assert len({c.design for c in paper.cells()}) == 5
    # Qwen2-0.5B trains on the fast GPU path, GradCache in merged chunks; Mistral-7B (ZeRO-3, 4 GPUs) padded
    for cell in paper.cells():
        t = paper.train_config(cell, *paper.probe_values(cell))
        fast = cell.base_model == "Qwen/Qwen2-0.5B"
        assert (t.packing, t.model.packing, t.model.compile, t.model.fused_lora) == (fast,) * 4
        assert t.model.attn_implementation == ("flex_attention" if fast else "sdpa")
        assert (t.chunk_size, t.zero_stage) == ((1024, 2) if fast else (16, 3))
    s = load_sweep_config("demo", ["training.max_steps=3", "search.lr=0.001", "name=other"], storage_path="/tmp/y")
    assert s.training["max_steps"] == 3 and s.lr.value == 0.001 and str(s.sweep_dir) == "/tmp/y/other"
    with pytest.raises(ConfigError, match="no such file and no such preset"):
        load_sweep_config("no-such-preset")


def test_fingerprint_ignores_where_and_how_only() -> None:
    a, b = cfg(), cfg(storage_path="/elsewhere", resources__gpus_per_worker=0.5, description="other words")
    assert a.fingerprint() == b.fingerprint() != cfg(search__samples_per_cell=2).fingerprint()
    assert a.fingerprint() != cfg(training__max_steps=7).fingerprint()


def test_fingerprint_ignores_the_kernels_that_compute_the_same_function() -> None:
    """A part run without compile, with another attention kernel or evaluation share merges with the others;
    anything that changes what is trained or scored does not."""
    a = cfg()
    same = [cfg(model__compile=True), cfg(model__attn_implementation="flash_varlen", model__fused_lora=True),
            cfg(evaluation__num_gpus=0.5, evaluation__num_cpus=3),
            cfg(overrides=[{"match": {"seed": 0}, "model": {"attn_implementation": "eager"}}]),
            cfg(overrides=[{"match": {"seed": 0}, "resources": {"gpus_per_worker": 0.5}}])]
    assert {c.fingerprint() for c in same} == {a.fingerprint()}
    assert a.fingerprint() != cfg(model__max_length=64).fingerprint()
    assert a.fingerprint() != cfg(overrides=[{"match": {"seed": 0}, "model": {"max_length": 64}}]).fingerprint()


# ====================================================================================== searcher / scheduler
def _drive(searcher: CellSearcher, n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        s = searcher.suggest(f"t{i}")
        out.append(s)
    return out


def test_searcher_covers_every_cell_round_robin_with_its_own_study(tmp_path) -> None:
    c = cfg()
    s = CellSearcher(c, "val_margin", "max")
    first = _drive(s, len(c.cells()))
    assert sorted(x["cell_key"] for x in first) == sorted(cell.key for cell in c.cells())  # one per cell first
    for x in first:
        assert x["lora_r"] in (4, 8) and 1e-4 <= x["lr"] <= 1e-2
    # results go to the cell's own Optuna study only
    for i, x in enumerate(first):
        s.on_trial_result(f"t{i}", {"val_margin": 0.1 * i, "training_iteration": 1, "step": 1})
        s.on_trial_complete(f"t{i}", {"val_margin": 0.1 * i})
    studies = s.get_state()["studies"]
    assert len(studies) == len(c.cells())
    assert all(len(st["_ot_study"].trials) == 1 for st in studies.values())
    # save / restore mid-sweep: the restored searcher continues without repeating or losing a suggestion
    rest = _drive(s, 4, start=100)
    s.save(str(tmp_path / "s.pkl"))
    again = CellSearcher(c, "val_margin", "max")
    again.restore(str(tmp_path / "s.pkl"))
    assert again.suggested == s.suggested
    remaining = c.num_trials() - len(first) - len(rest)
    more = _drive(again, remaining + 1, start=200)
    assert more[-1] == CellSearcher.FINISHED and all(isinstance(m, dict) for m in more[:-1])
    counts: dict[str, int] = {}
    for x in first + rest + more[:-1]:
        counts[x["cell_key"]] = counts.get(x["cell_key"], 0) + 1
    assert counts == {cell.key: 3 for cell in c.cells()}


def test_fixed_parameters_need_no_optuna() -> None:
    c = cfg(search={"lora_r": 16, "lr": 1e-5, "samples_per_cell": 1})
    s = CellSearcher(c, "val_margin", "max")
    xs = _drive(s, len(c.cells()) + 1)
    assert xs[-1] == CellSearcher.FINISHED
    assert all(x["lora_r"] == 16 and x["lr"] == 1e-5 for x in xs[:-1])


def test_grid_sampler_runs_each_combination_of_a_cell_once(tmp_path) -> None:
    """sampler: grid (e.g. a learning-rate check): every cell gets every (lora_r, lr) pair exactly once, in
    whatever order, also across a save / restore."""
    c = cfg(search={"lora_r": [4, 8], "lr": [1e-4, 3e-4, 1e-3], "sampler": "grid", "samples_per_cell": 6})
    s = CellSearcher(c, "val_margin", "max")
    xs = _drive(s, 7)
    s.save(str(tmp_path / "s.pkl"))
    again = CellSearcher(c, "val_margin", "max")
    again.restore(str(tmp_path / "s.pkl"))
    xs += _drive(again, c.num_trials() - 7 + 1, start=100)
    assert xs[-1] == CellSearcher.FINISHED
    want = sorted((r, lr) for r in (4, 8) for lr in (1e-4, 3e-4, 1e-3))
    for cell in c.cells():
        assert sorted((x["lora_r"], x["lr"]) for x in xs[:-1] if x["cell_key"] == cell.key) == want


def test_an_override_gives_its_cells_their_own_learning_rate() -> None:
    """overrides[].search: a base model's own learning rate (fixed or searched), used by the searcher for its
    cells only; the other cells keep `search:`. It changes what is trained, so the fingerprint too."""
    seed1 = {"match": {"seed": 1}, "search": {"lr": 4e-4}}
    c = cfg(search={"lora_r": 16, "lr": 2e-4, "samples_per_cell": 1}, overrides=[seed1])
    s = CellSearcher(c, "val_margin", "max")
    xs = _drive(s, len(c.cells()) + 1)
    assert xs[-1] == CellSearcher.FINISHED
    assert sorted({(x["seed"], x["lr"]) for x in xs[:-1]}) == [(0, 2e-4), (1, 4e-4)]
    assert all(c.train_config(cell, *c.probe_values(cell)).lr == (4e-4 if cell.seed else 2e-4) for cell in c.cells())
    assert c.fingerprint() != cfg(search={"lora_r": 16, "lr": 2e-4, "samples_per_cell": 1}).fingerprint()
    searched = cfg(search={"lora_r": 16, "lr": 2e-4, "samples_per_cell": 3},
                   overrides=[{"match": {"seed": 1}, "search": {"lr": {"low": 1e-4, "high": 1e-3, "log": True}}}])
    xs = _drive(CellSearcher(searched, "val_margin", "max"), searched.num_trials())
    assert {x["lr"] for x in xs if x["seed"] == 0} == {2e-4}
    assert all(1e-4 <= x["lr"] <= 1e-3 for x in xs if x["seed"] == 1) and len({x["lr"] for x in xs}) > 2


def test_asha_compares_trials_within_their_cell_only() -> None:
    """Real Tune Trial objects and ASHA schedulers: a trial far worse than another cell's trials is not stopped,
    one worse than its own cell's trials is."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    c = cfg(scheduler={"type": "asha", "metric": "val_margin", "grace_period": 1, "reduction_factor": 2})
    sched = make_scheduler(c)
    assert isinstance(sched, PerCellASHA)
    cells = c.cells()

    def trial(cell, i):
        return Trial("__fake", config={"cell_key": cell.key}, trial_id=f"{cell.key[:6]}{i}", stub=True)

    a, b = trial(cells[0], 0), trial(cells[0], 1)
    c, d = trial(cells[1], 0), trial(cells[1], 1)
    for t in (a, b, c, d):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, a, {"step": 1, "val_margin": 0.9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, b, {"step": 1, "val_margin": 0.1}) == TrialScheduler.STOP  # worse in its cell
    # far below cell 0's trials, but the first of its own cell: one ASHA over all trials would stop it here
    assert sched.on_trial_result(None, c, {"step": 1, "val_margin": -0.5}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, d, {"step": 1, "val_margin": -0.4}) == TrialScheduler.CONTINUE
    # a result without the metric (before the first evaluation) never stops a trial
    assert sched.on_trial_result(None, a, {"step": 2}) == TrialScheduler.CONTINUE


def test_cluster_yaml_passes_rays_schema_and_the_rayjob_runs_a_preset() -> None:
    """cluster.yaml through Ray's own autoscaler schema; the KubeRay RayJob's entrypoint names a real preset."""
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    root = Path(__file__).resolve().parent.parent
    cluster = prepare_config(yaml.safe_load((root / "cluster.yaml").read_text()))
    validate_config(cluster)
    assert {"head", "gpu_1x", "gpu_4x"} <= set(cluster["available_node_types"])
    assert any("/mnt/shared" in c for c in cluster["initialization_commands"])
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_1x"]["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(bad)
    job = next(d for d in yaml.safe_load_all((root / "k8s" / "rayjob.yaml").read_text()) if d["kind"] == "RayJob")
    words = job["spec"]["entrypoint"].split()
    assert words[:4] == ["python", "-m", "sweeps", "run"] and words[4] in presets()
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/mnt/shared" for m in mounts)
