"""The project's Trainer (embed_core.trainer: DeepSpeed ZeRO-2, its data path, tokenisation, packing inside the
step, GradCache) on the fast path, on a Qwen2-0.5B-shaped model with random weights (device machine; CI has no GPU).

bench/perf.py measures the fast path with a plain AdamW loop; this checks that the real Trainer gets the same
throughput. Everything is generated on the machine, nothing is carried but the code (and the DeepSpeed bundle):
a word-level tokenizer ("w17" is one token) built in code, and training JSONL whose texts have exactly the
token lengths of bench/data/lengths.json (the project's real training mix). Each variant runs in its own process.

    source .devbundle*/gpu_env.sh && python -m bench.trainer_fast --out $OUT/trainer_fast.json
    python -m bench.trainer_fast --quick --variants plain-512,fast-512     # CPU smoke test (tiny model)

A variant name may end in "@<pooling>+<attention>" (e.g. fast-512@multi_layer_trainable+causal): the paper's
designs on the fast path; without it, mean pooling, bidirectional. --check-save saves a Trainer checkpoint, loads
it and compares the encodings.

Variants: plain-512 = the same fast model in a plain PyTorch loop (fused AdamW, merged roles; the reference);
fast-512 / fast-varlen-512 = Trainer, packing + fused LoRA + compile, FlexAttention / varlen FlashAttention,
512 triplets, no GradCache; fast-gc-2048 = the same at 2048 triplets in GradCache chunks of 512;
padded-gc-512 = Trainer on the previous default path (SDPA, padded per chunk, no fused LoRA, no compile),
512 triplets in GradCache chunks of 64; fast-512-noexp = fast-512 with the CUDA allocator's default (no expandable
segments); plain-512-exp = plain-512 with expandable segments; fast-512-sync = fast-512 with the Trainer's earlier
loss call (metrics copied to the host and the loss checked for NaN between the forward and the backward);
fast-512-nocontig = ZeRO-2 without contiguous gradients; fast-512-zero1 = ZeRO-1. With packing the Trainer's
GradCache chunks hold every role (gradcache.merged_grad_cache_step; chunk = texts of all roles together):
fast-gc-2048-c1024 = chunks of 1024 texts; fast-gc-2048-perrole = the earlier one-role-per-chunk GradCache.
fast-512-dscheck = fast-512 with DeepSpeed's per-tensor bf16 gradient overflow check back on
(bf16.check_grad_overflow; the Trainer turns it off and checks the gradients with one fused reduction instead).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 32000
FAST = {"packing": True, "compile": True, "fused_lora": True}
VARIANTS = {  # name: (engine, attn_implementation, fast, batch, chunk)
    "plain-512": ("plain", "flex_attention", True, 512, None),
    "fast-512": ("trainer", "flex_attention", True, 512, None),
    "fast-varlen-512": ("trainer", "flash_varlen", True, 512, None),
    "fast-gc-2048": ("trainer", "flex_attention", True, 2048, 512),
    "padded-gc-512": ("trainer", "sdpa", False, 512, 64),
    "fast-512-zero1": ("trainer", "flex_attention", True, 512, None),
    "fast-512-noexp": ("trainer", "flex_attention", True, 512, None),
    "plain-512-exp": ("plain", "flex_attention", True, 512, None),
    "fast-512-sync": ("trainer", "flex_attention", True, 512, None),
    "fast-512-nocontig": ("trainer", "flex_attention", True, 512, None),
    "fast-gc-2048-perrole": ("trainer", "flex_attention", True, 2048, 512),
    "fast-gc-2048-c1024": ("trainer", "flex_attention", True, 2048, 1024),
    "fast-512-dscheck": ("trainer", "flex_attention", True, 512, None),
}
# DeepSpeed settings of a variant (TrainConfig.deepspeed_overrides)
VARIANT_DS = {"fast-512-nocontig": {"zero_optimization": {"contiguous_gradients": False}},
              "fast-512-dscheck": {"bf16": {"check_grad_overflow": True}}}
# extra environment of a variant's process: the Trainer turns on expandable segments in the CUDA allocator unless
# the environment configures the allocator (embed_core.distributed.configure_cuda_allocator); these variants measure
# the Trainer without it and the plain loop with it
VARIANT_ENV = {"fast-512-noexp": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"},
               "plain-512-exp": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}


def split_variant(name: str) -> tuple[str, str, str]:
    """"fast-512@eos_last+causal" -> ("fast-512", "eos_last", "causal"); without "@": mean pooling, bidirectional."""
    base, _, design = name.partition("@")
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {base!r}: one of {', '.join(VARIANTS)}")
    pooling, _, attention = (design or "mean+bidirectional").partition("+")
    return base, pooling, attention


def make_inputs(root: Path, quick: bool, rows: int) -> tuple[Path, Path]:
    """A Qwen2-0.5B-shaped model folder (random bf16 weights + a word-level tokenizer) and training JSONL."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModel, PreTrainedTokenizerFast

    from bench.perf import load_lengths, qwen2_05b

    model_dir, data = root / ("model-quick" if quick else "model"), root / f"train-{rows}.jsonl"
    if not (model_dir / ".complete").is_file():
        vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
        cfg = qwen2_05b(quick)
        cfg.vocab_size = max(cfg.vocab_size, VOCAB) if not quick else VOCAB
        cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = 1, 0, None
        torch.manual_seed(0)
        AutoModel.from_config(cfg).to(torch.bfloat16).save_pretrained(str(model_dir))
        # in a folder of its own: next to a Qwen2 config.json, AutoTokenizer would build a Qwen2 (BPE) tokenizer
        fast.save_pretrained(str(model_dir / "wordtok"))
        (model_dir / ".complete").write_text("ok")
    if not data.is_file():
        lengths, rng = load_lengths()["train"], random.Random(0)
        words = lambda n: " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(max(n - 1, 1)))  # noqa: E731  (+ EOS)
        with data.open("w") as fh:
            for _ in range(rows):
                fh.write(json.dumps({"query": words(rng.choice(lengths["query"])),
                                     "positive": words(rng.choice(lengths["positive"])),
                                     "negatives": [words(rng.choice(lengths["negative"]))]}) + "\n")
    return model_dir, data


def nonembed_params(quick: bool) -> int:
    from bench.perf import nonembed_params as ne

    return ne(argparse.Namespace(quick=quick))


def check_save(args, trainer, model, on_gpu: bool) -> dict:
    """--check-save: write the Trainer's checkpoint, load its model/ with EmbeddingModel.load and compare the two
    models' `encode` (the configured packed path) on 256 texts of the real length mix."""
    import numpy as np

    from bench.perf import load_lengths
    from embed_core.model import EmbeddingModel
    from embed_core.engine import gathered_trainable_state
    from embed_core.trainer import MODEL_DIR

    rng = random.Random(1)
    lengths = load_lengths()["train"]["positive"]
    texts = [" ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(max(rng.choice(lengths) - 1, 1)))
             for _ in range(256)]
    ckpt = trainer.save_checkpoint(Path(args.root) / f"ckpt-{args.variant}")
    a = model.encode(texts, batch_size=64)
    loaded = EmbeddingModel.load(ckpt / MODEL_DIR, device="cuda" if on_gpu else "cpu")
    b = loaded.encode(texts, batch_size=64)
    cos = (a * b).sum(axis=1)  # both L2-normalised
    want, got = gathered_trainable_state(trainer.engine, model)[0], loaded.trainable_state()[0]
    return {"texts": len(texts), "min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max()),
            "finite": bool(np.isfinite(a).all() and np.isfinite(b).all()),
            "adapter_keys_equal": sorted(want) == sorted(got),
            "adapter_max_abs_diff": max(float((want[k].float() - got[k].float().cpu()).abs().max()) for k in want),
            "lora_b_abs_max": max(float(v.float().abs().max()) for k, v in want.items() if "lora_B" in k)}


class PhaseTimer:
    """--phases: wall time of each phase of a step with the GPU synchronised at both ends (changes the overlap a
    little; the sum is close to the unsynchronised step). Where a step's time goes: forward+backward vs the
    optimizer step."""

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu, self.times = on_gpu, {}

    def wrap(self, name: str, fn):
        import torch

        def timed(*a, **kw):
            if self.on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if self.on_gpu:
                torch.cuda.synchronize()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            return out
        return timed

    def take(self) -> dict:
        out, self.times = {k: round(v, 5) for k, v in self.times.items()}, {}
        return out


def variant_main(args) -> dict:
    import torch
    import torch.distributed as dist

    from embed_core.distributed import init_single_process_group
    from embed_core.train_config import TrainConfig
    from embed_core.trainer import Trainer

    base, pooling, attention = split_variant(args.variant)
    engine, attn, fast, batch, chunk = VARIANTS[base]
    if args.quick:
        batch, chunk = 16, (8 if chunk else None)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:%d" % (29500 + os.getpid() % 1000), rank=0,
                                world_size=1)
        torch.cuda.set_device(0)
    else:
        init_single_process_group()
    model = {"base_model": args.model_dir, "pooling": pooling, "attention": attention, "lora_r": 16,
             "max_length": 512, "attn_implementation": attn, **(FAST if fast else {})}
    steps = args.warmup + args.steps
    tcfg = TrainConfig(model=model, train_data=[args.data], batch_size=batch, chunk_size=chunk, num_negatives=1,
                       lr=1e-5, max_steps=steps, zero_stage=1 if base.endswith("zero1") else 2, seed=0,
                       deepspeed_overrides=VARIANT_DS.get(base, {}),
                       packing=fast, eval_every=0)
    from embed_core.backbone import prepare_tokenizer
    from embed_core.model import EmbeddingModel
    from embed_core.train_config import model_config
    from transformers import PreTrainedTokenizerFast

    mcfg = model_config(tcfg, on_gpu)
    m = EmbeddingModel.from_config(mcfg, device="cuda" if on_gpu else "cpu", seed=0)
    m.tokenizer = prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(str(Path(args.model_dir) / "wordtok")), mcfg)
    probe = m.token_ids(["w5 w77 w12"])[0]
    assert len(probe) == 4 and probe[-1] == m.tokenizer.eos_token_id, probe  # 3 words + EOS
    rows, profile_rows = [], None
    phases = PhaseTimer(on_gpu) if args.phases else None
    if engine == "plain":
        from embed_core.gradcache import merged_batch_step
        from embed_core.loss import info_nce
        from embed_core.train_data import TrainData

        m.train()
        data = TrainData(tcfg)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=on_gpu)
        loss_fn = lambda r: info_nce(r["query"], r["positive"], r.get("negative"), temperature=0.05)  # noqa: E731
        embed = lambda c: m(packed=m.pack(c["ids"]).to(m.device))  # noqa: E731

        def opt_step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        fwd_bwd = phases.wrap("forward_backward", merged_batch_step) if phases else merged_batch_step
        opt_step = phases.wrap("optimizer_step", opt_step) if phases else opt_step
        for step in range(steps):
            b = data.local_batch(step, 0, 1, m.cfg.format_query)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            roles = {r: {"ids": m.token_ids(b[k])} for r, k in
                     (("query", "queries"), ("positive", "positives"), ("negative", "negatives"))}
            loss, _ = fwd_bwd(embed, roles, loss_fn)
            opt_step()
            if on_gpu:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            toks = sum(len(x) for r in roles.values() for x in r["ids"])
            rows.append({"step_time_s": dt, "tokens_per_s": toks / dt, "loss": float(loss),
                         "gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan"),
                         **({"phases": phases.take()} if phases else {})})
            print(f"  {args.variant} step {step} {dt * 1000:.0f} ms loss {float(loss):.3f}", flush=True)
    else:
        cls = Trainer
        if "perrole" in args.variant:  # the Trainer's earlier packed GradCache: one role per chunk
            import embed_core.trainer as trainer_module
            from embed_core.gradcache import grad_cache_step, iter_chunks

            trainer_module.merged_grad_cache_step = grad_cache_step
            trainer_module.merged_chunk_count = lambda roles, c: sum(len(iter_chunks(f, c, r)) for r, f in roles.items())
        if args.variant.endswith("-sync"):
            from embed_core.loss import check_finite, info_nce

            class SyncedTrainer(Trainer):  # the earlier _loss: two host syncs between the forward and the backward
                def _loss(self, reps):
                    loss, metrics = info_nce(reps["query"], reps["positive"], reps.get("negative"),
                                             temperature=self.tcfg.temperature, gather=True)
                    check_finite(loss, self.step + 1)
                    return loss, metrics

            cls = SyncedTrainer
        trainer = cls(tcfg, model=m)
        if phases:
            trainer.forward_backward = phases.wrap("forward_backward", trainer.forward_backward)
            trainer.engine.step = phases.wrap("optimizer_step", trainer.engine.step)
        for step in range(steps):
            if args.profile and step == steps - 1:  # the last (warm) step under the profiler: where host time goes
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    r = trainer.run_step()
                evs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
                gpu = sum(e.self_device_time_total for e in prof.key_averages() if e.self_cpu_time_total == 0)
                profile_rows = {"step_wall_ms": r["step_time_s"] * 1000, "gpu_kernels_busy_ms": gpu / 1000,
                                "top_host_ops": [{"name": e.key[:100], "self_cpu_ms": e.self_cpu_time_total / 1000,
                                                  "calls": e.count} for e in evs[:25]]}
                rows.append(r)
                print(f"  {args.variant} profiled step {r['step_time_s'] * 1000:.0f} ms, GPU busy {gpu / 1000:.0f} ms",
                      flush=True)
                continue
            r = trainer.run_step()
            if phases:
                r["phases"] = phases.take()
            rows.append(r)
            print(f"  {args.variant} step {step} {r['step_time_s'] * 1000:.0f} ms loss {r['loss']:.3f}", flush=True)
    saved = check_save(args, trainer, m, on_gpu) if args.check_save and engine == "trainer" else None
    meas = rows[args.warmup:]
    t = statistics.median(r["step_time_s"] for r in meas)
    tok_s = sum(r["tokens_per_s"] * r["step_time_s"] for r in meas) / sum(r["step_time_s"] for r in meas)
    import deepspeed
    import peft
    import transformers

    return {"variant": args.variant, "engine": engine, "attn": attn, "fast": fast, "batch": batch, "chunk": chunk,
            "median_step_s": t, "useful_tokens_per_s": tok_s, "triplets_per_s": batch / t,
            "mfu": 4 * nonembed_params(args.quick) * tok_s / 989.4e12,
            "peak_gib": max(r.get("gpu_mem_gb", float("nan")) for r in rows), "loss_first": rows[0]["loss"],
            "loss_last": rows[-1]["loss"], "step_s_all": [round(r["step_time_s"], 4) for r in rows],
            "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "deepspeed": deepspeed.__version__,
            "phases_median_s": {k: statistics.median(r["phases"][k] for r in meas) for k in meas[0]["phases"]}
            if phases else None,
            "pooling": pooling, "attention": attention, "save_check": saved,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or (
                getattr(trainer, "allocator_setting", None) if engine == "trainer" else None),
            "profile": profile_rows}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="trainer_fast.json")
    p.add_argument("--root", default="/tmp/trainer_fast")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", help="profile the last step of each Trainer variant")
    p.add_argument("--phases", action="store_true", help="time forward+backward and the optimizer step apart")
    p.add_argument("--check-save", action="store_true",
                   help="Trainer variants: save a checkpoint, load it, compare encode of the two models")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(variant_main(args)), flush=True)
        return 0
    if args.quick:
        args.steps, args.warmup = 2, 1
    names = [v for v in args.variants.split(",") if v]
    rows_needed = max(VARIANTS[split_variant(v)[0]][3] for v in names) * (args.steps + args.warmup) if not args.quick else 64
    model_dir, data = make_inputs(Path(args.root), args.quick, rows_needed)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"bench": "trainer_fast", "rows": []}
    for name in names:
        cmd = [sys.executable, "-m", "bench.trainer_fast", "--variant", name, "--model-dir", str(model_dir),
               "--data", str(data), "--steps", str(args.steps), "--warmup", str(args.warmup)] + (
               ["--quick"] if args.quick else []) + (["--profile"] if args.profile else []) + (
               ["--phases"] if args.phases else []) + (["--check-save"] if args.check_save else []) + [
               "--root", args.root]
        t0 = time.time()
        env = {**os.environ, **VARIANT_ENV.get(split_variant(name)[0], {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        sys.stdout.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if " step " in ln))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            results["rows"].append({"variant": name, "error": proc.stderr[-3000:]})
        else:
            r = json.loads(line[0][7:])
            r["wall_s"] = round(time.time() - t0, 1)
            results["rows"].append(r)
        out.write_text(json.dumps(results, indent=1))
    base = next((r for r in results["rows"] if r.get("variant") == "plain-512" and "error" not in r), None)
    print(f"\n{'variant':16s} {'batch':>5s} {'chunk':>5s} {'s/step':>7s} {'useful tok/s':>12s} {'MFU':>6s} {'GiB':>6s} {'vs plain':>8s}")
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['variant']:16s} FAILED")
            continue
        if base:
            r["ratio_vs_plain"] = r["useful_tokens_per_s"] / base["useful_tokens_per_s"]
        print(f"{r['variant']:16s} {r['batch']:5d} {str(r['chunk']):>5s} {r['median_step_s']:7.3f} "
              f"{r['useful_tokens_per_s']:12.0f} {100 * r['mfu']:5.1f}% {r['peak_gib']:6.2f} {r.get('ratio_vs_plain', float('nan')):8.2f}"
              + ("  phases " + " ".join(f"{k}={v * 1000:.0f}ms" for k, v in r["phases_median_s"].items())
                 if r.get("phases_median_s") else ""))
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
