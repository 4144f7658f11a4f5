"""The MTEB fan-out through real Ray: 2 tiny checkpoints x 2 quick local tasks (real mteb, real data), an injected
failure retried and then marked failed while the other results are saved, a rerun (through the CLI) that skips
what is done without touching it, and the per-run embedding cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embed_core.config import EmbedConfig
from embed_core.model import EmbeddingModel
from sweeps import layout
from tests.conftest import save_tiny_checkpoint
from ray_jobs.evaluate import EvaluationFailed, evaluate_checkpoints, specs_from_args

REPO = Path(__file__).resolve().parent.parent
TASKS = ["STSBenchmark", "SciFact"]


@pytest.fixture(scope="module")
def tiny_ckpts(tiny_dirs, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    out = []
    for seed, (pooling, attention) in enumerate((("eos_last", "causal"), ("mean", "bidirectional"))):
        out.append(save_tiny_checkpoint(tiny_dirs["llama"], root / f"ckpt{seed}", seed, pooling=pooling,
                                        attention=attention, max_length=64))
    return out


def _files(results: Path) -> dict[str, float]:
    """mtimes of the task results and instances (run_labels / model_meta are rewritten when a checkpoint gets a new
    task)."""
    return {str(p.relative_to(results)): p.stat().st_mtime_ns for p in results.rglob("*.json")
            if not p.name.startswith(".") and p.name not in ("run_labels.json", "model_meta.json")}


@pytest.mark.slow
def test_fan_out_retries_failures_and_reruns(tiny_ckpts, tmp_path, monkeypatch) -> None:
    import ray

    results = tmp_path / "results"
    specs = specs_from_args([str(c) for c in tiny_ckpts])
    names = [s.name for s in specs]
    assert names == ["embed-sweeps/ckpt0", "embed-sweeps/ckpt1"]
    monkeypatch.setenv("EMBED_EVAL_RAY_CPUS", "2")
    # ckpt0 / STSBenchmark fails once and is retried; ckpt1 / SciFact fails every attempt
    faults = [{"task": "STSBenchmark", "checkpoint": names[0], "times": 1},
              {"task": "SciFact", "checkpoint": names[1], "times": 99}]
    monkeypatch.setenv("EMBED_TEST_FAULTS", json.dumps({"evaluate": faults}))
    with pytest.raises(EvaluationFailed) as ei:
        evaluate_checkpoints(specs, TASKS, results, quick=True, max_retries=1, show_progress=True)
    assert not ray.is_initialized()  # the local Ray it started is shut down again
    s = ei.value.summary
    assert [(f["checkpoint"], f["task"]) for f in s.failed] == [(names[1], "SciFact")]
    assert "injected fault 2/99" in s.failed[0]["error"]  # 1 try + 1 retry, the root cause is reported
    assert sorted((d["checkpoint"], d["task"]) for d in s.done) == [(names[0], "STSBenchmark"), (names[0], "SciFact"),
                                                                     (names[1], "STSBenchmark")]
    for d in s.done:
        rev_dir = layout.result_dir(results, d["checkpoint"], d["revision"])
        assert d["revision"].endswith("-quick")  # subsampled results never share a folder with full ones
        import mteb
        tr = mteb.TaskResult.from_disk(rev_dir / f"{d['task']}.json")  # mteb's own TaskResult JSON
        assert tr.get_score() == pytest.approx(d["score"], abs=1e-9)
        (inst,) = [i for i in layout.InstanceScores.read_all(rev_dir) if i.task == d["task"]]
        assert inst.score() == pytest.approx(tr.get_score(), abs=1e-5)
        assert len(inst.ids) == (64 if d["task"] == "STSBenchmark" else 30)
        labels = layout.RunLabels.read(rev_dir)
        assert labels.extra["comparable_to_mteb"] is False and labels.checkpoint
        assert (rev_dir / "model_meta.json").is_file()
        assert d["texts_encoded"] > 0
        assert labels.design == {names[0]: "eos_last+causal", names[1]: "mean+bidirectional"}[d["checkpoint"]]
    failed_dir = layout.result_dir(results, names[1], next(d["revision"] for d in s.done if d["checkpoint"] == names[1]))
    assert not (failed_dir / "SciFact.json").exists()
    before = _files(results)

    # rerun through the CLI: the three done pairs are skipped (files untouched), the failed one runs now
    monkeypatch.delenv("EMBED_TEST_FAULTS")
    env = dict(os.environ, EMBED_EVAL_RAY_CPUS="2")
    p = subprocess.run([sys.executable, "-m", "ray_jobs.evaluate", "--checkpoints", *map(str, tiny_ckpts), "--tasks",
                        *TASKS, "--results", str(results), "--quick", "--json", str(tmp_path / "s.json")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s2 = json.loads((tmp_path / "s.json").read_text())
    assert len(s2["skipped"]) == 3 and [(d["checkpoint"], d["task"]) for d in s2["done"]] == [(names[1], "SciFact")]
    after = _files(results)
    assert all(after[f] == t for f, t in before.items())  # nothing done before was recomputed
    assert (failed_dir / "SciFact.json").is_file()
    assert "MTEB evaluation" in p.stderr  # the progress bar
    assert set(s2["scores"]) == set(names) and all(len(v) == 2 for v in s2["scores"].values())


def test_embedding_cache_embeds_each_text_once(tiny_dirs) -> None:
    import mteb

    from embed_core.mteb_encoder import cached, make_encoder

    m = EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs["qwen2"]), lora_r=0))
    calls: list[int] = []
    real = m.encode

    def counting(texts, **kw):
        calls.append(len(texts))
        return real(texts, **kw)

    m.encode = counting
    enc = cached(make_encoder(m))
    meta = mteb.get_task("STSBenchmark").metadata
    texts = ["a cat", "a dog", "a cat", "the long sentence about nothing at all", "a dog"]
    out = enc.encode([{"text": texts[:3]}, {"text": texts[3:]}], task_metadata=meta, hf_split="test",
                     hf_subset="default")
    assert calls == [3]  # 3 distinct texts, one call
    np.testing.assert_allclose(out, real(texts, instruction="Retrieve semantically similar text."), atol=1e-5)
    again = enc.encode([{"text": ["a dog", "a bird"]}], task_metadata=meta, hf_split="test", hf_subset="default")
    assert calls == [3, 1] and enc.hits == 2 + 1 and enc.misses == 4
    np.testing.assert_allclose(again[0], out[1], atol=0)


@pytest.mark.slow
def test_sweep_evaluate_stage_uses_the_callers_ray(tiny_ckpts, tiny_dirs, tmp_path) -> None:
    """The sweep's evaluate stage (checkpoints.json -> results/) through a Ray the caller started; the Ray is left
    running for the caller, and the results are what the report reads."""
    import ray
    import yaml

    from sweeps.results import load_results
    from ray_jobs.sweep import check_evaluation_tasks, evaluate_stage, prepare
    from sweeps.config_parse import load_sweep_config

    raw = {"name": "ev", "storage_path": str(tmp_path / "runs"), "seeds": [0],
           "grid": {"base_models": [str(tiny_dirs["llama"])], "designs": ["eos_last+causal"]},
           "model": {"max_length": 32}, "search": {"lora_r": 4, "lr": 1e-3, "samples_per_cell": 1},
           "scheduler": {"type": "fifo", "metric": "val_margin"},
           "training": {"builders": ["stsb"], "max_per_source": 50, "batch_size": 8, "max_steps": 2, "eval_every": 2,
                        "val_size": 8, "checkpoint_every": 2},
           "evaluation": {"tasks": ["STSBenchmark"], "quick": True, "options": {"batch_size": 16}}}
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(raw))
    sweep = load_sweep_config(str(tmp_path / "ev.yaml"), [], None)
    check_evaluation_tasks(sweep)
    sweep_dir = prepare(sweep)
    specs = specs_from_args([str(c) for c in tiny_ckpts])
    layout.write_checkpoints(sweep_dir, specs)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        s = evaluate_stage(sweep)
        assert ray.is_initialized()  # the caller's Ray is the caller's to shut down
    finally:
        ray.shutdown()
    assert len(s.done) == 2 and not s.failed
    res = load_results(sweep_dir)
    assert not res.problems, res.problems
    assert sorted(r.labels.design for r in res.runs) == ["eos_last+causal", "mean+bidirectional"]
    assert all(len(r.instances["STSBenchmark"][0].ids) == 64 for r in res.runs)


@pytest.mark.slow
def test_bring_your_own_task_through_the_job_reruns_when_its_data_changes(tiny_ckpts, tmp_path, monkeypatch) -> None:
    import mteb

    monkeypatch.setenv("EMBED_EVAL_RAY_CPUS", "2")
    rows = [{"q": f"the {w} sat on the mat", "d": f"a {w} was on a rug", "y": i % 2}
            for i, w in enumerate("cat dog cow owl bat rat ant bee elk yak".split())]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "pairs.yaml"
    spec.write_text("name: MyPairs\ntype: PairClassification\nfiles: {test: pairs.jsonl}\n"
                    "columns: {sentence1: q, sentence2: d, label: y}\n")
    specs = specs_from_args([str(tiny_ckpts[0])])
    results = tmp_path / "results"
    s1 = evaluate_checkpoints(specs, [str(spec)], results, show_progress=False)
    (d,) = s1.done
    rev_dir = layout.result_dir(results, d["checkpoint"], d["revision"])
    assert mteb.TaskResult.from_disk(rev_dir / "MyPairs.json").get_score() == pytest.approx(d["score"])
    (inst,) = layout.InstanceScores.read_all(rev_dir)
    assert inst.aggregate == "average_precision" and len(inst.ids) == 10
    s2 = evaluate_checkpoints(specs, [str(spec)], results, show_progress=False)
    assert len(s2.skipped) == 1 and not s2.done  # same data: skipped without starting a worker
    rows[0]["y"] = 1 - rows[0]["y"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s3 = evaluate_checkpoints(specs, [str(spec)], results, show_progress=False)
    assert len(s3.done) == 1  # the data changed: evaluated again
    assert not (results / ".eval_tmp").exists()
