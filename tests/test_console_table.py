"""sweeps.report.console_table tells tasks apart when their names are too long for a column."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("MTEB_CACHE", tempfile.mkdtemp(prefix="embed-sweeps-test-mteb-cache-"))

from sweeps.report import _abbrev, build_report, console_table  # noqa: E402
from sweeps.synthetic_results import write_synthetic_sweep  # noqa: E402

LONG = ("SynLongSharedPrefixTaskAlpha", "SynLongSharedPrefixTaskBeta")


def test_long_task_names_sharing_a_prefix_stay_distinct(tmp_path) -> None:
    assert _abbrev(LONG[0], 14) == _abbrev(LONG[1], 14)  # the premise: cut to a column, they look the same
    tasks = {**{t: ("STS", "spearman", "cosine_spearman") for t in LONG},
             "SynShort": ("STS", "spearman", "cosine_spearman")}
    sweep = write_synthetic_sweep(tmp_path / "sw", effects={"eos_last+causal": 0.0, "mean+causal": 0.3},
                                  tasks=tasks, n_instances=30, seeds={"eos_last+causal": [0], "mean+causal": [0]},
                                  trials=False)
    table = console_table(build_report(sweep.sweep_dir, n_resamples=99, plots=False, show_progress=False))
    header = next(line for line in table.splitlines() if "SynShort" in line)
    heads = header.split()
    long_heads = [h for h in heads if h.startswith("SynLong")]
    assert len(long_heads) == 2 and len(set(long_heads)) == 2, header
    assert all(len(h) <= 14 for h in long_heads)
    legend = next(line for line in table.splitlines() if line.startswith("tasks: "))
    for h, name in zip(long_heads, LONG):  # each numbered header resolves to its own full name
        tag = h[h.index("["):]
        assert f"{tag} = {name}" in legend, legend
    assert "SynShort" in heads and "SynShort" not in legend  # names that fit are left alone
