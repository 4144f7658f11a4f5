"""embed_core.mteb_tasks: MTEB tasks on local data reproduce MTEB's splits and scores.

Real mteb, real data (shared/data), real all-MiniLM-L6-v2; no network. Results go to pytest's
tmp_path, never to the home folder.
"""
from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import socket
import tempfile

# mteb builds its default ResultCache (and mkdirs ~/.cache/mteb) at import time: point it elsewhere
# first. The tests below pass an explicit cache in tmp_path anyway.
if "MTEB_CACHE" not in os.environ:
    os.environ["MTEB_CACHE"] = tempfile.mkdtemp(prefix="embed-core-test-mteb-cache-")
    atexit.register(shutil.rmtree, os.environ["MTEB_CACHE"], True)

import mteb  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from embed_core import mteb_tasks as mt  # noqa: E402
from embed_core.errors import ConfigError, DataError  # noqa: E402

# MTEB's eval-split sizes (MTEB descriptive statistics; shared/data/*/SOURCE.md), written out here
# rather than read from the module under test.
SIZES = {
    "STSBenchmark": {"test": 1379},
    "SICK-R": {"test": 9927},
    "Banking77Classification": {"train": 10003, "test": 3080},
    "EmotionClassification": {"train": 16000, "test": 2000},
    "AmazonCounterfactualClassification": {"train": 4018, "test": 670},
    "STS17": {"test": 250},
    "BIOSSES": {"test": 100},
    "MassiveIntentClassification": {"train": 11514, "validation": 2033, "test": 2974},
    "MassiveScenarioClassification": {"train": 11514, "validation": 2033, "test": 2974},
    "SummEval": {"test": 100},
    "TwitterURLCorpus": {"test": 51534},
}
# Multilingual tasks: the subset MTEB(eng, v1) evaluates (the only one the local data holds).
SUBSETS = {"AmazonCounterfactualClassification": "en", "STS17": "en-en", "MassiveIntentClassification": "en",
           "MassiveScenarioClassification": "en"}
SCIFACT = {"queries": 300, "corpus": 5183, "qrels": 339}

# all-MiniLM-L6-v2 on STSBenchmark, test, cosine_spearman, as published by MTEB:
# github.com/embeddings-benchmark/results, results/sentence-transformers__all-MiniLM-L6-v2/
# 8b3219a92973c328a8e22fadcfa821b5dc75636a/STSBenchmark.json (mteb 1.12.75, dataset revision
# b0fddb56ed78048fa8b90373c8a3cfc37b684831 = mteb 2.26's).
PUBLISHED_STSB_MINILM = 0.8203247283076371


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _split_sizes(task) -> dict[str, int]:
    subset = SUBSETS.get(task.metadata.name)
    ds = task.dataset[subset] if subset else task.dataset
    return {split: len(ds[split]) for split in ds}


# ---- loading (fast, no model) ------------------------------------------------------------


@pytest.mark.parametrize("name", list(SIZES))
def test_local_task_is_the_official_task_with_mteb_sizes(name: str, no_network: None) -> None:
    official = mteb.get_task(name)
    task = mt.local_task(name)
    assert isinstance(task, type(official))
    assert task.metadata == official.metadata
    assert task.metadata.main_score == official.metadata.main_score
    assert list(task.eval_splits) == ["test"]
    task.load_data()
    assert task.data_loaded
    sizes = _split_sizes(task)
    for split, n in SIZES[name].items():
        assert sizes[split] == n, (split, sizes)


def test_amazon_counterfactual_is_subset_en_test_only() -> None:
    task = mt.local_task("AmazonCounterfactualClassification")
    assert task.hf_subsets == ["en"]
    assert list(task.eval_splits) == ["test"]
    task.load_data()
    assert set(task.dataset) == {"en"}
    assert _split_sizes(task)["validation"] == 335
    assert sorted(set(task.dataset["en"]["test"]["label"])) == [0, 1]


def test_scifact_beir_test_split(no_network: None) -> None:
    task = mt.local_task("SciFact")
    assert isinstance(task, type(mteb.get_task("SciFact")))
    task.load_data()
    split = task.dataset["default"]["test"]
    qrels = split["relevant_docs"]
    assert len(split["queries"]) == SCIFACT["queries"]
    assert len(split["corpus"]) == SCIFACT["corpus"]
    assert sum(len(v) for v in qrels.values()) == SCIFACT["qrels"]
    assert len(qrels) == 300 and max(len(v) for v in qrels.values()) == 5
    assert set(split["corpus"].column_names) == {"id", "title", "text"}
    assert set(qrels) == set(split["queries"]["id"])
    assert {d for v in qrels.values() for d in v} <= set(split["corpus"]["id"])
    assert split["top_ranked"] is None


# Near copies (text differs from MTEB's, SOURCE.md): compared on sizes and gold scores only.
NEAR_COPIES = ("SICK-R", "BIOSSES", "SummEval", "TwitterURLCorpus")


@pytest.mark.parametrize("name", [*SIZES, "SciFact"])
def test_local_text_matches_mteb_descriptive_statistics(name: str) -> None:
    """Texts, not just sizes: character counts, min/max lengths and unique texts equal the
    statistics mteb ships with each task (computed on its hub copy).

    Not compared: `unique_pairs` (mteb 2.26 counts pairs order-insensitively, the stored numbers
    were counted in order) and label ids (hub-internal numbering). SICK-R only on size and scores:
    the local copy is SentEval's tokenised text (see the module docstring).
    """
    task = mt.local_task(name)
    task.load_data()
    stored = task.metadata.descriptive_stats
    subset = SUBSETS.get(name)
    for split in stored:
        if subset:
            if split not in SIZES[name]:
                continue
            want = stored[split]["hf_subset_descriptive_stats"][subset]
            got = task._calculate_descriptive_statistics_from_split(split, hf_subset=subset)
        else:
            want = stored[split]
            got = task._calculate_descriptive_statistics_from_split(split)
        got = dict(got)
        assert got["num_samples"] == want["num_samples"]
        if name in NEAR_COPIES:
            gold = "score_statistics" if name == "SummEval" else "label_statistics"
            if gold in want:
                assert _flat(dict(got[gold])) == pytest.approx(_flat(dict(want[gold]))), (split, gold)
            continue
        skip = ("unique_pairs", "label_statistics", "hf_subset_descriptive_stats")
        want_flat = _flat({k: v for k, v in want.items() if k not in skip})
        got_flat = _flat({k: v for k, v in got.items() if k not in skip})
        assert want_flat  # something is compared
        for key, value in want_flat.items():
            assert got_flat.get(key) == pytest.approx(value), (split, key)


def test_unknown_task_names_the_supported_ones() -> None:
    with pytest.raises(ConfigError) as err:
        mt.local_task("STS12")
    for name in mt.LOCAL_TASKS:
        assert name in str(err.value)
    with pytest.raises(ConfigError):
        mt.task_category("NoSuchTask")


def test_missing_data_dir_raises_data_error(tmp_path) -> None:
    with pytest.raises(DataError):
        mt.local_task("STSBenchmark", data_dir=tmp_path / "nope")
    # an existing folder without the files fails when the data is loaded, naming the file
    task = mt.local_task("STSBenchmark", data_dir=tmp_path)
    with pytest.raises(DataError, match="sts-test.csv"):
        task.load_data()


def test_wrong_sizes_raise_data_error(tmp_path) -> None:
    """A full load insists on MTEB's sizes: a truncated file is an error, not a quiet mismatch."""
    src = mt.local_task("STSBenchmark").local_data_dir / "stsbenchmark" / "sts-test.csv"
    (tmp_path / "stsbenchmark").mkdir()
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "stsbenchmark" / "sts-test.csv").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(DataError, match="1379"):
        mt.local_task("STSBenchmark", data_dir=tmp_path).load_data()
    small = mt.local_task("STSBenchmark", data_dir=tmp_path, subsample=10)  # subsamples are not checked
    small.load_data()
    assert len(small.dataset["test"]) == 10


def test_hugging_face_is_offline() -> None:
    """mteb (hence huggingface_hub, datasets) was imported above before embed_core.mteb_tasks:
    the module switches the already-imported libraries to offline mode too."""
    import datasets.config
    import huggingface_hub.constants

    if os.environ["HF_HUB_OFFLINE"].lower() in ("0", "false", "no", "off"):
        pytest.skip("HF_HUB_OFFLINE explicitly disabled in this environment")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert datasets.config.HF_HUB_OFFLINE is True


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_subsample_is_rejected(bad) -> None:
    with pytest.raises(ConfigError):
        mt.local_task("STSBenchmark", subsample=bad)


def test_new_tasks_subsets_and_splits() -> None:
    """Multilingual tasks evaluate MTEB(eng, v1)'s subset and split; Massive's validation is selectable."""
    for name, subset in SUBSETS.items():
        task = mt.local_task(name)
        assert task.hf_subsets == [subset] and list(task.eval_splits) == ["test"], name
    assert list(mt.local_task("MassiveIntentClassification", eval_splits=["validation"]).eval_splits) == ["validation"]
    scenario = mt.local_task("MassiveScenarioClassification")
    scenario.load_data()
    assert len(set(scenario.dataset["en"]["train"]["label"])) == 18


@pytest.mark.parametrize("name", ["STS17", "BIOSSES", "MassiveIntentClassification", "SummEval", "TwitterURLCorpus"])
def test_new_tasks_subsample(name: str) -> None:
    task = mt.local_task(name, subsample=12)
    task.load_data()
    sizes = _split_sizes(task)
    assert sizes["test"] == 12 and task.is_subsampled
    if name == "MassiveIntentClassification":
        assert sizes["train"] == 11514  # the probe's train split stays whole


def test_task_category() -> None:
    assert mt.task_category("STSBenchmark") == "STS"
    assert mt.task_category("SICK-R") == "STS"
    assert mt.task_category("Banking77Classification") == "Classification"
    assert mt.task_category("EmotionClassification") == "Classification"
    assert mt.task_category("AmazonCounterfactualClassification") == "Classification"
    assert mt.task_category("SciFact") == "Retrieval"
    assert mt.task_category(mt.local_task("SciFact")) == "Retrieval"
    assert mt.task_category("STS17") == "STS" and mt.task_category("BIOSSES") == "STS"
    assert mt.task_category("MassiveScenarioClassification") == "Classification"
    assert mt.task_category("SummEval") == "Summarization"
    assert mt.task_category("TwitterURLCorpus") == "PairClassification"


def test_subsample_is_small_deterministic_and_marked() -> None:
    official = mteb.get_task("STSBenchmark").metadata
    sts = mt.local_task("STSBenchmark", subsample=100)
    sts.load_data()
    assert len(sts.dataset["test"]) == 100 and sts.is_subsampled
    assert "local-subsample-100" in sts.metadata.revision
    assert "NOT comparable" in sts.metadata.description
    assert sts.metadata.name == official.name
    assert type(sts).metadata == official  # the official metadata is left alone
    again = mt.local_task("STSBenchmark", subsample=100)
    again.load_data()
    assert again.dataset["test"]["sentence1"] == sts.dataset["test"]["sentence1"]
    sts.unload_data()
    assert "local-subsample-100" in sts.metadata.revision  # marker survives mteb's unload

    emo = mt.local_task("EmotionClassification", subsample=50)
    emo.load_data()
    assert len(emo.dataset["test"]) == 50 and len(emo.dataset["train"]) == 16000

    sf = mt.local_task("SciFact", subsample=10)
    sf.load_data()
    split = sf.dataset["default"]["test"]
    relevant = {d for v in split["relevant_docs"].values() for d in v}
    assert len(split["queries"]) == 10 and set(split["relevant_docs"]) == set(split["queries"]["id"])
    assert relevant <= set(split["corpus"]["id"])
    assert len(split["corpus"]) == len(relevant) + 200

    assert not mt.local_task("STSBenchmark").is_subsampled


def test_eval_splits_override() -> None:
    task = mt.local_task("EmotionClassification", eval_splits=["validation"])
    assert list(task.eval_splits) == ["validation"]
    with pytest.raises(ConfigError):
        mt.local_task("STSBenchmark", eval_splits=["train"])


def test_scifact_abstract_parsing() -> None:
    abstract = "['First one.'\n 'Second, with \\'quote\\'.' \"It's third.\" '  padded  ' 'caf\\xe9 \\u03b2']"
    assert mt.scifact_abstract_sentences(abstract) == [
        "First one.",
        "Second, with 'quote'.",
        "It's third.",
        "  padded  ",
        "café β",
    ]
    # non-ASCII characters written as such stay as they are
    assert mt.scifact_abstract_sentences("['β-cells é']") == ["β-cells é"]


def test_local_task_pickles() -> None:
    """Ray ships tasks to workers with pickle: the generated classes resolve by name."""
    task = mt.local_task("SICK-R", subsample=20)
    clone = pickle.loads(pickle.dumps(task))
    assert type(clone) is type(task)
    assert clone.metadata.revision == task.metadata.revision
    clone.load_data()
    assert len(clone.dataset["test"]) == 20


# ---- end to end with the real encoder ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from embed_core.reference_encoder import minilm_reference_encoder

    return minilm_reference_encoder()


def test_reference_encoder_matches_sentence_transformers(minilm) -> None:
    st = pytest.importorskip("sentence_transformers")
    from embed_core.reference_encoder import minilm_model_dir

    model = st.SentenceTransformer(str(minilm_model_dir()), device="cpu")
    texts = ["A girl is styling her hair.", "Three men are playing chess.", "short", "x " * 300]
    ours = minilm.embed_texts(texts)
    theirs = model.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The task 'STSBenchmark' is superseded")
def test_stsbenchmark_end_to_end_reproduces_published_score(minilm, tmp_path, no_network) -> None:
    task = mt.local_task("STSBenchmark")
    cache = mteb.ResultCache(tmp_path / "mteb-cache")
    result = mteb.evaluate(
        minilm,
        [task],
        cache=cache,
        encode_kwargs={"batch_size": 64},
        show_progress_bar=False,
        co2_tracker=False,
    )
    assert not result.exceptions
    (task_result,) = result.task_results
    score = task_result.scores["test"][0]["cosine_spearman"]
    assert task_result.get_score() == pytest.approx(score)
    assert abs(score - PUBLISHED_STSB_MINILM) <= 0.01, score
    meta = minilm.mteb_model_meta
    saved = (
        tmp_path / "mteb-cache" / "results" / meta.model_name_as_path() / meta.revision / "STSBenchmark.json"
    )
    assert saved.is_file()
    # a second run is answered from the cache (no re-encoding)
    again = mteb.evaluate(minilm, [task], cache=cache, show_progress_bar=False, co2_tracker=False)
    assert again.task_results[0].scores["test"][0]["cosine_spearman"] == pytest.approx(score)


@pytest.mark.filterwarnings("ignore:The task 'SummEval' is superseded", "ignore:The used Evaluator is deprecated")
def test_new_task_types_give_instances_that_reproduce_mteb_and_report_categories(minilm, tmp_path) -> None:
    """Summarization (per-text correlation, SummEval's deprecated evaluator) and pair classification (per-pair
    similarity, AP) instances from mteb's saved predictions reproduce mteb's main score; the report files them
    under their mteb task type."""
    from sweeps import layout
    from sweeps.instances import instance_scores
    from sweeps.results import load_results

    tasks = [mt.local_task("SummEval", subsample=8), mt.local_task("TwitterURLCorpus", subsample=40),
             mt.local_task("STS17", subsample=30)]
    res = mteb.evaluate(minilm, tasks, cache=None, prediction_folder=tmp_path / "pred", show_progress_bar=False,
                        co2_tracker=False)
    rev_dir = layout.result_dir(tmp_path / "results", "m/base", "r1")
    for task, tr in zip(tasks, res.task_results):
        preds = json.loads((tmp_path / "pred" / f"{task.metadata.name}_predictions.json").read_text())
        task.load_data()
        (inst,) = instance_scores(task, tr, preds)  # raises DataError unless the aggregate equals mteb's
        assert inst.score() == pytest.approx(tr.get_score(), abs=1e-6)
        inst.write(rev_dir)
        tr.to_disk(rev_dir / f"{task.metadata.name}.json")
        if task.metadata.name == "SummEval":
            assert inst.aggregate == "mean" and set(inst.ids) <= set(task.dataset["test"]["id"])
        if task.metadata.name == "STS17":
            assert inst.subset == "en-en"
    layout.RunLabels(design="eos_last+causal", base_model="b").write(rev_dir)
    shutil.copytree(rev_dir, layout.result_dir(tmp_path / "results", "m/other", "r1"))
    layout.RunLabels(design="mean+bidirectional", base_model="b").write(
        layout.result_dir(tmp_path / "results", "m/other", "r1"))
    loaded = load_results(tmp_path / "results")
    assert loaded.categories == {"STS17": "STS", "SummEval": "Summarization", "TwitterURLCorpus": "PairClassification"}
