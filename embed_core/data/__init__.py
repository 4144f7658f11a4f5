"""Training-data layer: the JSONL training format, builders over the shared data folder, the
MTEB evaluation-split guard, and deterministic, resumable, length-grouped batching.

Does not import ray (safe to use in Ray workers and plain scripts alike).
"""
from __future__ import annotations

from .batching import (
    LengthGroupedBatcher,
    SamplerState,
    batch_indices,
    char_length_fn,
    collate,
    hf_length_fn,
    make_batches,
    shard_batch,
)
from .builders import (
    BUILDERS,
    DEFAULT_INSTRUCTIONS,
    DEFAULT_SOURCES,
    BM25,
    build_amazon_counterfactual,
    build_banking77,
    build_emotion,
    build_flag,
    build_scifact,
    build_sick,
    build_snli,
    build_stsb,
    build_training_set,
)
from .eval_guard import (
    EVAL_SPLITS,
    check_no_overlap,
    eval_texts,
    find_overlap,
    is_eval_text_fn,
    require_training_split,
)
from .format import (
    DataWarning,
    TrainExample,
    format_query,
    normalize_text,
    read_jsonl,
    validate_rows,
    write_jsonl,
)

__all__ = [
    "BM25",
    "BUILDERS",
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_SOURCES",
    "EVAL_SPLITS",
    "DataWarning",
    "LengthGroupedBatcher",
    "SamplerState",
    "TrainExample",
    "batch_indices",
    "build_amazon_counterfactual",
    "build_banking77",
    "build_emotion",
    "build_flag",
    "build_scifact",
    "build_sick",
    "build_snli",
    "build_stsb",
    "build_training_set",
    "char_length_fn",
    "check_no_overlap",
    "collate",
    "eval_texts",
    "find_overlap",
    "format_query",
    "hf_length_fn",
    "is_eval_text_fn",
    "make_batches",
    "normalize_text",
    "read_jsonl",
    "require_training_split",
    "shard_batch",
    "validate_rows",
    "write_jsonl",
]
