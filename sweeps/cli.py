"""Command line of the sweep system.

    python -m sweeps run CONFIG [--resume] [--storage PATH] [--set key.path=value ...] [--address ADDR] [--verbose]
    python -m sweeps status SWEEP_DIR | CONFIG
    python -m sweeps evaluate SWEEP_DIR      # stage 3 alone, on checkpoints.json
    python -m sweeps report SWEEP_DIR        # stage 4 alone, on results/ (+ trials.json)
    python -m sweeps presets                 # list the shipped presets
    python -m sweeps check CONFIG            # validate a config (and its models / data) without running
    python -m sweeps export CHECKPOINT OUT [--merge-lora] [--dtype bf16]   # a sentence-transformers folder
    python -m sweeps export SWEEP_DIR --best OUT_DIR                        # each base model's best checkpoint

CONFIG is a YAML file or a preset name (``demo``, ``paper``, ...). Locally an embedded Ray starts on demand;
under ``ray job submit --working-dir . -- python -m sweeps run CONFIG`` the job connects to its cluster.
Exit status 2 on a config / data error (printed before any Ray worker starts).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from embed_core.errors import EmbedCoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps", description="Ray sweeps over LLM embedding-model designs")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, config_help: str) -> None:
        sp.add_argument("target", help=config_help)
        sp.add_argument("--storage", default=None, help="storage path (overrides the config's storage_path)")
        sp.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value, e.g. --set training.max_steps=20 (repeatable)")

    r = sub.add_parser("run", help="run the whole pipeline: train (Tune) -> evaluate (MTEB) -> report")
    common(r, "sweep config: a YAML file or a preset name")
    r.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same config")
    r.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    r.add_argument("--stages", default="train,evaluate,report", help="comma-separated subset of the stages")
    r.add_argument("--verbose", action="store_true", help="also show Ray workers' output here (Ray Train, DeepSpeed, "
                   "transformers, mteb, tqdm); by default it stays in Ray's session logs")
    r.add_argument("--part", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="run only the matching cells (base_model, pooling, attention, design, seed), e.g. "
                        "--part base_model=gemma3-270m; merge the parts' folders with `sweeps merge`")
    c = sub.add_parser("check", help="validate a config, its base models and its training data; run nothing")
    common(c, "sweep config: a YAML file or a preset name")
    s = sub.add_parser("status", help="per-trial status of a sweep (running or finished)")
    common(s, "a sweep folder, or the config that names one")
    for name, what in (("evaluate", "evaluate the chosen checkpoints (stage 3 alone)"),
                       ("report", "write the significance report (stage 4 alone)")):
        sp = sub.add_parser(name, help=what)
        common(sp, "a sweep folder, or the config that names one")
        if name == "evaluate":
            sp.add_argument("--address", default=None)
    m = sub.add_parser("merge", help="merge the folders of a sweep run in parts (run --part) into one")
    m.add_argument("out", help="the merged sweep folder (created, or added to)")
    m.add_argument("parts", nargs="+", help="sweep folders of the parts")
    sub.add_parser("presets", help="list the shipped presets")
    e = sub.add_parser("export", help="write a checkpoint (or a sweep's best ones) as a sentence-transformers folder")
    e.add_argument("source", help="a checkpoint folder (a saved model), or with --best a sweep folder")
    e.add_argument("out", nargs="?", help="the folder to write (must not exist or be empty)")
    e.add_argument("--best", metavar="OUT_DIR", default=None,
                   help="export the best checkpoint per base model of the sweep SOURCE into OUT_DIR/<model>__<design>")
    e.add_argument("--merge-lora", action="store_true", help="merge the LoRA adapter into the base weights")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="stored weight dtype")
    return p


def _export(args) -> int:
    from sweeps import export

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


def _sweep_dir_of(target: str, storage: str | None, sets: list[str]) -> Path:
    """A sweep folder given directly, or the one a config names."""
    from sweeps.layout import SWEEP_FILE
    from sweeps.config_parse import load_sweep_config

    p = Path(os.path.expanduser(target))
    if p.is_dir() and (p / SWEEP_FILE).is_file():
        return p.resolve()
    return load_sweep_config(target, sets, storage).sweep_dir


def _memory_lines(sweep) -> str:
    """Each base model's GPU memory per trial worker (estimate) and how many share one GPU."""
    from embed_core.memory import gpu_total_gib
    from embed_core.train_data import load_examples
    from sweeps.resources import memory_plan

    examples = load_examples(sweep.train_config(sweep.cells()[0], *sweep.probe_values()))
    gpu = gpu_total_gib()
    lines = ["GPU memory per trial worker (estimate; embed_core/memory.py):"]
    for model, est in memory_plan(sweep, examples).items():
        sizes = [(gpu, "this machine's")] if gpu else []
        fits = ", ".join(f"{est.fits(g)} fit {how} {g:.0f} GiB GPU" for g, how in sizes + [(80.0, "an")])
        lines.append(f"  {model}: {est.describe()}; {fits}")
    return "\n".join(lines)


def _ray_jobs():
    """The commands that need Ray (ray_jobs/commands.py), imported here only: `presets`, `export` and the config
    checks run without Ray, and the sweeps package imports nothing of ray_jobs at module level."""
    from ray_jobs import commands

    return commands


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "presets":
            from sweeps.config_parse import PRESET_DIR, presets
            for name in presets():
                first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
                print(f"{name:24s} {first}")
            return 0
        if args.command == "export":
            return _export(args)
        if args.command in ("run", "check"):
            from sweeps.config_parse import load_sweep_config

            sweep = load_sweep_config(args.target, args.sets, args.storage)
            if getattr(args, "part", None):
                sweep = sweep.with_part(args.part)
            if args.command == "check":
                sizes = sweep.preflight(check_data=True)
                _ray_jobs().check(sweep)
                print(f"ok: {sweep.name}: {len(sweep.cells())} cells, {sweep.num_trials()} trials; "
                      f"training examples per seed {sizes}; sweep folder {sweep.sweep_dir}")
                if sweep.resources.use_gpu is not False:
                    print(_memory_lines(sweep))
                return 0
            return _ray_jobs().run(sweep, resume=args.resume, stages=args.stages, address=args.address,
                                   verbose=args.verbose)
        if args.command == "merge":
            return _ray_jobs().merge(args.out, args.parts)
        sweep_dir = _sweep_dir_of(args.target, args.storage, args.sets)
        return _ray_jobs().on_folder(args.command, sweep_dir, getattr(args, "address", None))
    except EmbedCoreError as err:  # ConfigError / DataError: before any worker starts
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
