"""Bring-your-own tasks: a YAML/JSON spec of each of the six task types runs through real mteb with a tiny model and
its per-instance scores reproduce mteb's main score; bad specs fail in resolve_tasks (before any Ray worker) with a
message that names the file and the field."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from embed_core.errors import ConfigError, DataError
from embed_core.task_spec import TASK_TYPES, resolve_tasks

WORDS = "cat dog car bank money tree river music song food pizza train card loan rain sun".split()


def _sent(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(6))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


@pytest.fixture()
def spec_dir(tmp_path) -> Path:
    """Small files for every task type, and a YAML spec per type beside them."""
    rng = random.Random(0)
    _jsonl(tmp_path / "sts.jsonl", [{"a": _sent(rng), "b": _sent(rng), "sim": rng.random() * 5} for _ in range(24)])
    _jsonl(tmp_path / "intents_train.jsonl", [{"utterance": _sent(rng), "intent": rng.choice(["pin", "loan", "card"])}
                                              for _ in range(48)])
    _jsonl(tmp_path / "intents_test.jsonl", [{"utterance": _sent(rng), "intent": rng.choice(["pin", "loan", "card"])}
                                             for _ in range(24)])
    _jsonl(tmp_path / "pairs.jsonl", [{"sentence1": _sent(rng), "sentence2": _sent(rng), "label": i % 2}
                                      for i in range(24)])
    _jsonl(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": _sent(rng)} for i in range(30)])
    _jsonl(tmp_path / "queries.jsonl", [{"_id": f"q{i}", "text": _sent(rng)} for i in range(6)])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    _jsonl(tmp_path / "candidates.jsonl", [{"query-id": f"q{i}", "corpus-id": f"d{(i + j) % 30}"}
                                           for i in range(6) for j in range(5)])
    specs = {
        "STS": "name: MySTS\ntype: STS\nfiles: {test: sts.jsonl}\ncolumns: {sentence1: a, sentence2: b, score: sim}\n",
        "Classification": "name: MyIntents\ntype: Classification\nfiles: {train: intents_train.jsonl, "
                          "test: intents_test.jsonl}\ncolumns: {text: utterance, label: intent}\nn_experiments: 3\n",
        "Clustering": "name: MyClusters\ntype: Clustering\nfiles: {test: intents_test.jsonl}\n"
                      "columns: {text: utterance, label: intent}\n",
        "PairClassification": "name: MyPairs\ntype: PairClassification\nfiles: {test: pairs.jsonl}\n",
        "Retrieval": "name: MyRetrieval\ntype: Retrieval\nfiles: {corpus: corpus.jsonl, queries: queries.jsonl, "
                     "qrels: qrels.tsv}\n",
        "Reranking": "name: MyReranking\ntype: Reranking\nfiles: {corpus: corpus.jsonl, queries: queries.jsonl, "
                     "qrels: qrels.tsv, candidates: candidates.jsonl}\n",
    }
    for t, text in specs.items():
        (tmp_path / f"{t}.yaml").write_text(text)
    return tmp_path


def test_every_task_type_runs_through_mteb_and_instances_match(spec_dir, tiny_dirs) -> None:
    import mteb

    from embed_core.config import EmbedConfig
    from embed_core.model import EmbeddingModel
    from embed_core.mteb_encoder import cached, make_encoder
    from sweeps.instances import instance_scores

    refs = resolve_tasks([str(spec_dir / f"{t}.yaml") for t in TASK_TYPES] + ["STSBenchmark", "SprintDuplicateQuestions"])
    assert [r.type for r in refs[:6]] == list(TASK_TYPES)
    assert [r.kind for r in refs[-2:]] == ["local", "mteb"]  # an official task by name (hub access at run time)
    assert refs[1].sizes == {"train": 48, "test": 24} and refs[1].revision.startswith("local-")
    enc = cached(make_encoder(EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs["qwen2"]), lora_r=0))))
    tasks = [r.build() for r in refs[:6]]
    res = mteb.evaluate(enc, tasks, cache=None, prediction_folder=spec_dir / "pred", show_progress_bar=False,
                        co2_tracker=False, raise_error=True)
    by_name = {tr.task_name: tr for tr in res.task_results}
    for ref, task in zip(refs[:6], tasks):
        tr = by_name[ref.name]
        assert tr.scores["test"][0]["main_score"] == pytest.approx(tr.scores["test"][0][ref.main_score])
        task.load_data()
        preds = json.loads((spec_dir / "pred" / f"{ref.name}_predictions.json").read_text())
        insts = instance_scores(task, tr, preds)  # raises if the instances do not reproduce the main score
        if ref.type == "Clustering":
            assert insts == []  # v-measure is not a per-document score
        else:
            (inst,) = insts
            assert inst.score() == pytest.approx(tr.get_score(), abs=1e-5)
            assert len(inst.ids) == {"Retrieval": 6, "Reranking": 6}.get(ref.type, 24)


def _write(spec_dir: Path, name: str, text: str) -> str:
    (spec_dir / name).write_text(text)
    return str(spec_dir / name)


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "unknown_type", "empty_split", "label_type",
                                  "csv_label_type", "pair_label_type", "score_type", "qrels_unknown_doc"])
def test_bad_specs_name_the_file_and_the_field(spec_dir, case) -> None:
    import ray

    from ray_jobs.evaluate import evaluate_checkpoints, reference_spec

    base = "name: Bad\ntype: Classification\nfiles: {train: intents_train.jsonl, test: %s}\ncolumns: %s\n"
    cols = "{text: utterance, label: intent}"
    if case == "missing_file":
        spec, err, expect = _write(spec_dir, "s.yaml", base % ("nope.jsonl", cols)), DataError, ["files.test", "nope.jsonl"]
    elif case == "missing_column":
        spec, err, expect = (_write(spec_dir, "s.yaml", base % ("intents_test.jsonl", "{text: utterance, label: lbl}")),
                             DataError, ["columns.label", "'lbl'", "intents_train.jsonl"])
    elif case == "unknown_type":
        spec, err, expect = _write(spec_dir, "s.yaml", "name: Bad\ntype: Regression\nfiles: {test: sts.jsonl}\n"), \
            ConfigError, ["type", "'Regression'"]
    elif case == "empty_split":
        (spec_dir / "empty.jsonl").write_text("\n")
        spec, err, expect = _write(spec_dir, "s.yaml", base % ("empty.jsonl", cols)), DataError, ["files.test", "empty.jsonl"]
    elif case == "label_type":
        _jsonl(spec_dir / "floats.jsonl", [{"utterance": "x y", "intent": 0.5}])
        spec, err, expect = _write(spec_dir, "s.yaml", base % ("floats.jsonl", cols)), DataError, \
            ["columns.label", "floats.jsonl", "row 1", "float"]
    elif case == "csv_label_type":  # a .csv cell is text: '0.5' is typed like the .jsonl float above
        (spec_dir / "floats.csv").write_text("utterance,intent\nx y,0.5\nz w,1.5\nv u,2.5\n")
        spec, err, expect = _write(spec_dir, "s.yaml", base % ("floats.csv", cols)), DataError, \
            ["columns.label", "floats.csv", "row 1", "float"]
    elif case == "pair_label_type":
        _jsonl(spec_dir / "p.jsonl", [{"sentence1": "a", "sentence2": "b", "label": "yes"}])
        spec, err, expect = _write(spec_dir, "s.json", json.dumps(
            {"name": "Bad", "type": "PairClassification", "files": {"test": "p.jsonl"}})), DataError, \
            ["s.json", "columns.label", "p.jsonl", "0 / 1"]
    elif case == "score_type":
        _jsonl(spec_dir / "st.jsonl", [{"sentence1": "a", "sentence2": "b", "score": "high"}])
        spec, err, expect = _write(spec_dir, "s.yaml", "name: Bad\ntype: STS\nfiles: {test: st.jsonl}\n"), DataError, \
            ["columns.score", "st.jsonl", "a number"]
    else:
        (spec_dir / "qr.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td999\t1\n")
        spec, err, expect = _write(spec_dir, "s.yaml", "name: Bad\ntype: Retrieval\nfiles: {corpus: corpus.jsonl, "
                                   "queries: queries.jsonl, qrels: qr.tsv}\n"), DataError, ["columns.qrels_doc_id", "d999"]
    with pytest.raises(err) as ei:
        resolve_tasks(["STSBenchmark", spec])
    msg = str(ei.value)
    assert Path(spec).name in msg and all(e in msg for e in expect), msg
    # the evaluation job raises the same error before it starts Ray
    with pytest.raises(err):
        evaluate_checkpoints([reference_spec()], [spec], spec_dir / "results", show_progress=False)
    assert not ray.is_initialized()
    assert not (spec_dir / "results" / "reference__all-MiniLM-L6-v2").exists()


def test_csv_and_jsonl_labels_are_typed_alike(spec_dir) -> None:
    """Integer labels in a .csv train file and a .jsonl test file are one label set (no 'labels mix types')."""
    rows = [json.loads(x) for x in (spec_dir / "intents_test.jsonl").read_text().splitlines() if x.strip()]
    ints = sorted({r["intent"] for r in rows})
    ids = {lab: i for i, lab in enumerate(ints)}
    _jsonl(spec_dir / "int_test.jsonl", [{"utterance": r["utterance"], "intent": ids[r["intent"]]} for r in rows])
    (spec_dir / "int_train.csv").write_text("utterance,intent\n" + "".join(
        f"{r['utterance'].replace(',', ' ')},{ids[r['intent']]}\n" for r in rows))
    spec = _write(spec_dir, "ints.yaml", "name: IntLabels\ntype: Classification\nfiles: {train: int_train.csv, "
                  "test: int_test.jsonl}\ncolumns: {text: utterance, label: intent}\n")
    (ref,) = resolve_tasks([spec])
    task = ref.build()
    task.load_data()
    train = task.dataset["default"]["train"]["label"]
    assert sorted(set(train)) == list(range(len(ints)))  # one id per label: '1' (csv) and 1 (jsonl) are the same


def test_unknown_task_name_and_duplicates() -> None:
    with pytest.raises(ConfigError, match="unknown task 'NoSuchTask'"):
        resolve_tasks(["NoSuchTask"])
    with pytest.raises(ConfigError, match="appears twice"):
        resolve_tasks(["STSBenchmark", "STSBenchmark"])
    with pytest.raises(ConfigError, match="inline task spec: main_score"):
        resolve_tasks([{"name": "X", "type": "STS", "main_score": "accuracy", "files": {"test": "a.jsonl"}}])


def test_job_arguments_are_checked_before_ray(tmp_path) -> None:
    import ray

    from ray_jobs.evaluate import evaluate_checkpoints, reference_spec
    from sweeps.layout import CheckpointSpec, RunLabels

    for kw, match in (({"num_gpus": -1}, "num_gpus"), ({"max_retries": 1.5}, "max_retries"),
                      ({"subsample": 0}, "subsample")):
        with pytest.raises(ConfigError, match=match):
            evaluate_checkpoints([reference_spec()], ["STSBenchmark"], tmp_path, **kw)
    bad = CheckpointSpec(name="x/ckpt", path=str(tmp_path / "nope"), labels=RunLabels(design="c"))
    with pytest.raises(ConfigError, match="not a saved EmbeddingModel folder"):
        evaluate_checkpoints([bad], ["STSBenchmark"], tmp_path)
    assert not ray.is_initialized()


def test_a_spec_reproduces_banking77(tmp_path, data_dir) -> None:
    """The README's example: the spec's dataset is the local mteb Banking77Classification's, row for row, with
    the same label ids and probe settings (so the same scores)."""
    from embed_core.mteb_tasks import local_task

    folder = data_dir / "banking77"
    spec = _write(tmp_path, "banking77.yaml", f"name: MyBanking77\ntype: Classification\nsplit: test\n"
                  f"main_score: accuracy\nfiles: {{train: {folder}/train.csv, test: {folder}/test.csv}}\n"
                  "columns: {text: text, label: category}\nsamples_per_label: 8\nn_experiments: 10\n")
    (ref,) = resolve_tasks([spec])
    mine, official = ref.build(), local_task("Banking77Classification", data_dir)
    for t in (mine, official):
        t.load_data()
    ds_mine, ds_official = mine.dataset["default"], official.dataset.get("default", official.dataset)
    for split in ("train", "test"):
        assert ds_mine[split]["text"] == ds_official[split]["text"]
        assert ds_mine[split]["label"] == ds_official[split]["label"]
    assert (mine.samples_per_label, mine.n_experiments) == (official.samples_per_label, official.n_experiments)


def test_sts_score_range_must_be_a_range(spec_dir) -> None:
    spec = _write(spec_dir, "r.yaml", "name: R\ntype: STS\nfiles: {test: sts.jsonl}\n"
                  "columns: {sentence1: a, sentence2: b, score: sim}\nmin_score: 5\nmax_score: 5\n")
    with pytest.raises(ConfigError, match="max_score"):
        resolve_tasks([spec])
