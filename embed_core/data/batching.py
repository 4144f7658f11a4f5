"""Deterministic, resumable, length-grouped batching, data-parallel sharding and collation.

Order of an epoch is a pure function of (seed, epoch) and the example lengths:

1. permute all examples with ``numpy.random.default_rng(SeedSequence([seed, epoch]))``;
2. with length grouping, cut the permutation into mega-batches of ``mega_batch_factor *
   batch_size`` examples and sort each by length (longest first, stable), so a batch holds
   examples of similar length (less padding);
3. cut into batches, then shuffle the order of the full batches (a partial last batch, kept only
   with ``drop_last=False``, stays last).

Resuming at (seed, epoch, step) recomputes the order and yields batches ``step, step+1, ...``,
exactly what an uninterrupted run would have yielded. Tokenisation is left to the model; lengths
are estimated as characters / 4 unless a HF tokenizer is given (:func:`hf_length_fn`).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from ..errors import ConfigError, DataError
from .format import TrainExample, format_query, normalize_text

__all__ = [
    "LengthFn",
    "SamplerState",
    "LengthGroupedBatcher",
    "char_length_fn",
    "hf_length_fn",
    "batch_indices",
    "make_batches",
    "shard_batch",
    "collate",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
LengthFn = Callable[[TrainExample], int]
DEFAULT_MEGA_BATCH_FACTOR = 50


def char_length_fn(example: TrainExample) -> int:
    """Fast token-count estimate: characters of formatted query + positive, divided by 4."""
    return (len(format_query(example.query, example.instruction)) + len(example.positive)) // 4 + 1


def hf_length_fn(tokenizer, max_length: int | None = None) -> LengthFn:
    """A length function counting tokens of formatted query + positive with a HF tokenizer."""

    def length(example: TrainExample) -> int:
        texts = [format_query(example.query, example.instruction), example.positive]
        ids = tokenizer(texts, add_special_tokens=True, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
        return sum(len(x) for x in ids)

    return length


@dataclass(frozen=True)
class SamplerState:
    """Where a run stands: the next batch to train on is batch ``step`` of ``epoch``."""

    seed: int
    epoch: int
    step: int = 0


def _check_sizes(batch_size: int, mega_batch_factor: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if mega_batch_factor < 1:
        raise ConfigError(f"mega_batch_factor must be >= 1, got {mega_batch_factor}")


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    length_grouping: bool = True,
    drop_last: bool = True,
    mega_batch_factor: int = DEFAULT_MEGA_BATCH_FACTOR,
) -> list[list[int]]:
    """The epoch's batches as lists of example indices (see the module docstring)."""
    _check_sizes(batch_size, mega_batch_factor)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    order = rng.permutation(len(lengths))
    if length_grouping:
        lens = np.asarray(lengths, dtype=np.int64)
        mega = mega_batch_factor * batch_size
        chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate(
            [c[np.argsort(-lens[c], kind="stable")] for c in chunks] or [order]
        )
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    partial = batches.pop() if batches and len(batches[-1]) < batch_size else None
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if partial is not None and not drop_last:
        batches.append(partial)
    return batches


class LengthGroupedBatcher:
    """Batches of TrainExamples in a deterministic, length-grouped, resumable order.

    >>> batcher = LengthGroupedBatcher(examples, batch_size=32, seed=0)   # doctest: +SKIP
    >>> for step, batch in enumerate(batcher.iter_batches(epoch=0, start_step=k), start=k): ...
    """

    def __init__(
        self,
        examples: Sequence[TrainExample],
        batch_size: int,
        seed: int = 0,
        length_fn: LengthFn | None = None,
        length_grouping: bool = True,
        drop_last: bool = True,
        mega_batch_factor: int = DEFAULT_MEGA_BATCH_FACTOR,
    ) -> None:
        _check_sizes(batch_size, mega_batch_factor)
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.length_grouping = length_grouping
        self.drop_last = drop_last
        self.mega_batch_factor = mega_batch_factor
        fn = length_fn or char_length_fn
        self.lengths = [fn(ex) for ex in examples] if length_grouping else [0] * len(examples)
        self._cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        full, rest = divmod(len(self.examples), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def indices(self, epoch: int) -> list[list[int]]:
        """The epoch's batches as index lists (cached for the most recent epoch)."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, batch_indices(
                self.lengths, self.batch_size, self.seed, epoch, self.length_grouping,
                self.drop_last, self.mega_batch_factor))
        return self._cache[1]

    def iter_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[TrainExample]]:
        """Batches ``start_step, start_step+1, ...`` of ``epoch``."""
        if start_step < 0:
            raise ConfigError(f"start_step must be >= 0, got {start_step}")
        for idx in self.indices(epoch)[start_step:]:
            yield [self.examples[i] for i in idx]

    def resume(self, state: SamplerState) -> Iterator[list[TrainExample]]:
        """The batches still to train on in ``state.epoch`` (from ``state.step`` on)."""
        if state.seed != self.seed:
            raise ConfigError(
                f"sampler state has seed {state.seed} but the batcher seed {self.seed}. "
                "Fix: build the batcher with the checkpoint's seed."
            )
        return self.iter_batches(state.epoch, state.step)

    def state(self, epoch: int, step: int) -> SamplerState:
        """The state to checkpoint after ``step`` batches of ``epoch`` were consumed."""
        return SamplerState(self.seed, epoch, step)


def make_batches(
    examples: Sequence[TrainExample],
    batch_size: int,
    seed: int,
    epoch: int,
    length_fn: LengthFn | None = None,
    length_grouping: bool = True,
    drop_last: bool = True,
    start_step: int = 0,
    mega_batch_factor: int = DEFAULT_MEGA_BATCH_FACTOR,
) -> list[list[TrainExample]]:
    """All batches of ``epoch`` from ``start_step`` on (functional form of the batcher)."""
    batcher = LengthGroupedBatcher(examples, batch_size, seed, length_fn, length_grouping,
                                   drop_last, mega_batch_factor)
    return list(batcher.iter_batches(epoch, start_step))


def shard_batch(batch: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The contiguous ``rank``-th of ``world_size`` equal parts of a global batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if len(batch) % world_size:
        raise ConfigError(
            f"global batch of {len(batch)} examples does not split into {world_size} equal parts. "
            "Fix: make the global batch size a multiple of the number of workers."
        )
    per = len(batch) // world_size
    return list(batch[rank * per:(rank + 1) * per])


def _pick_negatives(i: int, examples: Sequence[TrainExample], k: int,
                    rng: random.Random) -> tuple[list[str], int]:
    """k negatives for example i: its own (seeded shuffle when more than k), topped up from the
    other examples' positives/negatives in the batch. Returns (negatives, number filled)."""
    ex = examples[i]
    own = list(ex.negatives)
    if len(own) > k:
        rng.shuffle(own)
        return own[:k], 0
    if len(own) == k:
        return own, 0
    taken = {normalize_text(t) for t in (ex.query, ex.positive, *own)}
    pool: list[str] = []
    for j, other in enumerate(examples):
        if j == i:
            continue
        for text in (other.positive, *other.negatives):
            key = normalize_text(text)
            if key not in taken:
                taken.add(key)
                pool.append(text)
    need = k - len(own)
    if not pool:
        raise DataError(
            f"example {i} has {len(own)} negatives, {k} needed, and the batch offers no other "
            "texts to fill with. Fix: lower num_negatives or use a larger batch."
        )
    fill = rng.sample(pool, need) if len(pool) >= need else [rng.choice(pool) for _ in range(need)]
    return own + fill, need


def collate(examples: Sequence[TrainExample], num_negatives: int, seed: int = 0,
            query_format: Callable[[str, str | None], str] = format_query) -> dict[str, list]:
    """Tokenisation-ready lists for one batch.

    Returns ``queries`` (instruction applied by `query_format`, default :func:`format_query`; the trainer
    passes the model's own template), ``positives``,
    ``negatives`` (flat, exactly ``num_negatives`` per example: example i's are
    ``negatives[i*k:(i+1)*k]``) and ``num_filled`` (per example, how many negatives were borrowed
    from other examples of the batch). Deterministic given (examples, num_negatives, seed).
    """
    if num_negatives < 0:
        raise ConfigError(f"num_negatives must be >= 0, got {num_negatives}")
    rng = random.Random(seed)
    negatives: list[str] = []
    filled: list[int] = []
    for i in range(len(examples)):
        negs, n = _pick_negatives(i, examples, num_negatives, rng) if num_negatives else ([], 0)
        negatives.extend(negs)
        filled.append(n)
    if sum(filled):
        logger.debug("collate: filled %d of %d negatives from other batch examples",
                     sum(filled), len(negatives))
    return {
        "queries": [query_format(ex.query, ex.instruction) for ex in examples],
        "positives": [ex.positive for ex in examples],
        "negatives": negatives,
        "num_filled": filled,
    }
