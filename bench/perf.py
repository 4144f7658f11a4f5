"""Side-by-side GPU benchmark: the naive padded baseline vs the project's packed fast path (issue 7).

Qwen2-0.5B-shaped backbone with random weights (no download), PEFT LoRA r16 on every linear layer, bf16,
bidirectional attention, mean pooling, InfoNCE with one hard negative. Text lengths come from
bench/data/lengths.json (token lengths of the project's real training triplets and evaluation texts,
written by bench/make_lengths.py), so the device needs no data set. Token ids are random.

    python -m bench.perf --out $OUT/perf.json          # all sections
    python -m bench.perf --quick                       # tiny model, few steps (a smoke test, CPU or GPU)

Sections (each variant in the same process, one after the other; ratios are within this run):
  train_project_mix : 64 triplets of the real training mix. naive = every text padded to 512, SDPA,
                      gradient checkpointing, one forward per role (as the paper's code); packed = packed
                      rows, FlexAttention document masks, no checkpointing: one row per role, then all roles
                      merged in one row (gradcache.merged_batch_step), then + compile (EmbedConfig.compile);
                      at 64 / 256 / 512 triplets.
  train_issue_mix   : the issue's synthetic mix (queries 8-48 tokens, documents log-normal median 110,
                      capped 512), naive vs packed at 64 triplets.
  gradcache_2048    : GradCache (packed, chunks of 512 texts) at 2048 triplets of the real mix.
  encode            : (--encode-compile: every variant with compiled decoder layers)
                      8192 texts drawn from the evaluation tasks' real texts: naive (batches of 64 padded
                      to 512), the project's old encode (length-sorted, padded per batch of 64) and the
                      packed encode (length-sorted, rows of 16k tokens, FlexAttention).
  profile           : torch.profiler top kernels of one packed training step (512 triplets).

Useful tokens = non-pad tokens. MFU = 4 x non-embedding parameters x useful tokens/s / bf16 dense peak
(training: forward 2 + backward through activations 2, LoRA weight gradients and attention ignored;
encoding uses 2x). Peak memory = torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).parent
LAST: dict = {}
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


class FakeTok:
    eos_token_id = 2
    pad_token_id = 2
    padding_side = "right"


def qwen2_05b(quick: bool):
    from transformers import Qwen2Config

    if quick:
        return Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)


def build(args, attn: str, packing: bool, ckpt: bool = False, pooling: str = "mean", compile: bool = False,
          fused: bool = False):
    from transformers import AutoModel

    from embed_core.config import EmbedConfig
    from embed_core.model import EmbeddingModel, _apply_lora
    from embed_core.packing import register_attention
    from embed_core.pooling import build_pooling

    hc = qwen2_05b(args.quick)
    cfg = EmbedConfig(base_model="qwen2-0.5b-shaped", attention="bidirectional", pooling=pooling, attn_implementation=attn,
                      lora_r=16, dtype="bfloat16", packing=packing, max_length=512, compile=compile, fused_lora=fused)
    torch.manual_seed(0)
    impl = register_attention(attn)
    bb = AutoModel.from_config(hc, attn_implementation=impl).to(torch.bfloat16)  # from_config ignores dtype
    bb.config.use_cache = False
    bb = _apply_lora(bb, cfg, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    if ckpt:
        bb.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pooler = build_pooling(cfg, hc.hidden_size, hc.num_hidden_layers).to(torch.bfloat16)
    model = EmbeddingModel(cfg, bb, pooler, FakeTok(), {"hidden_size": hc.hidden_size, "num_layers": hc.num_hidden_layers})
    return model.to(args.device)


def nonembed_params(args) -> int:
    hc = qwen2_05b(args.quick)
    h, i, L = hc.hidden_size, hc.intermediate_size, hc.num_hidden_layers
    kv = h // hc.num_attention_heads * hc.num_key_value_heads
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * i + 2 * kv + h + 2 * h  # q,o + k,v + mlp + biases + norms
    return L * per_layer + h


# ------------------------------------------------------------------------------------------ data
def load_lengths() -> dict:
    return json.loads((HERE / "data" / "lengths.json").read_text())


def project_triplets(n: int, lengths: dict, rng: random.Random) -> list[tuple[int, int, int]]:
    t = lengths["train"]
    return [(rng.choice(t["query"]), rng.choice(t["positive"]), rng.choice(t["negative"])) for _ in range(n)]


def issue_triplets(n: int, rng: random.Random) -> list[tuple[int, int, int]]:
    doc = lambda: max(8, min(512, int(round(rng.lognormvariate(math.log(110), 0.8)))))  # noqa: E731
    return [(rng.randint(8, 48), doc(), doc()) for _ in range(n)]


def ids_of(lens, vocab: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(n - 1)] + [2] for n in lens]


def roles_of(triplets, vocab, rng) -> dict[str, list[list[int]]]:
    return {r: ids_of([t[k] for t in triplets], vocab, rng) for k, r in enumerate(("query", "positive", "negative"))}


def padded(ids: list[list[int]], length: int | None, device) -> dict[str, torch.Tensor]:
    t = length or max(len(x) for x in ids)
    inp = torch.full((len(ids), t), 2, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return {"input_ids": inp.to(device, non_blocking=True), "attention_mask": mask.to(device, non_blocking=True)}


# ------------------------------------------------------------------------------------------ measuring
def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def reset(args):
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(args) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")


def mfu(args, tok_s: float, mult: int) -> float:
    return mult * nonembed_params(args) * tok_s / args.peak


def train_variant(args, name: str, model, batches: list[dict], mode: str, chunk: int | None = None,
                  merged: bool = False) -> dict:
    """batches: list of {role: ids}. mode: 'padded512' | 'packed'. Steps: warm-up on the first ones."""
    from embed_core.gradcache import full_batch_step, grad_cache_step, merged_batch_step
    from embed_core.loss import info_nce

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=args.device == "cuda")

    def loss_fn(reps):
        return info_nce(reps["query"], reps["positive"], reps.get("negative"), temperature=0.05)

    if mode == "packed":
        embed = lambda c: model(packed=model.pack(c["ids"]).to(model.device))  # noqa: E731
    else:
        embed = lambda c: model(**padded(c["ids"], 512, model.device))  # noqa: E731
    step_fn = grad_cache_step if chunk else (merged_batch_step if merged else full_batch_step)
    times, toks = [], []
    reset(args)
    gc.disable()  # no collector pauses inside timed steps (the token-id lists are millions of Python ints)
    from torch._dynamo.utils import counters

    counters.clear()
    for i, b in enumerate(batches):
        roles = {r: {"ids": ids} for r, ids in b.items()}
        sync(args)
        t0 = time.perf_counter()
        loss, _ = step_fn(embed, roles, loss_fn, chunk)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
            toks.append(sum(len(x) for ids in b.values() for x in ids))
        print(f"  {name} step {i} {dt * 1000:.0f} ms loss {float(loss):.3f}", flush=True)
        LAST["step_ms"] = dt * 1000
    gc.enable()
    tok_s = sum(toks) / sum(times)
    ex_s = len(batches[0]["query"]) * len(times) / sum(times)
    res = {"variant": name, "mode": mode, "merged_roles": merged, "triplets": len(batches[0]["query"]), "chunk": chunk,
           "step_s_median": sorted(times)[len(times) // 2], "useful_tokens_per_s": tok_s, "triplets_per_s": ex_s,
           "mfu": mfu(args, tok_s, 4), "peak_gib": peak_gib(args),
           "useful_tokens_per_step": sum(toks) / len(toks), "measured_steps": len(times),
           "step_s_all": [round(t, 4) for t in times], "graph_breaks": sum(counters["graph_break"].values()),
           "graph_break_reasons": sorted({k.splitlines()[0][:120] for k in counters["graph_break"]})}
    del opt
    return res


def encode_variant(args, name: str, model, ids: list[list[int]], mode: str) -> dict:
    import numpy as np

    model.eval()
    reset(args)
    n = len(ids)
    sync(args)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if mode == "packed":
            out = np.zeros((n, model.embedding_dim), dtype=np.float32)
            order = np.argsort([-len(x) for x in ids], kind="stable")
            model._encode_packed(ids, order, out, True)
        else:
            order = np.argsort([-len(x) for x in ids], kind="stable") if mode == "sorted" else np.arange(n)
            outs = []
            for s in range(0, n, 64):
                idx = order[s:s + 64]
                enc = padded([ids[i] for i in idx], 512 if mode == "padded512" else None, model.device)
                outs.append(torch.nn.functional.normalize(model(**enc).float(), dim=-1))
            out = torch.cat(outs).cpu().numpy()
    sync(args)
    dt = time.perf_counter() - t0
    toks = sum(len(x) for x in ids)
    return {"variant": name, "mode": mode, "texts": n, "seconds": dt, "useful_tokens_per_s": toks / dt,
            "texts_per_s": n / dt, "mfu": mfu(args, toks / dt, 2), "peak_gib": peak_gib(args), "_emb": out}


def kernel_category(name: str) -> str | None:
    """A GPU kernel's category for the profile summaries (None: none of these)."""
    k = name.lower()
    if any(w in k for w in ("flash", "flex", "fmha", "attention")):
        return "attention"
    if any(w in k for w in ("nvjet", "gemm", "cutlass", "xmma", "splitk")):
        return "gemm"
    if any(w in k for w in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    return "fused elementwise (triton)" if k.startswith("triton") else None


def table(rows: list[dict], base: dict) -> list[dict]:
    for r in rows:
        r["ratio_vs_naive"] = r["useful_tokens_per_s"] / base["useful_tokens_per_s"]
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n== {title}")
    print(f"{'variant':34s} {'useful tok/s':>13s} {'ratio':>7s} {'MFU':>6s} {'peak GiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:34s} ERROR {r['error'][:90]}")
            continue
        print(f"{r['variant']:34s} {r['useful_tokens_per_s']:13.0f} {r.get('ratio_vs_naive', float('nan')):7.2f} "
              f"{100 * r['mfu']:5.1f}% {r['peak_gib']:9.2f}")


def guarded(fn, name):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- a failing variant is reported, the others still run
        traceback.print_exc()
        reset_cuda()
        return {"variant": name, "error": f"{type(e).__name__}: {e}"}


def reset_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ sections
def section_train(args, results):
    lengths = load_lengths()
    rng = random.Random(0)
    vocab = qwen2_05b(args.quick).vocab_size
    steps = args.warmup + args.steps
    mix = lambda n, s: [roles_of(project_triplets(n, lengths, random.Random(s + i)), vocab, random.Random(s + i))  # noqa
                        for i in range(steps)]
    b64 = mix(64, 100)
    rows = []
    m = build(args, "sdpa", packing=False, ckpt=True)
    naive = guarded(lambda: train_variant(args, "naive padded-512 +ckpt, 64", m, b64, "padded512"), "naive")
    del m
    reset_cuda()
    rows.append(naive)
    m = build(args, "flex_attention", packing=True)
    big = {n: mix(n, 1000 * n) for n in (256, 512)}
    big[64] = b64
    rows.append(guarded(lambda: train_variant(args, "packed flex, per role, 64", m, b64, "packed"), "packed 64"))
    for n in (64, 256, 512):
        name = f"packed flex, roles merged, {n}"
        rows.append(guarded(lambda: train_variant(args, name, m, big[n], "packed", merged=True), name))
    del m
    reset_cuda()
    m = build(args, "flex_attention", packing=True, compile=True)
    for n in (64, 256, 512):
        name = f"packed flex+compile, merged, {n}"
        rows.append(guarded(lambda: train_variant(args, name, m, big[n], "packed", merged=True), name))
    results["train_project_mix"] = table(rows, naive) if "error" not in naive else rows
    print_rows("train, project's real length mix (triplets/step)", rows)

    # the issue's synthetic mix
    imix = [roles_of(issue_triplets(64, random.Random(7 + i)), vocab, random.Random(7 + i)) for i in range(steps)]
    rows2 = [guarded(lambda: train_variant(args, "packed flex+compile, merged, issue mix 64", m, imix, "packed",
                                           merged=True), "packed issue")]
    del m
    reset_cuda()
    m = build(args, "sdpa", packing=False, ckpt=True)
    nb = guarded(lambda: train_variant(args, "naive padded-512 +ckpt, issue mix 64", m, imix[:args.warmup + 2], "padded512"),
                 "naive issue")
    del m
    reset_cuda()
    rows2.insert(0, nb)
    results["train_issue_mix"] = table(rows2, nb) if "error" not in nb else rows2
    print_rows("train, issue's synthetic mix, 64 triplets", rows2)


def section_gradcache(args, results):
    lengths = load_lengths()
    vocab = qwen2_05b(args.quick).vocab_size
    n = 2048 if not args.quick else 64
    batches = [roles_of(project_triplets(n, lengths, random.Random(50 + i)), vocab, random.Random(50 + i)) for i in range(2)]
    m = build(args, "flex_attention", packing=True, compile=True)
    saved = args.warmup
    args.warmup = 1
    r = guarded(lambda: train_variant(args, f"GradCache packed, {n} triplets, chunk 512", m, batches, "packed", chunk=512),
                "gradcache")
    args.warmup = saved
    del m
    reset_cuda()
    results["gradcache_2048"] = [r]
    print_rows("GradCache at 2048 triplets (real mix, max 512)", [r])


def section_encode(args, results):
    import numpy as np

    lengths = load_lengths()
    rng = random.Random(3)
    pool = [x for v in lengths["eval"].values() for x in v]
    n = 8192 if not args.quick else 256
    lens = [rng.choice(pool) for _ in range(n)]
    vocab = qwen2_05b(args.quick).vocab_size
    ids = ids_of(lens, vocab, rng)
    m = build(args, "flex_attention", packing=True, compile=args.encode_compile)  # padded inputs: SDPA path
    rows = []
    for name, mode in (("naive padded-512, batch 64", "padded512"), ("sorted padded, batch 64 (old encode)", "sorted"),
                       ("packed flex, 16k-token rows", "packed"), ("packed flex (steady state)", "packed")):
        rows.append(guarded(lambda: encode_variant(args, name, m, ids, mode), name))
    embs = [r.pop("_emb", None) for r in rows]
    if embs[0] is not None and embs[-1] is not None:
        cos = (embs[0] * embs[-1]).sum(-1)
        results["encode_packed_vs_padded_min_cosine"] = float(np.min(cos))
    del m
    reset_cuda()
    results["encode"] = table(rows, rows[0]) if "error" not in rows[0] else rows
    print_rows(f"encode {n} eval-task texts (real lengths)", rows)


def section_profile(args, results):
    from torch.profiler import ProfilerActivity, profile

    lengths = load_lengths()
    vocab = qwen2_05b(args.quick).vocab_size
    n = 512 if not args.quick else 32
    batches = [roles_of(project_triplets(n, lengths, random.Random(900 + i)), vocab, random.Random(900 + i)) for i in range(3)]
    attn, fused = FAST_VARIANTS[args.profile_variant]
    m = build(args, attn, packing=True, compile=True, fused=fused)
    saved = (args.warmup, args.steps)
    args.warmup, args.steps = 2, 0
    train_variant(args, "profile warm-up", m, batches[:2] + batches[:1], "packed", merged=True)
    args.warmup = 0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        train_variant(args, "profiled", m, batches[2:], "packed", merged=True)
    args.warmup, args.steps = saved
    key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    evs = list(prof.key_averages())
    if args.device == "cuda":  # kernels only (no CPU-side op rows, which would count the same time twice)
        evs = [e for e in evs if e.self_cpu_time_total == 0 and getattr(e, key, 0) > 0]
    evs.sort(key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in evs) or 1
    results["profile_gpu_busy_ms"] = total / 1000
    results["profile_step_wall_ms"] = LAST.get("step_ms")
    print(f"  profiled step: wall {LAST.get('step_ms', 0):.0f} ms (profiler on), GPU kernels busy {total / 1000:.0f} ms")
    top = [{"name": e.key[:120], "self_us": getattr(e, key, 0), "share": getattr(e, key, 0) / total, "calls": e.count}
           for e in evs[:20]]
    results["profile_packed_train_512"] = top
    cats: dict[str, float] = {}
    for e in evs:
        cat = kernel_category(e.key) or "other"
        cats[cat] = cats.get(cat, 0.0) + getattr(e, key, 0) / total
    results["profile_categories"] = dict(sorted(cats.items(), key=lambda kv: -kv[1]))
    print("  by category: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in results["profile_categories"].items()))
    results["profile_variant"] = args.profile_variant
    print("\n== profile (packed training step, 512 triplets): top kernels by self device time")
    for t in top[:15]:
        print(f"  {100 * t['share']:5.1f}%  {t['calls']:6d}  {t['name'][:100]}")
    del m
    reset_cuda()


FAST_VARIANTS = {  # name: (attn_implementation, fused LoRA)
    "flex+compile": ("flex_attention", False),
    "varlen+compile": ("flash_varlen", False),
    "varlen+fused+compile": ("flash_varlen", True),
    "flex+fused+compile": ("flex_attention", True),
}


def section_fast(args, results):
    """The packed path's kernels side by side in one run: FlexAttention block masks vs variable-length
    FlashAttention, and PEFT's LoRA vs the fused LoRA GEMMs, all compiled, roles merged, at 64 / 256 / 512
    triplets of the real mix; the naive baseline at 64; GradCache 2048 and packed encoding with the fastest."""
    lengths = load_lengths()
    vocab = qwen2_05b(args.quick).vocab_size
    steps = args.warmup + args.steps
    sizes = (64, 256, 512) if not args.quick else (16,)
    big = {n: [roles_of(project_triplets(n, lengths, random.Random(1000 * n + i)), vocab, random.Random(1000 * n + i))
               for i in range(steps)] for n in sizes}
    m = build(args, "sdpa", packing=False, ckpt=True)
    naive = guarded(lambda: train_variant(args, f"naive padded-512 +ckpt, {sizes[0]}", m, big[sizes[0]], "padded512"),
                    "naive")
    del m
    reset_cuda()
    rows = [naive]
    enc_rows, embs = [], []
    pool = [x for v in lengths["eval"].values() for x in v]
    rng = random.Random(3)
    n_enc = 8192 if not args.quick else 256
    enc_ids = ids_of([rng.choice(pool) for _ in range(n_enc)], vocab, rng)
    for vname in [v for v in args.variants.split(",") if v]:
        attn, fused = FAST_VARIANTS[vname]
        m = build(args, attn, packing=True, compile=True, fused=fused)
        if fused:
            results.setdefault("fused_counts", m.info.get("fused_lora"))
        for n in sizes:
            name = f"{vname}, merged, {n}"
            rows.append(guarded(lambda: train_variant(args, name, m, big[n], "packed", merged=True), name))
        for k in range(2):  # the first pass compiles the eval-mode graphs; the second is the steady state
            name = f"encode packed {vname}" + (" (steady)" if k else " (1st, compiles)")
            r = guarded(lambda: encode_variant(args, name, m, enc_ids, "packed"), name)
            if k:
                embs.append(r.pop("_emb", None))
                enc_rows.append(r)
        del m
        reset_cuda()
    results["fast_train"] = table(rows, naive) if "error" not in naive else rows
    print_rows("fast paths, training, real mix (all compiled, roles merged)", rows)
    if len(embs) > 1 and all(e is not None for e in embs):
        results["fast_encode_min_cosine_vs_first"] = float(min((embs[0] * e).sum(-1).min() for e in embs[1:]))
    results["fast_encode"] = enc_rows
    print_rows("fast paths, encoding 8192 eval texts (steady state)", enc_rows)
    print(f"  min cosine between the variants' embeddings: {results.get('fast_encode_min_cosine_vs_first')}")
    if args.gradcache_variant:
        attn, fused = FAST_VARIANTS[args.gradcache_variant]
        n = 2048 if not args.quick else 64
        gb = [roles_of(project_triplets(n, lengths, random.Random(50 + i)), vocab, random.Random(50 + i)) for i in range(2)]
        m = build(args, attn, packing=True, compile=True, fused=fused)
        saved, args.warmup = args.warmup, 1
        name = f"GradCache {args.gradcache_variant}, {n} triplets, chunk 512"
        r = guarded(lambda: train_variant(args, name, m, gb, "packed", chunk=512), name)
        args.warmup = saved
        del m
        reset_cuda()
        results["fast_gradcache_2048"] = [r]
        print_rows("GradCache at 2048 triplets", [r])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE / "results" / "perf.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="train,gradcache,encode,profile")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--encode-compile", action="store_true")
    ap.add_argument("--variants", default=",".join(FAST_VARIANTS), help="section fast: " + ", ".join(FAST_VARIANTS))
    ap.add_argument("--gradcache-variant", default="varlen+fused+compile")
    ap.add_argument("--profile-variant", default="flex+compile")
    args = ap.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    args.peak = next((v for k, v in PEAK_BF16.items() if k in dev_name), 989.4e12)
    if args.quick:
        args.steps, args.warmup = 1, 1
    torch.backends.cuda.matmul.allow_tf32 = True
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = 64  # packed lengths vary: let the compiled flex kernel go dynamic
    import transformers

    try:
        import peft
        peft_v = peft.__version__
    except ImportError:
        peft_v = None
    results = {"device": dev_name, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_v,
               "python": sys.version.split()[0], "cuda": torch.version.cuda,
               "settings": {"model": "Qwen2-0.5B-shaped (24 layers, hidden 896, 14/2 heads, vocab 151936), random weights",
                            "lora": "r16 alpha32 on q,k,v,o,gate,up,down", "dtype": "bfloat16", "attention": "bidirectional",
                            "pooling": "mean", "loss": "InfoNCE, 1 hard negative, t=0.05", "optimizer": "AdamW (fused)",
                            "nonembed_params": nonembed_params(args), "peak_flops_bf16": args.peak,
                            "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
                            "lengths": "bench/data/lengths.json (SmolLM2 tokenizer counts of the real data)"}}
    t0 = time.time()
    for s in args.sections.split(","):
        fn = {"train": section_train, "gradcache": section_gradcache, "encode": section_encode,
              "profile": section_profile, "fast": section_fast}[s]
        guarded(lambda: fn(args, results), s)
        results.setdefault("section_seconds", {})[s] = round(time.time() - t0, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
