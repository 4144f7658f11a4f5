"""The training-data format: JSONL rows of (query, positive, negatives, instruction, source).

One line per example::

    {"query": str, "positive": str, "negatives": [str, ...],
     "instruction": str | null (optional), "source": str (optional)}

The FlagEmbedding format (``{"query", "pos": [...], "neg": [...], "prompt"}``) is accepted too and
converted: one :class:`TrainExample` per positive.

Reading never stops at a bad row: malformed rows (bad JSON, missing field, wrong type, empty or
whitespace-only text) are counted per reason and skipped, with ONE summary :class:`DataWarning` per
file. If the bad rows exceed ``max_bad_fraction`` a :class:`~embed_core.errors.DataError` names the
file, the counts and the fix.

The instruction is applied to the query side only, E5-style, by :func:`format_query`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..files import atomic_write
from ..config import format_query  # noqa: F401  (re-exported: the one query template)
from ..errors import DataError

__all__ = [
    "DataWarning",
    "TrainExample",
    "format_query",
    "normalize_text",
    "parse_row",
    "validate_rows",
    "read_jsonl",
    "write_jsonl",
]

DEFAULT_MAX_BAD_FRACTION = 0.01
DEFAULT_MIN_ROWS_FOR_FRACTION = 100

_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]|_")


class DataWarning(UserWarning):
    """Malformed training rows were skipped (one summary warning per file / call)."""


@dataclass
class TrainExample:
    """One contrastive training example: a query, one positive, zero or more hard negatives.

    ``instruction`` is the query-side task instruction (documents never get one); ``source`` names
    the builder or file the example came from.
    """

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    instruction: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSONL row for this example (``source`` omitted when unset)."""
        row: dict[str, Any] = {
            "query": self.query,
            "positive": self.positive,
            "negatives": list(self.negatives),
            "instruction": self.instruction,
        }
        if self.source is not None:
            row["source"] = self.source
        return row

    def texts(self) -> list[str]:
        """Every text of the example: query, positive, then negatives."""
        return [self.query, self.positive, *self.negatives]


def normalize_text(text: str, ignore_punctuation: bool = False) -> str:
    """Comparison key for overlap checks: strip, collapse whitespace, lowercase.

    With ``ignore_punctuation`` punctuation is replaced by spaces first (a looser key that also
    catches ``"A man is riding a horse"`` vs ``"A man is riding a horse."``)."""
    if ignore_punctuation:
        text = _PUNCT.sub(" ", text)
    return _WS.sub(" ", text).strip().lower()


# ----------------------------------------------------------------------------------------------
# Row validation
# ----------------------------------------------------------------------------------------------


class _BadRow(Exception):
    """A row is malformed; ``reason`` is the counter key (e.g. ``missing_field:query``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _BadJson:
    """Placeholder for a line that is not valid JSON (keeps the row count right)."""


def _text(row: Mapping[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        raise _BadRow(f"missing_field:{key}")
    value = row[key]
    if not isinstance(value, str):
        raise _BadRow(f"wrong_type:{key}")
    if not value.strip():
        raise _BadRow(f"empty_text:{key}")
    return value


def _text_list(row: Mapping[str, Any], key: str, *, required: bool) -> list[str]:
    if key not in row or row[key] is None:
        if required:
            raise _BadRow(f"missing_field:{key}")
        return []
    value = row[key]
    if not isinstance(value, list):
        raise _BadRow(f"wrong_type:{key}")
    for item in value:
        if not isinstance(item, str):
            raise _BadRow(f"wrong_type:{key}")
        if not item.strip():
            raise _BadRow(f"empty_text:{key}")
    return list(value)


def _optional_str(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadRow(f"wrong_type:{key}")
    return value if value.strip() else None


def parse_row(row: Any, default_source: str | None = None) -> list[TrainExample]:
    """Examples from one decoded row (native or FlagEmbedding format).

    Raises ``_BadRow`` (internal) on a malformed row; use :func:`validate_rows` for counting.
    A FlagEmbedding row (``pos`` list, no ``positive``) yields one example per positive.
    """
    if isinstance(row, TrainExample):
        row = row.to_dict()
    if not isinstance(row, Mapping):
        raise _BadRow("not_an_object")
    query = _text(row, "query")
    source = _optional_str(row, "source") or default_source
    if "positive" not in row and "pos" in row:  # FlagEmbedding format
        positives = _text_list(row, "pos", required=True)
        if not positives:
            raise _BadRow("empty_text:pos")
        negatives = _text_list(row, "neg", required=False)
        instruction = _optional_str(row, "prompt")
        return [TrainExample(query, p, list(negatives), instruction, source) for p in positives]
    positive = _text(row, "positive")
    negatives = _text_list(row, "negatives", required=False)
    instruction = _optional_str(row, "instruction")
    return [TrainExample(query, positive, negatives, instruction, source)]


def _check_threshold(
    name: str, total: int, bad: Counter, max_bad_fraction: float, min_rows_for_fraction: int
) -> None:
    """Warn once about skipped rows; raise DataError when there are too many (or no good rows)."""
    n_bad = sum(bad.values())
    if total == 0:
        raise DataError(f"{name}: no rows found. Fix: point to a non-empty training JSONL file.")
    if n_bad == 0:
        return
    counts = ", ".join(f"{reason}={n}" for reason, n in sorted(bad.items()))
    fraction = n_bad / max(total, min_rows_for_fraction)
    if n_bad == total or fraction > max_bad_fraction:
        raise DataError(
            f"{name}: {n_bad} of {total} rows are malformed ({counts}), above the allowed "
            f"max_bad_fraction={max_bad_fraction} "
            f"(computed over max(rows, {min_rows_for_fraction})). "
            "Fix: repair the rows (each needs non-empty string 'query' and 'positive', optional "
            "'negatives' list of non-empty strings, optional 'instruction'/'source' strings) or "
            "raise max_bad_fraction if skipping them is acceptable."
        )
    warnings.warn(
        f"{name}: skipped {n_bad} of {total} malformed rows ({counts})",
        DataWarning,
        stacklevel=4,
    )


def _collect(
    rows: Iterable[Any],
    name: str,
    default_source: str | None,
    max_bad_fraction: float,
    min_rows_for_fraction: int,
) -> list[TrainExample]:
    examples: list[TrainExample] = []
    bad: Counter = Counter()
    total = 0
    for row in rows:
        total += 1
        if isinstance(row, _BadJson):
            bad["bad_json"] += 1
            continue
        try:
            examples.extend(parse_row(row, default_source))
        except _BadRow as exc:
            bad[exc.reason] += 1
    _check_threshold(name, total, bad, max_bad_fraction, min_rows_for_fraction)
    return examples


def validate_rows(
    rows: Iterable[Any],
    *,
    name: str = "<rows>",
    default_source: str | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    min_rows_for_fraction: int = DEFAULT_MIN_ROWS_FOR_FRACTION,
) -> list[TrainExample]:
    """Validate decoded rows (dicts or TrainExamples); skip and count malformed ones.

    Emits one :class:`DataWarning` summarising skipped rows per reason. Raises DataError when
    ``bad / max(total, min_rows_for_fraction) > max_bad_fraction``, when every row is bad, or when
    there are no rows (so a handful of bad rows in a tiny file is tolerated, a bad file is not).
    """
    return _collect(rows, name, default_source, max_bad_fraction, min_rows_for_fraction)


def _iter_json_lines(path: Path) -> Iterator[Any]:
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield _BadJson()


def read_jsonl(
    path: str | os.PathLike,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    min_rows_for_fraction: int = DEFAULT_MIN_ROWS_FOR_FRACTION,
    *,
    default_source: str | None = None,
) -> list[TrainExample]:
    """Read a training JSONL file (native or FlagEmbedding rows), skipping malformed rows.

    Blank lines are ignored. See :func:`validate_rows` for the threshold rule.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"training file {str(p)!r} does not exist. Fix: check the path.")
    return _collect(
        _iter_json_lines(p), str(p), default_source, max_bad_fraction, min_rows_for_fraction
    )


def write_jsonl(examples: Iterable[TrainExample], path: str | os.PathLike) -> Path:
    """Write examples as JSONL (UTF-8, one object per line), atomically; returns the path."""
    def write(fh) -> None:
        for ex in examples:
            fh.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")

    return atomic_write(path, write, encoding="utf-8")
