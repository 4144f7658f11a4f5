"""GPU validation of the Ray paths (run on the device machine; CI has no GPU):

1. Ray Train V2 `TorchTrainer`, 1 GPU worker, DeepSpeed ZeRO-2 and ZeRO-3 (bf16, GradCache), real SmolLM2-135M;
   the checkpoint's model/ must load with EmbeddingModel.load and hold a non-empty adapter;
2. the mteb encoder on the GPU (bf16) on the full local STSBenchmark test split, for the ZeRO-3 checkpoint
   and the untrained EOS+causal baseline.

    python -m bench.gpu_validate --base-model /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf --data-dir .devdata \
        --out $OUT/gpu_validate.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--storage", default="/tmp/embed_runs")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["EMBED_DATA_DIR"] = str(Path(args.data_dir).resolve())

    import mteb
    import torch
    from safetensors.torch import load_file

    from embed_core.config import EmbedConfig
    from embed_core.model import EmbeddingModel
    from embed_core.mteb_encoder import load_encoder, make_encoder
    from embed_core.mteb_tasks import local_task
    from embed_core.train_config import TrainConfig
    from ray_jobs.train import run_training

    report: dict = {"bench": "gpu_validate", "gpu": torch.cuda.get_device_name(0), "runs": {}}

    def sts(enc, tag):
        t0 = time.time()
        res = mteb.evaluate(enc, [local_task("STSBenchmark")], cache=mteb.ResultCache(f"/tmp/mteb-{tag}"),
                            show_progress_bar=False, co2_tracker=False)
        assert not res.exceptions, res.exceptions
        return float(res.task_results[0].scores["test"][0]["cosine_spearman"]), time.time() - t0

    for zero in (2, 3):
        cfg = TrainConfig(model=EmbedConfig(base_model=args.base_model, pooling="multi_layer_trainable",
                                            attention="bidirectional", max_length=128),
                          builders=["snli", "stsb", "scifact"], data_dir=args.data_dir, max_per_source=4000,
                          batch_size=256, chunk_size=64, num_negatives=1, lr=1e-4, warmup_steps=3,
                          max_steps=args.steps, zero_stage=zero, checkpoint_every=args.steps // 2,
                          eval_every=args.steps // 2, val_size=256, seed=0)
        t0 = time.time()
        run = run_training(cfg, num_workers=1, use_gpu=True, storage_path=args.storage, name=f"zero{zero}")
        wall = time.time() - t0
        adapter = load_file(str(Path(run.model_dir) / "adapter" / "adapter_model.safetensors"))
        nonempty = all(v.numel() > 0 for v in adapter.values()) and len(adapter) > 0
        model = EmbeddingModel.load(run.model_dir, device="cuda")
        row = {"wall_s": round(wall, 1), "adapter_tensors": len(adapter), "adapter_nonempty": nonempty,
               "adapter_abs_sum": float(sum(v.float().abs().sum() for v in adapter.values())),
               "loaded_dtype": str(model.dtype), "loss_first": run.history[0]["loss"], "loss_last": run.history[-1]["loss"],
               "final_metrics": {k: v for k, v in run.metrics.items() if isinstance(v, (int, float))}}
        del model
        torch.cuda.empty_cache()
        if zero == 3:
            row["stsb_cosine_spearman"], row["stsb_eval_s"] = sts(load_encoder(run.model_dir, device="cuda",
                                                                               name="embed-sweeps/gpu-zero3"), "z3")
        report["runs"][f"zero{zero}"] = row
        print(f"ZeRO-{zero}: {json.dumps(row)}", flush=True)

    base = EmbeddingModel.from_config(EmbedConfig(base_model=args.base_model, lora_r=0, max_length=128), device="cuda")
    score, secs = sts(make_encoder(base, name="embed-sweeps/gpu-baseline", batch_size=128), "base")
    report["baseline_eos_causal"] = {"stsb_cosine_spearman": score, "stsb_eval_s": secs, "dtype": str(base.dtype)}
    report["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\nrun        loss first->last   adapter    STSB (full test)")
    for k, r in report["runs"].items():
        print(f"{k:10s} {r['loss_first']:.3f} -> {r['loss_last']:.3f}   nonempty={r['adapter_nonempty']}  "
              f"{r.get('stsb_cosine_spearman', float('nan')):.4f}")
    print(f"baseline   eos_last+causal untrained                {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
