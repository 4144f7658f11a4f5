"""Ray's own share of a trial's start-up: how long a one-worker `TorchTrainer` takes from its construction to the
loop's first line, alone and as N Tune function trials started at once (the sweep's shape: Tune's trial actor,
Train's controller, the worker). With ``--imports`` the loop then imports what the Trainer's build imports
(`ray_jobs.worker_warmup.MODULES`) and the time to that point is kept too (``ready_s``); ``--warm both`` runs
everything twice, without and with the workers' warm-up hook (`ray_jobs.worker_warmup`, which the sweep's trials
use), alternating, so the two are measured on the same machine in the same minutes. Without ``--imports``: no
model, no data, nothing of this project's: the sweep's `worker_group_s` (bench/sweep_gpu.py's
`startup_profile_s`) less this is what the sweep's own code adds.

    python -m bench.worker_start --trials 2 --imports --warm both --out bench/results/worker_start_cpu.json
    source .devstage1/gpu_env.sh && python -m bench.worker_start --trials 5 --gpu --imports --warm both --out J
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
    import importlib
    import json
    import time
    from pathlib import Path

    import sys

    from ray_jobs import worker_warmup

    enter = time.time() - config["built_at"]
    lead = worker_warmup.lead_s(time.time())  # None: the warm-up hook did not run in this worker
    loaded = [name for name in config["imports"] if name in sys.modules]  # already, when the loop began
    worker_warmup.wait()                      # as train_loop_per_worker does
    for name in config["imports"]:
        importlib.import_module(name)
    # a file, not ray.train.report: Train keeps no metrics reported without a checkpoint
    Path(config["record"]).write_text(json.dumps({"enter_s": round(enter, 2),
                                                  "ready_s": round(time.time() - config["built_at"], 2),
                                                  "loaded_at_enter": loaded, "warm_lead_s": lead}))


def _run(use_gpu: bool, share: float, storage: str, name: str, imports: tuple[str, ...], warm: bool) -> dict:
    """Build a one-worker TorchTrainer, fit it: seconds from its construction to the loop (``enter_s``) and to the
    end of the loop's imports (``ready_s``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_jobs import worker_warmup

    record = Path(storage) / f"{name}.json"
    per_worker = {"CPU": 1, **({"GPU": share} if use_gpu else {})}
    TorchTrainer(_loop, train_loop_config={"built_at": time.time(), "record": str(record), "imports": imports},
                 scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=per_worker),
                 run_config=RunConfig(storage_path=storage, name=name,
                                      worker_runtime_env=worker_warmup.runtime_env() if warm else None)).fit()
    return json.loads(record.read_text())


def alone(use_gpu: bool, storage: str, tag: str, imports: tuple[str, ...], warm: bool) -> dict:
    """One TorchTrainer by itself."""
    return _run(use_gpu, 1.0, storage, f"alone_{tag}", imports, warm)


def in_tune(use_gpu: bool, storage: str, tag: str, trials: int, imports: tuple[str, ...], warm: bool) -> list[dict]:
    """`trials` Tune function trials started at once, each starting a TorchTrainer (the sweep's trial driver)."""
    from ray import tune

    def trial(config: dict) -> None:
        tune.report(_run(use_gpu, 1.0 / trials, storage, f"{tag}_t{config['i']}", imports, warm))

    grid = tune.Tuner(tune.with_resources(trial, {"CPU": 0.01}),
                      param_space={"i": tune.grid_search(list(range(trials)))},
                      tune_config=tune.TuneConfig(max_concurrent_trials=trials),
                      run_config=tune.RunConfig(storage_path=storage, name=f"tune_{tag}", verbose=0)).fit()
    return sorted(({k: r.metrics[k] for k in ("enter_s", "ready_s", "loaded_at_enter", "warm_lead_s")} for r in grid),
                  key=lambda m: m["ready_s"])


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--alone-runs", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--imports", action="store_true", help="the loop imports what the Trainer's build imports")
    p.add_argument("--warm", choices=("off", "on", "both"), default="off",
                   help="the workers' warm-up hook (ray_jobs.worker_warmup): without, with, or both alternating")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from bench.sweep_gpu import device_name, versions
    from ray_jobs import worker_warmup

    storage = tempfile.mkdtemp(prefix="worker_start_")
    t = time.time()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    out = {"device": device_name() if args.gpu else f"cpu x{os.cpu_count()}", "versions": versions(),
           "settings": {"trials": args.trials, "alone_runs": args.alone_runs, "use_gpu": args.gpu,
                        "health_check_interval_s": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "default")},
           "ray_init_s": round(time.time() - t, 2)}
    imports = worker_warmup.MODULES if args.imports else ()
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.warm]
    out["settings"].update(imports=list(imports), warm=args.warm)
    out["runs"] = runs = {("warm" if w else "cold"): {"alone": [], "tune": []} for w in variants}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every run: a call cut short keeps what it measured
        for v in runs.values():
            v["median_s"] = {f"{kind}_{key}": _median(v[kind], key) for kind in ("alone", "tune") if v[kind]
                             for key in ("enter_s", "ready_s")}
        Path(args.out).write_text(json.dumps(out, indent=1))

    for i in range(args.alone_runs):          # alternating, so that neither variant has the quieter minutes
        for w in variants:
            runs["warm" if w else "cold"]["alone"].append(alone(args.gpu, storage, f"{i}_{w}", imports, w))
            save()
    for w in variants:
        runs["warm" if w else "cold"]["tune"] = in_tune(args.gpu, storage, str(w), args.trials, imports, w)
        save()
    print(json.dumps({"device": out["device"], "ray_init_s": out["ray_init_s"],
                      **{v: r["median_s"] for v, r in runs.items()}}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
