"""sweeps.stats against hand-computed examples and brute force (no Ray, no models; a few seconds)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import rankdata, studentized_range
from scipy.stats import t as t_dist

from sweeps import stats
from sweeps.layout import InstanceScores, aggregate


def _inst(kind: str, ids=None, task="T", **data) -> InstanceScores:
    n = len(next(iter(data.values())))
    return InstanceScores(task=task, task_type="STS", split="test", subset="default", main_score="x", value=0.0,
                          aggregate=kind, ids=list(ids) if ids is not None else [str(i) for i in range(n)],
                          **{k: [float(v) for v in vs] for k, vs in data.items()})


# ---------------------------------------------------------------------------------- the paper's Wilcoxon
def test_wilcoxon_hand_example_and_the_papers_dataset_rule() -> None:
    # six STS datasets, differences 0.5 -0.1 0.3 0.2 0.4 0.6: |d| ranks 5 1 3 2 4 6, W- = 1, W+ = 20.
    # Exact two-sided p: sign patterns with W- <= 1 are {} and {rank 1}: 2 of 2^6, doubled = 4/64.
    d = [0.5, -0.1, 0.3, 0.2, 0.4, 0.6]
    sts = {f"S{i}": 0.5 + x for i, x in enumerate(d)}
    clf = {f"C{i}": 0.7 + 0.01 * (i + 1) for i in range(4)}  # 4 datasets: too few for the paper's test
    base = {**{k: 0.5 for k in sts}, **{k: 0.7 for k in clf}}
    cats = {**{k: "STS" for k in sts}, **{k: "Classification" for k in clf}}
    res = {r.scope: r for r in stats.wilcoxon_by_category({"base": base, "x": {**sts, **clf}}, cats, "base")}
    assert res["STS"].statistic == 1.0
    assert res["STS"].p_value == pytest.approx(4 / 64)
    assert res["STS"].delta == pytest.approx(np.mean(d))
    assert res["Classification"].skipped and "4 dataset(s)" in res["Classification"].skipped
    assert res["Classification"].p_value is None and not res["Classification"].tested
    # exactly five datasets, all better: smallest possible two-sided p = 2/32 (the paper's "> 4" rule)
    five = {f"S{i}": 1.0 for i in range(5)}
    r = stats.wilcoxon_by_category({"b": {k: 0.0 for k in five}, "x": five}, {k: "STS" for k in five}, "b")[0]
    assert r.tested and r.p_value == pytest.approx(2 / 32)


def test_wilcoxon_leaves_out_datasets_missing_for_one_side() -> None:
    base = {f"S{i}": 0.5 for i in range(6)}
    x = {f"S{i}": 0.6 for i in range(5)}  # S5 missing
    r = stats.wilcoxon_by_category({"b": base, "x": x}, {k: "STS" for k in base}, "b")[0]
    assert r.n == 5 and "S5" in r.note and r.tested


# ---------------------------------------------------------------------------------- corrections
def test_holm_and_benjamini_hochberg_hand_example() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 = .02 .03 .06 .04 -> running max .02 .03 .06 .06
    holm, rej = stats.adjust_pvalues(p, "holm", 0.05)
    np.testing.assert_allclose(holm, [0.03, 0.06, 0.06, 0.02])
    assert rej.tolist() == [True, False, False, True]
    # BH: sorted p*m/rank = .02 .02 .04 .04 -> running min from the top: same
    bh, rej = stats.adjust_pvalues(p, "bh", 0.05)
    np.testing.assert_allclose(bh, [0.02, 0.04, 0.04, 0.02])
    assert rej.all()
    with pytest.raises(ValueError, match="unknown correction"):
        stats.adjust_pvalues(p, "bonferonni")


def test_correct_family_skips_untested_results() -> None:
    rs = [stats.TestResult("instance", "m", "x", "b", f"T{i}", p_value=p) for i, p in enumerate([0.01, 0.04, 0.03])]
    rs.append(stats.TestResult("instance", "m", "x", "b", "T3", skipped="no instances"))
    stats.correct_family(rs, "holm", 0.05)
    assert [r.p_adjusted for r in rs[:3]] == pytest.approx([0.03, 0.06, 0.06])
    assert [r.significant for r in rs] == [True, False, False, None]


# ---------------------------------------------------------------------------------- Friedman / Nemenyi / CD
def test_friedman_nemenyi_and_critical_difference_hand_example() -> None:
    # 4 datasets, 3 configs always ranked a > b > c: average ranks 1, 2, 3;
    # chi2_F = 12N/(k(k+1)) * (sum R_j^2 - k(k+1)^2/4) = 4 * (14 - 12) = 8, p = exp(-8/2) for 2 dof.
    scores = {"a": {f"D{i}": 0.9 - 0.01 * i for i in range(4)},
              "b": {f"D{i}": 0.8 - 0.01 * i for i in range(4)},
              "c": {f"D{i}": 0.7 for i in range(4)}}
    f = stats.friedman_nemenyi(scores)
    assert f.avg_ranks == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert f.statistic == pytest.approx(8.0)
    assert f.p_value == pytest.approx(math.exp(-4.0))
    # Demsar (2006), table 5: q_0.05 = 2.343 (k=3), 2.728 (k=5); CD = q sqrt(k(k+1)/(6N))
    assert f.cd == pytest.approx(2.343 * math.sqrt(12 / 24), abs=1e-3)
    assert stats.critical_difference(5, 10) == pytest.approx(2.728 * math.sqrt(30 / 60), abs=1e-3)
    # Nemenyi a vs c: rank difference 2, standard error sqrt(k(k+1)/(6N)) = sqrt(1/2): z = 2.828,
    # studentized range statistic z * sqrt(2) = 4
    assert f.nemenyi.loc["a", "c"] == pytest.approx(studentized_range.sf(4.0, 3, np.inf), rel=1e-6)


def test_friedman_leaves_out_incomplete_datasets_and_says_when_it_cannot_run() -> None:
    scores = {"a": {"D0": 1, "D1": 2, "D2": 3}, "b": {"D0": 0, "D1": 1}, "c": {"D0": 2, "D1": 0, "D2": 1}}
    f = stats.friedman_nemenyi(scores)
    assert f.left_out == ["D2"] and f.datasets == ["D0", "D1"] and not f.skipped
    assert "at least 3" in stats.friedman_nemenyi({"a": {"D0": 1}, "b": {"D0": 2}}).skipped
    assert "at least 2" in stats.friedman_nemenyi({"a": {"D0": 1}, "b": {"D0": 2}, "c": {"D1": 1}}).skipped


# ---------------------------------------------------------------------------------- seeds
def test_seed_test_is_welch_by_hand() -> None:
    t, p = stats.seed_test([1, 2, 3], [4, 5, 6])
    # means 2 and 5, variances 1 and 1: t = -3 / sqrt(1/3 + 1/3); Welch dof = 4
    assert t == pytest.approx(-3 / math.sqrt(2 / 3))
    assert p == pytest.approx(2 * t_dist.sf(3 / math.sqrt(2 / 3), 4))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        stats.seed_test([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------- instance-level tests
def test_permutation_hand_example_exact() -> None:
    # differences 1, 2, 3: the 8 sign patterns give mean differences 2, 4/3, 2/3, 0, 0, -2/3, -4/3, -2;
    # |T| >= 2 in 2 of 8 -> p = 0.25
    a, b = _inst("mean", values=[1, 2, 3]), _inst("mean", values=[0, 0, 0])
    o = stats.paired_instance_test([a], [b], n_resamples=1000, rng=0)
    assert o.delta == pytest.approx(2.0) and o.statistic == pytest.approx(2.0)
    assert o.p_value == pytest.approx(0.25)


def _brute_force_p(kind: str, pa, pb, gold=None) -> tuple[float, float]:
    """Exhaustive paired permutation p-value, on the common scale the test uses (via layout.aggregate)."""
    if kind in ("spearman", "average_precision"):
        ta, tb = rankdata(pa), rankdata(pb)
    elif kind == "pearson":
        ta, tb = (pa - pa.mean()) / pa.std(), (pb - pb.mean()) / pb.std()
    else:
        ta, tb = pa, pb

    def score(p):
        return aggregate(kind, values=p) if kind == "mean" else aggregate(kind, pred=p, gold=gold)

    obs = score(ta) - score(tb)
    null = []
    for s in itertools.product([False, True], repeat=len(pa)):
        s = np.array(s)
        null.append(score(np.where(s, tb, ta)) - score(np.where(s, ta, tb)))
    null = np.array(null)
    tol = 1e-12
    return obs, min(1.0, 2 * min(np.mean(null <= obs + tol), np.mean(null >= obs - tol)))


@pytest.mark.parametrize("kind", ["spearman", "pearson", "average_precision", "mean"])
def test_permutation_matches_brute_force_for_every_aggregate(kind: str) -> None:
    rng = np.random.default_rng(1)
    n = 9
    gold = (rng.random(n) < 0.5).astype(float) if kind == "average_precision" else rng.uniform(0, 5, n)
    gold[0] = 1.0
    pa = gold + rng.normal(0, 1, n)
    pb = 3 * gold + rng.normal(0, 4, n) + 10  # another scale: swapping raw predictions would be meaningless
    kw = (lambda p: {"values": p}) if kind == "mean" else (lambda p: {"pred": p, "gold": gold})
    o = stats.paired_instance_test([_inst(kind, **kw(pa))], [_inst(kind, **kw(pb))], n_resamples=1000, rng=0)
    obs, p = _brute_force_p(kind, pa, pb, gold)
    assert o.p_value == pytest.approx(p)
    # delta is the difference of the real main scores (the common scale changes nothing for these scores)
    real = aggregate(kind, **kw(pa)) - aggregate(kind, **kw(pb))
    assert o.delta == pytest.approx(real)
    if kind != "pearson":  # a z-score is affine: pearson unchanged; ranks: spearman / AP unchanged
        assert obs == pytest.approx(real)


def test_randomised_permutation_agrees_with_exact_enumeration() -> None:
    rng = np.random.default_rng(2)
    n = 13  # 8192 patterns > 3000 resamples: the vectorised random path runs
    a, b = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
    obs, exact = _brute_force_p("mean", a, b)
    o = stats.paired_instance_test([_inst("mean", values=a)], [_inst("mean", values=b)], n_resamples=3000, rng=0)
    assert o.statistic == pytest.approx(obs)
    assert abs(o.p_value - exact) < 4 * math.sqrt(exact * (1 - exact) / 3000) + 1e-3


@pytest.mark.parametrize("kind", ["mean", "spearman", "pearson", "average_precision"])
def test_vectorised_resample_scores_equal_instance_scores_score(kind: str) -> None:
    rng = np.random.default_rng(3)
    n = 150
    gold = (rng.random(n) < 0.4).astype(float) if kind == "average_precision" else np.round(rng.uniform(0, 5, n), 1)
    pred = np.round(gold + rng.normal(0, 1.2, n), 1)  # rounded: many ties
    inst = _inst(kind, values=rng.random(n)) if kind == "mean" else _inst(kind, pred=pred, gold=gold)
    idx = np.vstack([rng.integers(0, n, (40, n)), np.arange(n)[None, :]])
    got = stats.resample_scores(kind, idx, values=inst.values, pred=inst.pred, gold=inst.gold)
    want = [inst.score(i) for i in idx]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    short = rng.integers(0, n, (5, n - 1))  # the bootstrap's jackknife uses n - 1 rows
    np.testing.assert_allclose(stats.resample_scores(kind, short, values=inst.values, pred=inst.pred, gold=inst.gold),
                               [inst.score(i) for i in short], rtol=0, atol=1e-12)


def test_bootstrap_ci_and_replicates() -> None:
    rng = np.random.default_rng(4)
    n = 300
    gold = rng.uniform(0, 5, n)
    shared = rng.normal(size=n)
    good = [_inst("spearman", pred=gold + 0.6 * shared + 0.5 * rng.normal(size=n), gold=gold) for _ in range(2)]
    bad = [_inst("spearman", pred=gold + 0.6 * shared + 1.5 * rng.normal(size=n), gold=gold) for _ in range(3)]
    o = stats.paired_instance_test(good, bad, n_resamples=2000, rng=0)
    want = np.mean([g.score() for g in good]) - np.mean([b.score() for b in bad])
    assert o.delta == pytest.approx(want)
    assert o.statistic == pytest.approx(want)  # 2 x 3 replicates: every pair, so the statistic is delta
    assert 0 < o.ci_low < o.delta < o.ci_high
    assert o.p_value < 0.01
    # the same model on both sides: no difference, CI [0, 0], p = 1
    same = stats.paired_instance_test(good[:1], good[:1], n_resamples=500, rng=0)
    assert same.delta == 0 and same.ci_low == 0 and same.ci_high == 0 and same.p_value == 1.0
    # mean aggregate with 1 vs 3 replicates: values are averaged per instance, the statistic is delta
    vals = [rng.random(n) for _ in range(4)]
    m = stats.paired_instance_test([_inst("mean", values=vals[0])], [_inst("mean", values=v) for v in vals[1:]],
                                   n_resamples=500, rng=0)
    assert m.statistic == pytest.approx(vals[0].mean() - np.mean([v.mean() for v in vals[1:]]))


def test_instances_pair_by_id_and_mismatches_are_refused() -> None:
    a = _inst("mean", ids=["q1", "q2", "q3", "q4"], values=[1, 0, 1, 1])
    b = _inst("mean", ids=["q4", "q3", "q2", "q1"], values=[1, 1, 0, 0])  # same instances, other order
    o = stats.paired_instance_test([a], [b], n_resamples=100, rng=0)
    assert o.delta == pytest.approx(0.25)
    # the only difference is q1 (1 vs 0): swapping it or not gives +-0.25, every other swap changes nothing
    assert o.p_value == pytest.approx(1.0)
    other = _inst("mean", ids=["q1", "q2", "q3", "q9"], values=[1, 0, 1, 1])
    with pytest.raises(stats.InstanceMismatch, match="instance ids differ: 1 only in a baseline run"):
        stats.paired_instance_test([a], [other])
    g1 = _inst("spearman", pred=[1, 2, 3], gold=[1, 2, 3])
    g2 = _inst("spearman", pred=[1, 2, 3], gold=[3, 2, 1])
    with pytest.raises(stats.InstanceMismatch, match="gold labels differ"):
        stats.paired_instance_test([g1], [g2])
    with pytest.raises(stats.InstanceMismatch, match="aggregates differ"):
        stats.paired_instance_test([a], [_inst("pearson", ids=a.ids, pred=[1, 2, 3, 4], gold=[1, 2, 3, 4])])
