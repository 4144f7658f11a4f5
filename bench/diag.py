"""Diagnostics of the packed path on the GPU: per-call time, pack+copy time, block-mask time, profiler tables.

    python -m bench.diag
"""
import random, time, torch, json, sys
from bench.perf import build, ids_of, load_lengths, qwen2_05b
import torch._dynamo as dynamo
from torch.profiler import profile, ProfilerActivity
dynamo.config.cache_size_limit = 64
class A: quick = False; device = "cuda"
args = A()
L = load_lengths()
pool = [x for v in L["eval"].values() for x in v]
rng = random.Random(0)
vocab = qwen2_05b(False).vocab_size
def row(n_tokens, seed):
    r = random.Random(seed); ids, t = [], 0
    while t < n_tokens:
        x = r.choice(pool); ids.append(x); t += x
    return ids_of(ids, vocab, r)
m = build(args, "flex_attention", packing=True).eval()
rows = [row(16000, s) for s in range(12)]
def timeit(fn, n):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for i in range(n): fn(i)
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / n
with torch.inference_mode():
    packs = [m.pack(r).to("cuda") for r in rows]
    for i in range(4): m(packed=packs[i])
    torch.cuda.synchronize()
    print("same pack x5   ms", 1000 * timeit(lambda i: m(packed=packs[0]), 5))
    print("diff packs x8  ms", 1000 * timeit(lambda i: m(packed=packs[4 + i]), 8))
    print("pack+h2d only  ms", 1000 * timeit(lambda i: m.pack(rows[i]).to("cuda"), 8))
    from embed_core import packing as pk
    print("blockmask only ms", 1000 * timeit(lambda i: pk.flex_block_mask(packs[i], False), 8))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        m(packed=packs[1]); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    # no-LoRA backbone, same pack: the ceiling without peft
    bb = m.backbone.get_base_model()
    mask = pk.flex_block_mask(packs[0], False)
    f = lambda i: bb(input_ids=packs[0].input_ids, attention_mask=mask, position_ids=packs[0].position_ids, use_cache=False)
    f(0); print("base (no LoRA) same pack ms", 1000 * timeit(f, 5))
    with m.backbone.disable_adapter():
        pass
print(dict(dynamo.utils.counters["stats"]), dict(dynamo.utils.counters.get("recompiles", {})))
