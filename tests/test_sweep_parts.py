"""A sweep run in parts (`run --part`, one machine or job each) and merged (`sweeps merge`); the study preset;
the sweep benchmark's throughput arithmetic. No Ray: the parts' folders are written in the layout's formats."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from embed_core.errors import ConfigError
from sweeps import layout
from ray_jobs.records import status_text
from sweeps.merge import merge_parts
from sweeps.layout import SWEEP_FORMAT, read_sweep
from sweeps.synthetic_results import write_synthetic_sweep
from sweeps.config_parse import load_sweep_config, parse_sweep_config

REPO = Path(__file__).resolve().parent.parent


def test_study_preset_runs_in_parts():
    study = load_sweep_config("study")
    assert len(study.cells()) == 30 and study.num_trials() == 30
    seed0 = study.with_part("seed=0")
    assert len(seed0.cells()) == 10 and {c.seed for c in seed0.cells()} == {0}
    assert seed0.fingerprint() == study.fingerprint()  # a part is the same sweep
    assert {c.seed for c in study.with_part("seed=1|2").cells()} == {1, 2}
    one = study.with_part("base_model=gemma3-270m, design=multi_layer_trainable+bidirectional")
    assert [(c.base_model, c.design) for c in one.cells()] == [("gemma3-270m", "multi_layer_trainable+bidirectional")] * 3
    with pytest.raises(ConfigError, match="expected key=value"):
        study.with_part("lora_r=16")
    with pytest.raises(ConfigError, match="matches no cell"):
        study.with_part("seed=7")


def _part(root: Path, name: str, sweep, base: str, seed: int) -> Path:
    d = root / name / sweep.name
    synth = write_synthetic_sweep(d, base_models=(base,), seed=seed,
                                  effects={"eos_last+causal": 0.0, "mean+causal": 0.2}, seeds={"eos_last+causal": [0],
                                                                                              "mean+causal": [0]})
    layout.atomic_write_json(d / layout.SWEEP_FILE, {"format": SWEEP_FORMAT, "fingerprint": sweep.fingerprint(),
                                                     "config": sweep.to_dict()})
    specs = [layout.CheckpointSpec(name=f"{sweep.name}/{r.name}", path=str(r),
                                   labels=layout.RunLabels.read(r)) for r in synth.run_dirs]
    layout.write_checkpoints(d, specs)
    return d


def test_merge_parts_unions_records_and_results(tmp_path):
    study = load_sweep_config("study")
    a = _part(tmp_path, "a", study, "synthetic/base-A", 0)
    b = _part(tmp_path, "b", study, "synthetic/base-B", 1)
    out = merge_parts(tmp_path / "merged" / "study", [a, b])
    trials = layout.read_trials(out)
    assert len(trials) == len(layout.read_trials(a)) + len(layout.read_trials(b))
    assert {t.base_model for t in trials} == {"synthetic/base-A", "synthetic/base-B"}
    assert len(layout.read_checkpoints(out)) == 4
    files = lambda d: sorted(p.relative_to(d / layout.RESULTS_DIR) for p in (d / layout.RESULTS_DIR).rglob("*.json"))
    assert files(out) == sorted(files(a) + files(b))
    assert read_sweep(out).fingerprint() == study.fingerprint()
    shown = status_text(out)  # no Tune folder in a merged sweep: status shows its records
    assert f"{len(trials)} started" in shown and all(t.trial_id in shown for t in trials)
    cells = {t.cell for t in trials}  # what the parts ran is what was planned, not the preset's whole grid
    assert (f"{len(cells)} cells (from 2 merged part(s); the config's grid has {len(study.cells())}), "
            f"{len(cells) * study.search.samples_per_cell} trials planned") in shown
    stored = json.loads((out / layout.SWEEP_FILE).read_text())  # an older fingerprint definition's value
    (out / layout.SWEEP_FILE).write_text(json.dumps({**stored, "fingerprint": "0123456789abcdef"}))
    merge_parts(out, [a])  # merging a part again changes nothing but that stale value
    assert json.loads((out / layout.SWEEP_FILE).read_text())["fingerprint"] == study.fingerprint()
    assert len(layout.read_trials(out)) == len(trials) and files(out) == sorted(files(a) + files(b))
    assert [p["from"] for p in layout.read_parts(out)] == [str(b), str(a)]  # a part merged again: its latest entry
    assert {c for p in layout.read_parts(out) for c in p["cells"]} == {t.cell for t in trials}
    other = _part(tmp_path, "c", load_sweep_config("demo"), "synthetic/base-C", 2)
    with pytest.raises(ConfigError, match="different sweep configs"):
        merge_parts(tmp_path / "m2" / "x", [a, other])


def test_merge_keeps_histories_and_says_how_each_part_ran(tmp_path):
    """Parts that ran with other kernels (compile, attention) or GPU shares merge -- the fingerprint leaves those
    out -- and parts.json records each part's cells with them; the training histories come along; the folder's
    own trials before its first recorded merge are an entry of their own."""
    compiled = load_sweep_config("study", ["model.compile=true", "model.attn_implementation=flex_attention"])
    a = _part(tmp_path, "a", compiled, "synthetic/base-A", 0)
    eager = load_sweep_config("study", ["model.compile=false", "model.attn_implementation=flash_varlen",
                                        "resources.gpus_per_worker=0.25"])
    b = _part(tmp_path, "b", eager, "synthetic/base-B", 1)
    (b / layout.HISTORIES_DIR).mkdir()
    (b / layout.HISTORIES_DIR / "run-1.json").write_text("[]")
    out = merge_parts(tmp_path / "merged" / "study", [a])
    (out / layout.PARTS_FILE).unlink()  # as a folder merged before parts.json existed
    merge_parts(out, [b])
    parts = layout.read_parts(out)
    assert [p["from"] for p in parts] == [str(out), str(b)]
    assert parts[1]["runs_with"]["model"] == {"compile": False, "attn_implementation": "flash_varlen",
                                              "fused_lora": True}
    assert parts[1]["runs_with"]["resources"]["gpus_per_worker"] == 0.25
    assert parts[0]["cells"] == sorted({t.cell for t in layout.read_trials(a)})
    assert parts[0]["runs_with"]["model"]["compile"] is True
    assert (out / layout.HISTORIES_DIR / "run-1.json").read_text() == "[]"


def test_bench_throughput_counts_concurrent_trials():
    """Two trials stepping side by side at 1 s a step, 1000 tokens a step each, against a Trainer alone at
    1000 tokens/s: the sweep keeps the GPU's throughput at twice the single trial's (ratio 2.0)."""
    from bench.sweep_gpu import throughput

    def hist(t0: float, n: int) -> list[dict]:
        return [{"step": i + 1, "wall_time": t0 + i, "tokens_per_s": 2000.0, "step_time_s": 0.5} for i in range(n)]

    out = throughput({"a": hist(100.0, 11), "b": hist(100.2, 11)}, iso_tokens_per_s=1000.0)
    assert out["in_sweep_step_s"] == pytest.approx(1.0)
    assert out["concurrent_trials_median"] == 2 and out["in_sweep_vs_isolated"] == pytest.approx(2.0)


@pytest.mark.parametrize("result, done", [
    ({"train_rc": 0, "train_interrupted": False}, True),                            # --after-train none
    ({"train_rc": 0, "train_interrupted": True}, False),                            # cut at the call's limit
    ({"train_rc": 1}, False),
    ({"train_rc": 0, "after_train": "evaluate,report"}, False),                     # evaluation never ran
    ({"train_rc": 0, "after_train": "evaluate,report", "eval_rc": 0, "eval_interrupted": True}, False),
    ({"train_rc": 0, "after_train": "evaluate,report", "eval_rc": 0, "eval_interrupted": False}, True),
])
def test_bench_finished_is_every_stage_it_was_given(tmp_path, result, done):
    """The device scripts go on to their next step only on `bench.sweep_gpu --finished`: its exit status."""
    import subprocess
    import sys

    (tmp_path / "b.json").write_text(json.dumps(result))
    r = subprocess.run([sys.executable, "-m", "bench.sweep_gpu", "--finished", "--out", str(tmp_path / "b.json")],
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == (0 if done else 1)


def test_bench_eval_profile_reads_mteb_phases_of_this_call(tmp_path):
    """The bench's evaluation profile: per task, mean whole / encoding / scoring seconds from mteb's phases,
    only from the task files this call wrote (a reference evaluated in an earlier call does not count)."""
    import os

    from bench.sweep_gpu import eval_profile

    def task_json(path, t, enc, score):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task_name": t, "evaluation_time": enc + score + 1, "evaluation_phases": [
            {"name": "Data loading", "start": 0, "end": 1}, {"name": "Encoding queries", "start": 1, "end": 1 + enc},
            {"name": "Scoring", "start": 1 + enc, "end": 1 + enc + score}]}))

    task_json(tmp_path / "m1" / "r1" / "SummEval.json", "SummEval", 2.0, 90.0)
    task_json(tmp_path / "m2" / "r2" / "SummEval.json", "SummEval", 4.0, 2.0)
    task_json(tmp_path / "ref" / "r0" / "SummEval.json", "SummEval", 100.0, 100.0)
    (tmp_path / "m1" / "r1" / "run_labels.json").write_text("{}")
    os.utime(tmp_path / "ref" / "r0" / "SummEval.json", (1000, 1000))
    prof = eval_profile(tmp_path, since=2000)
    assert prof == {"SummEval": {"n": 2, "task_s": 50.0, "encoding_s": 3.0, "scoring_s": 46.0}}


def test_bench_startup_profile_of_a_resumed_trial_is_its_last_run():
    """A trial interrupted and resumed has two first steps in its history (one per run); its start-up profile is
    the last run's, measured from the trial start Tune kept (the earlier run's would give a negative worker
    group time and the first run's compile-cache counters)."""
    from bench.sweep_gpu import startup_profile

    hist = [{"step": 1, "worker_started_at": 100.0, "trainer_ready_at": 120.0, "wall_time": 250.0,
             "compile_fxgraph_cache_miss": 4},
            {"step": 2, "wall_time": 251.0},
            {"step": 54, "worker_started_at": 1000.0, "trainer_ready_at": 1018.0, "wall_time": 1092.0,
             "compile_fxgraph_cache_hit": 4, "build_engine_s": 6.5}]
    out = startup_profile({"t-137ef8dc": hist}, {"t_137ef8dc": {"trial_started_at": 990.0, "fit_started_at": 993.5}})
    assert out == {"t-137ef8dc": {"worker_group_s": 10.0, "driver_s": 3.5, "ray_workers_s": 6.5,
                                  "trainer_build_s": 18.0, "first_step_s": 74.0,
                                  "compile_fxgraph_cache_hit": 4, "build_engine_s": 6.5}}
    # resumed after its last step: the run Tune kept started (t=2000) after the last first step in the history
    assert startup_profile({"t-137ef8dc": hist}, {"t_137ef8dc": {"trial_started_at": 2000.0}}) == {}


def test_bench_kill_loss_is_the_work_since_the_checkpoint_a_trial_resumed_from(tmp_path):
    """A trial resumed from step 3 after a SIGKILL at t=110 lost the training since step 3's wall time; one
    that had no checkpoint yet lost its whole first run; one that started after the kill lost nothing."""
    from bench.sweep_gpu import kill_loss
    from sweeps.layout import WALL_FILE

    def run(name, history, resumes=(), wall=None):
        d = tmp_path / "train" / name / "checkpoint_00000009"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"history": history, "resumes": list(resumes)}))
        if wall:
            (d.parent / WALL_FILE).write_text(json.dumps(wall))

    steps = lambda ts: [{"step": i + 1, "wall_time": t} for i, t in enumerate(ts)]  # noqa: E731
    run("a", steps([80, 90, 100, 140, 150]), resumes=[3], wall={"r1": 60.0, "r2": 50.0})
    run("b", steps([150, 160]), wall={"r1": 25.0, "r2": 30.0})
    run("c", steps([150, 160]), wall={"r2": 30.0})
    assert kill_loss(tmp_path, killed_at=110.0) == {"a": 10.0, "b": 25.0}


def test_memory_plan_covers_only_the_parts_models(tiny_dirs, tmp_path):
    """A part's GPU plan estimates the base models it runs (a part of one model once crashed the GPU planning
    with an empty max()); one estimate per model, the largest design's; the GPU share is raised only when needed."""
    import yaml

    from embed_core.memory import EAGER_ACTIVATIONS, estimate, gpu_share
    from embed_core.train_data import load_examples
    from sweeps.config_parse import load_sweep_config
    from sweeps.resources import memory_plan

    raw = {"name": "mem", "storage_path": str(tmp_path), "seeds": [0, 1],
           "grid": {"base_models": [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])],
                    "designs": ["eos_last+causal", "multi_layer_trainable+bidirectional"]},
           "model": {"max_length": 32}, "search": {"lora_r": 4, "lr": 1e-3},
           "training": {"builders": ["stsb"], "max_per_source": 100, "batch_size": 8, "max_steps": 2, "packing": True,
                        "eval_every": 1, "val_size": 8}}
    (tmp_path / "mem.yaml").write_text(yaml.safe_dump(raw))
    sweep = load_sweep_config(str(tmp_path / "mem.yaml")).with_part(f"base_model={tiny_dirs['qwen2']},seed=1")
    examples = load_examples(sweep.train_config(sweep.cells()[0], *sweep.probe_values(sweep.cells()[0])))
    plan = memory_plan(sweep, examples)
    assert list(plan) == [str(tiny_dirs["qwen2"])]
    est = plan[str(tiny_dirs["qwen2"])]
    assert 0 < est.tokens_per_forward and est.total_gib > est.activations_gib > 0
    compiled_sweep = load_sweep_config(str(tmp_path / "mem.yaml"), ["model.compile=true"])
    compiled = memory_plan(compiled_sweep.with_part(f"base_model={tiny_dirs['qwen2']},seed=1"),
                           examples)[str(tiny_dirs["qwen2"])]
    # eager layers keep every elementwise op's output: more activations than compiled ones, same weights
    assert est.activations_gib > compiled.activations_gib and est.weights_gib == compiled.weights_gib
    smollm2 = dict(n_params=134_515_008, n_trainable=4_884_480, num_layers=30, hidden=576, intermediate=1536,
                   tokens=15_000)
    eager, fused = estimate(**smollm2, compiled=False), estimate(**smollm2)
    assert eager.activations_gib == pytest.approx(fused.activations_gib * EAGER_ACTIVATIONS, rel=1e-3)
    assert gpu_share(10.0, 80.0, 0.125) == 0.125          # 10 GiB of an 80 GiB GPU holds it
    assert gpu_share(12.0, 80.0, 0.125) == pytest.approx(1 / 6)  # raised to the largest 1/k that does
    with pytest.raises(ValueError, match="needs"):
        gpu_share(90.0, 80.0, 0.5)


def test_gpu_plan_admits_trials_ahead_of_their_turn(tiny_dirs, tmp_path, monkeypatch):
    """On an (assumed) 80 GiB GPU the plan lets a whole second wave of one-worker trials start up beside the first
    when their waiting contexts fit, asks Ray for the smaller share that places them, and admits none ahead when
    `resources.start_ahead` is off or a trial has several workers (they could hold one GPU each and wait on another's)."""
    import yaml

    import embed_core.memory
    from ray_jobs.sweep import gpu_plan, prepare
    from sweeps.config_parse import load_sweep_config

    monkeypatch.setattr(embed_core.memory, "gpu_total_gib", lambda: 80.0)
    raw = {"name": "ahead", "storage_path": str(tmp_path), "seeds": [0],
           "grid": {"base_models": [str(tiny_dirs["llama"])], "designs": ["eos_last+causal"]},
           "model": {"max_length": 32}, "search": {"lora_r": 4, "lr": 1e-3},
           "training": {"builders": ["stsb"], "max_per_source": 100, "batch_size": 8, "max_steps": 2,
                        "eval_every": 1, "val_size": 8},
           "resources": {"gpus_per_worker": 0.2, "use_gpu": True}}
    (tmp_path / "ahead.yaml").write_text(yaml.safe_dump(raw))
    sweep = load_sweep_config(str(tmp_path / "ahead.yaml"))
    prepare(sweep, check_models=False)
    (entry,) = gpu_plan(sweep, True).values()
    assert (entry["training"], entry["ahead"]) == (5, 5)  # a tiny model: 5 x ~4.3 GiB leaves room for 5 contexts
    assert entry["gpus_per_worker"] == pytest.approx(0.1)
    for sets in (["resources.start_ahead=false"], ["resources.num_workers=2"]):
        (entry,) = gpu_plan(load_sweep_config(str(tmp_path / "ahead.yaml"), sets), True).values()
        assert entry["ahead"] == 0 and entry["gpus_per_worker"] == 0.2


def test_cuda_oom_is_recognised_through_rays_wrapping():
    """A trial is retried only for a CUDA OOM (found in the text Ray wraps a worker's error in), nothing else."""
    from ray_jobs.trial import is_cuda_oom

    class Failed(Exception):
        def __init__(self, msg, failures):
            super().__init__(msg)
            self.worker_failures = failures

    oom = RuntimeError("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_cuda_oom(Failed("Training failed due to worker errors", {0: oom}))
    assert is_cuda_oom(RuntimeError("...\ntorch.OutOfMemoryError: CUDA out of memory"))
    assert not is_cuda_oom(Failed("Training failed", {0: FloatingPointError("non-finite training loss")}))


@pytest.mark.parametrize("folder, preset, sets", [
    ("study", "study", ["overrides=[]"]),  # run before the learning-rate check: both models at 2e-4
    ("study_smollm2_lr4e-4", "study", ["name=study_smollm2_lr4e-4"]),
    ("lr_check", "lr_check", []),
])
def test_committed_studies_are_the_preset_with_the_readmes_sets(folder, preset, sets):
    """The README's commands reproduce the committed sweeps: the preset with those --set values is the same sweep."""
    assert read_sweep(REPO / "studies" / "h100" / folder).fingerprint() == load_sweep_config(preset, sets).fingerprint()


def test_resume_hint_repeats_the_sets_and_the_part(tmp_path):
    """The command printed on Ctrl-C continues the same sweep: its --set overrides and --part come back (without
    them the resume would be another config, refused by the fingerprint check, or the whole sweep)."""
    import shlex

    from ray_jobs.sweep import resume_hint

    sets = ["training.max_steps=2", "search.lora_r=4"]
    sweep = load_sweep_config("demo", sets, str(tmp_path)).with_part("design=eos_last+causal|mean+causal")
    hint = resume_hint(sweep)
    assert hint.startswith("resume with: python -m sweeps run ")
    args = shlex.split(hint.removeprefix("resume with: "))
    assert args[-1] == "--resume" and args[args.index("--storage") + 1] == str(tmp_path)
    again = load_sweep_config(args[4], [a.removeprefix("--set=") for a in args if a.startswith("--set=")],
                              args[args.index("--storage") + 1]).with_part(args[args.index("--part") + 1])
    assert again.raw == sweep.raw and again.cells() == sweep.cells()
    built = parse_sweep_config(sweep.raw)  # in Python: no file to name
    assert built.source == "<dict>" and "run_pipeline(" in resume_hint(built)
