"""Builders that turn the shared data folder into contrastive training sets.

Each builder returns a list of :class:`~embed_core.data.format.TrainExample`, deterministic given
``seed``, with an E5-style query-side ``instruction`` (documents get none) and ``source`` set to the
builder name. Every builder

* refuses evaluation splits (:func:`embed_core.data.eval_guard.require_training_split` raises a
  DataError naming the fix), and
* leaves texts that also occur in an MTEB evaluation split (duplicates in the source data) out of
  its candidate pools, drops pairs whose positive equals the query, and finally passes its output
  through :func:`embed_core.data.eval_guard.check_no_overlap` (filters what is left, e.g. in the
  fixed FlagEmbedding files), so the output has empty overlap with every evaluation split.

Sources (``BUILDERS``)::

    snli     SNLI dev+test (not MTEB sets): (premise, entailment hyp, contradiction hyps)
    stsb     STSBenchmark train (+dev): high-score pairs, random same-genre negative
    scifact  SciFact train claims -> cited abstracts, BM25 hard negatives
    banking77, emotion, amazon_counterfactual   train: same-label pairs, other-label negatives
    flag     FlagEmbedding example files (train_examples/*.jsonl)

SICK is refused entirely (:func:`build_sick`): MTEB's SICK-R test is all 9927 SICK pairs.

The raw files are read by :mod:`.sources` (one reader per dataset, shared with the evaluation guard
and the local MTEB tasks); this module only cleans the rows for training (strips texts).
"""
from __future__ import annotations

import random
import re
import zlib
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import numpy as np
from scipy import sparse

from ..errors import ConfigError, DataError
from ..paths import data_dir as resolve_data_dir
from . import eval_guard, sources
from .format import TrainExample, normalize_text, write_jsonl

__all__ = [
    "BUILDERS",
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_SOURCES",
    "BM25",
    "build_training_set",
    "build_snli",
    "build_stsb",
    "build_sick",
    "build_scifact",
    "build_banking77",
    "build_emotion",
    "build_amazon_counterfactual",
    "build_flag",
    "detokenize",
    "read_labelled",
    "read_snli",
    "scifact_corpus",
    "scifact_doc_text",
]

DEFAULT_INSTRUCTIONS: dict[str, str | None] = {
    "snli": "Given a premise, retrieve a hypothesis that is entailed by it",
    "stsb": "Retrieve semantically similar text",
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "banking77": "Given an online banking query, retrieve another query with the same intent",
    "emotion": "Given a Twitter message, retrieve another message that expresses the same emotion",
    "amazon_counterfactual": (
        "Given an Amazon customer review, retrieve another review that is likewise "
        "counterfactual or likewise not counterfactual"
    ),
    "flag": None,  # each FlagEmbedding record carries its own "prompt"
}

_KEEP = object()  # sentinel: "use the builder's default instruction"

# ----------------------------------------------------------------------------------------------
# Rows from the raw readers (:mod:`.sources`), cleaned for training
# ----------------------------------------------------------------------------------------------


def _folder(data_dir: str | Path | None, name: str) -> Path:
    folder = resolve_data_dir(data_dir) / name
    if not folder.is_dir():
        raise DataError(
            f"data folder {str(folder)!r} is missing. Fix: point data_dir / $EMBED_DATA_DIR at the "
            "shared data folder that holds it, or drop this source from the training mix."
        )
    return folder


def _stsb_pairs(data_dir: str | Path | None, split: str) -> list[sources.PairRow]:
    """STSBenchmark pairs of a training split, sentences stripped (group = genre)."""
    _folder(data_dir, "stsbenchmark")
    return [replace(p, sentence1=p.sentence1.strip(), sentence2=p.sentence2.strip())
            for p in sources.read_stsb(data_dir, split)]


def read_snli(data_dir: str | Path | None, split: str) -> list[tuple[str, str, str]]:
    """SNLI (premise, hypothesis, label) triples, raw tokenised text (trailing spaces kept)."""
    _folder(data_dir, "snli_triplets_source")
    return [(r.premise, r.hypothesis, r.label) for r in sources.read_snli(data_dir, split)]


# Labelled datasets a builder pairs by label: dataset -> reader of (text, label) rows.
_LABELLED: dict[str, Callable[[str | Path | None, str], list[sources.LabelledRow]]] = {
    "banking77": sources.read_banking77,
    "emotion": sources.read_emotion,
    "amazon_counterfactual": sources.read_amazon_counterfactual,
}


def read_labelled(data_dir: str | Path | None, dataset: str, split: str) -> list[tuple[str, str]]:
    """(text, label) rows of banking77 / emotion / amazon_counterfactual, texts stripped, empty
    texts left out."""
    if dataset not in _LABELLED:
        raise ConfigError(f"unknown labelled dataset {dataset!r}")
    _folder(data_dir, dataset)
    rows = [(r.text.strip(), r.label.strip()) for r in _LABELLED[dataset](data_dir, split)]
    return [(text, label) for text, label in rows if text]


def scifact_doc_text(title: str, sentences: Sequence[str]) -> str:
    """BEIR/MTEB document text: ``title + " " + sentences (stripped) joined by single spaces``."""
    return title.strip() + " " + " ".join(s.strip() for s in sentences)


def scifact_corpus(data_dir: str | Path | None = None) -> dict[str, tuple[str, list[str]]]:
    """doc_id -> (title, sentences) for the 5183 SciFact documents."""
    _folder(data_dir, "scifact")
    return {d.doc_id: (d.title, list(d.sentences)) for d in sources.read_scifact_corpus(data_dir)}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def detokenize(text: str) -> str:
    """Light PTB-style detokenisation of SNLI text: ``"a dog 's toy ."`` -> ``"a dog's toy."``."""
    s = " ".join(text.split())
    s = re.sub(r"``\s*", '"', s)
    s = re.sub(r"\s*''", '"', s)
    s = re.sub(r"\s+([.,;:!?%)])", r"\1", s)
    s = re.sub(r"\(\s+", "(", s)
    s = re.sub(r"\s+(n't|'s|'re|'m|'ll|'ve|'d)\b", r"\1", s, flags=re.IGNORECASE)
    return s


def _rng(seed: int, name: str) -> random.Random:
    """A per-source RNG: adding or removing another source does not change this one's output."""
    return random.Random((seed << 32) ^ zlib.crc32(name.encode()))


def _instruction(value: Any, source: str) -> str | None:
    return DEFAULT_INSTRUCTIONS[source] if value is _KEEP else value


def _drop_trivial(examples: list[TrainExample]) -> list[TrainExample]:
    """Drop pairs whose positive equals the query, and negatives equal to query or positive
    (after normalisation: e.g. STSB headline pairs differing only in case)."""
    kept = []
    for ex in examples:
        q, p = normalize_text(ex.query), normalize_text(ex.positive)
        if q == p:
            continue
        negs = [n for n in ex.negatives if normalize_text(n) not in (q, p)]
        kept.append(ex if len(negs) == len(ex.negatives) else replace(ex, negatives=negs))
    return kept


def _finish(examples: list[TrainExample], data_dir: str | Path | None,
            max_examples: int | None, seed: int, source: str) -> list[TrainExample]:
    """Drop trivial pairs and evaluation-overlap rows, then subsample (order kept)."""
    examples = eval_guard.check_no_overlap(_drop_trivial(examples), data_dir)
    if max_examples is not None and len(examples) > max_examples:
        keep = sorted(_rng(seed, source + ":subsample").sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in keep]
    if not examples:
        raise DataError(f"builder {source!r} produced no examples. Fix: check its data folder.")
    return examples


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def build_snli(data_dir: str | Path | None = None, seed: int = 0, *,
               splits: Sequence[str] = ("dev", "test"), instruction: Any = _KEEP,
               max_examples: int | None = None) -> list[TrainExample]:
    """SNLI triplets: one example per (premise, entailment hypothesis) whose premise also has at
    least one contradiction hypothesis; negatives = all contradiction hypotheses of that premise
    (file order). Grouped per split; text detokenised. Sentences that are evaluation texts (STSB
    test contains SNLI sentences, SICK shares Flickr captions) are removed first; without that,
    dev+test give 3172 + 3167 = 6339 (premise, entailment) candidates."""
    for split in splits:
        eval_guard.require_training_split("snli", split)
    is_eval = eval_guard.is_eval_text_fn(data_dir)
    examples = []
    for split in splits:
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for premise, hyp, label in read_snli(data_dir, split):
            premise, hyp = detokenize(premise), detokenize(hyp)
            if not (is_eval(premise) or is_eval(hyp)):
                groups[premise][label].append(hyp)
        for premise, by_label in groups.items():
            contra = by_label.get("contradiction", [])
            if not contra:
                continue
            for ent in by_label.get("entailment", []):
                examples.append(TrainExample(premise, ent, list(contra),
                                             _instruction(instruction, "snli"), "snli"))
    return _finish(examples, data_dir, max_examples, seed, "snli")


def build_stsb(data_dir: str | Path | None = None, seed: int = 0, *,
               split: str | Sequence[str] = "train", min_score: float = 4.0,
               num_negatives: int = 1, instruction: Any = _KEEP,
               max_examples: int | None = None) -> list[TrainExample]:
    """STSBenchmark pairs with ``score >= min_score`` (sentence1 -> sentence2); negatives are
    random sentences of other pairs of the same genre. Only ``train`` and ``dev`` are allowed
    (MTEB evaluates on ``test``); pairs with an STSB-test sentence (repeated captions) are
    skipped."""
    splits = [split] if isinstance(split, str) else list(split)
    for sp in splits:
        eval_guard.require_training_split("stsbenchmark", sp)
    is_eval = eval_guard.is_eval_text_fn(data_dir)
    pairs: list[sources.PairRow] = []
    for sp in splits:
        pairs.extend(p for p in _stsb_pairs(data_dir, sp)
                     if not (is_eval(p.sentence1) or is_eval(p.sentence2)))
    rng = _rng(seed, "stsb")
    by_genre: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_genre[p.group].append(i)
    examples = []
    for i, p in enumerate(pairs):
        if p.score < min_score:
            continue
        pool = by_genre[p.group]
        others = [pairs[j] for j in rng.sample(pool, min(len(pool), num_negatives + 1)) if j != i]
        negs = [rng.choice((o.sentence1, o.sentence2)) for o in others[:num_negatives]]
        examples.append(TrainExample(p.sentence1, p.sentence2, negs,
                                     _instruction(instruction, "stsb"), "stsb"))
    return _finish(examples, data_dir, max_examples, seed, "stsb")


def build_sick(data_dir: str | Path | None = None, seed: int = 0, **kwargs: Any) -> NoReturn:
    """Always refuses: MTEB's SICK-R test split is ALL 9927 SICK pairs (train + trial +
    test_annotated), so no SICK sentence may be trained on."""
    raise DataError(
        "SICK cannot be used for training: MTEB's SICK-R test split is all 9927 SICK pairs "
        "(SICK_train + SICK_trial + SICK_test_annotated), so every SICK sentence is an evaluation "
        "sentence. Fix: remove 'sick' from the training sources; use 'stsb' (train/dev) or 'snli' "
        "for sentence-similarity training data."
    )


# --- SciFact + BM25 -------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+")


class BM25:
    """Okapi BM25 over a fixed corpus, vectorised with a scipy sparse term-weight matrix."""

    def __init__(self, docs: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.vocab: dict[str, int] = {}
        rows, cols = [], []
        for d, doc in enumerate(docs):
            for tok in _TOKEN.findall(doc.lower()):
                rows.append(d)
                cols.append(self.vocab.setdefault(tok, len(self.vocab)))
        shape = (len(docs), len(self.vocab))
        tf = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
        tf.sum_duplicates()
        dl = np.asarray(tf.sum(axis=1)).ravel()
        df = np.bincount(tf.indices, minlength=shape[1])
        idf = np.log1p((len(docs) - df + 0.5) / (df + 0.5)).astype(np.float32)
        norm = k1 * (1 - b + b * dl / max(dl.mean(), 1e-9))
        tf_rows = np.repeat(np.arange(shape[0]), np.diff(tf.indptr))
        data = tf.data * (k1 + 1) / (tf.data + norm[tf_rows]) * idf[tf.indices]
        self.weights = sparse.csr_matrix((data, tf.indices, tf.indptr), shape=shape)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(n_queries, n_docs) BM25 scores; each query term counted once per occurrence."""
        rows, cols = [], []
        for q, text in enumerate(queries):
            for tok in _TOKEN.findall(text.lower()):
                if tok in self.vocab:
                    rows.append(q)
                    cols.append(self.vocab[tok])
        qm = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                               shape=(len(queries), len(self.vocab)))
        return np.asarray((qm @ self.weights.T).todense())

    def top_k(self, queries: Sequence[str], k: int) -> np.ndarray:
        """Indices of the k best documents per query, best first (ties by lower index)."""
        s = self.scores(queries)
        k = min(k, s.shape[1])
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.lexsort((part, -np.take_along_axis(s, part, 1)), axis=1)
        return np.take_along_axis(part, order, 1)


def build_scifact(data_dir: str | Path | None = None, seed: int = 0, *, split: str = "train",
                  num_negatives: int = 7, instruction: Any = _KEEP,
                  max_examples: int | None = None) -> list[TrainExample]:
    """SciFact train claims -> each cited abstract (one example per (claim, cited doc)), with the
    top ``num_negatives`` BM25 documents that the claim does not cite as hard negatives.

    The validation claims are MTEB's SciFact test queries and are refused. Documents come from the
    shared corpus (also MTEB's retrieval corpus): allowed, see :mod:`eval_guard`."""
    eval_guard.require_training_split("scifact", split)
    corpus = scifact_corpus(data_dir)
    doc_ids = list(corpus)
    texts = [scifact_doc_text(*corpus[d]) for d in doc_ids]
    index = {d: i for i, d in enumerate(doc_ids)}
    is_eval = eval_guard.is_eval_text_fn(data_dir)  # 2 train claims repeat validation claims
    claims = [(c.claim.strip(), [index[d] for d in c.cited if d in index])
              for c in sources.read_scifact_claims(data_dir, split) if not is_eval(c.claim)]
    claims = [(c, cited) for c, cited in claims if cited]
    depth = num_negatives + max(len(cited) for _, cited in claims)
    ranked = BM25(texts).top_k([c for c, _ in claims], depth)
    examples = []
    for (claim, cited), top in zip(claims, ranked):
        negs = [texts[j] for j in top if j not in cited][:num_negatives]
        for pos in cited:
            examples.append(TrainExample(claim, texts[pos], negs,
                                         _instruction(instruction, "scifact"), "scifact"))
    return _finish(examples, data_dir, max_examples, seed, "scifact")


# --- Classification datasets: same-label pairs -------------------------------------------------


def _label_pairs(rows: list[tuple[str, str]], rng: random.Random, num_negatives: int,
                 instruction: str | None, source: str) -> list[TrainExample]:
    """One example per row: positive = another text with the same label (different text),
    negatives = texts with other labels. A row is skipped when 8 draws find no different text
    with its label."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in rows:
        by_label[label].append(text)
    labels = sorted(by_label)
    examples = []
    for text, label in rows:
        same = by_label[label]
        positive = None
        for _ in range(8):
            cand = same[rng.randrange(len(same))]
            if normalize_text(cand) != normalize_text(text):
                positive = cand
                break
        if positive is None:
            continue
        negs = []
        while len(negs) < num_negatives and len(labels) > 1:
            other = labels[rng.randrange(len(labels))]
            if other != label:
                negs.append(rng.choice(by_label[other]))
        examples.append(TrainExample(text, positive, negs, instruction, source))
    return examples


def _build_labelled(dataset: str, source: str, data_dir: str | Path | None, seed: int,
                    split: str, num_negatives: int, instruction: Any,
                    max_examples: int | None) -> list[TrainExample]:
    eval_guard.require_training_split(dataset, split)
    is_eval = eval_guard.is_eval_text_fn(data_dir)
    rows = [(t, lab) for t, lab in read_labelled(data_dir, dataset, split) if not is_eval(t)]
    examples = _label_pairs(rows, _rng(seed, source), num_negatives,
                            _instruction(instruction, source), source)
    return _finish(examples, data_dir, max_examples, seed, source)


def build_banking77(data_dir: str | Path | None = None, seed: int = 0, *, split: str = "train",
                    num_negatives: int = 3, instruction: Any = _KEEP,
                    max_examples: int | None = None) -> list[TrainExample]:
    """Banking77 train: one same-intent pair per text, negatives from other intents."""
    return _build_labelled("banking77", "banking77", data_dir, seed, split, num_negatives,
                           instruction, max_examples)


def build_emotion(data_dir: str | Path | None = None, seed: int = 0, *, split: str = "train",
                  num_negatives: int = 3, instruction: Any = _KEEP,
                  max_examples: int | None = None) -> list[TrainExample]:
    """Emotion train: one same-emotion pair per text, negatives from other emotions."""
    return _build_labelled("emotion", "emotion", data_dir, seed, split, num_negatives,
                           instruction, max_examples)


def build_amazon_counterfactual(data_dir: str | Path | None = None, seed: int = 0, *,
                                split: str = "train", num_negatives: int = 1,
                                instruction: Any = _KEEP,
                                max_examples: int | None = None) -> list[TrainExample]:
    """AmazonCounterfactual (EN) train: same-label pairs, negative from the other label."""
    return _build_labelled("amazon_counterfactual", "amazon_counterfactual", data_dir, seed,
                           split, num_negatives, instruction, max_examples)


def build_flag(data_dir: str | Path | None = None, seed: int = 0, *,
               files: Sequence[str] | None = None, instruction: Any = _KEEP,
               max_examples: int | None = None) -> list[TrainExample]:
    """FlagEmbedding example files (``train_examples/*.jsonl``, sorted), converted; each record's
    ``prompt`` becomes the instruction unless ``instruction`` overrides it. ``source`` is
    ``flag:<file stem>``."""
    folder = _folder(data_dir, "train_examples")
    names = list(files) if files else sorted(p.name for p in folder.glob("*.jsonl"))
    examples = []
    for name in names:
        for ex in sources.read_train_examples(data_dir, name):
            if instruction is not _KEEP:
                ex.instruction = instruction
            examples.append(ex)
    return _finish(examples, data_dir, max_examples, seed, "flag")


# ----------------------------------------------------------------------------------------------
# Registry and mixing
# ----------------------------------------------------------------------------------------------

Builder = Callable[..., list[TrainExample]]

BUILDERS: dict[str, Builder] = {
    "snli": build_snli,
    "stsb": build_stsb,
    "scifact": build_scifact,
    "banking77": build_banking77,
    "emotion": build_emotion,
    "amazon_counterfactual": build_amazon_counterfactual,
    "flag": build_flag,
}
"""Usable training sources. ``"sick"`` is deliberately absent; asking for it raises (build_sick)."""

DEFAULT_SOURCES: tuple[str, ...] = tuple(BUILDERS)

_REFUSED: dict[str, Builder] = {"sick": build_sick, "sickr": build_sick}


def build_training_set(
    names: Iterable[str] = DEFAULT_SOURCES,
    data_dir: str | Path | None = None,
    seed: int = 0,
    max_per_source: int | None = None,
    instructions: Mapping[str, str | None] | None = None,
    builder_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    output: str | Path | None = None,
) -> list[TrainExample]:
    """Concatenate the named sources (in the given order) into one training set.

    ``instructions`` overrides a source's query instruction (``None`` = no instruction);
    ``builder_kwargs`` passes extra keyword arguments per source; ``output`` writes the JSONL.
    Each source is already filtered against every evaluation split.
    """
    names = list(names)
    for name in names:
        if name in _REFUSED:
            _REFUSED[name]()
        if name not in BUILDERS:
            raise ConfigError(
                f"unknown training source {name!r}. Fix: use one of {sorted(BUILDERS)}"
            )
    examples: list[TrainExample] = []
    for name in names:
        kwargs = dict((builder_kwargs or {}).get(name, {}))
        if instructions is not None and name in instructions:
            kwargs["instruction"] = instructions[name]
        kwargs.setdefault("max_examples", max_per_source)
        examples.extend(BUILDERS[name](data_dir, seed, **kwargs))
    if output is not None:
        write_jsonl(examples, output)
    return examples
