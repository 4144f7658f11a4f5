"""Evaluation tasks by reference: a local task name, an official mteb task name, or a bring-your-own task spec.

:func:`resolve_tasks` turns each entry of a task list into a :class:`TaskRef` and validates it *now* (files,
columns, splits, label types, task type), so bad input fails with an error that names the file and the field
before any Ray worker starts. A ``TaskRef`` is a small picklable record; :meth:`TaskRef.build` makes the mteb
task object where it runs (on the worker).

A bring-your-own task is a YAML or JSON file (or an inline dict) like::

    name: MyIntents                  # the task's name in the results (results/<model>/<rev>/MyIntents.json)
    type: Classification             # STS | Classification | Clustering | PairClassification | Retrieval | Reranking
    split: test                      # the evaluation split (default test)
    main_score: accuracy             # optional: default per type (see DEFAULT_MAIN_SCORE)
    files:                           # paths relative to the spec file; .jsonl, .json (a list of rows), .csv, .tsv
      train: intents_train.jsonl     # Classification: the logistic-regression probe's training rows
      test: intents_test.jsonl
    columns: {text: utterance, label: intent}   # our column name -> the file's column (default: the same name)

Files and columns per type (``files`` keys / ``columns`` keys):

=====================  ===================================  ======================================================
type                   files                                columns
=====================  ===================================  ======================================================
STS                    <split>                              sentence1, sentence2, score (number)
Classification         train, <split>                       text, label (int or str)
Clustering             <split>                              text, label (int or str)
PairClassification     <split>                              sentence1, sentence2, label (0 / 1)
Retrieval              corpus, queries, qrels               corpus_id, corpus_text, corpus_title (optional),
                                                            query_id, query_text, qrels_query_id, qrels_doc_id,
                                                            qrels_score (int)
Reranking              corpus, queries, qrels, candidates   as Retrieval + candidates_query_id, candidates_doc_id
=====================  ===================================  ======================================================

Retrieval defaults follow BEIR: corpus ``_id/title/text``, queries ``_id/text``, qrels ``query-id/corpus-id/score``.
Labels are typed alike in every format: a .csv / .tsv label cell is read as the JSON value it spells ('3' -> 3,
'0.5' -> 0.5), so a float class is refused whether it came from .jsonl or .csv. Every key: README "Bring your own task".
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import paths
from .errors import ConfigError, DataError
from .offline import prefer_datasets_offline

# mteb (and embed_core.mteb_tasks, datasets) are imported where a task is built or looked up: mteb takes seconds
# to import (it loads torch), and a task spec file is read and checked without it.

__all__ = ["DEFAULT_MAIN_SCORE", "TASK_TYPES", "TaskRef", "load_spec", "resolve_task", "resolve_tasks"]

TASK_TYPES = ("STS", "Classification", "Clustering", "PairClassification", "Retrieval", "Reranking")

DEFAULT_MAIN_SCORE = {
    "STS": "cosine_spearman",
    "Classification": "accuracy",
    "Clustering": "v_measure",
    "PairClassification": "max_ap",
    "Retrieval": "ndcg_at_10",
    "Reranking": "map_at_1000",
}
_RETRIEVAL_SCORES = tuple(f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr")
                          for k in (1, 3, 5, 10, 20, 100, 1000))
MAIN_SCORES = {
    "STS": ("cosine_spearman", "cosine_pearson", "spearman", "pearson"),
    "Classification": ("accuracy", "f1", "f1_weighted"),
    "Clustering": ("v_measure",),
    "PairClassification": ("max_ap", "max_f1", "max_accuracy", "similarity_ap", "cosine_ap"),
    "Retrieval": _RETRIEVAL_SCORES,
    "Reranking": _RETRIEVAL_SCORES,
}

# columns each type needs: key -> (default file column, file key, required)
_RET_COLS = {
    "corpus_id": ("_id", "corpus", True), "corpus_text": ("text", "corpus", True),
    "corpus_title": ("title", "corpus", False),
    "query_id": ("_id", "queries", True), "query_text": ("text", "queries", True),
    "qrels_query_id": ("query-id", "qrels", True), "qrels_doc_id": ("corpus-id", "qrels", True),
    "qrels_score": ("score", "qrels", True),
}
_SPLIT = "<split>"
_COLUMNS: dict[str, dict[str, tuple[str, str, bool]]] = {
    "STS": {"sentence1": ("sentence1", _SPLIT, True), "sentence2": ("sentence2", _SPLIT, True),
            "score": ("score", _SPLIT, True)},
    "Classification": {"text": ("text", "*", True), "label": ("label", "*", True)},
    "Clustering": {"text": ("text", _SPLIT, True), "label": ("label", _SPLIT, True)},
    "PairClassification": {"sentence1": ("sentence1", _SPLIT, True), "sentence2": ("sentence2", _SPLIT, True),
                           "label": ("label", _SPLIT, True)},
    "Retrieval": _RET_COLS,
    "Reranking": {**_RET_COLS, "candidates_query_id": ("query-id", "candidates", True),
                  "candidates_doc_id": ("corpus-id", "candidates", True)},
}
_DELIMITED = (".csv", ".tsv")  # text cells: typed on reading (see _read_spec_rows)
_SPEC_KEYS = {"name", "type", "split", "main_score", "files", "columns", "description", "languages",
              "min_score", "max_score", "samples_per_label", "n_experiments"}


@dataclass
class TaskRef:
    """A resolved task. kind: ``local`` (embed_core.mteb_tasks), ``mteb`` (official, loaded from the hub) or
    ``spec`` (bring-your-own; `spec` holds the validated spec with absolute file paths, `source` the file)."""

    name: str
    kind: str
    type: str
    main_score: str
    source: str = ""
    spec: dict[str, Any] | None = None
    revision: str = ""  # content hash of a spec task's files (its dataset revision)
    sizes: dict[str, int] = field(default_factory=dict)

    def build(self, data_dir: str | os.PathLike | None = None, *, subsample: int | None = None, seed: int = 42):
        """The mteb task object (not loaded). `subsample` applies to local tasks only."""
        if self.kind == "local":
            from .mteb_tasks import local_task
            return local_task(self.name, data_dir, subsample=subsample, seed=seed)
        if self.kind == "mteb":
            import mteb
            return mteb.get_task(self.name)
        return _build_spec_task(self, seed=seed)


def resolve_tasks(refs: Sequence[str | Mapping | os.PathLike] | str, data_dir: str | os.PathLike | None = None
                  ) -> list[TaskRef]:
    """Resolve and validate every task reference (raises ConfigError / DataError naming the file and field)."""
    if isinstance(refs, (str, os.PathLike, Mapping)):
        refs = [refs]
    if not refs:
        raise ConfigError("tasks: the task list is empty")
    out = [resolve_task(r, data_dir) for r in refs]
    seen: dict[str, int] = {}
    for i, t in enumerate(out):
        if t.name in seen:
            raise ConfigError(f"tasks[{i}]: task name {t.name!r} appears twice (also tasks[{seen[t.name]}])")
        seen[t.name] = i
    return out


def resolve_task(ref: str | Mapping | os.PathLike | TaskRef, data_dir: str | os.PathLike | None = None) -> TaskRef:
    if isinstance(ref, TaskRef):
        return ref
    if isinstance(ref, Mapping):
        return load_spec(ref)
    if not isinstance(ref, (str, os.PathLike)) or not str(ref):
        raise ConfigError(f"task reference must be a task name, a spec file or a mapping, got {ref!r}")
    s = str(ref)
    if s.endswith((".yaml", ".yml", ".json")) or os.sep in s:
        return load_spec(s)
    from .mteb_tasks import LOCAL_TASKS, task_category

    if s in LOCAL_TASKS:
        paths.data_dir(data_dir)  # raises DataError if the data folder is missing
        t = task_category(s)
        from .mteb_tasks import _local_class
        return TaskRef(name=s, kind="local", type=t, main_score=str(_local_class(s).metadata.main_score))
    import mteb
    try:
        task = mteb.get_task(s)
    except Exception as err:  # noqa: BLE001 - mteb raises KeyError / ValueError for unknown names
        raise ConfigError(f"unknown task {s!r}: not one of the local tasks ({', '.join(LOCAL_TASKS)}), not an "
                          f"official mteb task ({type(err).__name__}: {err}), and not a .yaml/.json spec file") from None
    return TaskRef(name=s, kind="mteb", type=str(task.metadata.type), main_score=str(task.metadata.main_score))


# ====================================================================================== spec files
def load_spec(spec: str | os.PathLike | Mapping) -> TaskRef:
    """Read and validate a bring-your-own task spec (file or inline mapping): its fields, then its files (they
    exist, hold the columns, are not empty, the values have the right types). ConfigError / DataError name the
    spec and the field."""
    where, base, raw = _spec_mapping(spec)

    def err(fld: str, msg: str, cls=ConfigError):
        return cls(f"{where}: {fld}: {msg}")

    name, ttype, split, main, files, columns, langs, need_files = _check_spec_fields(raw, err)
    roles = _COLUMNS[ttype]
    col = {role: columns.get(role, default) for role, (default, _f, _r) in roles.items()}
    abs_files, data, h = _read_spec_files(where, base, files, need_files, split, col)
    _check_spec_columns(where, ttype, split, roles, col, need_files, data, abs_files)
    sizes = {k: len(v) for k, v in data.items()}
    valid = {"name": name, "type": ttype, "split": split, "main_score": main, "files": abs_files, "columns": col,
             "description": str(raw.get("description") or f"Local {ttype} task {name} (bring-your-own spec)"),
             "languages": langs, **{k: raw[k] for k in ("min_score", "max_score", "samples_per_label", "n_experiments")
                                    if k in raw}}
    return TaskRef(name=name, kind="spec", type=ttype, main_score=main, source=where, spec=valid,
                   revision="local-" + h.hexdigest()[:16], sizes=sizes)


def _spec_mapping(spec: str | os.PathLike | Mapping) -> tuple[str, Path, dict]:
    """(where, folder its relative paths start from, the raw mapping) of a spec file or an inline mapping."""
    if isinstance(spec, Mapping):
        return "inline task spec", Path.cwd(), dict(spec)
    else:
        path = Path(os.path.expanduser(str(spec)))
        where, base = str(path), path.parent
        if not path.is_file():
            raise DataError(f"task spec file {str(path)!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                raw = json.loads(text)
            else:
                raw = yaml.safe_load(text)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{where}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a task spec must be a mapping with name, type, files, got {type(raw).__name__}")

    return where, base, raw


def _check_spec_fields(raw: dict, err) -> tuple:
    """The spec's fields: name, type, split, main score, files (the ones its type needs), columns, languages."""
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise err(sorted(unknown)[0], f"unknown field; allowed: {', '.join(sorted(_SPEC_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise err("name", f"must be a non-empty task name without '/', got {name!r}")
    ttype = raw.get("type")
    if ttype not in TASK_TYPES:
        raise err("type", f"unknown task type {ttype!r}: one of {', '.join(TASK_TYPES)}")
    split = raw.get("split", "test")
    if not isinstance(split, str) or not split or split in ("train", "corpus", "queries", "qrels", "candidates"):
        raise err("split", f"must be the evaluation split's name (not train / corpus / ...), got {split!r}")
    main = raw.get("main_score", DEFAULT_MAIN_SCORE[ttype])
    if main not in MAIN_SCORES[ttype]:
        raise err("main_score", f"{main!r} is not a main score of {ttype} tasks: one of {', '.join(MAIN_SCORES[ttype])}")
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise err("files", "must be a mapping of split / part -> file path")
    need_files = {"STS": [split], "Classification": ["train", split], "Clustering": [split],
                  "PairClassification": [split], "Retrieval": ["corpus", "queries", "qrels"],
                  "Reranking": ["corpus", "queries", "qrels", "candidates"]}[ttype]
    for k in need_files:
        if k not in files:
            raise err(f"files.{k}", f"missing: {ttype} tasks need files {need_files}")
    extra = set(files) - set(need_files)
    if extra:
        raise err(f"files.{sorted(extra)[0]}", f"not used by {ttype} tasks (they need {need_files})")
    columns = raw.get("columns") or {}
    if not isinstance(columns, dict):
        raise err("columns", "must be a mapping of column role -> the file's column name")
    roles = _COLUMNS[ttype]  # the column roles of this task type
    for k in columns:
        if k not in roles:
            raise err(f"columns.{k}", f"unknown column role for {ttype}: one of {', '.join(roles)}")
    for k in ("min_score", "max_score"):
        if k in raw and (isinstance(raw[k], bool) or not isinstance(raw[k], (int, float))):
            raise err(k, f"must be a number, got {raw[k]!r}")
    lo, hi = raw.get("min_score", 0), raw.get("max_score", 5)
    if ttype == "STS" and not lo < hi:
        raise err("max_score", f"must be above min_score (mteb divides by max_score - min_score), got {lo} and {hi}")
    for k in ("samples_per_label", "n_experiments"):
        if k in raw and (isinstance(raw[k], bool) or not isinstance(raw[k], int) or raw[k] < 1):
            raise err(k, f"must be an int >= 1, got {raw[k]!r}")
    langs = raw.get("languages", ["eng-Latn"])
    if not isinstance(langs, list) or not all(isinstance(x, str) for x in langs):
        raise err("languages", f"must be a list of ISO 639-3 + script codes like eng-Latn, got {langs!r}")
    return name, ttype, split, main, files, columns, langs, need_files


def _read_spec_files(where: str, base: Path, files: dict, need_files: list[str], split: str,
                     col: dict[str, str]) -> tuple[dict[str, str], dict[str, list[dict]], Any]:
    """Each needed file read (absolute path, rows) and the content hash of them all (the task's revision)."""
    abs_files: dict[str, str] = {}
    data: dict[str, list[dict]] = {}
    h = hashlib.sha256()
    for k in need_files:
        p = Path(os.path.expanduser(str(files[k])))
        p = p if p.is_absolute() else (base / p)
        if not p.is_file():
            raise DataError(f"{where}: files.{k}: file {str(p)!r} does not exist")
        rows = _read_spec_rows(p, f"{where}: files.{k}", col)
        if not rows:
            raise DataError(f"{where}: files.{k}: file {str(p)!r} has no rows (empty {'split' if k in (split, 'train') else 'file'})")
        abs_files[k] = str(p.resolve())
        data[k] = rows
        h.update(k.encode() + b"\0" + p.read_bytes())
    return abs_files, data, h


def _check_spec_columns(where: str, ttype: str, split: str, roles: dict, col: dict[str, str], need_files: list[str],
                        data: dict[str, list[dict]], abs_files: dict[str, str]) -> None:
    """Every row holds the columns its role needs, with values of the right type."""
    for role, (default, fkey, required) in roles.items():
        keys = need_files if fkey == "*" else [split if fkey == _SPLIT else fkey]
        for k in keys:
            present = col[role] in data[k][0] if data[k] else False
            if not required and not present:
                continue
            for i, row in enumerate(data[k]):
                if col[role] not in row:
                    avail = ", ".join(sorted(row))
                    raise DataError(f"{where}: columns.{role}: column {col[role]!r} missing from {abs_files[k]!r} "
                                    f"(row {i + 1}; its columns: {avail})")
                _check_value(ttype, role, row[col[role]], f"{where}: columns.{role}: {abs_files[k]!r} row {i + 1}")
    if ttype in ("Classification", "Clustering"):
        kinds = {type(r[col["label"]]) for k in need_files if k != "corpus" for r in data[k]}
        if len(kinds) > 1:
            raise DataError(f"{where}: columns.label: labels mix types {sorted(t.__name__ for t in kinds)} in "
                            f"{[abs_files[k] for k in need_files]}: use all int or all str")
    if ttype in ("Retrieval", "Reranking"):
        _check_retrieval(where, data, col, abs_files)


def _read_rows(p: Path, where: str) -> list[dict]:
    try:
        if p.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: {str(p)!r} line {i} is not valid JSON: {e}") from None
        elif p.suffix == ".json":
            rows = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DataError(f"{where}: {str(p)!r} must hold a JSON list of rows")
        elif p.suffix in (".csv", ".tsv"):
            with p.open(encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if p.suffix == ".tsv" else ","))
        else:
            raise DataError(f"{where}: {str(p)!r}: unsupported file type {p.suffix!r} (use .jsonl, .json, .csv, .tsv)")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: {str(p)!r} is not UTF-8 text: {e}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{where}: {str(p)!r}: every row must be an object / mapping of column -> value")
    return rows


def _read_spec_rows(p: Path, where: str, col: dict[str, str]) -> list[dict]:
    """A spec file's rows with labels typed the same whatever the format: a .csv / .tsv cell is text, so its
    label column is read as a JSON value would be ('3' -> 3, '0.5' -> 0.5, 'neg' -> 'neg') and then checked
    like a .jsonl label (a float label is refused for Classification / Clustering in both)."""
    rows = _read_rows(p, where)
    label = col.get("label")
    if p.suffix in _DELIMITED and label is not None:
        for r in rows:
            if label in r:
                r[label] = _from_text(r[label])
    return rows


def _from_text(v: Any) -> Any:
    """CSV cells are strings: '3' -> 3, '4.5' -> 4.5 (for scores and labels read from .csv/.tsv)."""
    if isinstance(v, str):
        for conv in (int, float):
            try:
                return conv(v)
            except ValueError:
                pass
    return v


def _check_value(ttype: str, role: str, v: Any, where: str) -> None:
    def bad(what: str):
        return DataError(f"{where}: expected {what}, got {type(v).__name__} {v!r:.60}")

    if role in ("sentence1", "sentence2", "text", "corpus_text", "query_text", "corpus_title"):
        if not isinstance(v, str) or (role != "corpus_title" and not v.strip()):
            raise bad("a non-empty string")
    elif role == "score" or role == "qrels_score":
        if isinstance(v, str):
            v = _from_text(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (role == "qrels_score" and not float(v).is_integer()):
            raise bad("a number" if role == "score" else "an integer relevance")
    elif role == "label" and ttype == "PairClassification":
        if isinstance(v, str):
            v = _from_text(v)
        if isinstance(v, bool) or v not in (0, 1) or isinstance(v, float) and not v.is_integer():
            raise bad("a 0 / 1 label")
    elif role == "label":
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v):
            raise bad("an int or non-empty str label")
    elif role.endswith("_id"):
        if isinstance(v, bool) or not isinstance(v, (int, str)) or str(v) == "":
            raise bad("an id (str or int)")


def _check_retrieval(where: str, data: dict, col: dict, files: dict) -> None:
    docs = {str(r[col["corpus_id"]]) for r in data["corpus"]}
    qids = {str(r[col["query_id"]]) for r in data["queries"]}
    if len(docs) != len(data["corpus"]):
        raise DataError(f"{where}: columns.corpus_id: ids in {files['corpus']!r} are not unique")
    for i, r in enumerate(data["qrels"]):
        q, d = str(r[col["qrels_query_id"]]), str(r[col["qrels_doc_id"]])
        if q not in qids:
            raise DataError(f"{where}: columns.qrels_query_id: {files['qrels']!r} row {i + 1}: query {q!r} is not in "
                            f"{files['queries']!r}")
        if d not in docs:
            raise DataError(f"{where}: columns.qrels_doc_id: {files['qrels']!r} row {i + 1}: document {d!r} is not "
                            f"in {files['corpus']!r}")
    if "candidates" in data:
        for i, r in enumerate(data["candidates"]):
            if str(r[col["candidates_doc_id"]]) not in docs:
                raise DataError(f"{where}: columns.candidates_doc_id: {files['candidates']!r} row {i + 1}: document "
                                f"{r[col['candidates_doc_id']]!r} is not in {files['corpus']!r}")


# ====================================================================================== building
_ABS = {
    "STS": ("mteb.abstasks.sts", "AbsTaskSTS"),
    "Classification": ("mteb.abstasks.classification", "AbsTaskClassification"),
    "Clustering": ("mteb.abstasks.clustering", "AbsTaskClustering"),
    "PairClassification": ("mteb.abstasks.pair_classification", "AbsTaskPairClassification"),
    "Retrieval": ("mteb.abstasks.retrieval", "AbsTaskRetrieval"),
    "Reranking": ("mteb.abstasks.retrieval", "AbsTaskRetrieval"),
}


def _build_spec_task(ref: TaskRef, seed: int = 42):


    prefer_datasets_offline()  # before mteb loads
    from mteb.abstasks.task_metadata import TaskMetadata

    spec = ref.spec or {}
    base = getattr(importlib.import_module(_ABS[ref.type][0]), _ABS[ref.type][1])
    meta = TaskMetadata(
        name=ref.name, description=spec["description"], dataset={"path": f"local/{ref.name}", "revision": ref.revision},
        type=ref.type, category="t2t", modalities=["text"], eval_splits=[spec["split"]],
        eval_langs=spec["languages"], main_score=ref.main_score, reference=None, date=None, domains=None,
        task_subtypes=None, license=None, annotations_creators=None, dialect=None, sample_creation=None,
        bibtex_citation="",
    )
    attrs: dict[str, Any] = {"metadata": meta, "load_data": _spec_load_data, "_spec": spec, "__module__": __name__}
    if ref.type == "STS":
        attrs["min_score"] = spec.get("min_score", 0)
        attrs["max_score"] = spec.get("max_score", 5)
    if ref.type == "Classification":
        for k in ("samples_per_label", "n_experiments"):
            if k in spec:
                attrs[k] = spec[k]
    if ref.type == "Clustering":  # small user sets: embed every document, at most 10 bootstrap draws of them all
        attrs["max_fraction_of_documents_to_embed"] = None
    cls = type(f"Spec_{ref.type}_{abs(hash(ref.name)) % 10**8}", (base,), attrs)
    return cls(seed=seed)


def _spec_load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
    from datasets import Dataset, DatasetDict

    if self.data_loaded:
        return
    spec, col, split = self._spec, self._spec["columns"], self._spec["split"]
    rows = {k: _read_spec_rows(Path(p), k, col) for k, p in spec["files"].items()}
    t = self.metadata.type
    if t in ("STS", "PairClassification"):
        r = rows[split]
        d = {"sentence1": [x[col["sentence1"]] for x in r], "sentence2": [x[col["sentence2"]] for x in r]}
        if t == "STS":
            d["score"] = [float(_from_text(x[col["score"]])) for x in r]
        else:
            d["labels"] = [int(_from_text(x[col["label"]])) for x in r]
        self.dataset = {"default": DatasetDict({split: Dataset.from_dict(d)})}
    elif t == "Classification":
        labels = sorted({x[col["label"]] for k in ("train", split) for x in rows[k]}, key=str)
        ids = {lab: i for i, lab in enumerate(labels)}
        self.dataset = {"default": DatasetDict({
            k: Dataset.from_dict({"text": [x[col["text"]] for x in rows[k]],
                                  "label": [ids[x[col["label"]]] for x in rows[k]]}) for k in ("train", split)})}
    elif t == "Clustering":
        r = rows[split]
        labels = sorted({x[col["label"]] for x in r}, key=str)
        ids = {lab: i for i, lab in enumerate(labels)}
        self.dataset = {"default": DatasetDict({split: Dataset.from_dict(
            {"sentences": [x[col["text"]] for x in r], "labels": [ids[x[col["label"]]] for x in r]})})}
    else:  # Retrieval / Reranking
        corpus = rows["corpus"]
        qrels: dict[str, dict[str, int]] = {}
        for x in rows["qrels"]:
            qrels.setdefault(str(x[col["qrels_query_id"]]), {})[str(x[col["qrels_doc_id"]])] = int(
                float(_from_text(x[col["qrels_score"]])))
        top_ranked = None
        if t == "Reranking":
            top_ranked = {}
            for x in rows["candidates"]:
                top_ranked.setdefault(str(x[col["candidates_query_id"]]), []).append(str(x[col["candidates_doc_id"]]))
        part = {
            "corpus": Dataset.from_dict({"id": [str(x[col["corpus_id"]]) for x in corpus],
                                         "title": [str(x.get(col["corpus_title"]) or "") for x in corpus],
                                         "text": [x[col["corpus_text"]] for x in corpus]}),
            "queries": Dataset.from_dict({"id": [str(x[col["query_id"]]) for x in rows["queries"]],
                                          "text": [x[col["query_text"]] for x in rows["queries"]]}),
            "relevant_docs": qrels, "top_ranked": top_ranked,
        }
        self.dataset = {"default": {split: part}}
    self.data_loaded = True
