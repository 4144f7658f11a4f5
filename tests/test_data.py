"""Tests of the training-data layer (embed_core.data) on the real shared data files."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import defaultdict

import pytest

from embed_core.data import (
    BUILDERS,
    DEFAULT_INSTRUCTIONS,
    DEFAULT_SOURCES,
    DataWarning,
    LengthGroupedBatcher,
    SamplerState,
    TrainExample,
    build_amazon_counterfactual,
    build_banking77,
    build_emotion,
    build_scifact,
    build_sick,
    build_stsb,
    build_training_set,
    char_length_fn,
    check_no_overlap,
    collate,
    eval_texts,
    format_query,
    hf_length_fn,
    make_batches,
    normalize_text,
    read_jsonl,
    shard_batch,
    validate_rows,
    write_jsonl,
)
from embed_core.data.builders import detokenize, read_snli, scifact_corpus, scifact_doc_text
from embed_core.errors import ConfigError, DataError
from embed_core.mteb_tasks import LOCAL_TASKS, local_task
from embed_core.paths import data_dir

# Expected builder output sizes (seed-independent). Builders first remove texts that occur in an
# MTEB evaluation split (source-data duplicates), then drop pairs whose positive equals the query.
EXPECTED_COUNTS = {
    # (premise, entailment hyp) pairs whose premise keeps >= 1 contradiction hyp; from the raw
    # files 3172 + 3167 = 6339, 6289 after removing evaluation sentences (STSB 2017 test track5 is
    # SNLI, SICK shares Flickr captions) and 3 hypothesis == premise pairs
    # (recomputed from raw files in test_snli_count_from_raw_files); one more entailment pair goes
    # because its hypothesis ("The woman has gray hair.") is an STS17 en-en test sentence.
    "snli": 6288,
    # 1406 STSB train pairs with score >= 4.0; 91 contain an STSB-test sentence (repeated captions);
    # 12 differ only in case.
    "stsb": 1406 - 91 - 12,
    # 919 (train claim, cited doc) pairs; 2 claims are verbatim SciFact validation (= test) claims.
    "scifact": 919 - 2,
    "banking77": 10003 - 7,  # one example per train text; 7 train texts also occur in test
    "emotion": 16000 - 16,  # 16 train texts also occur in test / validation
    "amazon_counterfactual": 4018,
    "flag": 40 - 1,  # 40 records x 1 positive; 1 has an STSB-test sentence as query or positive
}


@pytest.fixture(scope="module")
def root():
    try:
        return data_dir()
    except DataError as exc:  # pragma: no cover - only without the shared data folder
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def built(root):
    """Every usable builder, seed 0, grouped by source name."""
    examples = build_training_set(DEFAULT_SOURCES, root, seed=0)
    by_source = defaultdict(list)
    for ex in examples:
        by_source[(ex.source or "").split(":")[0]].append(ex)
    return examples, dict(by_source)


def _well_formed(ex: TrainExample) -> bool:
    texts = [ex.query, ex.positive, *ex.negatives]
    return all(isinstance(t, str) and t.strip() for t in texts)


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_builder_output(built, name):
    examples = built[1][name]
    assert len(examples) == EXPECTED_COUNTS[name]
    assert all(_well_formed(ex) for ex in examples)
    if name != "flag":
        assert {ex.instruction for ex in examples} == {DEFAULT_INSTRUCTIONS[name]}
    assert all(normalize_text(ex.query) != normalize_text(ex.positive) for ex in examples)


def test_all_sources_registered():
    assert set(EXPECTED_COUNTS) == set(BUILDERS) == set(DEFAULT_SOURCES)
    assert "sick" not in BUILDERS


def test_snli_count_from_raw_files(root, built):
    evaluation = set().union(*eval_texts(root).values())
    raw_total, expected = 0, 0
    for split in ("dev", "test"):
        raw = defaultdict(lambda: defaultdict(list))
        clean = defaultdict(lambda: defaultdict(list))
        for premise, hyp, label in read_snli(root, split):
            raw[premise][label].append(hyp)
            p, h = detokenize(premise), detokenize(hyp)
            if normalize_text(p) not in evaluation and normalize_text(h) not in evaluation:
                clean[p][label].append(h)
        raw_total += sum(len(g["entailment"]) for g in raw.values() if g["contradiction"])
        expected += sum(normalize_text(h) != normalize_text(p) for p, g in clean.items()
                        if g["contradiction"] for h in g["entailment"])
    assert raw_total == 6339
    snli = built[1]["snli"]
    assert len(snli) == expected == EXPECTED_COUNTS["snli"]
    assert all(not ex.query.endswith(" ") and " ." not in ex.query for ex in snli)
    assert all(ex.negatives for ex in snli)  # every triplet keeps >= 1 contradiction
    raw = "A man ca n't see the dog 's `` toy '' . "
    assert detokenize(raw) == 'A man can\'t see the dog\'s "toy".'


def test_scifact_abstract_parsing(root):
    corpus = scifact_corpus(root)
    assert len(corpus) == 5183
    lengths = [len(scifact_doc_text(t, s)) for t, s in corpus.values()]
    assert sum(lengths) == 7_771_428  # SOURCE.md check (MTEB: 7,771,451)
    assert (min(lengths), max(lengths)) == (221, 10_127)
    n_sents = [len(sents) for _, sents in corpus.values()]
    assert (min(n_sents), max(n_sents), sum(n_sents)) == (3, 367, 45_952)  # mean 8.87
    assert sum(s != s.strip() for _, sents in corpus.values() for s in sents) == 3707


def test_scifact_hard_negatives_exclude_positives(built):
    examples = built[1]["scifact"]
    positives = defaultdict(set)
    for ex in examples:
        positives[ex.query].add(ex.positive)
    for ex in examples:
        assert len(ex.negatives) == 7
        assert not positives[ex.query] & set(ex.negatives)


def test_builders_deterministic_by_seed(root):
    a = build_banking77(root, seed=0, max_examples=300)
    b = build_banking77(root, seed=0, max_examples=300)
    c = build_banking77(root, seed=1, max_examples=300)
    assert a == b
    assert a != c


def test_build_training_set_writes_jsonl(root, tmp_path):
    out = tmp_path / "mix.jsonl"
    examples = build_training_set(["stsb", "amazon_counterfactual"], root, seed=3,
                                  max_per_source=50, instructions={"stsb": None}, output=out)
    assert len(examples) == 100
    assert all(ex.instruction is None for ex in examples if ex.source == "stsb")
    assert read_jsonl(out) == examples
    with pytest.raises(ConfigError, match="unknown training source"):
        build_training_set(["nope"], root)


# ------------------------------------------------------------------------------------------------
# evaluation guard
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda r: build_stsb(r, split="test"),
    lambda r: build_sick(r),
    lambda r: build_training_set(["sick"], r),
    lambda r: build_scifact(r, split="validation"),
    lambda r: build_banking77(r, split="test"),
    lambda r: build_emotion(r, split="test"),
    lambda r: build_amazon_counterfactual(r, split="test"),
])
def test_eval_split_refused(root, call):
    with pytest.raises(DataError, match="Fix"):
        call(root)


def test_eval_texts_registry(root):
    texts = eval_texts(root)
    assert len(texts["SciFact/test"]) == 300
    assert len(texts["SICK-R/test"]) > 6000  # sentences of all 9927 pairs
    assert len(texts["STSBenchmark/test"]) > 2000
    assert len(texts["EmotionClassification/test"]) == 2000
    assert len(texts["AmazonCounterfactualClassification/test"]) == 670
    assert len(texts["STS17/test"]) == 500  # 250 pairs, all sentences unique
    assert len(texts["MassiveIntentClassification/test"]) == 2970  # MTEB: 2970 unique of 2974
    assert texts["MassiveScenarioClassification/test"] == texts["MassiveIntentClassification/test"]
    assert len(texts["TwitterURLCorpus/test"]) > 40_000


def _mteb_eval_texts(name: str, split: str, root) -> set[str]:
    """Normalised texts the local mteb task holds for one eval split. SciFact: its queries only (the
    guard leaves the shared corpus to training, see eval_guard); SummEval: articles and summaries."""
    task = local_task(name, root, eval_splits=[split])
    task.load_data()
    subset = task.hf_subsets[0]
    data = (task.dataset[subset] if subset in task.dataset else task.dataset)[split]
    kind = str(task.metadata.type)
    if kind == "Retrieval":
        texts = list(data["queries"]["text"])
    elif kind == "Summarization":
        texts = [t for row in data for t in (row["text"], *row["human_summaries"], *row["machine_summaries"])]
    elif kind in ("STS", "PairClassification"):
        texts = list(data["sentence1"]) + list(data["sentence2"])
    else:
        texts = list(data["text"])
    return {normalize_text(t) for t in texts} - {""}


def test_guard_eval_texts_equal_the_mteb_tasks_texts(root):
    """The texts the guard keeps out of training are exactly the texts each local MTEB task scores
    (same readers), for every eval split the guard registers; every local task is covered."""
    guarded = eval_texts(root)
    assert {key.split("/")[0] for key in guarded} == set(LOCAL_TASKS)
    for key, texts in guarded.items():
        name, split = key.split("/")
        assert texts == _mteb_eval_texts(name, split, root), key


def test_no_overlap_between_training_set_and_eval_splits(root, built):
    examples = built[0]
    evaluation = set().union(*eval_texts(root).values())
    train = {normalize_text(t) for ex in examples for t in ex.texts()}
    assert not train & evaluation
    assert check_no_overlap(examples, root, strict=True) == examples


def test_check_no_overlap_filters_or_raises(root):
    test_sentence = "A man is playing a flute."  # STSB test
    examples = [
        TrainExample("fine query", "fine doc", ["  a MAN is playing a flute. ", "other"]),
        TrainExample(test_sentence, "fine doc"),
        TrainExample("another query", "another doc"),
    ]
    assert normalize_text(test_sentence) in eval_texts(root)["STSBenchmark/test"]
    kept = check_no_overlap(examples, root)
    assert [ex.query for ex in kept] == ["fine query", "another query"]
    assert kept[0].negatives == ["other"]
    with pytest.raises(DataError, match="2 training texts in 2 examples"):
        check_no_overlap(examples, root, strict=True)
    near = [TrainExample("A band is playing on stage", "doc")]  # STSB test has "...stage."
    assert check_no_overlap(near, root) == near
    assert check_no_overlap(near, root, ignore_punctuation=True) == []


# ------------------------------------------------------------------------------------------------
# format
# ------------------------------------------------------------------------------------------------


def _good(i: int) -> dict:
    return {"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"], "instruction": None}


def test_malformed_rows_counted_and_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    bad = ['{"query": "q", "positive": ', json.dumps({"query": "q"}),
           json.dumps({"query": "   ", "positive": "p"}), json.dumps({"query": "q", "positive": 3}),
           json.dumps(["not", "an", "object"])]
    lines = [json.dumps(_good(i)) for i in range(500)] + bad
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = read_jsonl(path)
    assert len(examples) == 500
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(msgs) == 1
    for part in ("skipped 5 of 505", "bad_json=1", "missing_field:positive=1",
                 "empty_text:query=1", "wrong_type:positive=1", "not_an_object=1"):
        assert part in msgs[0]


def test_bad_fraction_threshold_raises(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [json.dumps(_good(i)) for i in range(10)] + ['{"query": ""}'] * 3
    path.write_text("\n".join(rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: 3 of 13 rows.*empty_text:query=3.*Fix"):
        read_jsonl(path)
    with pytest.warns(DataWarning, match="skipped 3 of 13"):
        assert len(read_jsonl(path, max_bad_fraction=0.5)) == 10


def test_flag_format_and_roundtrip(tmp_path):
    rows = [{"query": "q", "pos": ["p1", "p2"], "neg": ["n"], "prompt": "Do it.", "type": "x"}]
    examples = validate_rows(rows, default_source="flag")
    assert examples == [TrainExample("q", "p1", ["n"], "Do it.", "flag"),
                        TrainExample("q", "p2", ["n"], "Do it.", "flag")]
    path = write_jsonl(examples, tmp_path / "out.jsonl")
    assert read_jsonl(path) == examples
    assert format_query("hi", "Do it.") == "Instruct: Do it.\nQuery: hi"
    assert format_query("hi", None) == "hi"


# ------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return [TrainExample(f"query {i} " + "x" * (i * 37 % 400), f"pos {i}", [f"neg {i}"])
            for i in range(1000)]


def _ids(batches):
    return [[ex.query for ex in b] for b in batches]


def test_batches_deterministic_by_seed_and_epoch(toy):
    a = _ids(make_batches(toy, 16, seed=0, epoch=0))
    assert a == _ids(make_batches(toy, 16, seed=0, epoch=0))
    assert a != _ids(make_batches(toy, 16, seed=1, epoch=0))
    assert a != _ids(make_batches(toy, 16, seed=0, epoch=1))
    assert len(a) == 1000 // 16 and all(len(b) == 16 for b in a)
    assert len(make_batches(toy, 16, 0, 0, drop_last=False)) == 1000 // 16 + 1


def test_length_grouping_reduces_spread(toy):
    def spread(grouping):
        batches = make_batches(toy, 16, 0, 0, length_grouping=grouping)
        lens = [[char_length_fn(ex) for ex in b] for b in batches]
        return sum(max(x) - min(x) for x in lens) / len(lens)

    assert spread(True) < 0.2 * spread(False)


def test_resume_at_step_is_identical(toy):
    full = _ids(LengthGroupedBatcher(toy, 16, seed=7).iter_batches(epoch=2))
    for k in (0, 1, 25, len(full) - 1, len(full)):
        fresh = LengthGroupedBatcher(toy, 16, seed=7)  # as after a restart
        assert _ids(fresh.resume(SamplerState(seed=7, epoch=2, step=k))) == full[k:]
    assert _ids(make_batches(toy, 16, 7, 2, start_step=10)) == full[10:]
    with pytest.raises(ConfigError):
        LengthGroupedBatcher(toy, 16, seed=8).resume(SamplerState(7, 2, 0))


def test_hf_length_fn_counts_tokens():
    class WordTokenizer:  # stands in for a HF tokenizer: __call__(texts) -> {"input_ids": ...}
        def __call__(self, texts, add_special_tokens=True, truncation=False, max_length=None):
            ids = [[0] * (len(t.split()) + 2 * add_special_tokens) for t in texts]
            return {"input_ids": [x[:max_length] if truncation else x for x in ids]}

    ex = TrainExample("one two three", "four five", [], "Do")
    assert hf_length_fn(WordTokenizer())(ex) == (6 + 2) + (2 + 2)  # "Instruct: Do\nQuery: ..."
    assert hf_length_fn(WordTokenizer(), max_length=3)(ex) == 6


def test_shard_batch():
    batch = list(range(12))
    shards = [shard_batch(batch, r, 4) for r in range(4)]
    assert shards[1] == [3, 4, 5] and sum(shards, []) == batch
    with pytest.raises(ConfigError, match="multiple"):
        shard_batch(batch, 0, 5)
    with pytest.raises(ConfigError):
        shard_batch(batch, 4, 4)


def test_collate_fills_and_truncates_negatives():
    batch = [TrainExample("q0", "p0", ["a", "b", "c", "d"], "Find it"),
             TrainExample("q1", "p1", []),
             TrainExample("q2", "p2", ["e"])]
    out = collate(batch, num_negatives=2, seed=0)
    assert out["queries"] == ["Instruct: Find it\nQuery: q0", "q1", "q2"]
    assert out["positives"] == ["p0", "p1", "p2"]
    assert len(out["negatives"]) == 6 and out["num_filled"] == [0, 2, 1]
    assert set(out["negatives"][:2]) <= {"a", "b", "c", "d"}
    assert out["negatives"][4] == "e" and out["negatives"][5] not in {"q2", "p2", "e"}
    assert not {"q1", "p1"} & set(out["negatives"][2:4])
    assert collate(batch, 2, seed=0) == out
    assert collate(batch, 0)["negatives"] == []


def test_data_layer_does_not_import_ray():
    code = "import sys, embed_core.data; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# raw readers (embed_core.data.sources): the format traps of each SOURCE.md
# ------------------------------------------------------------------------------------------------


def test_raw_readers_handle_the_format_traps(root):
    from embed_core.data import sources as src

    stsb = src.read_stsb(root, "test")  # tabs, 9-field rows, '"' as text: 1119 rows with csv quoting
    assert len(stsb) == 1379 and sum('"' in p.sentence1 + p.sentence2 for p in stsb) == 50
    sick = src.read_sick(root, "test_annotated")  # CRLF
    assert len(sick) == 4927 and not any("\r" in p.sentence2 for p in sick)
    banking = src.read_banking77(root, "train")  # CRLF records, quoted newlines
    assert len(banking) == 10003 and sum("\n" in r.text for r in banking) == 10
    amazon = src.read_amazon_counterfactual(root, "test")  # leading '"': csv-unquoted as MTEB's copy
    assert len(amazon) == 670 and {r.label for r in amazon} == {"0", "1"}
    assert any(r.text.startswith('"This book') for r in amazon)
    assert [len(src.read_emotion(root, s)) for s in ("train", "val", "test")] == [16000, 2000, 2000]
    claims = src.read_scifact_claims(root, "validation")  # one row per evidence doc -> one per id
    assert len(claims) == 300 and sum(len(c.cited) for c in claims) == 339
    assert len(src.read_massive(root, "scenario", "train")) == 11514  # gzip JSONL
    summ = src.read_summeval(root)
    assert len(summ) == 100 and {len(r.machine_summaries) for r in summ} == {16}
    twitter = src.read_twitter_url_corpus(root)
    assert len(twitter) == 51534 and sum(r.label for r in twitter) == 12988
    assert [len(src.read_sts17(root)), len(src.read_biosses(root))] == [250, 100]
    with pytest.raises(DataError, match="no split"):
        src.read_stsb(root, "validation")
