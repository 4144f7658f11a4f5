# Over 500 lines: each test sits beside its statistics note (ties, exactness, multiplicity), as the report cites them.
"""Significance tests for the sweep report: pure numpy / scipy / statsmodels / scikit-posthocs, no Ray.

What is tested, and against what (``sweeps.report`` assembles the inputs from a results folder):

* :func:`wilcoxon_by_category`: the paper's test. Per task category, a paired Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, two-sided, exact for small n) of one design's dataset scores against the
  baseline's, only where the category has more than 4 datasets with both scores (the paper's rule).
* :func:`paired_instance_test`: per dataset, at the instance level (queries, pairs, examples): a paired
  bootstrap confidence interval of the score difference (``scipy.stats.bootstrap``, percentile by default)
  and a paired permutation test (``scipy.stats.permutation_test``, ``permutation_type="samples"``: each
  instance's two models are swapped at random). Scores over resamples are vectorised for the four
  :data:`sweeps.layout.AGGREGATES` and equal ``InstanceScores.score(index)`` row by row.
* :func:`adjust_pvalues` / :func:`correct_family`: Holm (default) or Benjamini-Hochberg across a family of
  tests (``statsmodels.stats.multitest.multipletests``).
* :func:`friedman_nemenyi`: Friedman test over datasets x designs (``scipy.stats.friedmanchisquare``), the
  Nemenyi post-hoc (``scikit_posthocs.posthoc_nemenyi_friedman``) and Demsar's critical difference.
* :func:`seed_test`: replicates (seeds) of a design against the baseline's: Welch's t-test
  (``scipy.stats.ttest_ind(equal_var=False)``).

Permutation tests on correlation-type scores swap *predictions* between the two models, so the
predictions are first put on a common, score-preserving scale: average ranks for ``spearman`` and
``average_precision`` (both depend on the order of the predictions only) and z-scores for ``pearson``.
"""
from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scikit_posthocs as sp
from scipy.stats import (DegenerateDataWarning, bootstrap, friedmanchisquare, permutation_test, rankdata,
                         studentized_range, ttest_ind, wilcoxon)
from statsmodels.stats.multitest import multipletests

__all__ = [
    "CORRECTIONS",
    "FriedmanResult",
    "TestResult",
    "adjust_pvalues",
    "correct_family",
    "critical_difference",
    "friedman_nemenyi",
    "paired_instance_test",
    "paired_permutation",
    "resample_scores",
    "rng_for",
    "seed_test",
    "wilcoxon_by_category",
]

#: Correction names accepted by the report -> statsmodels' method names.
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh"}

#: The paper applies its Wilcoxon test only to categories with more than this many datasets.
PAPER_MIN_DATASETS = 5

# Elements per vectorised block (resamples x instances); bounds memory at a few hundred MB.
_BLOCK = 2_000_000


# ====================================================================================== result records
@dataclass
class TestResult:
    """One comparison of a design against the baseline (or its reason for being skipped).

    kind: ``wilcoxon`` (per category, over datasets), ``instance`` (per dataset, over instances),
    ``seeds`` (over replicate seeds). scope: the category, dataset or ``overall``. delta: design minus
    baseline (the quantity tested). p_adjusted / significant are filled by :func:`correct_family`.
    """

    kind: str
    base_model: str
    design: str
    baseline: str
    scope: str
    n: int = 0
    delta: float | None = None
    statistic: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    significant: bool | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    skipped: str = ""
    note: str = ""

    @property
    def tested(self) -> bool:
        return not self.skipped and self.p_value is not None and not math.isnan(self.p_value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FriedmanResult:
    """Friedman test + Nemenyi post-hoc over a datasets x designs table (higher score = better = rank 1)."""

    designs: list[str]
    datasets: list[str]
    statistic: float | None = None
    p_value: float | None = None
    avg_ranks: dict[str, float] = field(default_factory=dict)
    nemenyi: Any = None  # pandas DataFrame of pairwise p-values (designs x designs)
    cd: float | None = None
    alpha: float = 0.05
    skipped: str = ""
    left_out: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nemenyi"] = None if self.nemenyi is None else self.nemenyi.round(6).to_dict()
        return d


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A generator that depends on `seed` and the names only (not on the order tests run in)."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(n).encode()) for n in names])


# ====================================================================================== corrections
def adjust_pvalues(pvalues: Sequence[float], method: str = "holm", alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Adjusted p-values and rejections for a family: ``holm`` (FWER) or ``bh`` (Benjamini-Hochberg FDR)."""

    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}: one of {sorted(CORRECTIONS)}")
    p = np.asarray(pvalues, dtype=float)
    if p.size == 0:
        return p, np.zeros(0, dtype=bool)
    reject, p_adj, _, _ = multipletests(p, alpha=alpha, method=CORRECTIONS[method])
    return p_adj, reject


def correct_family(results: Sequence[TestResult], method: str = "holm", alpha: float = 0.05) -> None:
    """Fill p_adjusted / significant of the tested results of one family (skipped ones stay None)."""
    tested = [r for r in results if r.tested]
    p_adj, reject = adjust_pvalues([r.p_value for r in tested], method, alpha)
    for r, pa, rej in zip(tested, p_adj, reject):
        r.p_adjusted = float(pa)
        r.significant = bool(rej)


# ====================================================================================== paper's Wilcoxon
def wilcoxon_by_category(
    scores: Mapping[str, Mapping[str, float]],
    categories: Mapping[str, str],
    baseline: str,
    *,
    base_model: str = "",
    min_datasets: int = PAPER_MIN_DATASETS,
) -> list[TestResult]:
    """The paper's test: per category, Wilcoxon signed-rank over datasets, each design vs `baseline`.

    scores: ``{design: {dataset: score}}`` (replicates already averaged); categories: ``{dataset: category}``.
    A category needs at least `min_datasets` datasets scored by both (the paper: more than 4), else the
    result says it was skipped and why. Zero differences are dropped (``zero_method="wilcox"``).
    """

    out: list[TestResult] = []
    base = scores.get(baseline, {})
    cats = sorted(set(categories.values()))
    for design in scores:
        if design == baseline:
            continue
        for cat in cats:
            ds = [d for d in sorted(categories) if categories[d] == cat]
            both = [d for d in ds if _finite(scores[design].get(d)) and _finite(base.get(d))]
            r = TestResult("wilcoxon", base_model, design, baseline, cat, n=len(both))
            out.append(r)
            if both:
                r.delta = float(np.mean([scores[design][d] - base[d] for d in both]))
            missing = [d for d in ds if d not in both]
            if missing:
                r.note = f"left out (not scored by both): {', '.join(missing)}"
            if len(both) < min_datasets:
                r.skipped = (f"{len(both)} dataset(s) scored by both in {cat} "
                             f"(the paper's Wilcoxon test needs at least {min_datasets})")
                continue
            d = np.array([scores[design][x] - base[x] for x in both])
            if np.all(d == 0):
                r.statistic, r.p_value = 0.0, 1.0
                r.note = (r.note + "; " if r.note else "") + "all differences are zero"
                continue
            res = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
            r.statistic, r.p_value = float(res.statistic), float(res.pvalue)
    return out


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(float(x))


# ====================================================================================== vectorised scores
def _as_rows(a: np.ndarray) -> np.ndarray:
    return a[None, :] if a.ndim == 1 else a


def _codes(x: np.ndarray) -> np.ndarray:
    """Integer codes preserving order and ties: 2 x average rank (1-based), values in [2, 2n]."""

    return np.rint(2 * rankdata(x, method="average")).astype(np.int64)


def _flat_codes(codes: np.ndarray, size: int) -> np.ndarray:
    """Row-offset codes: row b's code c becomes b * size + c (index into a flattened (B, size) table)."""
    return (codes + (np.arange(codes.shape[0], dtype=np.int64) * size)[:, None]).ravel()


def _row_hist(flat: np.ndarray, rows: int, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(flat, weights=weights, minlength=rows * size)


def _row_ranks(codes: np.ndarray, size: int) -> np.ndarray:
    """Average ranks (1-based, ties averaged) within each row of an int array with values in [0, size)."""
    rows = codes.shape[0]
    flat = _flat_codes(codes, size)
    h = _row_hist(flat, rows, size)
    c = np.cumsum(h.reshape(rows, size), axis=1).ravel()
    r = h[flat].astype(np.float64)
    r -= 1.0
    r *= -0.5
    r += c[flat]
    return r.reshape(codes.shape)


def _row_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))


def _row_ap(codes: np.ndarray, gold: np.ndarray, size: int) -> np.ndarray:
    """Average precision per row (sklearn's definition, tied predictions form one threshold)."""
    rows = codes.shape[0]
    gold = np.broadcast_to(gold, codes.shape).astype(np.float64)
    flat = _flat_codes(codes, size)
    h = _row_hist(flat, rows, size).reshape(rows, size)
    hp = _row_hist(flat, rows, size, weights=gold.ravel()).reshape(rows, size)
    n_ge = np.cumsum(h[:, ::-1], axis=1)[:, ::-1]
    tp_ge = np.cumsum(hp[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = (tp_ge / np.maximum(n_ge, 1)).ravel()
        return (prec[flat].reshape(codes.shape) * gold).sum(1) / gold.sum(1)


class _Prepared:
    """One model's instances in a common id order, pre-transformed for fast scoring of many resamples.

    For ``spearman`` / ``average_precision`` the predictions become integer codes (order and ties kept,
    on the common scale of average ranks, then densely numbered over every model of the test by
    :func:`_unify`), so ranking a resample is a histogram + cumulative sum per row instead of a sort.
    """

    def __init__(self, kind: str, values=None, pred=None, gold=None) -> None:
        self.kind = kind
        if kind == "mean":
            self.values = np.asarray(values, dtype=np.float64)
            self.n = self.values.size
            return
        self.pred = np.asarray(pred, dtype=np.float64)
        self.gold = np.asarray(gold, dtype=np.float64)
        self.n = self.pred.size
        if kind in ("spearman", "average_precision"):
            self.pcode = _codes(self.pred)
            self.size = 2 * self.n + 1
            gcode = _codes(self.gold)
            self.grank = gcode / 2.0            # gold ranks of the full set (permutations)
            uniq = np.unique(gcode)
            self.gcode, self.gsize = np.searchsorted(uniq, gcode), uniq.size
        elif kind == "pearson":
            sd = self.pred.std()
            self.z = (self.pred - self.pred.mean()) / (sd if sd > 0 else 1.0)
        else:
            raise ValueError(f"unknown aggregate {kind!r}")

    def gold_ranks(self, idx: np.ndarray) -> np.ndarray | None:
        """Ranks of the gold labels in each resample (shared by every model of a test)."""
        return _row_ranks(self.gcode[idx], self.gsize) if self.kind == "spearman" else None

    # scores of resamples given as index rows (bootstrap): (B, m) -> (B,)
    def score_index(self, idx: np.ndarray, gold_ranks: np.ndarray | None = None) -> np.ndarray:
        idx = _as_rows(np.asarray(idx, dtype=np.int64))
        k = self.kind
        if k == "mean":
            return self.values[idx].mean(axis=1)
        if k == "pearson":
            return _row_pearson(self.pred[idx], self.gold[idx])
        if k == "spearman":
            g = self.gold_ranks(idx) if gold_ranks is None else gold_ranks
            return _row_pearson(_row_ranks(self.pcode[idx], self.size), g)
        return _row_ap(self.pcode[idx], self.gold[idx], self.size)

    # scores when each instance's prediction comes from self or other (permutation): swap (B, n) bool
    def score_mixed(self, other: "_Prepared", swap: np.ndarray) -> np.ndarray:
        k = self.kind
        if k == "mean":
            return np.where(swap, other.values, self.values).mean(axis=1)
        if k == "pearson":
            return _row_pearson(np.where(swap, other.z, self.z), self.gold[None, :])
        mixed = np.where(swap, other.pcode, self.pcode)
        if k == "spearman":
            return _row_pearson(_row_ranks(mixed, self.size), self.grank[None, :])
        return _row_ap(mixed, self.gold[None, :], self.size)


def _unify(preps: Sequence[_Prepared]) -> None:
    """Number the prediction codes of all models of one test densely over their union (smaller histograms)."""
    if preps and preps[0].kind in ("spearman", "average_precision"):
        uniq = np.unique(np.concatenate([p.pcode for p in preps]))
        for p in preps:
            p.pcode, p.size = np.searchsorted(uniq, p.pcode), uniq.size


def resample_scores(kind: str, index: np.ndarray, *, values=None, pred=None, gold=None) -> np.ndarray:
    """Main scores of many resamples at once: row b of `index` (B x m instance indices, repeats allowed)
    gives ``aggregate(kind, ..., index=index[b])`` (see :func:`sweeps.layout.aggregate`)."""
    p = _Prepared(kind, values, pred, gold)
    _unify([p])
    return p.score_index(index)


# ====================================================================================== per-dataset instance tests
@dataclass
class InstanceTestOutcome:
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    statistic: float
    n: int
    note: str = ""


class InstanceMismatch(ValueError):
    """The two sides' instances cannot be paired (ids, aggregate or gold labels differ)."""


def _align(a: Sequence[Any], b: Sequence[Any]) -> tuple[list[str], list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Put every replicate of both sides in one id order; raise InstanceMismatch naming what differs."""
    sides = list(a) + list(b)
    kinds = {s.aggregate for s in sides}
    if len(kinds) > 1:
        raise InstanceMismatch(f"aggregates differ ({', '.join(sorted(kinds))})")
    ref = sides[0]
    ref_ids = set(ref.ids)
    for s, label in [(s, "design") for s in a] + [(s, "baseline") for s in b]:
        ids = set(s.ids)
        if ids != ref_ids:
            only_s, only_ref = len(ids - ref_ids), len(ref_ids - ids)
            ex = sorted(ids ^ ref_ids)[:3]
            raise InstanceMismatch(
                f"instance ids differ: {only_s} only in a {label} run, {only_ref} only in the first "
                f"(design) run, {len(ids & ref_ids)} shared (e.g. {', '.join(map(str, ex))})")
    order = list(ref.ids)
    out: list[dict[str, np.ndarray]] = []
    for s in sides:
        pos = {i: k for k, i in enumerate(s.ids)}
        take = np.fromiter((pos[i] for i in order), dtype=np.int64, count=len(order))
        d = {}
        for name in ("values", "pred", "gold"):
            arr = getattr(s, name)
            if arr is not None:
                d[name] = np.asarray(arr, dtype=np.float64)[take]
        out.append(d)
    if ref.aggregate != "mean":
        g0 = out[0]["gold"]
        for d in out[1:]:
            if not np.array_equal(d["gold"], g0):
                raise InstanceMismatch("gold labels differ between runs for the same instance ids")
    return order, out[: len(a)], out[len(a):]


def _drop_nonfinite(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]):
    """Leave out every instance that is non-finite in any run of either side: a NaN prediction is no evidence
    (ranked or cast to integer codes it would become an arbitrary extreme value and fake a difference)."""
    keep = np.logical_and.reduce([np.isfinite(arr) for d in a + b for arr in d.values()])
    dropped = int(keep.size - keep.sum())
    if not dropped:
        return a, b, 0
    cut = lambda side: [{k: v[keep] for k, v in d.items()} for d in side]  # noqa: E731
    return cut(a), cut(b), dropped


def _permutation_pairs(kind: str, A: list, B: list) -> list[tuple]:
    """The (design, baseline) replicate pairs one swap pattern applies to (see `paired_instance_test`)."""
    if kind == "mean":
        # per-instance values averaged over replicates: the statistic is exactly delta, all replicates used
        return [(_Prepared("mean", values=np.mean([p.values for p in A], axis=0)),
                 _Prepared("mean", values=np.mean([p.values for p in B], axis=0)))]
    if len(A) == len(B):
        return list(zip(A, B))
    return [(pa, pb) for pa in A for pb in B]  # the mean over all pairs is exactly delta


def paired_instance_test(
    design_runs: Sequence[Any],
    baseline_runs: Sequence[Any],
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    ci_method: str = "percentile",
    rng: np.random.Generator | int | None = None,
) -> InstanceTestOutcome:
    """Paired bootstrap CI and paired permutation test of (design - baseline) on one dataset.

    design_runs / baseline_runs: the replicates (seeds) of each side, ``InstanceScores`` of the same task,
    split and subset (anything with ``aggregate``, ``ids``, ``values``/``pred``/``gold``). Instances pair up
    by id; ids, aggregate or gold labels that differ raise :class:`InstanceMismatch`.

    delta: mean over the design's replicates of the score minus the same for the baseline.
    Bootstrap: instances resampled with replacement, the same resample for every replicate of both
    sides; CI of delta (``scipy.stats.bootstrap``, `ci_method` ``percentile`` or ``BCa``).
    Permutation: each instance's data are swapped between design and baseline with probability 1/2
    (:func:`paired_permutation`, two-sided; exact when 2^n <= n_resamples); the statistic is delta.
    With replicates: for ``mean`` the per-instance values are averaged over each side's replicates first;
    otherwise the replicates are paired in the given order (sort them by seed) when both sides have as
    many, else every design replicate is paired with every baseline replicate, and one swap pattern
    applies to all pairs.
    """
    if not design_runs or not baseline_runs:
        raise InstanceMismatch("a side has no per-instance scores")
    kind = design_runs[0].aggregate
    order, a_data, b_data = _align(design_runs, baseline_runs)
    a_data, b_data, dropped = _drop_nonfinite(a_data, b_data)
    n = len(order) - dropped
    if n < 2:
        raise InstanceMismatch(f"only {n} instance(s) with finite scores in every run"
                               + (f" ({dropped} non-finite left out)" if dropped else ""))
    A = [_Prepared(kind, **d) for d in a_data]
    B = [_Prepared(kind, **d) for d in b_data]
    _unify(A + B)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    batch = max(1, _BLOCK // n)

    full = np.arange(n)
    delta = float(np.mean([p.score_index(full)[0] for p in A]) - np.mean([p.score_index(full)[0] for p in B]))
    ci = _bootstrap_ci(A, B, n, n_resamples=n_resamples, batch=batch, confidence=confidence, method=ci_method, rng=rng)
    pairs = _permutation_pairs(kind, A, B)

    def perm_stat(swap: np.ndarray) -> np.ndarray:
        return np.mean([pa.score_mixed(pb, swap) - pb.score_mixed(pa, swap) for pa, pb in pairs], axis=0)

    with np.errstate(invalid="ignore"):
        stat, p_value = paired_permutation(perm_stat, n, n_resamples=n_resamples, rng=rng, batch=batch)
    note = (f"{dropped} of {len(order)} instances left out: a non-finite (NaN / inf) score or prediction in "
            "some run (check the evaluation)") if dropped else ""
    return InstanceTestOutcome(delta=delta, ci_low=float(ci.low), ci_high=float(ci.high), p_value=p_value,
                               statistic=stat, n=n, note=note)


def _bootstrap_ci(A: list[_Prepared], B: list[_Prepared], n: int, *, n_resamples: int, batch: int, confidence: float,
                  method: str, rng: np.random.Generator):
    """The bootstrap CI of `paired_instance_test` (see there): the same resample of the n instances for every
    replicate of both sides; an undefined CI (resamples with no defined score) comes back as nan."""

    def boot_stat(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        one = idx.ndim == 1
        rows = _as_rows(idx)
        g = A[0].gold_ranks(rows)
        d = (np.mean([p.score_index(rows, g) for p in A], axis=0)
             - np.mean([p.score_index(rows, g) for p in B], axis=0))
        return d[0] if one else d

    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        boot = bootstrap((np.arange(n),), boot_stat, vectorized=True, n_resamples=n_resamples, batch=batch,
                         confidence_level=confidence, method=method, rng=rng)
    return boot.confidence_interval


def paired_permutation(
    statistic, n: int, *, n_resamples: int = 10_000, rng: np.random.Generator | int | None = None,
    batch: int | None = None,
) -> tuple[float, float]:
    """Two-sided paired permutation test: (observed statistic, p-value).

    statistic(swap) maps a boolean (B, n) array (True: instance i's two models swapped) to B statistics.
    When 2^n <= n_resamples every swap pattern is enumerated by ``scipy.stats.permutation_test`` (exact);
    otherwise `n_resamples` random patterns are drawn here, vectorised (scipy's randomised "samples" path
    loops over instances in Python, far too slow for thousands of instances), and the p-value is
    computed as scipy computes it: ``min(1, 2 min(P(T* <= t), P(T* >= t)))`` with the observed pattern
    counted, ``P = (#hits + 1) / (n_resamples + 1)``.
    """

    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    batch = batch or max(1, _BLOCK // max(n, 1))
    if n < 63 and 2 ** n <= n_resamples:
        idx = np.arange(n)

        def wrapped(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
            one = np.ndim(x) == 1
            out = statistic(_as_rows(np.asarray(x)) >= n)
            return out[0] if one else out

        res = permutation_test((idx, idx + n), wrapped, permutation_type="samples", vectorized=True,
                               n_resamples=n_resamples, batch=batch, alternative="two-sided", rng=rng)
        return float(res.statistic), float(res.pvalue)
    observed = float(statistic(np.zeros((1, n), dtype=bool))[0])
    null = np.concatenate([statistic(rng.random((min(batch, n_resamples - k), n)) < 0.5)
                           for k in range(0, n_resamples, batch)])
    gamma = abs(observed) * np.finfo(np.float64).eps * 100  # scipy's tolerance for ties with the observed value
    less = (np.sum(null <= observed + gamma) + 1) / (n_resamples + 1)
    greater = (np.sum(null >= observed - gamma) + 1) / (n_resamples + 1)
    return observed, float(min(1.0, 2 * min(less, greater)))


# ====================================================================================== Friedman / Nemenyi
def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Demsar (2006) critical difference of average ranks for the Nemenyi test: q_alpha sqrt(k(k+1)/(6n)),
    q_alpha = studentized range quantile(1 - alpha, k, inf) / sqrt(2)."""

    q = studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6.0 * n)))


def friedman_nemenyi(scores: Mapping[str, Mapping[str, float]], *, alpha: float = 0.05) -> FriedmanResult:
    """Friedman test over the datasets scored by every design, Nemenyi post-hoc and critical difference.

    scores: ``{design: {dataset: score}}``. Datasets missing for some design are left out (listed in
    ``left_out``); needs at least 3 designs and 2 complete datasets, else ``skipped`` says why.
    """

    designs = list(scores)
    datasets = sorted({d for c in designs for d in scores[c]})
    complete = [d for d in datasets if all(_finite(scores[c].get(d)) for c in designs)]
    res = FriedmanResult(designs=designs, datasets=complete, alpha=alpha,
                         left_out=[d for d in datasets if d not in complete])
    if len(designs) < 3:
        res.skipped = f"{len(designs)} design(s): the Friedman test needs at least 3"
        return res
    if len(complete) < 2:
        res.skipped = f"{len(complete)} dataset(s) scored by every design: the Friedman test needs at least 2"
        return res
    m = np.array([[scores[c][d] for c in designs] for d in complete])  # datasets x designs
    ranks = rankdata(-m, axis=1)  # best = 1
    res.avg_ranks = {c: float(r) for c, r in zip(designs, ranks.mean(axis=0))}
    if np.all(m == m[:, :1]):
        res.statistic, res.p_value = 0.0, 1.0
    else:
        st = friedmanchisquare(*m.T)
        res.statistic, res.p_value = float(st.statistic), float(st.pvalue)
    res.nemenyi = sp.posthoc_nemenyi_friedman(pd.DataFrame(m, columns=designs, index=complete))
    res.cd = critical_difference(len(designs), len(complete), alpha)
    return res


# ====================================================================================== seeds
def seed_test(config_scores: Sequence[float], baseline_scores: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test (two-sided) of a design's per-seed scores against the baseline's: (t, p).
    Needs at least 2 seeds on each side (ValueError otherwise)."""

    a = np.asarray(config_scores, dtype=float)
    b = np.asarray(baseline_scores, dtype=float)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"needs at least 2 seeds on each side (design {a.size}, baseline {b.size})")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        raise ValueError("no spread across seeds on either side: the t-test is undefined")
    t = ttest_ind(a, b, equal_var=False)
    return float(t.statistic), float(t.pvalue)
