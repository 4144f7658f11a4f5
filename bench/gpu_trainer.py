"""GPU benchmark of the contrastive trainer (run on the device machine; CI has no GPU).

Every variant trains the real SmolLM2-135M (multi_layer_trainable pooling, bidirectional attention, LoRA r16,
bf16) on real training data for a few steps in its own process, and reports the median step time, tokens/s,
examples/s and peak GPU memory. Ratios are against a baseline measured in the same run: plain PyTorch
(AdamW, no DeepSpeed) on the same batches.

    python -m bench.gpu_trainer --base-model /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data-dir .devdata --out $OUT/gpu_trainer.json

Variants: torch baseline | ZeRO-2 | ZeRO-3, all on one global batch without GradCache; then ZeRO-2 / ZeRO-3
with GradCache at the same batch, and ZeRO-2 GradCache at 4x and 8x the batch (memory should follow the
chunk, not the batch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def variant_main(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist

    from embed_core.config import EmbedConfig
    from embed_core.gradcache import full_batch_step, grad_cache_step
    from embed_core.loss import info_nce
    from embed_core.train_config import TrainConfig
    from embed_core.train_data import TrainData, load_examples
    from embed_core.trainer import Trainer

    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    model_cfg = EmbedConfig(base_model=args.base_model, pooling="multi_layer_trainable", attention="bidirectional",
                            max_length=args.max_length, lora_r=16)
    zero = {"torch": 2, "zero2": 2, "zero3": 3}[args.engine]
    tcfg = TrainConfig(model=model_cfg, builders=["snli", "stsb", "scifact"], data_dir=args.data_dir,
                       max_per_source=4000, batch_size=args.batch, chunk_size=args.chunk or None, num_negatives=1,
                       lr=1e-5, warmup_steps=2, max_steps=args.steps, zero_stage=zero, seed=0)
    examples = load_examples(tcfg)
    times, tokens, mems, losses = [], [], [], []
    if args.engine == "torch":
        from embed_core.model import EmbeddingModel

        data = TrainData(tcfg, examples)
        model = EmbeddingModel.from_config(model_cfg, device="cuda", seed=0)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def loss_fn(reps):
            return info_nce(reps["query"], reps["positive"], reps.get("negative"), temperature=0.05)

        for step in range(args.steps):
            batch = data.local_batch(step, 0, 1, model.cfg.format_query)
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            roles = {"query": model.tokenize(batch["queries"]), "positive": model.tokenize(batch["positives"]),
                     "negative": model.tokenize(batch["negatives"])}
            roles = {k: {n: t.cuda() for n, t in v.items()} for k, v in roles.items()}
            embed = lambda c: model(c["input_ids"], c["attention_mask"])  # noqa: E731
            if args.chunk:
                loss, _ = grad_cache_step(embed, roles, loss_fn, args.chunk)
            else:
                loss, _ = full_batch_step(embed, roles, loss_fn, None)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            tokens.append(sum(int(r["attention_mask"].sum()) for r in roles.values()))
            mems.append(torch.cuda.max_memory_allocated() / 2**30)
            losses.append(float(loss))
    else:
        trainer = Trainer(tcfg, examples=examples, device="cuda")
        for _ in range(args.steps):
            m = trainer.run_step()
            times.append(m["step_time_s"])
            tokens.append(m["tokens_per_s"] * m["step_time_s"])
            mems.append(m.get("gpu_mem_gb", float("nan")))
            losses.append(m["loss"])
    warm = slice(2, None)  # the first steps include allocator growth and kernel selection
    t = statistics.median(times[warm])
    return {"engine": args.engine, "batch": args.batch, "chunk": args.chunk, "steps": args.steps,
            "median_step_s": t, "steps_per_s": 1 / t, "tokens_per_s": statistics.median(tokens[warm]) / t,
            "examples_per_s": args.batch / t, "peak_mem_gb": max(mems), "loss_first": losses[0], "loss_last": losses[-1],
            "gpu": torch.cuda.get_device_name(0)}


VARIANTS = [  # (engine, batch, chunk)
    ("torch", 128, 0), ("zero2", 128, 0), ("zero3", 128, 0),
    ("torch", 128, 64), ("zero2", 128, 64), ("zero3", 128, 64),
    ("zero2", 512, 64), ("zero2", 1024, 64),
]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base-model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variant", nargs=3, metavar=("ENGINE", "BATCH", "CHUNK"))
    args = p.parse_args()
    if args.variant:
        args.engine, args.batch, args.chunk = args.variant[0], int(args.variant[1]), int(args.variant[2])
        print("RESULT " + json.dumps(variant_main(args)), flush=True)
        return 0
    rows = []
    for engine, batch, chunk in VARIANTS:
        cmd = [sys.executable, "-m", "bench.gpu_trainer", "--base-model", args.base_model, "--data-dir", args.data_dir,
               "--out", args.out, "--max-length", str(args.max_length), "--steps", str(args.steps),
               "--variant", engine, str(batch), str(chunk)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            rows.append({"engine": engine, "batch": batch, "chunk": chunk, "error": proc.stderr[-2000:]})
            print(f"{engine} b{batch} c{chunk}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        r["wall_s"] = round(time.time() - t0, 1)
        rows.append(r)
        print(f"{engine} b{batch} c{chunk}: {r['median_step_s']:.3f}s/step {r['peak_mem_gb']:.2f} GiB", flush=True)
    base = {(r["batch"], r["chunk"]): r for r in rows if r.get("engine") == "torch" and "error" not in r}
    for r in rows:
        b = base.get((r["batch"], r["chunk"]))
        if b and "error" not in r:
            r["step_time_vs_torch"] = r["median_step_s"] / b["median_step_s"]
            r["mem_vs_torch"] = r["peak_mem_gb"] / b["peak_mem_gb"]
    out = {"bench": "gpu_trainer", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), multi_layer_trainable + "
           "bidirectional, LoRA r16 all projections, bf16", "max_length": args.max_length, "rows": rows,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{'engine':6s} {'batch':>5s} {'chunk':>5s} {'s/step':>7s} {'tok/s':>9s} {'ex/s':>7s} {'GiB':>6s} {'t/torch':>7s} {'mem/torch':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:6s} {r['batch']:5d} {r['chunk']:5d} FAILED")
            continue
        print(f"{r['engine']:6s} {r['batch']:5d} {r['chunk']:5d} {r['median_step_s']:7.3f} {r['tokens_per_s']:9.0f} "
              f"{r['examples_per_s']:7.1f} {r['peak_mem_gb']:6.2f} {r.get('step_time_vs_torch', float('nan')):7.2f} "
              f"{r.get('mem_vs_torch', float('nan')):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
