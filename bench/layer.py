"""One decoder layer of the Qwen2-0.5B shape on one packed row, PEFT LoRA vs fused LoRA (embed_core.fused_lora),
eager and compiled, training (forward + backward) and inference; CUDA-event timing and a kernel profile by
category. Isolates the LoRA linears from the rest of a training step (run on the device machine).

    python -m bench.layer --tokens 45000 --out $OUT/layer.json            # appends rows to --out
    python -m bench.layer --shape mistral-7b --tokens 16384 --variants 10,11 --out $OUT/layer.json
    python -m bench.layer --attn flex_attention,flash_varlen --variants 11 --out $OUT/layer.json
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch


SHAPES = {  # hidden, intermediate, heads, kv heads
    "qwen2-0.5b": (896, 4864, 14, 2),
    "qwen2-1.5b": (1536, 8960, 12, 2),
    "mistral-7b": (4096, 14336, 32, 8),
}


def make_layer(fused: bool, compiled: bool, attn: str, shape: str = "qwen2-0.5b"):
    from transformers import AutoModel

    from bench.perf import qwen2_05b
    from embed_core.config import EmbedConfig
    from embed_core.fused_lora import fuse_lora
    from embed_core.model import _apply_lora
    from embed_core.packing import register_attention

    hc = qwen2_05b(False)
    hc.num_hidden_layers = 1
    hc.hidden_size, hc.intermediate_size, hc.num_attention_heads, hc.num_key_value_heads = SHAPES[shape]
    hc.head_dim = hc.hidden_size // hc.num_attention_heads
    cfg = EmbedConfig(base_model="x", lora_r=16, dtype="bfloat16")
    torch.manual_seed(0)
    impl = register_attention(attn)
    bb = AutoModel.from_config(hc, attn_implementation=impl).to(torch.bfloat16)
    bb = _apply_lora(bb, cfg, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with torch.no_grad():
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    if fused:
        fuse_lora(bb)
    layer = bb.base_model.model.layers[0].cuda()
    for m in layer.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
    rotary = bb.base_model.model.rotary_emb.cuda()
    if compiled:
        layer.compile(dynamic=True)
    return layer, rotary


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def categories(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    from bench.perf import kernel_category

    cats: dict[str, float] = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total != 0 or e.self_device_time_total <= 0:
            continue
        cat = kernel_category(e.key) or "other: " + e.key[:40]
        cats[cat] = cats.get(cat, 0.0) + e.self_device_time_total / 1000
    return dict(sorted(cats.items(), key=lambda kv: -kv[1])[:8])


def layer_row(args, attn: str, bits: str, pack, t: int, kw: dict, params: int, h: int) -> dict:
    compiled, fused = bits[0] == "1", bits[1] == "1"
    layer, rotary = make_layer(fused, compiled, attn, args.shape)
    x = torch.randn(1, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pe = rotary(x, pack.position_ids)

    def train():
        out = layer(x, position_ids=pack.position_ids, position_embeddings=pe, **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    def infer():
        with torch.inference_mode():
            layer(x.detach(), position_ids=pack.position_ids, position_embeddings=pe, **kw)

    tr, inf = timed(train, args.iters), timed(infer, args.iters)
    row = {"shape": args.shape, "attn": attn, "compiled": compiled, "fused": fused, "tokens": t, "peak_tflops": 989.4,
           "train_mfu": 4 * params * t / tr / 1e9 / 989.4, "infer_mfu": 2 * params * t / inf / 1e9 / 989.4,
           "train_ms": tr, "infer_ms": inf,
           "train_linear_tflops": 4 * params * t / tr / 1e9, "infer_linear_tflops": 2 * params * t / inf / 1e9,
           "train_kernels_ms": categories(train), "infer_kernels_ms": categories(infer)}
    print(f"{args.shape} {attn} compiled={compiled!s:5} fused={fused!s:5} train {tr:7.2f} ms ({row['train_linear_tflops']:.0f} TFLOP/s)"
          f"  infer {inf:6.2f} ms ({row['infer_linear_tflops']:.0f} TFLOP/s)", flush=True)
    print("   train:", {k: round(v, 2) for k, v in row["train_kernels_ms"].items()})
    print("   infer:", {k: round(v, 2) for k, v in row["infer_kernels_ms"].items()}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=45000)
    ap.add_argument("--doc", type=int, default=0, help="tokens per document; 0 = the real training mix (bench/data)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--attn", default="flash_varlen", help="comma-separated: flex_attention, flash_varlen")
    ap.add_argument("--shape", default="qwen2-0.5b", choices=list(SHAPES))
    ap.add_argument("--variants", default="00,01,10,11", help="compiled+fused bits, e.g. 10 = compiled, PEFT LoRA")
    ap.add_argument("--out", default="layer.json")
    args = ap.parse_args()
    from embed_core import packing as pk

    torch._dynamo.config.cache_size_limit = 64
    if args.doc:
        lens = [args.doc] * (args.tokens // args.doc)
    else:  # the project's real training mix (queries, positives, negatives), as in bench.perf
        import random

        from bench.perf import load_lengths, project_triplets

        rng, lengths, lens = random.Random(0), load_lengths(), []
        while sum(lens) < args.tokens:
            lens += project_triplets(1, lengths, rng)[0]
    ids = [[5] * n for n in lens]
    h, inter, heads, kvh = SHAPES[args.shape]
    params = 3 * h * inter + 2 * h * h + 2 * h * (h // heads * kvh)
    rows = []
    for attn in args.attn.split(","):
        flex = attn == "flex_attention"
        pack = pk.pack_ids(ids, 2, pad_to=pk.FLEX_BLOCK if flex else 1).to("cuda")
        t = pack.input_ids.shape[1]
        kw = {"attention_mask": pk.flex_block_mask(pack, causal=False) if flex else None}
        if attn == "flash_varlen":
            kw.update(pk.varlen_kwargs(pack))
        for bits in args.variants.split(","):
            try:
                rows.append(layer_row(args, attn, bits, pack, t, kw, params, h))
            except Exception as e:  # one failing variant must not lose the others
                import traceback

                traceback.print_exc()
                rows.append({"shape": args.shape, "attn": attn, "variant": bits, "error": f"{type(e).__name__}: {e}"[:2000]})
            gc.collect()
            torch.cuda.empty_cache()
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "doc_tokens": args.doc, "attn": args.attn, "rows": old["rows"] + rows}, indent=1))


if __name__ == "__main__":
    main()
