"""The demo job: train one embedding design on the real SmolLM2-135M with Ray Train + DeepSpeed, then score it.

    python -m ray_jobs.demo                 # local embedded Ray, CPU, a few minutes
    ray job submit --working-dir . -- python -m ray_jobs.demo --use-gpu --steps 200 --batch-size 256

Steps:
1. build a small training set from the shared data (SNLI triplets + STSB-train pairs + SciFact-train claims
   with BM25 hard negatives; evaluation splits are refused and filtered out);
2. train ``multi_layer_trainable`` pooling with ``bidirectional`` attention (the paper's best design) with LoRA,
   2 Ray Train workers, DeepSpeed ZeRO-2, GradCache, checkpoints;
3. evaluate the trained checkpoint and the untrained EOS + causal baseline on MTEB STSBenchmark read from
   the local data (a subsample on CPU: the scores are not comparable to the MTEB leaderboard);
4. print a table and write ``<output>/demo_summary.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from embed_core.config import EmbedConfig
from embed_core.trainer import TrainConfig


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="smollm2-135m")
    p.add_argument("--pooling", default="multi_layer_trainable")
    p.add_argument("--attention", default="bidirectional")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (triplets)")
    p.add_argument("--chunk-size", type=int, default=4, help="GradCache chunk per worker")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--zero-stage", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--eval-pairs", type=int, default=200, help="STSBenchmark test pairs to score (0: all 1379)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--data-dir", default=None)
    return p


def sts_score(encoder, subsample: int | None, cache_dir: Path) -> float:
    import mteb

    from embed_core.mteb_tasks import local_task

    task = local_task("STSBenchmark", subsample=subsample or None)
    # a separate cache per subsample size: mteb keys results by task name + revision only
    cache = mteb.ResultCache(cache_dir / f"mteb-{subsample or 'full'}")
    res = mteb.evaluate(encoder, [task], cache=cache, show_progress_bar=True, co2_tracker=False)
    if res.exceptions:
        raise RuntimeError(f"mteb failed: {res.exceptions}")
    return float(res.task_results[0].scores["test"][0]["cosine_spearman"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = EmbedConfig(base_model=args.base_model, pooling=args.pooling, attention=args.attention,
                            max_length=args.max_length, lora_r=16)
    tcfg = TrainConfig(
        model=model_cfg, builders=["snli", "stsb", "scifact"], data_dir=args.data_dir, max_per_source=400,
        batch_size=args.batch_size, chunk_size=args.chunk_size, num_negatives=1, lr=args.lr,
        warmup_steps=1, max_steps=args.steps, zero_stage=args.zero_stage, checkpoint_every=max(1, args.steps // 2),
        eval_every=max(1, args.steps // 2), val_size=32, seed=0,
    )
    from ray_jobs.train import run_training

    _log(f"training {args.pooling} + {args.attention} on {args.base_model}: {args.num_workers} Ray Train workers, "
         f"ZeRO-{args.zero_stage}, {args.steps} steps of {args.batch_size} triplets (GradCache chunk {args.chunk_size})")
    t0 = time.time()
    run = run_training(tcfg, num_workers=args.num_workers, use_gpu=args.use_gpu, storage_path=out,
                       name=time.strftime("train_%Y%m%d_%H%M%S"))
    train_s = time.time() - t0
    losses = [round(h["loss"], 4) for h in run.history]
    _log(f"trained in {train_s:.0f}s; loss per step {losses}; checkpoint {run.model_dir}")

    from embed_core.model import EmbeddingModel
    from embed_core.mteb_encoder import load_encoder, make_encoder

    sub = args.eval_pairs or None
    _log(f"scoring on MTEB STSBenchmark (local data, {sub or 'all 1379'} test pairs)")
    trained = sts_score(load_encoder(run.model_dir, name="embed-sweeps/demo-trained"), sub, out)
    base_model = EmbeddingModel.from_config(EmbedConfig(base_model=args.base_model, lora_r=0, max_length=args.max_length))
    baseline = sts_score(make_encoder(base_model, name="embed-sweeps/demo-baseline-eos-causal"), sub, out)

    summary = {"design": f"{args.pooling}+{args.attention}", "steps": args.steps, "batch_size": args.batch_size,
               "num_workers": args.num_workers, "zero_stage": args.zero_stage, "train_seconds": round(train_s, 1),
               "loss_per_step": losses, "final_metrics": {k: v for k, v in run.metrics.items() if isinstance(v, (int, float))},
               "checkpoint": run.model_dir, "stsb_pairs": sub or 1379,
               "stsb_cosine_spearman": {"untrained eos_last+causal": baseline, f"trained {args.pooling}+{args.attention}": trained}}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"{'model':45s} STSBenchmark cos-Spearman ({sub or 1379} pairs)")
    for k, v in summary["stsb_cosine_spearman"].items():
        print(f"{k:45s} {v:.4f}")
    print(f"\nsummary: {out / 'demo_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
