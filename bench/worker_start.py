"""Ray's own share of a trial's start-up: how long a one-worker `TorchTrainer` with an empty loop takes from its
construction to the loop's first line, alone and as N Tune function trials started at once (the sweep's shape:
Tune's trial actor, Train's controller, the worker). No model, no data, nothing of this project's: the sweep's
`worker_group_s` (bench/sweep_gpu.py's `startup_profile_s`) less this is what the sweep's own code adds.

    python -m bench.worker_start --trials 2 --out bench/results/worker_start_cpu.json          # this CPU
    source .devstage1/gpu_env.sh && python -m bench.worker_start --trials 5 --gpu --out $OUT/worker_start.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _loop(config: dict) -> None:
    import time
    from pathlib import Path

    # a file, not ray.train.report: Train keeps no metrics reported without a checkpoint
    Path(config["record"]).write_text(str(time.time() - config["built_at"]))


def _enter_s(use_gpu: bool, share: float, storage: str, name: str) -> float:
    """Build a one-worker TorchTrainer with an empty loop, fit it: seconds from its construction to the loop."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    record = Path(storage) / f"{name}.enter_s"
    per_worker = {"CPU": 1, **({"GPU": share} if use_gpu else {})}
    TorchTrainer(_loop, train_loop_config={"built_at": time.time(), "record": str(record)},
                 scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=per_worker),
                 run_config=RunConfig(storage_path=storage, name=name)).fit()
    return round(float(record.read_text()), 2)


def alone(use_gpu: bool, storage: str, runs: int) -> list[float]:
    """`runs` TorchTrainers one after another: seconds from construction to the loop."""
    return [_enter_s(use_gpu, 1.0, storage, f"alone{i}") for i in range(runs)]


def in_tune(use_gpu: bool, storage: str, trials: int) -> list[float]:
    """`trials` Tune function trials started at once, each starting a TorchTrainer (the sweep's trial driver)."""
    from ray import tune

    def trial(config: dict) -> None:
        tune.report({"enter_s": _enter_s(use_gpu, 1.0 / trials, storage, f"t{config['i']}")})

    grid = tune.Tuner(tune.with_resources(trial, {"CPU": 0.01}),
                      param_space={"i": tune.grid_search(list(range(trials)))},
                      tune_config=tune.TuneConfig(max_concurrent_trials=trials),
                      run_config=tune.RunConfig(storage_path=storage, name="tune", verbose=0)).fit()
    return sorted(r.metrics["enter_s"] for r in grid)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--alone-runs", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from bench.sweep_gpu import device_name, versions

    storage = tempfile.mkdtemp(prefix="worker_start_")
    t = time.time()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    out = {"device": device_name() if args.gpu else f"cpu x{os.cpu_count()}", "versions": versions(),
           "settings": {"trials": args.trials, "alone_runs": args.alone_runs, "use_gpu": args.gpu,
                        "health_check_interval_s": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "default")},
           "ray_init_s": round(time.time() - t, 2)}
    out["alone_enter_s"] = alone(args.gpu, storage, args.alone_runs)
    out["tune_enter_s"] = in_tune(args.gpu, storage, args.trials)
    out["tune_enter_median_s"] = statistics.median(out["tune_enter_s"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("device", "ray_init_s", "alone_enter_s", "tune_enter_s")}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
