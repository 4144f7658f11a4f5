"""Gemma3 on the GPU fast path (run on the device machine; CI has no GPU): packing + FlexAttention (compiled,
head_dim 256) + fused LoRA + compiled layers, bf16, causal and bidirectional, documents past the 512-token
sliding window. The weights are random (the real ones do not travel to the device machine); the config and the
tokenizer are gemma-3-270m's (`.devmodel_gemma/`: config.json + tokenizer files of the converted alias).

    # here: the converted alias's config + tokenizer, and peft as a wheel (the device image lacks it)
    mkdir -p .devmodel_gemma .whl && cp $EMBED_CACHE_DIR/models/gemma-3-270m-q4_k_m-*/{config.json,tokenizer*.json} .devmodel_gemma/
    pip download --no-deps -d .whl peft==0.21.2
    # there (carry .devmodel_gemma and .whl):
    pip install --no-deps .whl/peft-*.whl && python3 -m bench.gemma3_gpu --model-dir .devmodel_gemma --out $OUT/gemma3_gpu.json

Checks: packed (FlexAttention) embeddings == padded (SDPA, per-layer-type 4D masks) embeddings, cosine per text;
LoRA gradients finite and close; then times a few packed training steps.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def random_model_dir(src: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(str(src))
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / f)
    return out


def lengths_rows(model, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    eos = model.tokenizer.eos_token_id
    return [[2] + torch.randint(300, 200000, (n - 2,), generator=g).tolist() + [eos] for n in lengths]


def compare(model, rows) -> dict:
    from embed_core.model import pad_ids

    def run(packed: bool):
        model.zero_grad()
        if packed:
            emb = model(packed=model.pack(rows).to("cuda"))
        else:
            enc = pad_ids(rows, model.tokenizer, model.cfg.max_length)
            emb = model(enc["input_ids"].cuda(), enc["attention_mask"].cuda())
        emb.float().pow(2).sum().backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return emb.float().detach(), grads

    e_pack, g_pack = run(True)
    e_pad, g_pad = run(False)
    cos = torch.nn.functional.cosine_similarity(e_pack, e_pad, dim=-1)
    rel = [float((g_pack[n] - g_pad[n]).norm() / g_pad[n].norm().clamp(min=1e-12)) for n in g_pad if "lora" in n]
    finite = all(bool(torch.isfinite(g).all()) for g in g_pack.values())
    return {"min_cos": float(cos.min()), "grad_rel_err_max": max(rel), "grad_rel_err_median": sorted(rel)[len(rel) // 2],
            "grads_finite": finite, "n_lora_grads": len(rel)}


def time_steps(model, rows, steps: int = 10) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t = time.perf_counter()
        opt.zero_grad()
        model(packed=model.pack(rows).to("cuda")).float().pow(2).sum().backward()
        opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from embed_core.config import EmbedConfig
    from embed_core.model import EmbeddingModel

    base = random_model_dir(Path(args.model_dir), Path("/tmp/gemma3_random"))
    lengths = [700, 530, 300, 64, 40, 17, 5, 128, 256, 90]  # two documents past the 512 window
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "lengths": lengths, "runs": []}
    for attention in ("bidirectional", "causal"):
        cfg = EmbedConfig(base_model=str(base), lora_r=16, pooling="multi_layer_trainable", attention=attention,
                          packing=True, attn_implementation="flex_attention", fused_lora=True, compile=True,
                          max_length=1024, dtype="bfloat16")
        model = EmbeddingModel.from_config(cfg, device="cuda").train()
        rows = lengths_rows(model, lengths)
        entry = {"attention": attention, "fused_lora": model.info.get("fused_lora"), "window": model.window}
        try:
            entry.update(compare(model, rows))
            entry["s_per_step"] = time_steps(model, rows)
        except Exception as e:  # report, do not hide: the probe's point is what breaks on the GPU
            entry["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(json.dumps(entry), flush=True)
        results["runs"].append(entry)
        del model
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
