"""MTEB tasks whose data is read from local files instead of the Hugging Face hub.

The hub is unreachable on the machines this project runs on, so the evaluation data lives in
`shared/data` (see its README.md and each folder's SOURCE.md). :func:`local_task` returns a real
mteb task object: an instance of a subclass of the official task class (``isinstance`` of it), with
the official metadata (name, eval splits, main score, dataset revision), whose ``load_data`` parses
the local files into the exact structure mteb's own loader would produce. Nothing in this module
ever touches the network; on import it also puts `datasets` in offline mode (HF_DATASETS_OFFLINE=1 unless set)

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
=====================================  =========================================  ===============

Known text difference: the local SICK files are SentEval's tokenised copy (``man ' s``,
``young , topless``); MTEB's copy is untokenised (``man's``), about 0.15 % fewer characters. Pair
count, pair order and scores are identical. WordPiece tokenisers (BERT, MiniLM) split punctuation
anyway and see identical tokens; byte-level BPE tokenisers (LLMs) see slightly different input, so
SICK-R scores of such models are close to, not exactly, MTEB's.

``subsample=N`` builds a smaller task for quick runs. Its scores are **not comparable** to MTEB
scores: the task keeps the official name (mteb's result files are keyed by it) but its metadata's
dataset revision and description say ``local-subsample``. Because the result cache is keyed by
task name and model revision only, evaluate subsampled tasks with ``cache=None``, a separate
``mteb.ResultCache(folder)``, or a model revision / ``experiment_kwargs`` that names the subsample,
otherwise a cached full run and a subsampled run would be taken for one another.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import random
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar


def _prefer_hf_offline() -> None:
    """Keep `datasets` off the network (the task data is local) unless the environment already decides.

    Only the *datasets* switch is set: the hub itself stays reachable for users who load backbones by
    hub id in the same process (HF_HUB_OFFLINE is the user's choice; the test suite sets it). Sets the
    variable before `datasets` is imported (it reads it at import time), and its module-level switch
    if it was imported earlier. An explicit ``HF_DATASETS_OFFLINE=0`` is respected.
    """
    explicit = "HF_DATASETS_OFFLINE" in os.environ
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None and not explicit:
        datasets_config.HF_DATASETS_OFFLINE = True


_prefer_hf_offline()

import mteb  # noqa: E402  (imported after the offline switch on purpose)
from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.abstask import AbsTask  # noqa: E402
from mteb.timing import TimingStack  # noqa: E402

from . import paths  # noqa: E402
from .errors import ConfigError, DataError  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "EXPECTED_SIZES",
    "LOCAL_TASKS",
    "PUBLISHED_MINILM_L6_V2_SCORES",
    "local_task",
    "local_tasks",
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
)

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

# Folder of each task under the data directory.
_FOLDERS: dict[str, str] = {
    "STSBenchmark": "stsbenchmark",
    "SICK-R": "sickr",
    "Banking77Classification": "banking77",
    "EmotionClassification": "emotion",
    "AmazonCounterfactualClassification": "amazon_counterfactual",
    "SciFact": "scifact",
}

# Splits that can be evaluated (besides MTEB's default, which is test for all six).
_EVAL_SPLITS: dict[str, tuple[str, ...]] = {
    "STSBenchmark": ("test",),
    "SICK-R": ("test",),
    "Banking77Classification": ("test",),
    "EmotionClassification": ("validation", "test"),
    "AmazonCounterfactualClassification": ("validation", "test"),
    "SciFact": ("test",),
}

# dair-ai emotion label ids, as in MTEB's copy (verified on its per-label counts).
_EMOTION_LABELS: tuple[str, ...] = ("sadness", "joy", "love", "anger", "fear", "surprise")

# SciFact: one Python/NumPy string literal of the abstract repr ('...' or "..."), escapes allowed.
_PY_STRING_LITERAL = re.compile(r"""(['"])((?:\\.|(?!\1).)*)\1""", re.S)

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
            label from it); SciFact: N queries, their relevant documents and
            20 x N other documents. Rows are drawn with `seed` and keep their file order.
        seed: mteb's task seed (classification probes) and the subsample's seed.
        eval_splits: evaluate other splits than MTEB's (e.g. ``["validation"]`` for Emotion);
            default MTEB's eval split (test; AmazonCounterfactual: test of subset ``en``).

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
    if name == "AmazonCounterfactualClassification":
        # What MTEB(eng) evaluates: get_task(..., eval_splits=["test"], hf_subsets=["en"]).
        task.filter_languages(None, hf_subsets=["en"])
        if eval_splits is None:
            eval_splits = ["test"]
    if eval_splits is not None:
        available = _EVAL_SPLITS[name]
        if not eval_splits or any(s not in available for s in eval_splits):
            raise ConfigError(
                f"eval_splits {list(eval_splits)!r} not available for local {name}; "
                f"choose from {list(available)}"
            )
        task.filter_eval_splits(list(eval_splits))
    return task


def local_tasks(
    names: Sequence[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    subsample: int | None = None,
    seed: int = 42,
) -> list[AbsTask]:
    """:func:`local_task` for each of `names` (default: all of :data:`LOCAL_TASKS`)."""
    return [
        local_task(n, data_dir, subsample=subsample, seed=seed) for n in (names or LOCAL_TASKS)
    ]


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
        folder = self.local_data_dir / _FOLDERS[self._local_name]
        with timer("Data loading", log_message=f"Loading local dataset {self._local_name} from {folder}..."):
            self.dataset = _LOADERS[self._local_name](
                folder, subsample=self.subsample, seed=self.seed  # type: ignore[attr-defined]
            )
        self.data_loaded = True

    def unload_data(self) -> None:
        """mteb's unload, which also drops per-instance metadata; restore the subsample marker."""
        super().unload_data()  # type: ignore[misc]
        self._apply_subsample_metadata()


_LOCAL_CLASSES: dict[str, type[AbsTask]] = {}


def _class_name(name: str) -> str:
    return "Local" + re.sub(r"\W", "", name)


def _local_class(name: str) -> type[AbsTask]:
    """The subclass of the official task class with local loading (created once per task)."""
    cls = _LOCAL_CLASSES.get(name)
    if cls is None:
        official = type(mteb.get_task(name))
        cls_name = _class_name(name)
        cls = type(
            cls_name,
            (_LocalDataMixin, official),
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
# file readers
# --------------------------------------------------------------------------------------------


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(
            f"missing data file {str(path)!r}: the data folder must hold the files listed in "
            f"{path.parent.name}/SOURCE.md (see shared/data/README.md)"
        )
    return path


def _lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file split on LF only (a CR before the LF is dropped); characters that
    str.splitlines would also split on (\\x0b, \\x85, U+2028, a lone CR...) stay inside the text."""
    with _need(path).open(encoding="utf-8", newline="") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


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


def _bad(path: Path, lineno: int, why: str) -> DataError:
    return DataError(f"{path}: line {lineno}: {why}")


# ---- STS -----------------------------------------------------------------------------------


def _read_stsb(path: Path) -> dict[str, list[Any]]:
    """STS Benchmark file: tab-separated, no header, 7 or 9 fields, '"' is an ordinary character."""
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for i, line in enumerate(_lines(path), 1):
        fields = line.split("\t")
        if len(fields) not in (7, 9):
            raise _bad(path, i, f"expected 7 or 9 tab-separated fields, found {len(fields)}")
        try:
            score = float(fields[4])
        except ValueError:
            raise _bad(path, i, f"score {fields[4]!r} is not a number") from None
        s1.append(fields[5])
        s2.append(fields[6])
        scores.append(score)
    return {"sentence1": s1, "sentence2": s2, "score": scores}


def _read_sick(paths_: Sequence[Path]) -> dict[str, list[Any]]:
    """SICK files (SentEval copy), concatenated: header + pair_ID, A, B, relatedness, entailment."""
    out: dict[str, list[Any]] = {"sentence1": [], "sentence2": [], "score": []}
    for path in paths_:
        lines = _lines(path)
        if not lines or lines[0].split("\t")[:4] != [
            "pair_ID", "sentence_A", "sentence_B", "relatedness_score",
        ]:
            raise _bad(path, 1, "unexpected header (want pair_ID, sentence_A, sentence_B, relatedness_score, ...)")
        for i, line in enumerate(lines[1:], 2):
            fields = line.split("\t")
            if len(fields) != 5:
                raise _bad(path, i, f"expected 5 tab-separated fields, found {len(fields)}")
            out["sentence1"].append(fields[1])
            out["sentence2"].append(fields[2])
            out["score"].append(float(fields[3]))
    return out


def _sts_dataset(cols: dict[str, list[Any]], subsample: int | None, seed: int) -> DatasetDict:
    idx = _sample(len(cols["score"]), subsample, seed)
    return DatasetDict({"test": Dataset.from_dict({k: [v[i] for i in idx] for k, v in cols.items()})})


def _load_stsbenchmark(folder: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    cols = _read_stsb(folder / "sts-test.csv")
    _check_sizes("STSBenchmark", {"test": len(cols["score"])}, subsample)
    return _sts_dataset(cols, subsample, seed)


def _load_sickr(folder: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    # MTEB's SICK-R "test" is all of SICK: train, trial and test_annotated, in that order.
    files = ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt")
    cols = _read_sick([folder / f for f in files])
    _check_sizes("SICK-R", {"test": len(cols["score"])}, subsample)
    return _sts_dataset(cols, subsample, seed)


# ---- classification ------------------------------------------------------------------------


def _classification_dataset(
    task: str,
    splits: dict[str, dict[str, list[Any]]],
    subsample: int | None,
    seed: int,
) -> DatasetDict:
    """DatasetDict of text/label(/label_text) splits; subsample thins every split but train."""
    _check_sizes(task, {k: len(v["label"]) for k, v in splits.items()}, subsample)
    out = {}
    for split, cols in splits.items():
        idx = _sample(len(cols["label"]), None if split == "train" else subsample, seed)
        out[split] = Dataset.from_dict({k: [v[i] for i in idx] for k, v in cols.items()})
    return DatasetDict(out)


def _load_banking77(folder: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    # CSV with CRLF records and quoted fields holding newlines: a real CSV parser is required.
    raw: dict[str, tuple[list[str], list[str]]] = {}
    for split in ("train", "test"):
        path = _need(folder / f"{split}.csv")
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != ["text", "category"]:
                raise _bad(path, 1, f"header {reader.fieldnames} != ['text', 'category']")
            rows = list(reader)
        raw[split] = ([r["text"] for r in rows], [r["category"] for r in rows])
    # Ids in alphabetical order of the intent names (the order of the HF banking77 ClassLabel).
    names = sorted(set(raw["train"][1]))
    ids = {n: i for i, n in enumerate(names)}
    splits = {}
    for split, (texts, cats) in raw.items():
        unknown = sorted(set(cats) - set(ids))
        if unknown:
            raise DataError(f"banking77/{split}.csv has intents missing from train: {unknown[:5]}")
        splits[split] = {"text": texts, "label": [ids[c] for c in cats], "label_text": cats}
    return _classification_dataset("Banking77Classification", splits, subsample, seed)


def _load_emotion(folder: Path, *, subsample: int | None, seed: int) -> DatasetDict:
    ids = {n: i for i, n in enumerate(_EMOTION_LABELS)}
    splits = {}
    for split, fname in (("train", "train.txt"), ("validation", "val.txt"), ("test", "test.txt")):
        path = folder / fname
        lines = _lines(path)
        if not lines or lines[0] != "text;label_name":
            raise _bad(path, 1, "header is not 'text;label_name'")
        texts, labels = [], []
        for i, line in enumerate(lines[1:], 2):
            text, sep, label = line.rpartition(";")
            if not sep or label not in ids:
                raise _bad(path, i, f"expected 'text;label' with label in {_EMOTION_LABELS}")
            texts.append(text)
            labels.append(label)
        splits[split] = {"text": texts, "label": [ids[x] for x in labels], "label_text": labels}
    return _classification_dataset("EmotionClassification", splits, subsample, seed)


def _load_amazon_counterfactual(folder: Path, *, subsample: int | None, seed: int) -> dict[str, DatasetDict]:
    # Read with the csv module's default quoting, as MTEB's copy was made: for the lines that start
    # with '"' it unwraps the quotes ('"""It is ..."""' -> '"It is ..."'). MTEB's descriptive stats
    # (characters per split, min/max length, unique texts) match this reading exactly, and not the
    # quoting-disabled one. No line is merged: row counts are the same either way.
    splits = {}
    for split, fname in (("train", "EN_train.tsv"), ("validation", "EN_valid.tsv"), ("test", "EN_test.tsv")):
        path = _need(folder / fname)
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
        if not rows or rows[0] != ["sentence", "is_counterfactual"]:
            raise _bad(path, 1, "header is not 'sentence<TAB>is_counterfactual'")
        texts, labels = [], []
        for i, row in enumerate(rows[1:], 2):
            if len(row) != 2 or row[1] not in ("0", "1"):
                raise _bad(path, i, f"expected 2 fields with label 0/1, got {row!r:.80}")
            texts.append(row[0])
            labels.append(int(row[1]))
        splits[split] = {"text": texts, "label": labels}
    return {"en": _classification_dataset("AmazonCounterfactualClassification", splits, subsample, seed)}


# ---- retrieval -----------------------------------------------------------------------------


def _unescape_py_literal(body: str) -> str:
    """Body of a Python string literal -> its value (\\n, \\', \\\\, \\xNN, ...); non-ASCII kept."""
    if "\\" not in body:
        return body
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape")


def scifact_abstract_sentences(abstract: str) -> list[str]:
    """Sentences of a SciFact ``abstract`` field, a NumPy array repr like ``['a.'\\n 'b.' "c's"]``.

    Parses the quoted literals one by one (``ast.literal_eval`` would glue adjacent literals).
    """
    return [_unescape_py_literal(m.group(2)) for m in _PY_STRING_LITERAL.finditer(abstract)]


def _csv_member(zf: zipfile.ZipFile, member: str) -> list[dict[str, str]]:
    try:
        raw = zf.open(member)
    except KeyError:
        raise DataError(f"scifact.zip has no member {member!r}") from None
    with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _load_scifact(folder: Path, *, subsample: int | None, seed: int) -> dict[str, dict[str, Any]]:
    # BEIR's SciFact: test queries = the original *validation* claims; qrels = their cited docs.
    with zipfile.ZipFile(_need(folder / "scifact.zip")) as zf:
        corpus_rows = _csv_member(zf, "corpus_train.csv")
        claim_rows = _csv_member(zf, "claims_validation.csv")

    query_text: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for r in claim_rows:
        qid = r["id"]
        if query_text.setdefault(qid, r["claim"]) != r["claim"]:
            raise DataError(f"scifact claims_validation.csv: claim id {qid} has two texts")
        for doc_id in re.findall(r"\d+", r["cited_doc_ids"]):
            qrels.setdefault(qid, {})[doc_id] = 1

    doc_ids = [r["doc_id"] for r in corpus_rows]
    titles = [r["title"] for r in corpus_rows]
    # Document text as BEIR has it: the abstract's sentences, stripped, joined by one space.
    texts = [" ".join(s.strip() for s in scifact_abstract_sentences(r["abstract"])) for r in corpus_rows]
    if any(not t for t in texts):
        raise DataError("scifact corpus_train.csv: an abstract could not be parsed")
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
}
