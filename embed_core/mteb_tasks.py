# Over 500 lines: one small mteb task class per local dataset, over the shared readers and size checks.
"""MTEB tasks whose data is read from local files instead of the Hugging Face hub.

The hub is unreachable on the machines this project runs on, so the evaluation data lives in
`shared/data` (see its README.md and each folder's SOURCE.md). :func:`local_task` returns a real
mteb task object: an instance of a subclass of the official task class (``isinstance`` of it), with
the official metadata (name, eval splits, main score, dataset revision), whose ``load_data`` parses
the local files into the exact structure mteb's own loader would produce. Nothing in this module
ever touches the network; before loading mteb it calls `offline.prefer_datasets_offline` (HF_DATASETS_OFFLINE=1
unless set).

The local data reproduces MTEB's evaluation splits row for row (checked against the descriptive
statistics mteb ships with each task: sizes, character counts, unique texts):

=====================================  =========================================  ===============
task                                   split sizes                                main score
=====================================  =========================================  ===============
STSBenchmark                           test 1379                                  cosine_spearman
SICK-R                                 test 9927 (= SICK train + trial + test)    cosine_spearman
Banking77Classification                train 10003, test 3080                     accuracy
EmotionClassification                  train 16000, validation 2000, test 2000    accuracy
AmazonCounterfactualClassification     subset en: train 4018, validation 335,     accuracy
                                       test 670 (evaluated on test, as MTEB(eng))
SciFact                                test: 300 queries, 5183 docs, 339 qrels    ndcg_at_10
STS17                                  subset en-en: test 250                     cosine_spearman
BIOSSES                                test 100                                   cosine_spearman
MassiveIntentClassification            subset en: train 11514, validation 2033,   accuracy
                                       test 2974 (evaluated on test, as MTEB(eng))
MassiveScenarioClassification          subset en: as MassiveIntent, 18 labels     accuracy
SummEval                               test 100 texts (1600 machine summaries)    cosine_spearman
TwitterURLCorpus                       test 51534 pairs                           max_ap
=====================================  =========================================  ===============

The raw files are read by :mod:`embed_core.data.sources`, the same readers the training builders
and the evaluation-leak guard use.

Known text difference: the local SICK files are SentEval's tokenised copy (``man ' s``,
``young , topless``); MTEB's copy is untokenised (``man's``), about 0.15 % fewer characters. Pair
count, pair order and scores are identical. WordPiece tokenisers (BERT, MiniLM) split punctuation
anyway and see identical tokens; byte-level BPE tokenisers (LLMs) see slightly different input, so
SICK-R scores of such models are close to, not exactly, MTEB's.

Other near copies (same rows, labels and gold scores; text differs, see each SOURCE.md): BIOSSES
(whitespace and a few sentence prefixes: text1 12 characters shorter), SummEval (PTB-tokenised,
re-cased text, about 2 % more characters), TwitterURLCorpus (the corpus' 42200 train-part pairs are
lowercased and re-tokenised; the 9334 test-part pairs are exact). Their scores are close to, not
exactly, MTEB's (README: "Reproducing MTEB's published scores").

``subsample=N`` builds a smaller task for quick runs. Its scores are **not comparable** to MTEB
scores: the task keeps the official name (mteb's result files are keyed by it) but its metadata's
dataset revision and description say ``local-subsample``. Because the result cache is keyed by
task name and model revision only, evaluate subsampled tasks with ``cache=None``, a separate
``mteb.ResultCache(folder)``, or a model revision / ``experiment_kwargs`` that names the subsample,
otherwise a cached full run and a subsampled run would be taken for one another.
"""
from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from .offline import prefer_datasets_offline

prefer_datasets_offline()  # before mteb (and datasets) load: the task data is local

import mteb  # noqa: E402  (imported after the offline switch on purpose)
from datasets import Dataset, DatasetDict  # noqa: E402
from datasets.arrow_dataset import Column  # noqa: E402
from mteb.abstasks.abstask import AbsTask  # noqa: E402
from mteb.timing import TimingStack  # noqa: E402

from . import paths  # noqa: E402
from .data import sources  # noqa: E402
from .data.sources import scifact_abstract_sentences  # noqa: E402,F401  (public API)
from .errors import ConfigError, DataError  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TASKS",
    "EXPECTED_SIZES",
    "LOCAL_TASKS",
    "PUBLISHED_MINILM_L6_V2_SCORES",
    "local_task",
    "scifact_abstract_sentences",
    "task_category",
]

#: Tasks :func:`local_task` can build, in the order of the table above.
LOCAL_TASKS: tuple[str, ...] = (
    "STSBenchmark",
    "SICK-R",
    "Banking77Classification",
    "EmotionClassification",
    "AmazonCounterfactualClassification",
    "SciFact",
    "STS17",
    "BIOSSES",
    "MassiveIntentClassification",
    "MassiveScenarioClassification",
    "SummEval",
    "TwitterURLCorpus",
)

#: The six tasks evaluated when none are named (``python -m ray_jobs.evaluate`` without ``--tasks``): the project's original set, kept so default runs and their timings do
#: not change; the other local tasks are evaluated when named.
DEFAULT_TASKS: tuple[str, ...] = LOCAL_TASKS[:6]

#: Sizes of the full local splits; they equal MTEB's. A full (not subsampled) load that finds other
#: sizes raises DataError, so a wrong data folder cannot silently produce incomparable scores.
#: For SciFact the keys are the parts of its test split.
EXPECTED_SIZES: dict[str, dict[str, int]] = {
    "STSBenchmark": {"test": 1379},
    "SICK-R": {"test": 9927},
    "Banking77Classification": {"train": 10003, "test": 3080},
    "EmotionClassification": {"train": 16000, "validation": 2000, "test": 2000},
    "AmazonCounterfactualClassification": {"train": 4018, "validation": 335, "test": 670},
    "SciFact": {"queries": 300, "corpus": 5183, "qrels": 339},
    "STS17": {"test": 250},
    "BIOSSES": {"test": 100},
    "MassiveIntentClassification": {"train": 11514, "validation": 2033, "test": 2974},
    "MassiveScenarioClassification": {"train": 11514, "validation": 2033, "test": 2974},
    "SummEval": {"test": 100},
    "TwitterURLCorpus": {"test": 51534},
}

#: Published MTEB scores of sentence-transformers/all-MiniLM-L6-v2 (main score, test split), from
#: github.com/embeddings-benchmark/results, results/sentence-transformers__all-MiniLM-L6-v2/
#: 8b3219a92973c328a8e22fadcfa821b5dc75636a/<task>.json (mteb 1.12.75, same dataset revisions as
#: mteb 2.26's task metadata). Classification scores depend on the probe's train subsample, i.e. on
#: the train row order; the local files keep the original order.
PUBLISHED_MINILM_L6_V2_SCORES: dict[str, float] = {
    "STSBenchmark": 0.8203247283076371,
    "SICK-R": 0.7758245525469719,
    "Banking77Classification": 0.8004220779220779,
    "EmotionClassification": 0.4083,
}

# Splits that can be evaluated (besides MTEB's default, which is test for all six).
_EVAL_SPLITS: dict[str, tuple[str, ...]] = {
    "STSBenchmark": ("test",),
    "SICK-R": ("test",),
    "Banking77Classification": ("test",),
    "EmotionClassification": ("validation", "test"),
    "AmazonCounterfactualClassification": ("validation", "test"),
    "SciFact": ("test",),
    "STS17": ("test",),
    "BIOSSES": ("test",),
    "MassiveIntentClassification": ("validation", "test"),
    "MassiveScenarioClassification": ("validation", "test"),
    "SummEval": ("test",),
    "TwitterURLCorpus": ("test",),
}

# Multilingual tasks: the one subset the local data holds and the split MTEB(eng, v1) evaluates
# (mteb.get_benchmark("MTEB(eng, v1)") selects these subsets and splits).
_SUBSETS: dict[str, tuple[str, list[str]]] = {
    "AmazonCounterfactualClassification": ("en", ["test"]),
    "STS17": ("en-en", ["test"]),
    "MassiveIntentClassification": ("en", ["test"]),
    "MassiveScenarioClassification": ("en", ["test"]),
}

# Number of non-relevant SciFact documents kept per sampled query when subsampling.
_SCIFACT_DISTRACTORS_PER_QUERY = 20


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def local_task(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    subsample: int | None = None,
    seed: int = 42,
    eval_splits: Sequence[str] | None = None,
) -> AbsTask:
    """An mteb task object for `name` whose data comes from the local data folder.

    Args:
        name: one of :data:`LOCAL_TASKS` (MTEB task names).
        data_dir: folder holding ``stsbenchmark/``, ``sickr/``, ... ; default
            :func:`embed_core.paths.data_dir` ($EMBED_DATA_DIR or ../shared/data).
        subsample: for quick runs only, NOT comparable to MTEB scores. STS: N pairs; classification:
            N evaluation rows (the probe's train split stays whole; it only draws a few rows per
            label from it); SummEval: N texts (with all their summaries); TwitterURLCorpus: N
            pairs; SciFact: N queries, their relevant documents and
            20 x N other documents. Rows are drawn with `seed` and keep their file order.
        seed: mteb's task seed (classification probes) and the subsample's seed.
        eval_splits: evaluate other splits than MTEB's (e.g. ``["validation"]`` for Emotion);
            default MTEB's eval split (test; AmazonCounterfactual, Massive*: test of subset ``en``;
            STS17: test of subset ``en-en``).

    Returns:
        An instance of a subclass of the official task class (``type(mteb.get_task(name))``),
        not loaded yet; mteb calls ``load_data`` on it.

    Raises:
        ConfigError: unknown task, bad subsample, unknown eval split.
        DataError: the data folder does not exist (raised here) or its files are missing or
            malformed (raised when the data is loaded).
    """
    _check_name(name)
    root = paths.data_dir(data_dir)
    if subsample is not None and (
        isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1
    ):
        raise ConfigError(f"subsample must be a positive int or None, got {subsample!r}")
    cls = _local_class(name)
    task = cls(data_dir=root, subsample=subsample, seed=seed)  # type: ignore[call-arg]
    if name in _SUBSETS:
        # What MTEB(eng) evaluates, e.g. get_task(..., eval_splits=["test"], hf_subsets=["en"]).
        subset, default_splits = _SUBSETS[name]
        task.filter_languages(None, hf_subsets=[subset])
        if eval_splits is None:
            eval_splits = default_splits
    if eval_splits is not None:
        available = _EVAL_SPLITS[name]
        if not eval_splits or any(s not in available for s in eval_splits):
            raise ConfigError(
                f"eval_splits {list(eval_splits)!r} not available for local {name}; "
                f"choose from {list(available)}"
            )
        task.filter_eval_splits(list(eval_splits))
    return task


def task_category(name: str | AbsTask) -> str:
    """MTEB task type of a supported task ("STS", "Classification", "Retrieval"), or of a task object."""
    if isinstance(name, AbsTask):
        return str(name.metadata.type)
    _check_name(name)
    return str(_local_class(name).metadata.type)


# --------------------------------------------------------------------------------------------
# the task classes
# --------------------------------------------------------------------------------------------


class _LocalDataMixin:
    """Replaces mteb's hub loading by parsing the local files; placed before the official class."""

    _local_name: ClassVar[str]
    metadata: Any
    dataset: Any
    data_loaded: bool

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        subsample: int | None = None,
        seed: int = 42,
        **kwargs: Any,
    ) -> None:
        super().__init__(seed=seed, **kwargs)  # type: ignore[call-arg]
        self.local_data_dir: Path = paths.data_dir(data_dir)
        self.subsample: int | None = subsample
        self._apply_subsample_metadata()

    @property
    def is_subsampled(self) -> bool:
        """True when the data is a subsample; its scores are not comparable to MTEB's."""
        return self.subsample is not None

    def _apply_subsample_metadata(self) -> None:
        """Give a subsampled task its own metadata copy marking the dataset revision and description."""
        if self.subsample is None:
            return
        official = type(self).metadata
        tag = f"local-subsample-{self.subsample}-seed{self.seed}"  # type: ignore[attr-defined]
        self.metadata = official.model_copy(
            update={
                "dataset": {**official.dataset, "revision": f"{official.dataset['revision']}+{tag}"},
                "description": f"[{tag}: NOT comparable to MTEB scores] {official.description}",
            }
        )

    def load_data(
        self,
        num_proc: int | None = None,
        *,
        timer: TimingStack | None = None,
        **kwargs: Any,
    ) -> None:
        """Load the split(s) from the local data folder (never from the hub)."""
        if self.data_loaded:
            return
        timer = timer or TimingStack()
        root = self.local_data_dir
        with timer("Data loading", log_message=f"Loading local dataset {self._local_name} from {root}..."):
            self.dataset = _LOADERS[self._local_name](
                root, subsample=self.subsample, seed=self.seed  # type: ignore[attr-defined]
            )
        self.data_loaded = True

    def unload_data(self) -> None:
        """mteb's unload, which also drops per-instance metadata; restore the subsample marker."""
        super().unload_data()  # type: ignore[misc]
        self._apply_subsample_metadata()


class _ArrowLabels:
    """A split whose label column reads as one list. mteb's classification indexes the column row by row
    (``labels[i]`` while undersampling, ``np.asarray(column)`` in sklearn's metrics) and datasets 5's lazy
    ``Column`` makes each index a formatted row read: ~27 s of EmotionClassification's ~46 s on 2 CPU cores,
    the same on the GPU machine's workers, whatever the encoder. Everything but the label column is the split's."""

    def __init__(self, split: Any, column: str) -> None:
        self._split, self._column = split, column
        self._labels = self.read(split, column)

    @staticmethod
    def read(split: Any, column: str) -> list:
        return split.with_format("arrow")[column].to_pylist()

    def __getitem__(self, key: Any) -> Any:
        return self._labels if key == self._column else self._split[key]

    def __len__(self) -> int:
        return len(self._split)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._split, attr)


class _FastLabelsMixin:
    """Classification with the label reads of :class:`_ArrowLabels`; mteb's algorithm (shuffles, samples,
    metrics) runs unchanged, so the scores are the same (the reference-score tests pin them)."""

    label_column_name: str

    def _undersample_data(self, dataset: Any, experiment_num: int, idxs: list[int] | None = None) -> Any:
        return super()._undersample_data(_ArrowLabels(dataset, self.label_column_name), experiment_num, idxs)  # type: ignore[misc]

    def _calculate_scores(self, y_test: Any, y_pred: Any) -> Any:
        if isinstance(y_test, Column):
            y_test = _ArrowLabels.read(y_test.source, y_test.column_name)
        return super()._calculate_scores(y_test, y_pred)  # type: ignore[misc]


_LOCAL_CLASSES: dict[str, type[AbsTask]] = {}


def _class_name(name: str) -> str:
    return "Local" + re.sub(r"\W", "", name)


def _local_class(name: str) -> type[AbsTask]:
    """The subclass of the official task class with local loading (created once per task)."""
    cls = _LOCAL_CLASSES.get(name)
    if cls is None:
        official = type(mteb.get_task(name))
        cls_name = _class_name(name)
        fast = (_FastLabelsMixin,) if hasattr(official, "_undersample_data") else ()
        cls = type(
            cls_name,
            (_LocalDataMixin, *fast, official),
            {
                "__module__": __name__,
                "__qualname__": cls_name,
                "__doc__": f"{official.__name__} ({name}) with data from local files.",
                "_local_name": name,
            },
        )
        _LOCAL_CLASSES[name] = cls
    return cls


def __getattr__(attr: str) -> type[AbsTask]:
    """Module attribute access to the generated classes, so pickle (Ray) finds them by name."""
    for name in LOCAL_TASKS:
        if _class_name(name) == attr:
            return _local_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _check_name(name: str) -> None:
    if name not in LOCAL_TASKS:
        raise ConfigError(
            f"unknown local MTEB task {name!r}: supported are {', '.join(LOCAL_TASKS)}"
        )


# --------------------------------------------------------------------------------------------
# loaders: rows from embed_core.data.sources -> the structure mteb's own loader would produce
# --------------------------------------------------------------------------------------------


def _sample(n: int, k: int | None, seed: int) -> list[int]:
    """All indices if k is None or k >= n, else k indices drawn with `seed`, in ascending order."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def _check_sizes(task: str, sizes: dict[str, int], subsample: int | None) -> None:
    if subsample is not None:
        return
    want = EXPECTED_SIZES[task]
    got = {k: sizes[k] for k in want if k in sizes}
    if got != want:
        raise DataError(
            f"local {task} data has sizes {got}, MTEB's are {want}: the files are not the ones "
            "described in SOURCE.md (wrong data folder or altered files)"
        )


def _subset(cols: dict[str, list[Any]], idx: list[int]) -> Dataset:
    return Dataset.from_dict({k: [v[i] for i in idx] for k, v in cols.items()})


# ---- STS -----------------------------------------------------------------------------------


def _sts_dataset(task: str, rows: Sequence[sources.PairRow], subsample: int | None, seed: int) -> DatasetDict:
    _check_sizes(task, {"test": len(rows)}, subsample)
    cols = {"sentence1": [r.sentence1 for r in rows], "sentence2": [r.sentence2 for r in rows],
            "score": [r.score for r in rows]}
    return DatasetDict({"test": _subset(cols, _sample(len(rows), subsample, seed))})


def _load_stsbenchmark(root: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    return _sts_dataset("STSBenchmark", sources.read_stsb(root, "test"), subsample, seed)


def _load_sickr(root: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    # MTEB's SICK-R "test" is all of SICK: train, trial and test_annotated, in that order.
    rows = [r for part in ("train", "trial", "test_annotated") for r in sources.read_sick(root, part)]
    return _sts_dataset("SICK-R", rows, subsample, seed)


def _load_sts17(root: Path, *, subsample: int | None, seed: int) -> dict[str, DatasetDict]:
    return {"en-en": _sts_dataset("STS17", sources.read_sts17(root), subsample, seed)}


def _load_biosses(root: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    return _sts_dataset("BIOSSES", sources.read_biosses(root), subsample, seed)


# ---- classification ------------------------------------------------------------------------


def _classification_dataset(
    task: str,
    splits: dict[str, list[sources.LabelledRow]],
    subsample: int | None,
    seed: int,
    ids: dict[str, int] | None = None,
) -> DatasetDict:
    """DatasetDict of text/label(/label_text) splits; subsample thins every split but train.

    `ids` maps label names to MTEB's ids; None: the labels are ints already (written as text)."""
    _check_sizes(task, {k: len(v) for k, v in splits.items()}, subsample)
    out = {}
    for split, rows in splits.items():
        unknown = sorted({r.label for r in rows} - set(ids)) if ids is not None else []
        if unknown:
            raise DataError(f"local {task} {split} has labels missing from train: {unknown[:5]}")
        cols: dict[str, list[Any]] = {"text": [r.text for r in rows]}
        if ids is None:
            cols["label"] = [int(r.label) for r in rows]
        else:
            cols["label"] = [ids[r.label] for r in rows]
            cols["label_text"] = [r.label for r in rows]
        idx = _sample(len(rows), None if split == "train" else subsample, seed)
        out[split] = _subset(cols, idx)
    return DatasetDict(out)


def _sorted_ids(rows: Sequence[sources.LabelledRow]) -> dict[str, int]:
    """Ids in alphabetical order of the label names (the order of the HF ClassLabel features)."""
    return {n: i for i, n in enumerate(sorted({r.label for r in rows}))}


def _load_banking77(root: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    splits = {split: sources.read_banking77(root, split) for split in ("train", "test")}
    return _classification_dataset("Banking77Classification", splits, subsample, seed,
                                   _sorted_ids(splits["train"]))


def _load_emotion(root: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    files = {"train": "train", "validation": "val", "test": "test"}
    splits = {split: sources.read_emotion(root, f) for split, f in files.items()}
    ids = {n: i for i, n in enumerate(sources.EMOTION_LABELS)}
    return _classification_dataset("EmotionClassification", splits, subsample, seed, ids)


def _load_amazon_counterfactual(root: Path, *, subsample: int | None, seed: int) -> dict[str, DatasetDict]:
    files = {"train": "train", "validation": "valid", "test": "test"}
    splits = {split: sources.read_amazon_counterfactual(root, f) for split, f in files.items()}
    return {"en": _classification_dataset("AmazonCounterfactualClassification", splits, subsample, seed)}


def _massive_loader(task: str, kind: str):
    def load(root: Path, *, subsample: int | None, seed: int) -> dict[str, DatasetDict]:
        splits = {split: sources.read_massive(root, kind, split) for split in ("train", "validation", "test")}
        return {"en": _classification_dataset(task, splits, subsample, seed, _sorted_ids(splits["train"]))}

    return load


# ---- pair classification, summarization -----------------------------------------------------


def _load_twitter_url_corpus(root: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    rows = sources.read_twitter_url_corpus(root)
    _check_sizes("TwitterURLCorpus", {"test": len(rows)}, subsample)
    cols = {"sentence1": [r.sentence1 for r in rows], "sentence2": [r.sentence2 for r in rows],
            "labels": [r.label for r in rows]}
    return DatasetDict({"test": _subset(cols, _sample(len(rows), subsample, seed))})


def _load_summeval(root: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    rows = sources.read_summeval(root)
    _check_sizes("SummEval", {"test": len(rows)}, subsample)
    cols = {"id": [r.id for r in rows], "text": [r.text for r in rows],
            "human_summaries": [list(r.human_summaries) for r in rows],
            "machine_summaries": [list(r.machine_summaries) for r in rows],
            "relevance": [list(r.relevance) for r in rows]}
    return DatasetDict({"test": _subset(cols, _sample(len(rows), subsample, seed))})


# ---- retrieval -----------------------------------------------------------------------------


def _load_scifact(root: Path, *, subsample: int | None, seed: int) -> dict[str, dict[str, Any]]:
    # BEIR's SciFact: test queries = the original *validation* claims; qrels = their cited docs.
    docs = sources.read_scifact_corpus(root)
    claims = sources.read_scifact_claims(root, "validation")
    query_text = {c.claim_id: c.claim for c in claims}
    qrels = sources.read_scifact_qrels(root, "validation")
    doc_ids = [d.doc_id for d in docs]
    titles = [d.title for d in docs]
    texts = [d.text for d in docs]
    missing = {d for rel in qrels.values() for d in rel} - set(doc_ids)
    if missing:
        raise DataError(f"scifact: qrels cite documents missing from the corpus: {sorted(missing)[:5]}")

    qids = list(query_text)
    n_qrels = sum(len(v) for v in qrels.values())
    _check_sizes("SciFact", {"queries": len(qids), "corpus": len(doc_ids), "qrels": n_qrels}, subsample)

    if subsample is not None:
        qids = [qids[i] for i in _sample(len(qids), subsample, seed)]
        relevant = {d for q in qids for d in qrels.get(q, {})}
        others = [i for i, d in enumerate(doc_ids) if d not in relevant]
        n_other = min(len(others), _SCIFACT_DISTRACTORS_PER_QUERY * len(qids))
        keep = set(others[j] for j in _sample(len(others), n_other, seed))
        keep |= {i for i, d in enumerate(doc_ids) if d in relevant}
        idx = sorted(keep)
        doc_ids, titles, texts = ([xs[i] for i in idx] for xs in (doc_ids, titles, texts))
        qrels = {q: qrels[q] for q in qids if q in qrels}

    corpus = Dataset.from_dict({"id": doc_ids, "title": titles, "text": texts})
    queries = Dataset.from_dict({"id": qids, "text": [query_text[q] for q in qids]})
    split = {"corpus": corpus, "queries": queries, "relevant_docs": qrels, "top_ranked": None}
    return {"default": {"test": split}}


_LOADERS = {
    "STSBenchmark": _load_stsbenchmark,
    "SICK-R": _load_sickr,
    "Banking77Classification": _load_banking77,
    "EmotionClassification": _load_emotion,
    "AmazonCounterfactualClassification": _load_amazon_counterfactual,
    "SciFact": _load_scifact,
    "STS17": _load_sts17,
    "BIOSSES": _load_biosses,
    "MassiveIntentClassification": _massive_loader("MassiveIntentClassification", "intent"),
    "MassiveScenarioClassification": _massive_loader("MassiveScenarioClassification", "scenario"),
    "SummEval": _load_summeval,
    "TwitterURLCorpus": _load_twitter_url_corpus,
}
