"""Attention alone on one packed row of the real training mix (device machine): FlexAttention block masks and
varlen FlashAttention (embed_core.packing), forward and forward + backward, with CUDA-event timing; and each
one's error against a float64 per-document reference on a smaller row, outputs and gradients, causal and
bidirectional. Qwen2-0.5B heads (14 query / 2 kv heads of 64). What a new packed attention has to beat.

    python -m bench.attn --out $OUT/attn.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from bench.perf import load_lengths, project_triplets
from embed_core import packing as pk

HQ, HK, D = 14, 2, 64


def lengths_of(tokens: int, seed: int) -> list[int]:
    rng, lengths, lens = random.Random(seed), load_lengths(), []
    while sum(lens) < tokens:
        lens += project_triplets(1, lengths, rng)[0]
    return lens


def make(lens: list[int], impl: str, causal: bool):
    """(pack, fn(q, k, v) -> [T, HQ, D]) for one implementation."""
    flex = impl == "flex_attention"
    pack = pk.pack_ids([[5] * n for n in lens], 2, pad_to=pk.FLEX_BLOCK if flex else 1).to("cuda")
    if flex:
        bm = pk.flex_block_mask(pack, causal)
        f = pk._flex_fn(True)
        return pack, lambda q, k, v: f(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       block_mask=bm, enable_gqa=True)[0].transpose(0, 1)
    if impl == "flash_varlen":
        kw = pk.varlen_kwargs(pack)
        return pack, lambda q, k, v: pk.varlen_attention(q, k, v, kw["cu_seq_lens_q"], kw["max_length_q"], causal)
    raise SystemExit(f"unknown attention implementation {impl!r}: flex_attention or flash_varlen")


def qkv(t: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(t, h, D, device="cuda", dtype=dtype, generator=g).requires_grad_() for h in (HQ, HK, HK)]


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def accuracy(impl: str, causal: bool, lens: list[int]) -> dict:
    pack, fn = make(lens, impl, causal)
    t = pack.input_ids.shape[1]
    q, k, v = qkv(t, seed=1)
    out = fn(q, k, v)[: pack.num_real_tokens]
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    cu = pk.cu_seqlens(pk.pack_ids([[5] * n for n in lens], 2))
    ref = pk._varlen_reference(q64[: pack.num_real_tokens], k64[: pack.num_real_tokens], v64[: pack.num_real_tokens],
                               cu.cuda(), causal, None)
    rgrads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    return {"out": rel(out, ref), **{f"d{n}": rel(a[: pack.num_real_tokens], b[: pack.num_real_tokens])
                                     for n, a, b in zip("qkv", grads, rgrads)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=45000)
    ap.add_argument("--check-tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--impls", default="flex_attention,flash_varlen")
    ap.add_argument("--out", default="attn.json")
    args = ap.parse_args()
    pk.allow_recompiles()
    lens, small = lengths_of(args.tokens, 0), lengths_of(args.check_tokens, 7)
    rows = []
    for impl in args.impls.split(","):
        for causal in (False, True):
            row = {"impl": impl, "causal": causal, "tokens": sum(lens), "docs": len(lens)}
            try:
                pack, fn = make(lens, impl, causal)
                q, k, v = qkv(pack.input_ids.shape[1])
                go = torch.randn(q.shape, device="cuda", dtype=q.dtype)

                def fwd():
                    with torch.no_grad():
                        fn(q, k, v)

                def fwd_bwd():
                    torch.autograd.backward(fn(q, k, v), go)

                row["fwd_ms"], row["fwd_bwd_ms"] = timed(fwd, args.iters), timed(fwd_bwd, args.iters)
                row["rel_err"] = accuracy(impl, causal, small)
            except Exception as e:  # one failing implementation must not lose the others
                import traceback

                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"bench": "attn", "device": torch.cuda.get_device_name(),
                                          "torch": torch.__version__, "heads": [HQ, HK, D], "rows": rows}, indent=1))
    print(f"\n{'impl':16s} {'causal':6s} {'fwd ms':>7s} {'fwd+bwd ms':>10s}  rel err out / dq / dk / dv")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:16s} {r['causal']!s:6s} FAILED {r['error'][:80]}")
            continue
        e = r["rel_err"]
        print(f"{r['impl']:16s} {r['causal']!s:6s} {r['fwd_ms']:7.3f} {r['fwd_bwd_ms']:10.3f}  "
              f"{e['out']:.1e} / {e['dq']:.1e} / {e['dk']:.1e} / {e['dv']:.1e}")


if __name__ == "__main__":
    main()
