"""sweeps.report on synthetic sweeps with known effects, on bad input, and on real mteb.evaluate output.

The synthetic sweeps are written by sweeps.synthetic_results in the exact layout of sweeps.layout; the
real fixture runs all-MiniLM-L6-v2 through mteb.evaluate on two subsampled local STS tasks (real mteb, real
data) and adds a second config whose predictions are perturbed.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

if "MTEB_CACHE" not in os.environ:  # mteb creates its default cache folder at import time
    os.environ["MTEB_CACHE"] = tempfile.mkdtemp(prefix="embed-sweeps-test-mteb-cache-")
    atexit.register(shutil.rmtree, os.environ["MTEB_CACHE"], True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from embed_core.errors import ConfigError, DataError  # noqa: E402
from sweeps import layout  # noqa: E402
from sweeps.report import build_report, console_table, main  # noqa: E402
from sweeps.results import load_results  # noqa: E402
from sweeps.synthetic_results import mteb_task_result, write_synthetic_sweep  # noqa: E402

BASE = "eos_last+causal"
STRONG, NULL, WORSE = "multi_layer_trainable+bidirectional", "mean+causal", "last_layer_trainable+causal"
EFFECTS = {BASE: 0.0, NULL: 0.0, STRONG: 0.8, WORSE: -0.5}
TASKS = {
    **{f"SynSTS-{i}": ("STS", "spearman", "cosine_spearman") for i in range(1, 11)},  # 10: the Wilcoxon can reach p < .05
    **{f"SynClassification-{i}": ("Classification", "mean", "accuracy") for i in range(1, 4)},  # 3: too few
    "SynPairClassification-1": ("PairClassification", "average_precision", "max_ap"),
}


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A sweep with known effects and its report (built once for the tests below)."""
    sweep = write_synthetic_sweep(tmp_path_factory.mktemp("known"), effects=EFFECTS, tasks=TASKS, n_instances=120,
                                  seeds={BASE: [0, 1, 2], STRONG: [0, 1, 2], NULL: [0], WORSE: [0]})
    summary = build_report(sweep.sweep_dir, n_resamples=3000, show_progress=False)
    return sweep, summary


def _json_scores(results: Path, config: str) -> dict[str, list[float]]:
    """Main scores per task of every checkpoint of `config`, read straight from the mteb JSON files."""
    out: dict[str, list[float]] = {}
    for labels_file in results.glob(f"*/*/{layout.LABELS_FILE}"):
        if json.loads(labels_file.read_text())["design"] != config:
            continue
        for f in labels_file.parent.glob("Syn*.json"):
            obj = json.loads(f.read_text())
            out.setdefault(obj["task_name"], []).append(obj["scores"]["test"][0]["main_score"])
    return out


def test_known_effects_are_found_and_the_null_is_not(known) -> None:
    sweep, s = known
    (g,) = s.groups
    assert g.designs[0] == BASE and g.baseline_present
    # the baseline's absolute scores are the mean over its seeds of mteb's main scores
    for task, vals in _json_scores(sweep.results_dir, BASE).items():
        assert len(vals) == 3 and g.mean[BASE][task] == pytest.approx(np.mean(vals))
    strong_scores = _json_scores(sweep.results_dir, STRONG)
    for task in TASKS:
        assert g.mean[STRONG][task] - g.mean[BASE][task] == pytest.approx(
            np.mean(strong_scores[task]) - g.mean[BASE][task])
    # the paper's Wilcoxon: STS has 10 datasets and is tested, Classification (3) and PairClassification (1) not
    w = {(r.design, r.scope): r for r in g.wilcoxon}
    assert w[(STRONG, "STS")].significant and w[(STRONG, "STS")].delta > 0
    assert w[(WORSE, "STS")].significant and w[(WORSE, "STS")].delta < 0
    assert w[(NULL, "STS")].significant is False
    assert not w[(STRONG, "Classification")].tested
    assert any("Wilcoxon, Classification: not tested for any design: 3 dataset(s)" in x for x in s.skipped)
    # per-dataset tests: the strong design wins nearly everywhere, the null design nowhere
    inst = {(r.design, r.scope): r for r in g.instance}
    assert len(inst) == 3 * len(TASKS) and all(r.tested for r in inst.values())
    assert sum(inst[(STRONG, t)].significant and inst[(STRONG, t)].delta > 0 for t in TASKS) >= len(TASKS) - 2
    assert all(inst[(WORSE, t)].delta < 0 for t in TASKS)  # single seed, weaker effect: less power
    assert sum(inst[(WORSE, t)].significant for t in TASKS) >= len(TASKS) // 2
    assert not any(inst[(NULL, t)].significant for t in TASKS)
    for r in inst.values():
        assert r.ci_low <= r.delta <= r.ci_high and r.p_adjusted >= r.p_value
    # seeds: 3 vs 3 seeds for the strong design; single-seed designs are listed as not testable
    overall = next(r for r in g.seeds if r.design == STRONG and r.scope == "overall")
    assert overall.significant and overall.delta > 0
    assert any("single seed" in x and NULL in x and WORSE in x for x in s.skipped)
    # Friedman / Nemenyi: the strong design ranks first, the worse one last
    ranks = g.friedman.avg_ranks
    assert min(ranks, key=ranks.get) == STRONG and max(ranks, key=ranks.get) == WORSE
    assert g.friedman.p_value < 1e-6 and g.friedman.nemenyi.loc[STRONG, WORSE] < 0.05
    # best LoRA rank / LR per cell: the finished trial with the best validation metric
    trials = layout.read_trials(sweep.sweep_dir)
    for row in s.best_per_cell:
        done = [t for t in trials if t.cell == row["cell"] and t.status == "TERMINATED"]
        best = max(done, key=lambda t: t.val_metric)
        assert (row["lora_r"], row["lr"], row["best_trial"]) == (best.lora_r, best.lr, best.trial_id)


def test_report_files_console_table_and_summary(known) -> None:
    sweep, s = known
    out = sweep.sweep_dir / layout.REPORT_DIR  # the layout's place, beside results/
    assert s.out_dir == out
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"score_vs_cost.png"} | {f"{k}_synthetic_base-A.png" for k in ("heatmap", "cd", "seeds")} <= set(pngs)
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):  # every image the Markdown links exists
        assert (out / name).is_file()
    assert html.count("data:image/png;base64,") == len(pngs) and "src='data:image/png" in html
    assert not re.search(r"src=['\"](?!data:)", html)  # self-contained: nothing loaded from files
    for text in ("Per category (the paper's table)", "Per task", "Wilcoxon", "Friedman", "Seeds",
                 "best LoRA rank / LR per cell", "Skipped comparisons", "Methods and caveats"):
        assert text in md and text.replace("'", "&#x27;") in html
    summary = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON, no NaN
    assert summary["format"] == "embed_sweeps.report/v1" and summary["skipped"] == s.skipped
    table = console_table(s)
    rows = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in EFFECTS}
    assert "(baseline)" in rows[BASE] and "*" not in rows[BASE]
    assert re.search(r"\+0\.\d{4}\*", rows[STRONG]) and "*" not in rows[NULL]
    assert str(s.html) in table


def test_cli_and_clear_errors(tmp_path: Path, capsys) -> None:
    sweep = write_synthetic_sweep(tmp_path / "sw", effects={BASE: 0.0, STRONG: 0.8}, n_instances=40,
                                  tasks={"SynSTS-1": TASKS["SynSTS-1"], "SynClassification-1": TASKS["SynClassification-1"]},
                                  seeds={BASE: [0], STRONG: [0]})
    out = tmp_path / "rep"
    rc = main([str(sweep.results_dir), "--out", str(out), "--correction", "bh", "--resamples", "300",
               "--no-plots", "--quiet", "--baseline", BASE])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Benjamini-Hochberg" in printed and (out / "report.html").is_file() and not list(out.glob("*.png"))
    assert "Benjamini-Hochberg" in (out / "report.md").read_text()
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no checkpoint results under"):
        build_report(empty)
    with pytest.raises(ConfigError, match="unknown correction"):
        build_report(sweep.sweep_dir, correction="bonferroni")
    with pytest.raises(DataError, match="trials file"):
        build_report(sweep.sweep_dir, trials=tmp_path / "missing.json")


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_still_renders_and_says_what_was_skipped(tmp_path: Path) -> None:
    tasks = {"SynSTS-1": TASKS["SynSTS-1"], "SynSTS-2": TASKS["SynSTS-2"],
             "SynClassification-1": TASKS["SynClassification-1"], "SynPairClassification-1": TASKS["SynPairClassification-1"]}
    sweep = write_synthetic_sweep(tmp_path / "sw", effects={BASE: 0.0, STRONG: 0.8, WORSE: -0.5, NULL: 0.0},
                                  tasks=tasks, n_instances=50, seeds={BASE: [0, 1], STRONG: [0], WORSE: [0], NULL: [0]})
    runs = {json.loads(p.read_text())["design"] + f"/{json.loads(p.read_text())['seed']}": p.parent
            for p in sweep.results_dir.glob(f"*/*/{layout.LABELS_FILE}")}
    # 1. a task missing for a config
    (runs[f"{WORSE}/0"] / "SynSTS-2.json").unlink()
    # 2. instance ids that do not match the baseline's
    f = runs[f"{STRONG}/0"] / layout.INSTANCES_DIR / "SynSTS-1.json"
    obj = json.loads(f.read_text())
    obj["ids"] = [f"other-{i}" for i in range(len(obj["ids"]))]
    f.write_text(json.dumps(obj))
    # 3. no per-instance scores at all for a run
    shutil.rmtree(runs[f"{NULL}/0"] / layout.INSTANCES_DIR)
    # 4. a corrupt task result file
    (runs[f"{STRONG}/0"] / "SynClassification-1.json").write_text("{not json")
    # 5. a checkpoint folder without run labels (an extra model, e.g. copied from an mteb cache)
    stray = sweep.results_dir / "someone__model" / "abc123"
    stray.mkdir(parents=True)
    (stray / "SynSTS-1.json").write_text(json.dumps(mteb_task_result("SynSTS-1", "cosine_spearman", 0.5)))
    s = build_report(sweep.sweep_dir, n_resamples=400, show_progress=False)
    html = (s.out_dir / "report.html").read_text()
    skipped = "\n".join(s.skipped)
    assert f"{WORSE}: no result for SynSTS-2" in skipped
    assert re.search(rf"per-dataset test {re.escape(STRONG)} vs {re.escape(BASE)} on SynSTS-1: skipped, instance ids differ: "
                     r"\d+ only in a baseline run", skipped)
    assert f"per-dataset test {NULL} vs {BASE} on SynSTS-1: skipped, no per-instance scores" in skipped
    assert f"per-dataset test {STRONG} vs {BASE} on SynClassification-1: skipped, {STRONG} has no result" in skipped
    # single dataset per category (4 categories with 1-2 datasets): the paper's test is never run
    assert all(not r.tested for g in s.groups for r in g.wilcoxon)
    assert "Wilcoxon, PairClassification: not tested for any design: 1 dataset(s)" in skipped
    assert any("SynClassification-1.json: skipped" in p and "not valid JSON" in p for p in s.problems)
    assert any("someone__model/abc123: run_labels.json missing" in p for p in s.problems)
    # the unlabelled model is its own group, without the baseline: rendered in absolute terms, nothing tested
    stray_group = next(g for g in s.groups if g.base_model == "(no base model)")
    assert not stray_group.baseline_present and not stray_group.instance
    assert "is not among this base model's designs" in skipped
    # what could still be compared was: the strong config on the other datasets
    ok = {r.scope for g in s.groups for r in g.instance if r.design == STRONG and r.tested}
    assert ok == {"SynSTS-2", "SynPairClassification-1"}
    for line in s.skipped + s.problems:  # every reason is in the HTML report
        assert line.replace("&", "&amp;").replace("'", "&#x27;").replace('"', "&quot;").replace(
            "<", "&lt;").replace(">", "&gt;") in html
    # a baseline that is not there at all
    s2 = build_report(sweep.sweep_dir, tmp_path / "nobase", baseline="mean+bidirectional", n_resamples=100,
                      show_progress=False, plots=True)
    g = next(g for g in s2.groups if g.base_model == "synthetic/base-A")
    assert not g.baseline_present and not g.wilcoxon and not g.instance and not g.seeds
    assert g.friedman.avg_ranks  # ranks across designs need no baseline
    assert "no comparison against a baseline" in (s2.out_dir / "report.md").read_text()
    assert "baseline mean+bidirectional missing" in console_table(s2)


# ---------------------------------------------------------------------------------- real mteb output
@pytest.fixture(scope="module")
def real_results(tmp_path_factory):
    """MiniLM through real mteb.evaluate on two subsampled local STS tasks, laid out as the evaluation job does
    (mteb's TaskResult JSON, instances from mteb's saved predictions), plus a second config whose predictions
    are perturbed (its TaskResult JSON copied with the new scores)."""
    import mteb
    from scipy.stats import spearmanr

    from embed_core.mteb_tasks import local_task
    from embed_core.reference_encoder import minilm_reference_encoder

    tmp = tmp_path_factory.mktemp("real")
    enc = minilm_reference_encoder()
    tasks = [local_task("STSBenchmark", subsample=100), local_task("SICK-R", subsample=100)]
    cache = mteb.ResultCache(tmp / "cache")
    mteb.evaluate(enc, tasks, cache=cache, prediction_folder=tmp / "predictions", show_progress_bar=False)
    meta = enc.mteb_model_meta
    src = layout.result_dir(tmp / "cache" / "results", meta.name, meta.revision)
    sweep = tmp / "sweep"
    base_dir = layout.result_dir(sweep / "results", "real/eos_last-causal", meta.revision)
    pert_dir = layout.result_dir(sweep / "results", "real/multi_layer-bidirectional", "perturbed0001")
    shutil.copytree(src, base_dir)
    pert_dir.mkdir(parents=True)
    layout.RunLabels(design=BASE, base_model="minilm-reference").write(base_dir)
    layout.RunLabels(design=STRONG, base_model="minilm-reference").write(pert_dir)
    rng = np.random.default_rng(0)
    expected = {}
    for task in tasks:
        name = task.metadata.name
        predictions = json.loads((tmp / "predictions" / f"{name}_predictions.json").read_text())
        pred = np.asarray(predictions["default"]["test"]["cosine_scores"], dtype=float)  # mteb's own similarities
        task.load_data()  # mteb unloads the data after evaluating
        gold = np.asarray(task.dataset["test"]["score"], dtype=float)
        res = json.loads((base_dir / f"{name}.json").read_text())
        main_score = res["scores"]["test"][0]["main_score"]
        # task_type left empty: the category must come from mteb's task metadata
        inst = layout.InstanceScores(task=name, task_type="", split="test", subset="default",
                                     main_score="cosine_spearman", value=main_score, aggregate="spearman",
                                     ids=[str(i) for i in range(len(gold))], pred=pred.tolist(), gold=gold.tolist())
        assert inst.score() == pytest.approx(main_score, abs=1e-6)  # our instances reproduce mteb's main score
        inst.write(base_dir)
        noisy = pred + rng.normal(0, 0.15, len(pred))
        p_score = float(spearmanr(noisy, gold).statistic)
        layout.InstanceScores(task=name, task_type="", split="test", subset="default", main_score="cosine_spearman",
                              value=round(p_score, 6), aggregate="spearman", ids=inst.ids, pred=noisy.tolist(),
                              gold=inst.gold).write(pert_dir)
        for entry in res["scores"]["test"]:
            entry["main_score"] = entry["cosine_spearman"] = round(p_score, 6)
        (pert_dir / f"{name}.json").write_text(json.dumps(res, indent=2))
        expected[name] = (main_score, round(p_score, 6))
    return sweep, expected


@pytest.mark.slow
def test_report_on_real_mteb_results(real_results) -> None:
    import mteb

    sweep, expected = real_results
    for f in (sweep / "results").glob("*/*/S*.json"):  # the perturbed copies are still mteb TaskResults
        assert mteb.TaskResult.from_disk(f).get_score() == pytest.approx(
            expected[f.stem][0 if "eos_last" in str(f) else 1])
    res = load_results(sweep)
    assert res.categories == {"SICK-R": "STS", "STSBenchmark": "STS"}
    assert res.category_source == {"SICK-R": "mteb", "STSBenchmark": "mteb"} and not res.problems
    s = build_report(sweep, n_resamples=2000, show_progress=False)
    (g,) = s.groups
    for task, (base_score, pert_score) in expected.items():
        assert g.mean[BASE][task] == pytest.approx(base_score)
        r = g.test("instance", STRONG, task)
        assert r.tested and r.n == 100
        assert r.delta == pytest.approx(pert_score - base_score, abs=2e-6)
        assert r.ci_low < r.delta < r.ci_high
    assert any("Wilcoxon, STS: not tested for any design: 2 dataset(s)" in x for x in s.skipped)
    assert "Friedman / Nemenyi: skipped, 2 design(s)" in "\n".join(s.skipped)
    assert (s.out_dir / "report.html").is_file() and (s.out_dir / "heatmap_minilm-reference.png").is_file()
    assert f"{expected['STSBenchmark'][0]:.4f}" in console_table(s)


def test_records_written_before_the_design_rename_are_read_the_same(tmp_path, known):
    """run_labels.json and trials.json of earlier versions call the design id ``config``: a copy of the known sweep
    rewritten that way gives the same records and the same report numbers."""
    import shutil

    sweep, summary = known
    old = tmp_path / "old"
    shutil.copytree(sweep.sweep_dir, old, ignore=shutil.ignore_patterns("report"))
    for f in [*old.glob(f"results/*/*/{layout.LABELS_FILE}"), old / layout.TRIALS_FILE]:
        f.write_text(f.read_text().replace('"design":', '"config":'))
    assert '"config":' in (old / layout.TRIALS_FILE).read_text()
    assert [t.to_dict() for t in layout.read_trials(old)] == [t.to_dict() for t in layout.read_trials(sweep.sweep_dir)]
    again = build_report(old, n_resamples=3000, show_progress=False, plots=False)
    assert [g.mean for g in again.groups] == [g.mean for g in summary.groups]
    assert [(r.design, r.scope, r.p_value) for g in again.groups for r in g.wilcoxon] == \
        [(r.design, r.scope, r.p_value) for g in summary.groups for r in g.wilcoxon]
    assert again.best_per_cell == summary.best_per_cell


def test_a_summary_written_before_the_design_rename_reads_as_a_new_one(known):
    """summary.json of earlier versions calls the design ids ``configs`` (a group's, Friedman's) and ``config`` (each
    test's, each best cell's): read through the layout, it equals the one written now."""
    sweep, _ = known
    path = sweep.sweep_dir / layout.REPORT_DIR / layout.SUMMARY_FILE
    new = path.read_text()
    assert '"configs":' not in new and '"config":' not in new and '"design":' in new
    try:
        path.write_text(new.replace('"designs":', '"configs":').replace('"design":', '"config":'))
        old = layout.read_summary(sweep.sweep_dir)
    finally:
        path.write_text(new)
    assert old == layout.read_summary(sweep.sweep_dir) == json.loads(new)


def test_per_dataset_tests_in_a_process_pool_equal_the_serial_ones(tmp_path: Path, monkeypatch) -> None:
    """Large tasks' tests run in spawned processes; each test draws from its own generator, so the pool changes
    nothing but the time (the pool starts only above POOL_MIN_INSTANCES: lowered here)."""
    import sweeps.analysis as analysis

    sweep = write_synthetic_sweep(tmp_path / "sw", effects={BASE: 0.0, STRONG: 0.3, NULL: 0.0}, n_instances=60,
                                  tasks=dict(list(TASKS.items())[:2]), seeds={BASE: [0, 1], STRONG: [0, 1], NULL: [0]})
    monkeypatch.setenv("EMBED_REPORT_WORKERS", "1")
    serial = build_report(sweep.sweep_dir, n_resamples=500, show_progress=False)
    monkeypatch.setenv("EMBED_REPORT_WORKERS", "2")
    monkeypatch.setattr(analysis, "POOL_MIN_INSTANCES", 0)
    pooled = build_report(sweep.sweep_dir, n_resamples=500, show_progress=False)
    (a,), (b,) = serial.groups, pooled.groups
    assert len(a.instance) == 4 and [r.to_dict() for r in a.instance] == [r.to_dict() for r in b.instance]
    assert all(r.p_value is not None for r in b.instance)
