"""``python -m sweeps``: the project's one command line.

    python -m sweeps run CONFIG [--resume] [--storage PATH] [--set key.path=value ...] [--address ADDR] [--verbose]
    python -m sweeps check CONFIG            # validate a config (and its models / data) without running
    python -m sweeps status SWEEP_DIR | CONFIG
    python -m sweeps train --output DIR [--base-model ...] [--pooling ...] ...   # one training run on Ray Train
    python -m sweeps evaluate SWEEP_DIR | CONFIG                                 # stage 3 alone, on checkpoints.json
    python -m sweeps evaluate --checkpoints PATH... [--reference] [--tasks ...] [--results DIR] [--quick] ...
    python -m sweeps report SWEEP_DIR | CONFIG                                   # stage 4 alone, the sweep's settings
    python -m sweeps report SWEEP_DIR | RESULTS_DIR [--baseline D] [--resamples N] [--out DIR] ...  # own settings
    python -m sweeps merge OUT PART...       # the folders of a sweep run in parts (run --part), into one
    python -m sweeps presets                 # list the shipped presets
    python -m sweeps export CHECKPOINT OUT [--merge-lora] [--dtype bf16]   # a sentence-transformers folder
    python -m sweeps export SWEEP_DIR --best OUT_DIR                        # each base model's best checkpoint
    python -m sweeps wait-for-jobs ADDRESS [--timeout S]                    # for scripts that start a Ray head

CONFIG is a YAML file or a preset name (``demo``, ``paper``, ...). Locally an embedded Ray starts on demand;
under ``ray job submit --working-dir . -- python -m sweeps run CONFIG`` the job connects to its cluster.
Exit status 2 on a config / data error (printed before any Ray worker starts).

``python -m sweeps.report``, ``python -m ray_jobs.train``, ``python -m ray_jobs.evaluate`` and
``python -m ray_jobs.ray_cluster`` are aliases of `report`, `train`, `evaluate` and `wait-for-jobs`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from embed_core.config import EmbedConfig
from embed_core.errors import EmbedCoreError
from embed_core.train_config import TrainConfig

from .config_parse import PRESET_DIR, load_sweep_config, presets
from .layout import SWEEP_FILE

# ---------------------------------------------------------------------------------------- option tables
# (flag, argparse keywords): each table is one group of a subcommand's options, declared once.
TRAIN_OPTIONS = {
    "model": (("--base-model", dict(default=EmbedConfig.base_model)), ("--pooling", dict(default="eos_last")),
              ("--attention", dict(default="causal")), ("--lora-r", dict(type=int, default=16)),
              ("--lora-alpha", dict(type=float, default=None)), ("--num-latents", dict(type=int, default=32)),
              ("--max-length", dict(type=int, default=512))),
    "data": (("--train-data", dict(nargs="*", default=[], help="training JSONL file(s)")),
             ("--builders", dict(nargs="*", default=[], help="builders over the shared data folder, e.g. stsb snli")),
             ("--data-dir", dict(default=None)), ("--max-per-source", dict(type=int, default=None)),
             ("--num-negatives", dict(type=int, default=1)), ("--val-size", dict(type=int, default=0))),
    "training": (("--batch-size", dict(type=int, default=32, help="global batch size")),
                 ("--chunk-size", dict(type=int, default=None,
                                       help="GradCache chunk (rows per worker); none: no GradCache")),
                 ("--max-steps", dict(type=int, default=100)), ("--lr", dict(type=float, default=1e-5)),
                 ("--weight-decay", dict(type=float, default=0.0)), ("--warmup-steps", dict(type=int, default=0)),
                 ("--temperature", dict(type=float, default=0.05)), ("--grad-clip", dict(type=float, default=1.0)),
                 ("--zero-stage", dict(type=int, default=2, choices=(1, 2, 3))), ("--precision", dict(default="auto")),
                 ("--seed", dict(type=int, default=0)), ("--checkpoint-every", dict(type=int, default=0)),
                 ("--eval-every", dict(type=int, default=0))),
    "ray": (("--num-workers", dict(type=int, default=1)), ("--use-gpu", dict(action="store_true")),
            ("--output", dict(required=True, help="storage path (local / shared filesystem)")),
            ("--name", dict(default=None)), ("--max-failures", dict(type=int, default=0)),
            ("--ray-address", dict(default=None, help="connect to this Ray cluster (e.g. 'auto'); default: start a "
                                                      "local one"))),
}
#: `train`'s model options, as EmbedConfig fields
MODEL_FIELDS = ("base_model", "pooling", "attention", "lora_r", "lora_alpha", "num_latents", "max_length")
#: `train`'s options that say how to run, not what to train
RUN_FIELDS = ("num_workers", "use_gpu", "output", "name", "max_failures", "ray_address")

#: `evaluate --checkpoints`: evaluating checkpoints outside a sweep's stage 3
EVALUATE_OPTIONS = (
    ("--checkpoints", dict(nargs="*", default=None, metavar="PATH",
                           help="checkpoints.json, sweep folders, or saved EmbeddingModel folders (instead of TARGET)")),
    ("--reference", dict(action="store_true", help="also evaluate the all-MiniLM-L6-v2 reference")),
    ("--tasks", dict(nargs="+", default=None, help="local task names, official mteb task names, or task spec files "
                                                   "(.yaml/.json); default: the six local tasks")),
    ("--results", dict(default=None, help="results folder (default: <sweep folder>/results for one sweep)")),
    ("--quick", dict(action="store_true", help="small subsamples of the local tasks (NOT comparable to MTEB)")),
    ("--subsample", dict(type=int, default=None, help="subsample size for every local task")),
    ("--num-cpus", dict(type=float, default=1)),
    ("--num-gpus", dict(type=float, default=0, help="per Ray task; fractions share a GPU (e.g. 0.25)")),
    ("--max-retries", dict(type=int, default=2)),
    ("--batch-size", dict(type=int, default=32)),
    ("--seed", dict(type=int, default=42)),
    ("--overwrite", dict(action="store_true", help="re-run pairs whose results exist")),
    ("--data-dir", dict(default=None, help="shared data folder (default $EMBED_DATA_DIR or ../shared/data)")),
    ("--no-progress", dict(action="store_true")),
    ("--json", dict(default=None, metavar="FILE", help="also write the summary (scores) to FILE")),
)

#: `report`'s own settings, each stored under its `sweeps.report.build_report` keyword; None = not given (the
#: default is build_report's). Giving any of them makes the report one with these settings, not stage 4.
REPORT_OPTIONS = (
    ("--trials", dict(dest="trials", help="trials.json for score-vs-cost and best LoRA rank / LR per cell "
                                          "(default: the sweep folder's, if any)")),
    ("--no-trials", dict(dest="trials", action="store_const", const=False, help="do not look for trials.json")),
    ("--baseline", dict(dest="baseline", help="design every test compares against (default eos_last+causal)")),
    ("--out", dict(dest="out_dir", help="output folder (default: the sweep's report/)")),
    ("--correction", dict(dest="correction", choices=("bh", "holm"), help="default holm")),
    ("--alpha", dict(dest="alpha", type=float, help="default 0.05")),
    ("--resamples", dict(dest="n_resamples", type=int, help="bootstrap resamples / permutations per dataset "
                                                            "(default 10000)")),
    ("--ci-method", dict(dest="ci_method", choices=("percentile", "BCa", "basic"), help="default percentile")),
    ("--min-datasets", dict(dest="min_datasets", type=int, help="Wilcoxon per category only with at least this "
                                                                "many datasets (default, the paper's: 5)")),
    ("--split", dict(dest="split", help="default test")),
    ("--seed", dict(dest="seed", type=int, help="default 0")),
    ("--no-plots", dict(dest="plots", action="store_const", const=False)),
    ("--quiet", dict(dest="show_progress", action="store_const", const=False, help="no progress bar")),
)


def _add(parser, options) -> None:
    for flag, kw in options:
        parser.add_argument(flag, **kw)


# ---------------------------------------------------------------------------------------- the parser
def _common(sp, target_help: str, nargs: str | None = None) -> None:
    sp.add_argument("target", nargs=nargs, help=target_help)
    sp.add_argument("--storage", default=None, help="storage path (overrides the config's storage_path)")
    sp.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a config value, e.g. --set training.max_steps=20 (repeatable)")


def _add_sweep_commands(sub) -> None:
    r = sub.add_parser("run", help="run the whole pipeline: train (Tune) -> evaluate (MTEB) -> report")
    _common(r, "sweep config: a YAML file or a preset name")
    r.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same config")
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    r.add_argument("--stages", default="train,evaluate,report", help="comma-separated subset of the stages")
    r.add_argument("--verbose", action="store_true", help="also show Ray workers' output here (Ray Train, DeepSpeed, "
                   "transformers, mteb, tqdm); by default it stays in Ray's session logs")
    r.add_argument("--part", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="run only the matching cells (base_model, pooling, attention, design, seed), e.g. "
                        "--part base_model=gemma3-270m; merge the parts' folders with `sweeps merge`")
    _common(sub.add_parser("check", help="validate a config, its base models and its training data; run nothing"),
            "sweep config: a YAML file or a preset name")
    _common(sub.add_parser("status", help="per-trial status of a sweep (running or finished)"),
            "a sweep folder, or the config that names one")
    m = sub.add_parser("merge", help="merge the folders of a sweep run in parts (run --part) into one")
    m.add_argument("out", help="the merged sweep folder (created, or added to)")
    m.add_argument("parts", nargs="+", help="sweep folders of the parts")
    sub.add_parser("presets", help="list the shipped presets")


def _add_stage_commands(sub) -> None:
    t = sub.add_parser("train", help="one training run on Ray Train (no sweep)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for group, options in TRAIN_OPTIONS.items():
        _add(t.add_argument_group(group), options)
    ev = sub.add_parser("evaluate", help="evaluate a sweep's chosen checkpoints (stage 3 alone), or --checkpoints")
    _common(ev, "a sweep folder, or the config that names one (leave out with --checkpoints)", nargs="?")
    ev.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    _add(ev, EVALUATE_OPTIONS)
    rp = sub.add_parser("report", help="write the significance report (stage 4 alone, or with its own settings)")
    _common(rp, "a sweep folder, the config that names one, or a results folder (<model>/<revision>/...)")
    _add(rp, REPORT_OPTIONS)


def _add_other_commands(sub) -> None:
    e = sub.add_parser("export", help="write a checkpoint (or a sweep's best ones) as a sentence-transformers folder")
    e.add_argument("source", help="a checkpoint folder (a saved model), or with --best a sweep folder")
    e.add_argument("out", nargs="?", help="the folder to write (must not exist or be empty)")
    e.add_argument("--best", metavar="OUT_DIR", default=None,
                   help="export the best checkpoint per base model of the sweep SOURCE into OUT_DIR/<model>__<design>")
    e.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter into the base weights")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="stored weight dtype")
    w = sub.add_parser("wait-for-jobs", help="wait until a Ray cluster's dashboard accepts job submissions")
    w.add_argument("address", help="dashboard address, e.g. http://127.0.0.1:8265")
    w.add_argument("--timeout", type=float, default=180.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps", description="Ray sweeps over LLM embedding-model designs")
    sub = p.add_subparsers(dest="command", required=True)
    _add_sweep_commands(sub)
    _add_stage_commands(sub)
    _add_other_commands(sub)
    return p


# ---------------------------------------------------------------------------------------- the commands
def _ray_jobs():
    """The commands that need Ray (ray_jobs/commands.py), imported here only: `presets`, `export`, the config
    checks and a report with its own settings run without Ray, and the sweeps package imports nothing of
    ray_jobs at module level."""
    from ray_jobs import commands

    return commands


def _is_config(target: str) -> bool:
    p = Path(os.path.expanduser(target))
    return p.is_file() or (not p.exists() and (PRESET_DIR / f"{target}.yaml").is_file())


def _sweep_dir_of(target: str, storage: str | None, sets: list[str]) -> Path:
    """A sweep folder given directly, or the one a config names."""
    p = Path(os.path.expanduser(target))
    if p.is_dir() and (p / SWEEP_FILE).is_file():
        return p.resolve()
    return load_sweep_config(target, sets, storage).sweep_dir


def _memory_lines(sweep) -> str:
    """Each base model's GPU memory per trial worker (estimate) and how many share one GPU."""
    # torch: only `check` of a GPU sweep measures the GPU and reads the data
    from embed_core.memory import gpu_total_gib, placement
    from embed_core.train_data import load_examples
    from sweeps.resources import memory_plan

    examples = load_examples(sweep.train_config(sweep.cells()[0], *sweep.probe_values(sweep.cells()[0])))
    gpu = gpu_total_gib()
    lines = ["GPU memory per trial worker (estimate; embed_core/memory.py):"]
    for model, est in memory_plan(sweep, examples).items():
        res = sweep.resources_for(next(c for c in sweep.cells() if c.base_model == model))
        sizes = [(gpu, "this machine's")] if gpu else []
        fits = ", ".join(f"{est.fits(g)} fit {how} {g:.0f} GiB GPU" for g, how in sizes + [(80.0, "an")])
        line = f"  {model}: {est.describe()}; {fits}"
        try:  # as the run will place them (ray_jobs.sweep.gpu_plan), on this GPU or an assumed 80 GiB one
            place = placement(est.total_gib, gpu or 80.0, res.gpus_per_worker, ahead=res.admits_ahead)
        except ValueError:
            place = None
        if place and place.admission:
            adm, where = place.admission, "this machine's" if gpu else "an 80 GiB"
            raised = f" (raised to {place.share:.3g} to fit)" if place.share != res.gpus_per_worker else ""
            line += (f"; with gpus_per_worker {res.gpus_per_worker:g}{raised} on {where} GPU: {adm.training} train "
                     "at once" + (f", {adm.ahead} more start up ahead" if adm.ahead else ""))
        lines.append(line)
    return "\n".join(lines)


def _presets(args) -> int:
    for name in presets():
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:24s} {first}")
    return 0


def _export(args) -> int:
    from sweeps import export  # torch: writing a model

    if args.best is not None:
        if args.out is not None:
            print("error: with --best give the output folder once, as --best OUT_DIR", file=sys.stderr)
            return 2
        for path in export.export_best(args.source, args.best, merge_lora=args.merge_lora, dtype=args.dtype):
            print(f"wrote {path}")
        return 0
    if args.out is None:
        print("error: export CHECKPOINT OUT: the output folder is missing", file=sys.stderr)
        return 2
    print(f"wrote {export.export_checkpoint(args.source, args.out, merge_lora=args.merge_lora, dtype=args.dtype)}")
    return 0


def _run_or_check(args) -> int:
    sweep = load_sweep_config(args.target, args.sets, args.storage)
    if getattr(args, "part", None):
        sweep = sweep.with_part(args.part)
    if args.command == "run":
        return _ray_jobs().run(sweep, resume=args.resume, stages=args.stages, address=args.address,
                               verbose=args.verbose)
    sizes = sweep.preflight(check_data=True)
    _ray_jobs().check(sweep)
    print(f"ok: {sweep.name}: {len(sweep.cells())} cells, {sweep.num_trials()} trials; "
          f"training examples per seed {sizes}; sweep folder {sweep.sweep_dir}")
    if sweep.resources.use_gpu is not False:
        print(_memory_lines(sweep))
    return 0


def train_config_from_args(args) -> TrainConfig:
    """`train`'s options as a TrainConfig, validated before Ray starts (the run options stay in `args`)."""
    model = {k: getattr(args, k) for k in MODEL_FIELDS}
    skip = set(MODEL_FIELDS) | set(RUN_FIELDS) | {"command"}
    return TrainConfig(model=model, **{k: v for k, v in vars(args).items() if k not in skip})


def _train(args) -> int:
    """One training run: the options as a TrainConfig and how to run it."""
    return _ray_jobs().train(train_config_from_args(args), **{k: getattr(args, k) for k in RUN_FIELDS})


def _evaluate(args) -> int:
    if args.target is None:
        return _ray_jobs().evaluate(args)
    if args.checkpoints is not None:
        print("error: evaluate: give a sweep folder (or its config) or --checkpoints, not both", file=sys.stderr)
        return 2
    return _ray_jobs().on_folder("evaluate", _sweep_dir_of(args.target, args.storage, args.sets), args.address)


def _report(args) -> int:
    """Stage 4 (the sweep's report settings, tracking) for a sweep with no setting given; else the report of the
    folder with the settings given, which needs no Ray."""
    settings = {kw["dest"]: getattr(args, kw["dest"]) for _, kw in REPORT_OPTIONS
                if getattr(args, kw["dest"]) is not None}
    p = Path(os.path.expanduser(args.target))
    is_sweep = _is_config(args.target) or (p / SWEEP_FILE).is_file()
    folder = _sweep_dir_of(args.target, args.storage, args.sets) if is_sweep else p
    if is_sweep and not settings:
        return _ray_jobs().on_folder("report", folder)
    from sweeps.report import print_report  # scipy, statsmodels, matplotlib: seconds, for `report` only

    return print_report(folder, **settings)


def _on_folder(args) -> int:
    return _ray_jobs().on_folder(args.command, _sweep_dir_of(args.target, args.storage, args.sets))


COMMANDS = {"run": _run_or_check, "check": _run_or_check, "status": _on_folder, "train": _train,
            "evaluate": _evaluate, "report": _report, "presets": _presets, "export": _export,
            "merge": lambda a: _ray_jobs().merge(a.out, a.parts),
            "wait-for-jobs": lambda a: _ray_jobs().wait_for_jobs(a.address, a.timeout)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except EmbedCoreError as err:  # ConfigError / DataError: before any worker starts
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def alias(command: str) -> None:
    """``python -m <old module> ARGS`` as ``python -m sweeps <command> ARGS`` (the old modules' entry points)."""
    try:
        sys.exit(main([command, *sys.argv[1:]] if command else sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
