"""Ray's own share of a trial's start-up: how long a one-worker `TorchTrainer` takes from its construction to the
loop's first line (``enter_s``), alone and as N Tune function trials started at once (the sweep's shape: Tune's
trial actor, Train's controller, the worker). With ``--imports`` the loop then imports what the Trainer's build
imports (`IMPORTS`) and the time to that point is kept too (``ready_s``). Without: no model, no data, nothing of
this project's: the sweep's `worker_group_s` (bench/sweep_gpu.py's `startup_profile_s`) less ``enter_s`` is what
the sweep's own code adds.

    python -m bench.worker_start --trials 2 --imports --out bench/results/worker_start_cpu.json          # this CPU
    source .devstage1/gpu_env.sh && python -m bench.worker_start --trials 5 --gpu --imports --out $OUT/ws.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# what `Trainer(...)` imports on its way to the first step (torch is Ray Train's own: its backend imports it)
IMPORTS = ("embed_core.trainer", "transformers", "deepspeed", "peft", "embed_core.model")


def _loop(config: dict) -> None:
    import importlib
    import json
    import time
    from pathlib import Path

    enter = time.time() - config["built_at"]
    for name in config["imports"]:
        importlib.import_module(name)
    # a file, not ray.train.report: Train keeps no metrics reported without a checkpoint
    Path(config["record"]).write_text(json.dumps({"enter_s": round(enter, 2),
                                                  "ready_s": round(time.time() - config["built_at"], 2)}))


def _run(use_gpu: bool, share: float, storage: str, name: str, imports: tuple[str, ...]) -> dict:
    """Build a one-worker TorchTrainer, fit it: seconds from its construction to the loop (``enter_s``) and to the
    end of the loop's imports (``ready_s``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    record = Path(storage) / f"{name}.json"
    per_worker = {"CPU": 1, **({"GPU": share} if use_gpu else {})}
    TorchTrainer(_loop, train_loop_config={"built_at": time.time(), "record": str(record), "imports": imports},
                 scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=per_worker),
                 run_config=RunConfig(storage_path=storage, name=name)).fit()
    return json.loads(record.read_text())


def in_tune(use_gpu: bool, storage: str, trials: int, imports: tuple[str, ...]) -> list[dict]:
    """`trials` Tune function trials started at once, each starting a TorchTrainer (the sweep's trial driver)."""
    from ray import tune

    def trial(config: dict) -> None:
        tune.report(_run(use_gpu, 1.0 / trials, storage, f"t{config['i']}", imports))

    grid = tune.Tuner(tune.with_resources(trial, {"CPU": 0.01}),
                      param_space={"i": tune.grid_search(list(range(trials)))},
                      tune_config=tune.TuneConfig(max_concurrent_trials=trials),
                      run_config=tune.RunConfig(storage_path=storage, name="tune", verbose=0)).fit()
    return sorted(({k: r.metrics[k] for k in ("enter_s", "ready_s")} for r in grid), key=lambda m: m["ready_s"])


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--alone-runs", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--imports", action="store_true", help="the loop imports what the Trainer's build imports")
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
    imports = IMPORTS if args.imports else ()
    out["settings"]["imports"] = list(imports)
    out["alone"], out["tune"] = [], []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every run: a call cut short keeps what it measured
        out["median_s"] = {f"{kind}_{key}": _median(out[kind], key) for kind in ("alone", "tune") if out[kind]
                           for key in ("enter_s", "ready_s")}
        Path(args.out).write_text(json.dumps(out, indent=1))

    for i in range(args.alone_runs):
        out["alone"].append(_run(args.gpu, 1.0, storage, f"alone_{i}", imports))  # one TorchTrainer by itself
        save()
    out["tune"] = in_tune(args.gpu, storage, args.trials, imports)
    save()
    print(json.dumps({k: out[k] for k in ("device", "ray_init_s", "median_s")}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
