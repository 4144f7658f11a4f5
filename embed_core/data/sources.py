"""One reader per raw dataset of the shared data folder, returning plain typed rows.

The training builders (:mod:`.builders`), the evaluation-leak guard (:mod:`.eval_guard`) and the local
MTEB tasks (:mod:`embed_core.mteb_tasks`) all read the raw files through these functions, so the texts
the guard keeps out of training are exactly the texts MTEB scores. Texts are returned as the file
holds them (no stripping, no case change); callers that need cleaner text (builders) clean it.

Format traps handled here (each folder's SOURCE.md lists them):

=====================  =========================================================================
folder                 trap
=====================  =========================================================================
stsbenchmark           tab-separated despite ``.csv``, no header, 7 or 9 fields, ``"`` is text
sickr                  header line; ``SICK_test_annotated.txt`` has CRLF line endings
scifact                zip of RFC-4180 CSVs with quoted newlines; abstracts are NumPy array reprs
banking77              CRLF records, quoted fields holding bare newlines (csv module required)
emotion                ``text;label_name`` with a header
amazon_counterfactual  lines starting with ``"``: read with csv's default quoting, as MTEB's copy
                       was made (MTEB's descriptive statistics match that reading, not the raw one)
snli_triplets_source   three parallel line files, tokenised text with a trailing space
sts17, biosses         JSONL (BIOSSES: the ``mteb_variant`` file, see its SOURCE.md)
massive                gzip JSONL, one file set per label kind (intent / scenario)
summeval               gzip JSONL, one row per article with list columns
twitter_url_corpus     gzip JSONL, MTEB's whole test split (51534 pairs) in one file
train_examples         FlagEmbedding JSONL, read by :func:`.format.read_jsonl`
=====================  =========================================================================

Text files are split on LF only (a CR before the LF is dropped): characters that ``str.splitlines``
would also split on (``\\x0b``, ``\\x85``, U+2028, a lone CR) stay inside the text.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError
from ..paths import data_dir as resolve_data_dir
from .format import TrainExample, read_jsonl

__all__ = [
    "ClaimRow",
    "DocRow",
    "LabelledRow",
    "NliRow",
    "PairLabelRow",
    "PairRow",
    "SummaryRow",
    "EMOTION_LABELS",
    "read_amazon_counterfactual",
    "read_banking77",
    "read_biosses",
    "read_emotion",
    "read_massive",
    "read_scifact_claims",
    "read_scifact_corpus",
    "read_scifact_qrels",
    "read_sick",
    "read_snli",
    "read_sts17",
    "read_stsb",
    "read_summeval",
    "read_train_examples",
    "read_twitter_url_corpus",
    "scifact_abstract_sentences",
]

#: dair-ai emotion label ids, as in MTEB's copy (verified on its per-label counts).
EMOTION_LABELS: tuple[str, ...] = ("sadness", "joy", "love", "anger", "fear", "surprise")


# ------------------------------------------------------------------------------------------------
# row types
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRow:
    """A scored sentence pair (STS). group: STSB genre, SICK file part, else empty."""

    sentence1: str
    sentence2: str
    score: float
    group: str = ""


@dataclass(frozen=True)
class PairLabelRow:
    """A sentence pair with a binary label (pair classification)."""

    sentence1: str
    sentence2: str
    label: int


@dataclass(frozen=True)
class LabelledRow:
    """A text with its label name (classification)."""

    text: str
    label: str


@dataclass(frozen=True)
class NliRow:
    """An SNLI pair: premise, hypothesis (tokenised, as in the file) and label."""

    premise: str
    hypothesis: str
    label: str


@dataclass(frozen=True)
class DocRow:
    """A SciFact corpus document: id, title and the abstract's sentences (unstripped)."""

    doc_id: str
    title: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        """BEIR/MTEB document text: the sentences, stripped, joined by one space (title apart)."""
        return " ".join(s.strip() for s in self.sentences)


@dataclass(frozen=True)
class ClaimRow:
    """A SciFact claim (one per id): its text and the cited document ids in first-seen order."""

    claim_id: str
    claim: str
    cited: tuple[str, ...]


@dataclass(frozen=True)
class SummaryRow:
    """A SummEval article with its human and machine summaries and the machine summaries' relevance."""

    id: str
    text: str
    human_summaries: tuple[str, ...]
    machine_summaries: tuple[str, ...]
    relevance: tuple[float, ...]


# ------------------------------------------------------------------------------------------------
# file access
# ------------------------------------------------------------------------------------------------

_SPLIT_FILES: dict[str, dict[str, str]] = {
    "stsbenchmark": {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"},
    "sickr": {"train": "SICK_train.txt", "trial": "SICK_trial.txt",
              "test_annotated": "SICK_test_annotated.txt"},
    "scifact": {"train": "claims_train.csv", "validation": "claims_validation.csv",
                "test": "claims_test.csv"},
    "banking77": {"train": "train.csv", "test": "test.csv"},
    "emotion": {"train": "train.txt", "val": "val.txt", "test": "test.txt"},
    "amazon_counterfactual": {"train": "EN_train.tsv", "valid": "EN_valid.tsv", "test": "EN_test.tsv"},
    "sts17": {"test": "sts17_en-en_test.jsonl"},
    "biosses": {"test": "biosses_test_mteb_variant.jsonl"},
    "massive": {s: f"massive_{{kind}}_en_{s}.jsonl.gz" for s in ("train", "validation", "test")},
    "summeval": {"test": "summeval_test.jsonl.gz"},
    "twitter_url_corpus": {"test": "twitterurlcorpus_mteb_all51534.jsonl.gz"},
}


def split_names(dataset: str) -> tuple[str, ...]:
    """The file-level split names of a dataset folder (e.g. emotion: train, val, test)."""
    return tuple(_SPLIT_FILES[dataset])


def _file(data_dir: str | Path | None, dataset: str, split: str, **fmt: str) -> Path:
    """The file of (dataset, split); DataError naming it when the split or file is missing."""
    names = _SPLIT_FILES[dataset]
    if split not in names:
        raise DataError(f"{dataset} has no split {split!r}. Fix: use one of {list(names)}.")
    return _need(resolve_data_dir(data_dir) / dataset / names[split].format(**fmt))


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DataError(
            f"missing data file {str(path)!r}. Fix: the data folder must hold the files listed in "
            f"{path.parent.name}/SOURCE.md (see shared/data/README.md)."
        )
    return path


def _bad(path: Path | str, lineno: int, why: str) -> DataError:
    return DataError(f"{path}: line {lineno}: {why}. Fix: restore the file described in SOURCE.md.")


def _lines(path: Path) -> list[str]:
    """Lines of a UTF-8 file split on LF only (a CR before the LF dropped), no trailing empty line."""
    with path.open(encoding="utf-8", newline="") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSONL file, gzip-compressed when it ends in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise _bad(path, i, f"not JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise _bad(path, i, "not a JSON object")
            yield i, obj


def _field(path: Path, i: int, obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _bad(path, i, f"field {key!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def _csv_rows(fh: io.TextIOBase, path: str, header: list[str], **kw: Any) -> list[dict[str, str]]:
    reader = csv.DictReader(fh, **kw)
    if reader.fieldnames is None or list(reader.fieldnames)[: len(header)] != header:
        raise _bad(path, 1, f"header {reader.fieldnames} does not start with {header}")
    return list(reader)


# ------------------------------------------------------------------------------------------------
# STS pairs
# ------------------------------------------------------------------------------------------------


def read_stsb(data_dir: str | Path | None, split: str) -> list[PairRow]:
    """STSBenchmark pairs (group = genre): tab-separated, no header, 7 or 9 fields, no quoting."""
    path = _file(data_dir, "stsbenchmark", split)
    rows = []
    for i, line in enumerate(_lines(path), 1):
        f = line.split("\t")
        if len(f) not in (7, 9):
            raise _bad(path, i, f"expected 7 or 9 tab-separated fields, found {len(f)}")
        rows.append(PairRow(f[5], f[6], _score(path, i, f[4]), f[0]))
    return rows


def _score(path: Path, i: int, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _bad(path, i, f"score {text!r} is not a number") from None


_SICK_HEADER = ["pair_ID", "sentence_A", "sentence_B", "relatedness_score"]


def read_sick(data_dir: str | Path | None, part: str) -> list[PairRow]:
    """SICK pairs of one file (train, trial, test_annotated; group = the part), SentEval's copy."""
    path = _file(data_dir, "sickr", part)
    lines = _lines(path)
    if not lines or lines[0].split("\t")[:4] != _SICK_HEADER:
        raise _bad(path, 1, f"unexpected header (want {', '.join(_SICK_HEADER)}, ...)")
    rows = []
    for i, line in enumerate(lines[1:], 2):
        f = line.split("\t")
        if len(f) != 5:
            raise _bad(path, i, f"expected 5 tab-separated fields, found {len(f)}")
        rows.append(PairRow(f[1], f[2], _score(path, i, f[3]), part))
    return rows


def _read_sts_jsonl(data_dir: str | Path | None, dataset: str) -> list[PairRow]:
    path = _file(data_dir, dataset, "test")
    return [PairRow(_field(path, i, o, "sentence1", str), _field(path, i, o, "sentence2", str),
                    float(_field(path, i, o, "score", (int, float))))
            for i, o in _json_lines(path)]


def read_sts17(data_dir: str | Path | None, split: str = "test") -> list[PairRow]:
    """STS17 en-en (SemEval-2017 track 5): 250 pairs, the only split."""
    _file(data_dir, "sts17", split)
    return _read_sts_jsonl(data_dir, "sts17")


def read_biosses(data_dir: str | Path | None, split: str = "test") -> list[PairRow]:
    """BIOSSES: 100 pairs from the ``mteb_variant`` file (MTEB's gold scores; whitespace may differ)."""
    _file(data_dir, "biosses", split)
    return _read_sts_jsonl(data_dir, "biosses")


# ------------------------------------------------------------------------------------------------
# classification
# ------------------------------------------------------------------------------------------------


def read_banking77(data_dir: str | Path | None, split: str) -> list[LabelledRow]:
    """Banking77 (text, intent): CSV with CRLF records and quoted newlines (csv module)."""
    path = _file(data_dir, "banking77", split)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = _csv_rows(fh, str(path), ["text", "category"])
    return [LabelledRow(r["text"], r["category"]) for r in rows]


def read_emotion(data_dir: str | Path | None, split: str) -> list[LabelledRow]:
    """dair-ai emotion (text, emotion name): ``text;label_name`` with a header."""
    path = _file(data_dir, "emotion", split)
    lines = _lines(path)
    if not lines or lines[0] != "text;label_name":
        raise _bad(path, 1, "header is not 'text;label_name'")
    rows = []
    for i, line in enumerate(lines[1:], 2):
        text, sep, label = line.rpartition(";")
        if not sep or label not in EMOTION_LABELS:
            raise _bad(path, i, f"expected 'text;label' with label in {EMOTION_LABELS}")
        rows.append(LabelledRow(text, label))
    return rows


def read_amazon_counterfactual(data_dir: str | Path | None, split: str) -> list[LabelledRow]:
    """AmazonCounterfactual EN (text, "0"/"1"), read with csv's default quoting.

    That is how MTEB's copy was made: for the lines that start with '"' it unwraps the quotes
    ('\"\"\"It is ...\"\"\"' -> '"It is ..."'). MTEB's descriptive statistics (characters per split,
    min/max length, unique texts) match this reading exactly, not the quoting-disabled one that
    SOURCE.md suggests. No line is merged: row counts are the same either way."""
    path = _file(data_dir, "amazon_counterfactual", split)
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    if not rows or rows[0] != ["sentence", "is_counterfactual"]:
        raise _bad(path, 1, "header is not 'sentence<TAB>is_counterfactual'")
    out = []
    for i, row in enumerate(rows[1:], 2):
        if len(row) != 2 or row[1] not in ("0", "1"):
            raise _bad(path, i, f"expected 2 fields with label 0/1, got {row!r:.80}")
        out.append(LabelledRow(row[0], row[1]))
    return out


_MASSIVE_KINDS = ("intent", "scenario")


def read_massive(data_dir: str | Path | None, kind: str, split: str) -> list[LabelledRow]:
    """MASSIVE en-US (text, intent or scenario name); kind is ``intent`` or ``scenario``."""
    if kind not in _MASSIVE_KINDS:
        raise DataError(f"massive has no label kind {kind!r}. Fix: use one of {list(_MASSIVE_KINDS)}.")
    path = _file(data_dir, "massive", split, kind=kind)
    return [LabelledRow(_field(path, i, o, "text", str), _field(path, i, o, "label", str))
            for i, o in _json_lines(path)]


# ------------------------------------------------------------------------------------------------
# pair classification, summarization, NLI, training examples
# ------------------------------------------------------------------------------------------------


def read_twitter_url_corpus(data_dir: str | Path | None, split: str = "test") -> list[PairLabelRow]:
    """TwitterURLCorpus, MTEB's test split: all 51534 pairs (the corpus' train part lowercased)."""
    path = _file(data_dir, "twitter_url_corpus", split)
    rows = []
    for i, o in _json_lines(path):
        label = _field(path, i, o, "label", int)
        if label not in (0, 1):
            raise _bad(path, i, f"label {label!r} is not 0/1")
        rows.append(PairLabelRow(_field(path, i, o, "sentence1", str),
                                 _field(path, i, o, "sentence2", str), label))
    return rows


def read_summeval(data_dir: str | Path | None, split: str = "test") -> list[SummaryRow]:
    """SummEval: 100 articles, 11 human and 16 machine summaries each, expert relevance per machine one."""
    path = _file(data_dir, "summeval", split)
    rows = []
    for i, o in _json_lines(path):
        machine = tuple(_field(path, i, o, "machine_summaries", list))
        relevance = tuple(float(x) for x in _field(path, i, o, "relevance", list))
        if len(machine) != len(relevance):
            raise _bad(path, i, "machine_summaries and relevance differ in length")
        rows.append(SummaryRow(str(_field(path, i, o, "id", str)), _field(path, i, o, "text", str),
                               tuple(_field(path, i, o, "human_summaries", list)), machine, relevance))
    return rows


def read_snli(data_dir: str | Path | None, split: str) -> list[NliRow]:
    """SNLI (premise, hypothesis, label) from the parallel s1/s2/labels files (text as in the file)."""
    folder = resolve_data_dir(data_dir) / "snli_triplets_source"
    s1, s2, labels = (_lines(_need(folder / f"{k}.{split}")) for k in ("s1", "s2", "labels"))
    if not len(s1) == len(s2) == len(labels):
        raise DataError(f"{folder}: s1/s2/labels.{split} have different line counts. "
                        "Fix: restore the files described in SOURCE.md.")
    return [NliRow(a, b, lab.strip()) for a, b, lab in zip(s1, s2, labels)]


def read_train_examples(data_dir: str | Path | None, file: str) -> list[TrainExample]:
    """One FlagEmbedding example file of ``train_examples/`` (e.g. ``msmarco.jsonl``); source
    ``flag:<file stem>``."""
    path = _need(resolve_data_dir(data_dir) / "train_examples" / file)
    return read_jsonl(path, default_source=f"flag:{path.stem}")


# ------------------------------------------------------------------------------------------------
# SciFact (zip; NumPy-repr abstracts)
# ------------------------------------------------------------------------------------------------

# One Python/NumPy string literal of the abstract repr ('...' or "..."), escapes allowed.
_PY_STRING_LITERAL = re.compile(r"""(['"])((?:\\.|(?!\1).)*)\1""", re.S)


def _unescape_py_literal(body: str) -> str:
    """Body of a Python string literal -> its value (\\n, \\', \\\\, \\xNN, ...); non-ASCII kept."""
    if "\\" not in body:
        return body
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape")


def scifact_abstract_sentences(abstract: str) -> list[str]:
    """Sentences of a SciFact ``abstract`` field, a NumPy array repr like ``['a.'\\n 'b.' "c's"]``.

    Parses the quoted literals one by one (``ast.literal_eval`` would glue adjacent literals)."""
    return [_unescape_py_literal(m.group(2)) for m in _PY_STRING_LITERAL.finditer(abstract)]


def _scifact_member(data_dir: str | Path | None, member: str, header: list[str]) -> list[dict[str, str]]:
    path = _need(resolve_data_dir(data_dir) / "scifact" / "scifact.zip")
    with zipfile.ZipFile(path) as zf:
        try:
            raw = zf.open(member)
        except KeyError:
            raise DataError(f"{path} has no member {member!r}. Fix: restore scifact.zip.") from None
        with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
            return _csv_rows(fh, f"{path}:{member}", header)


def read_scifact_corpus(data_dir: str | Path | None = None) -> list[DocRow]:
    """The 5183 SciFact documents in file order."""
    rows = _scifact_member(data_dir, "corpus_train.csv", ["doc_id", "title", "abstract"])
    docs = [DocRow(r["doc_id"], r["title"], tuple(scifact_abstract_sentences(r["abstract"]))) for r in rows]
    empty = [d.doc_id for d in docs if not d.text]
    if empty:
        raise DataError(f"scifact corpus_train.csv: abstracts of docs {empty[:5]} could not be parsed. "
                        "Fix: restore scifact.zip.")
    return docs


def read_scifact_claims(data_dir: str | Path | None, split: str) -> list[ClaimRow]:
    """SciFact claims of one file (train, validation, test), one per id in first-seen order.

    The files repeat a claim once per evidence document; a claim id with two different texts is a
    DataError. BEIR's SciFact test queries are the *validation* claims."""
    member = _SPLIT_FILES["scifact"].get(split)
    if member is None:
        raise DataError(f"scifact has no claims split {split!r}. Fix: use one of {split_names('scifact')}.")
    texts: dict[str, str] = {}
    cited: dict[str, list[str]] = {}
    for r in _scifact_member(data_dir, member, ["id", "claim"]):
        cid = r["id"]
        if texts.setdefault(cid, r["claim"]) != r["claim"]:
            raise DataError(f"scifact {member}: claim id {cid} has two texts. Fix: restore scifact.zip.")
        docs = cited.setdefault(cid, [])
        for doc in re.findall(r"\d+", r.get("cited_doc_ids") or ""):
            if doc not in docs:
                docs.append(doc)
    return [ClaimRow(cid, texts[cid], tuple(cited[cid])) for cid in texts]


def read_scifact_qrels(data_dir: str | Path | None, split: str) -> dict[str, dict[str, int]]:
    """BEIR qrels of a claims split: claim id -> {cited doc id: 1} (claims citing nothing left out)."""
    return {c.claim_id: {d: 1 for d in c.cited} for c in read_scifact_claims(data_dir, split) if c.cited}
