"""What a sweep's trials need of a GPU, known before any trial starts (`sweeps check` prints it; `run` uses it to
share a GPU between trials safely). The estimate itself is `embed_core.memory`; this module feeds it each base
model's structure (config only, on the meta device) and the sweep's training texts."""
from __future__ import annotations

import torch

from embed_core.backbone import meta_backbone, preflight
from embed_core.memory import MemoryEstimate, estimate, forward_tokens
from embed_core.pooling import build_pooling
from embed_core.train_config import TrainConfig

from .config import Cell, SweepConfig


def _counts(tcfg: TrainConfig) -> dict[str, int]:
    """Backbone / trainable parameter counts and the sizes the activations scale with, from the config alone."""

    pre = preflight(tcfg.model, convert=False)  # a GGUF's header only: `check` reads no weights
    net = meta_backbone(pre.hf_config, tcfg.model)
    r = tcfg.model.lora_r
    lora = sum(r * (m.in_features + m.out_features) for n, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in pre.lora_targets) if r else 0
    with torch.device("meta"):
        head = sum(p.numel() for p in build_pooling(tcfg.model, pre.hidden_size, pre.num_layers).parameters())
    layers = tcfg.model.truncate_layers or pre.num_layers
    return {"params": sum(p.numel() for p in net.parameters()), "trainable": lora + head, "layers": layers,
            "hidden": pre.hidden_size,
            "intermediate": int(getattr(pre.hf_config, "intermediate_size", 4 * pre.hidden_size))}


def trial_memory(sweep: SweepConfig, cell: Cell, examples: list) -> MemoryEstimate:
    """The GPU memory one worker of `cell`'s trials needs at its largest step (the LoRA rank's largest choice)."""
    lora_r, lr = sweep.probe_values(cell)
    tcfg = sweep.train_config(cell, max(sweep.params_for(cell)[0].choices or [lora_r]), lr)
    c = _counts(tcfg)
    workers = sweep.resources_for(cell).num_workers
    fmt = tcfg.model.format_query
    texts = [[fmt(ex.query, ex.instruction), ex.positive, *ex.negatives[: tcfg.num_negatives]] for ex in examples]
    tokens = forward_tokens(texts, tcfg.batch_size, workers, tcfg.chunk_size, tcfg.packing, tcfg.model.max_length)
    dtype_bytes = 4 if tcfg.precision == "fp32" else 2
    return estimate(c["params"], c["trainable"], c["layers"], c["hidden"], c["intermediate"], tokens, dtype_bytes,
                    compiled=tcfg.model.compile)


def memory_plan(sweep: SweepConfig, examples: list) -> dict[str, MemoryEstimate]:
    """cell key -> estimate, for the most demanding cell of each base model (designs differ only by the small
    pooling head; the base model and the data decide)."""
    plan: dict[str, MemoryEstimate] = {}
    for model in dict.fromkeys(c.base_model for c in sweep.cells()):  # the models of this part of the sweep
        cells = [c for c in sweep.cells() if c.base_model == model]
        one_per_design = {c.design: c for c in cells}.values()
        best = max((trial_memory(sweep, c, examples) for c in one_per_design), key=lambda e: e.total_gib)
        plan[model] = best
    return plan


__all__ = ["memory_plan", "trial_memory"]
