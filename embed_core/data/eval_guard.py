"""Guard against training on MTEB evaluation data present in the shared data folder.

Evaluation splits (``EVAL_SPLITS``, task key -> (dataset, split) files):

* ``STSBenchmark/test``  -- stsbenchmark/sts-test.csv (train and dev are fine for training)
* ``SICK-R/test``        -- ALL THREE SICK files: MTEB's SICK-R test is the 9927 pairs of
  train + trial + test_annotated, so SICK is never a training source
* ``SciFact/test``       -- the 300 *validation* claims (BEIR's SciFact test = SciFact validation)
* ``Banking77Classification/test``, ``EmotionClassification/test``,
  ``AmazonCounterfactualClassification/test`` (EN_test)
* conservatively also ``AmazonCounterfactualClassification/validation`` (listed as an eval split in
  MTEB's task metadata) and ``EmotionClassification/validation`` (scored by older mteb versions).
* ``STS17/test`` (en-en, 250 SNLI-drawn pairs), ``BIOSSES/test``
* ``MassiveIntentClassification`` and ``MassiveScenarioClassification`` (en): test and validation
  (both MTEB eval splits; the same utterances for the two tasks)
* ``SummEval/test``       -- articles, human and machine summaries
* ``TwitterURLCorpus/test`` -- all 51534 pairs (MTEB's test is the corpus' train + test parts)

Every text is read by :mod:`embed_core.data.sources`, the readers the local MTEB tasks use, so the
evaluation texts here are the texts MTEB scores (tests/test_data.py checks it per task).

Decision on SciFact documents: MTEB retrieves over the 5183-document corpus that is shared by the
train and test claims. Training a train claim against its cited abstract (and BM25 negatives from
the corpus) is the standard BEIR train-split practice and shows the model no evaluation *query* and
no evaluation *relevance pair*. Only the evaluation queries (the validation claims) are therefore
registered as evaluation texts; corpus documents are not, so they pass the check wherever they
appear (query, positive or negative), while every field of every example is still compared against
all evaluation texts.

Texts are compared after :func:`~embed_core.data.format.normalize_text` (strip, collapse whitespace,
lowercase). ``ignore_punctuation=True`` uses a looser key (punctuation removed) that also catches
near-duplicates such as SICK's unpunctuated versions of SNLI/STSB captions; it is off by default.
Some sentences occur in both a train and a test file of the source data (e.g. repeated
STSB captions, Banking77 duplicates); :func:`check_no_overlap` filters those rows by default and
reports counts, or raises with ``strict=True``.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ConfigError, DataError
from ..paths import data_dir as resolve_data_dir
from . import sources
from .format import TrainExample, normalize_text

__all__ = [
    "EVAL_SPLITS",
    "TRAINING_SPLITS",
    "Overlap",
    "eval_task_for",
    "require_training_split",
    "eval_texts",
    "is_eval_text_fn",
    "split_texts",
    "find_overlap",
    "check_no_overlap",
]

logger = logging.getLogger(__name__)

EVAL_SPLITS: dict[str, tuple[tuple[str, str], ...]] = {
    "STSBenchmark/test": (("stsbenchmark", "test"),),
    "SICK-R/test": (("sickr", "train"), ("sickr", "trial"), ("sickr", "test_annotated")),
    "SciFact/test": (("scifact", "validation"),),
    "Banking77Classification/test": (("banking77", "test"),),
    "EmotionClassification/test": (("emotion", "test"),),
    "EmotionClassification/validation": (("emotion", "val"),),
    "AmazonCounterfactualClassification/test": (("amazon_counterfactual", "test"),),
    "AmazonCounterfactualClassification/validation": (("amazon_counterfactual", "valid"),),
    "STS17/test": (("sts17", "test"),),
    "BIOSSES/test": (("biosses", "test"),),
    "MassiveIntentClassification/test": (("massive_intent", "test"),),
    "MassiveIntentClassification/validation": (("massive_intent", "validation"),),
    "MassiveScenarioClassification/test": (("massive_scenario", "test"),),
    "MassiveScenarioClassification/validation": (("massive_scenario", "validation"),),
    "SummEval/test": (("summeval", "test"),),
    "TwitterURLCorpus/test": (("twitter_url_corpus", "test"),),
}

TRAINING_SPLITS: dict[str, tuple[str, ...]] = {
    "stsbenchmark": ("train", "dev"),
    "sickr": (),
    "scifact": ("train",),  # claims_test.csv exists but has no cited docs (unlabelled)
    "banking77": ("train",),
    "emotion": ("train",),
    "amazon_counterfactual": ("train",),
    "snli": ("dev", "test"),  # SNLI is not an MTEB evaluation set
    "sts17": (),  # one split, MTEB's test
    "biosses": (),
    "massive_intent": ("train",),
    "massive_scenario": ("train",),
    "summeval": (),
    "twitter_url_corpus": (),  # MTEB's test is the whole corpus (its train + test parts)
}


def _pair_texts(rows: Sequence[sources.PairRow] | Sequence[sources.PairLabelRow]) -> list[str]:
    return [t for r in rows for t in (r.sentence1, r.sentence2)]


def _summary_texts(rows: Sequence[sources.SummaryRow]) -> list[str]:
    """Articles, human and machine summaries: everything SummEval encodes or shows."""
    return [t for r in rows for t in (r.text, *r.human_summaries, *r.machine_summaries)]


# The texts of each dataset split that count as evaluation texts, read with the same readers as the
# local MTEB tasks (:mod:`.sources`). SciFact: the claims (queries) only, see the module docstring.
_SPLIT_TEXTS: dict[str, Callable[[str, str], list[str]]] = {
    "stsbenchmark": lambda root, split: _pair_texts(sources.read_stsb(root, split)),
    "sickr": lambda root, split: _pair_texts(sources.read_sick(root, split)),
    "sts17": lambda root, split: _pair_texts(sources.read_sts17(root, split)),
    "biosses": lambda root, split: _pair_texts(sources.read_biosses(root, split)),
    "scifact": lambda root, split: [c.claim for c in sources.read_scifact_claims(root, split)],
    "banking77": lambda root, split: [r.text for r in sources.read_banking77(root, split)],
    "emotion": lambda root, split: [r.text for r in sources.read_emotion(root, split)],
    "amazon_counterfactual": lambda root, split: [
        r.text for r in sources.read_amazon_counterfactual(root, split)],
    "massive_intent": lambda root, split: [r.text for r in sources.read_massive(root, "intent", split)],
    "massive_scenario": lambda root, split: [
        r.text for r in sources.read_massive(root, "scenario", split)],
    "summeval": lambda root, split: _summary_texts(sources.read_summeval(root, split)),
    "twitter_url_corpus": lambda root, split: _pair_texts(sources.read_twitter_url_corpus(root, split)),
}


def split_texts(dataset: str, split: str, data_dir: str | Path | None = None) -> list[str]:
    """The evaluation-relevant texts of one dataset split, as the file holds them (not normalised)."""
    if dataset not in _SPLIT_TEXTS:
        raise ConfigError(f"unknown dataset {dataset!r}. Fix: use one of {sorted(_SPLIT_TEXTS)}")
    return _SPLIT_TEXTS[dataset](str(resolve_data_dir(data_dir)), split)


def eval_task_for(dataset: str, split: str) -> str | None:
    """The evaluation task key that uses (dataset, split), or None."""
    for task, files in EVAL_SPLITS.items():
        if (dataset, split) in files:
            return task
    return None


def require_training_split(dataset: str, split: str) -> None:
    """Raise DataError if (dataset, split) is an evaluation split or not a known training split."""
    if dataset not in TRAINING_SPLITS:
        raise ConfigError(f"unknown dataset {dataset!r}. Fix: use one of {sorted(TRAINING_SPLITS)}")
    allowed = TRAINING_SPLITS[dataset]
    task = eval_task_for(dataset, split)
    if task is not None:
        fix = (f"use split in {list(allowed)}" if allowed
               else "remove this source from the training mix")
        raise DataError(
            f"refusing to train on {dataset}/{split}: it is part of the MTEB evaluation split "
            f"{task!r}, training on it would leak the benchmark. Fix: {fix}."
        )
    if split not in allowed:
        raise DataError(
            f"{dataset} has no training split {split!r}. Fix: use split in {list(allowed)}."
        )


@lru_cache(maxsize=8)
def _eval_texts_cached(root: str, ignore_punctuation: bool) -> dict[str, frozenset[str]]:
    out = {}
    for task, files in EVAL_SPLITS.items():
        texts: set[str] = set()
        for dataset, split in files:
            texts.update(normalize_text(t, ignore_punctuation)
                         for t in split_texts(dataset, split, root))
        texts.discard("")
        out[task] = frozenset(texts)
    return out


def eval_texts(data_dir: str | Path | None = None,
               ignore_punctuation: bool = False) -> dict[str, frozenset[str]]:
    """Task key -> normalised query/sentence texts of that evaluation split (cached per folder).

    Sentence pairs contribute both sentences; classification sets their texts; SciFact its 300
    evaluation claims (not the shared corpus, see the module docstring)."""
    return dict(_eval_texts_cached(str(resolve_data_dir(data_dir)), ignore_punctuation))


@dataclass(frozen=True)
class Overlap:
    """One training text that also occurs in an evaluation split."""

    index: int  # position of the example in the checked sequence
    field: str  # "query", "positive" or "negative"
    text: str
    tasks: tuple[str, ...]


@lru_cache(maxsize=8)
def _lookup_cached(root: str, ignore_punctuation: bool) -> dict[str, tuple[str, ...]]:
    """Normalised evaluation text -> the task keys it belongs to."""
    lookup: dict[str, list[str]] = {}
    for task, texts in _eval_texts_cached(root, ignore_punctuation).items():
        for t in texts:
            lookup.setdefault(t, []).append(task)
    return {t: tuple(tasks) for t, tasks in lookup.items()}


def is_eval_text_fn(data_dir: str | Path | None = None,
                    ignore_punctuation: bool = False) -> Callable[[str], bool]:
    """A predicate ``text -> bool``: does the text occur in any evaluation split? Builders use it
    to keep evaluation texts out of their candidate pools (so random picks never need dropping)."""
    lookup = _lookup_cached(str(resolve_data_dir(data_dir)), ignore_punctuation)
    return lambda text: normalize_text(text, ignore_punctuation) in lookup


def find_overlap(examples: Sequence[TrainExample], data_dir: str | Path | None = None,
                 ignore_punctuation: bool = False) -> list[Overlap]:
    """Every (example, field) whose text occurs in an evaluation split; all fields are checked."""
    lookup = _lookup_cached(str(resolve_data_dir(data_dir)), ignore_punctuation)
    hits = []
    for i, ex in enumerate(examples):
        fields = [("query", ex.query), ("positive", ex.positive)]
        fields += [("negative", n) for n in ex.negatives]
        for name, text in fields:
            tasks = lookup.get(normalize_text(text, ignore_punctuation))
            if tasks:
                hits.append(Overlap(i, name, text, tasks))
    return hits


def _describe(hits: list[Overlap], limit: int = 10) -> str:
    per_task = Counter(task for h in hits for task in h.tasks)
    shown = "; ".join(f"#{h.index} {h.field} {h.text[:80]!r} in {'/'.join(h.tasks)}"
                      for h in hits[:limit])
    more = f" (+{len(hits) - limit} more)" if len(hits) > limit else ""
    return f"per task {dict(sorted(per_task.items()))}; e.g. {shown}{more}"


def check_no_overlap(examples: Sequence[TrainExample], data_dir: str | Path | None = None,
                     strict: bool = False,
                     ignore_punctuation: bool = False) -> list[TrainExample]:
    """Return the examples without evaluation texts.

    An example whose query or positive is an evaluation text is dropped; an evaluation text among
    the negatives is removed from that example's negatives (the example is kept). Counts are
    logged. With ``strict=True`` any overlap raises DataError listing how many and which."""
    hits = find_overlap(examples, data_dir, ignore_punctuation)
    if not hits:
        return list(examples)
    if strict:
        raise DataError(
            f"{len(hits)} training texts in {len({h.index for h in hits})} examples occur in MTEB "
            f"evaluation splits: {_describe(hits)}. Fix: drop those rows (check_no_overlap with "
            "strict=False filters them) or rebuild from training splits only."
        )
    drop = {h.index for h in hits if h.field != "negative"}
    bad_negs = {(h.index, h.text) for h in hits if h.field == "negative"}
    touched = {i for i, _ in bad_negs}
    kept = []
    for i, ex in enumerate(examples):
        if i in drop:
            continue
        if i in touched:
            ex = replace(ex, negatives=[n for n in ex.negatives if (i, n) not in bad_negs])
        kept.append(ex)
    n_negs = sum(1 for h in hits if h.field == "negative")
    message = (f"evaluation overlap filtered: {len(drop)} examples dropped, {n_negs} negatives removed "
               f"({_describe(hits, limit=3)})")
    if message not in _SAID:  # a sweep filters the same data once per seed and per check: say it once
        _SAID.add(message)
        logger.warning(message)
    return kept


_SAID: set[str] = set()
