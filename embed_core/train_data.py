"""The training data of one run: loading (JSONL files and builders), the held-out split, and the deterministic
global batch of every step with each rank's share of it. No torch import.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np

from .errors import DataError
from .data import LengthGroupedBatcher, build_training_set, collate, read_jsonl, shard_batch
from .train_config import TrainConfig

__all__ = ["TrainData", "batch_fingerprint", "data_fingerprint", "derived_seed", "load_examples"]


def load_examples(tcfg: TrainConfig) -> list:
    """All training examples: the JSONL files in order, then the builders' output (DataError if none)."""

    examples: list = []
    for path in tcfg.train_data:
        examples.extend(read_jsonl(path, max_bad_fraction=tcfg.max_bad_fraction))
    if tcfg.builders:
        examples.extend(build_training_set(tcfg.builders, data_dir=tcfg.data_dir, seed=tcfg.seed,
                                           max_per_source=tcfg.max_per_source))
    if not examples:
        raise DataError("the training data is empty: check train_data / builders")
    return examples


def _example_key(ex) -> str:
    return "\x1f".join([ex.query, ex.positive, *ex.negatives, ex.instruction or ""])


def data_fingerprint(examples: Sequence) -> str:
    """Content hash of a list of TrainExamples (order included)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(_example_key(ex).encode("utf-8", "replace"))
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def batch_fingerprint(batch: Sequence) -> str:
    """Short hash of a global batch's (query, positive) pairs, logged per step to audit the data order."""
    h = hashlib.sha1()
    for ex in batch:
        h.update(f"{ex.query}\x1f{ex.positive}\x1e".encode("utf-8", "replace"))
    return h.hexdigest()[:12]


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of `parts` (stable across processes and runs)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TrainData:
    """Train / held-out split and the deterministic global batch of every step.

    The held-out slice is ``val_size`` examples picked by a permutation seeded with ``seed``; the
    rest is batched by `embed_core.data.LengthGroupedBatcher` (drop_last): step ``s`` (0-based)
    is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``.
    """

    def __init__(self, tcfg: TrainConfig, examples: Sequence | None = None) -> None:

        self.tcfg = tcfg
        examples = list(examples) if examples is not None else load_examples(tcfg)
        self.fingerprint = data_fingerprint(examples)
        n = len(examples)
        if tcfg.val_size >= n:
            raise DataError(f"val_size {tcfg.val_size} leaves no training data out of {n} examples: lower val_size")
        order = np.random.default_rng(np.random.SeedSequence([tcfg.seed, 7919])).permutation(n)
        held = set(order[: tcfg.val_size].tolist())
        self.val = [examples[i] for i in sorted(held)]
        self.train = [ex for i, ex in enumerate(examples) if i not in held]
        if len(self.train) < tcfg.batch_size:
            raise DataError(f"{len(self.train)} training examples (after holding out val_size={tcfg.val_size}) "
                            f"do not fill one global batch of {tcfg.batch_size}: add data or lower batch_size")
        # packed rows have no padding to save, and length-grouped batches would swing the tokens per step (and
        # the activation memory) several-fold between an all-short and an all-long batch
        self.batcher = LengthGroupedBatcher(self.train, tcfg.batch_size, seed=tcfg.seed,
                                            length_grouping=tcfg.length_grouping and not tcfg.packing, drop_last=True)
        self.steps_per_epoch = len(self.batcher)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of 0-based global step `step`."""
        return divmod(step, self.steps_per_epoch)

    def global_batch(self, step: int) -> list:
        epoch, index = self.position(step)
        return [self.train[i] for i in self.batcher.indices(epoch)[index]]

    def local_batch(self, step: int, rank: int, world_size: int, format_query: Callable[[str, str | None], str]) -> dict:
        """This rank's share of step `step`'s global batch, collated (negatives drawn on the global batch,
        so the result does not depend on the number of workers). Keys: queries, positives, negatives,
        fingerprint (of the global batch)."""

        batch = self.global_batch(step)
        k = self.tcfg.num_negatives
        col = collate(batch, k, seed=derived_seed(self.tcfg.seed, "negatives", step), query_format=format_query)
        return {
            "queries": shard_batch(col["queries"], rank, world_size),  # in the model's own template
            "positives": shard_batch(col["positives"], rank, world_size),
            "negatives": shard_batch(col["negatives"], rank, world_size) if k else [],
            "fingerprint": batch_fingerprint(batch),
        }
