"""Does torch.compile's persistent cache serve a second process? The sweep's compiled Trainer path on CPU.

    TORCHINDUCTOR_CACHE_DIR=/tmp/cc python -m bench.compile_cache_probe --model-dir DIR [--start-step N] [--steps 2]

Builds a Trainer on a tiny backbone with ``compile``, ``flex_attention``, packing and fused LoRA (the sweep's GPU
path), compiles its decoder layers on CPU too (the model compiles only on a GPU by itself), runs ``--steps``
optimizer steps from ``--start-step`` (a resumed run starts at another batch) and prints, as one JSON line,
the wall time of each step and the compiler's cache counters (``inductor`` / ``aot_autograd``). Run it twice
with the same cache folder: the second process should hit the FX graph and AOTAutograd caches.
``--real-flex``: run FlexAttention under grad too (the GPU graph), not the CPU tests' dense-SDPA fallback.
``--make-model DIR``: write a tiny random Llama (the tests' `tiny_config`) with the SmolLM2 tokenizer, then exit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROWS = 24


def make_model(out: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from embed_core.backbone import resolve_source
    from embed_core.config import EmbedConfig
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("llama")).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(resolve_source(EmbedConfig()).path).save_pretrained(str(out))


def write_data(path: Path) -> None:
    with path.open("w") as fh:
        for i in range(ROWS * 4):
            fh.write(json.dumps({"query": f"which thing {i} is number {i * 7 % 13}? " * (1 + i % 3),
                                 "positive": f"The thing tagged {i} stands here, next to {i % 5}.",
                                 "negatives": [f"Another thing {i + 1} elsewhere."]}) + "\n")


def patch_cpu_flex_template() -> None:
    """torch 2.13's CPU FlexAttention template renames its split-size symbols with str.replace, so ``ks1`` also
    rewrites ``ks16`` (C++ error "cur_kvSplitSize6 was not declared"); the same renaming on word boundaries."""
    import inspect
    import re
    import textwrap

    import torch._inductor.compile_fx  # noqa: F401 - imports the codegen modules in their order
    from torch._inductor.codegen import cpp_flex_attention_template as mod

    cls = mod.CppFlexAttentionTemplate
    src = textwrap.dedent(inspect.getsource(cls.modification))
    fixed = re.sub(r"output_code\.replace\(\s*(kernel_group\.args\.sizevars\[\w+\]),\s*(\"\w+\")\s*\)",
                   r"__import__('re').sub(r'\\b' + __import__('re').escape(\1) + r'\\b', \2, output_code)", src)
    assert fixed.count("__import__('re').sub") == 2, "the template changed: patch no longer applies"
    ns: dict = {}
    exec(compile(fixed, mod.__file__, "exec"), vars(mod), ns)  # noqa: S102 - a probe's patch of torch's own source
    cls.modification = ns["modification"]


def cache_counters() -> dict:
    from torch._dynamo.utils import counters

    return {g: {k: int(v) for k, v in counters[g].items()} for g in ("inductor", "aot_autograd")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir")
    p.add_argument("--make-model")
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--real-flex", action="store_true")
    p.add_argument("--gpu-flex-fn", action="store_true",
                   help="packing._flex_fn as on a GPU (torch.compile'd flex_attention) for the no-grad pass too")
    p.add_argument("--no-fused-lora", action="store_true")
    p.add_argument("--attn", default="flex_attention")
    p.add_argument("--save-checkpoint", help="save a checkpoint here after the steps (for --resume)")
    p.add_argument("--resume", help="load this checkpoint first, as a resumed trial does")
    a = p.parse_args()
    if a.make_model:
        make_model(Path(a.make_model))
        return
    torch.set_num_threads(1)
    patch_cpu_flex_template()
    from embed_core import packing as pk
    from embed_core.distributed import init_single_process_group
    from embed_core.model import EmbeddingModel
    from embed_core.train_config import TrainConfig
    from embed_core.trainer import Trainer

    orig_maybe = EmbeddingModel.maybe_compile

    def maybe_compile_cpu(self):  # the model compiles only on a GPU: here on CPU too
        if self.cfg.compile and not getattr(self, "_compiled", False):
            self.compile_layers()
            self._compiled = True

    EmbeddingModel.maybe_compile = maybe_compile_cpu
    if a.gpu_flex_fn:
        flex_fn = pk._flex_fn
        pk._flex_fn = lambda is_cuda: flex_fn(True)
    if a.real_flex:
        import torch.nn.attention.flex_attention as fa
        from torch.nn.attention.flex_attention import BlockMask

        # trace the GPU's training graph on CPU: its Inductor cache key is computed before the lowering, which
        # then fails (CPU FlexAttention compiles for inference only); this check would stop it before that
        fa._validate_device = lambda *args: None

        orig = pk.flex_attention_forward

        def flex_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
            if not isinstance(attention_mask, BlockMask):
                return orig(module, query, key, value, attention_mask, scaling, dropout, **kw)
            out = pk._flex_fn(True)(query, key, value, block_mask=attention_mask, scale=scaling,
                                    enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous(), None

        pk.flex_attention_forward = flex_forward
    data = Path(os.environ.get("PROBE_DATA", "/tmp/compile_cache_probe_data.jsonl"))
    if not data.exists():
        write_data(data)
    init_single_process_group()
    tcfg = TrainConfig(model=dict(base_model=a.model_dir, lora_r=4, max_length=32, pooling="last_layer_trainable",
                                  num_latents=4, compile=True, attn_implementation=a.attn, packing=True,
                                  fused_lora=not a.no_fused_lora),
                       train_data=[str(data)], batch_size=8, num_negatives=1, lr=1e-3,
                       max_steps=50, zero_stage=2, seed=0, packing=True,
                       chunk_size=a.chunk_size)
    t0 = time.perf_counter()
    trainer = Trainer(tcfg, device="cpu")
    built = time.perf_counter() - t0
    trainer.step = a.start_step
    if a.resume:
        trainer.load_checkpoint(a.resume)
    times, counts = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        trainer.run_step()
        times.append(round(time.perf_counter() - t, 2))
        counts.append(cache_counters())
    if a.save_checkpoint:
        trainer.save_checkpoint(a.save_checkpoint)
    print(json.dumps({"torch": torch.__version__, "pid": os.getpid(), "build_s": round(built, 2),
                      "step_s": times, "counters_after_each_step": counts,
                      "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip teardown (DeepSpeed, process group): the numbers are out


if __name__ == "__main__":
    main()
