"""Cross-device negatives with the real model: 2 gloo workers, each embedding half the batch with a PEFT-LoRA
tiny Llama (+ trainable pooling head), give the same loss and the same LoRA / head gradients (after the
data-parallel averaging DeepSpeed does) as 1 worker on the concatenated batch. float64; tolerance rtol 1e-8."""
from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embed_core.config import EmbedConfig
from embed_core.gradcache import full_batch_step, grad_cache_step
from embed_core.loss import info_nce
from embed_core.model import EmbeddingModel

QUERIES = ["A man plays a guitar on stage.", "Two kids are running in a park.", "A woman slices an onion.",
           "The dog catches a frisbee.", "A chef cooks pasta in a kitchen.", "People wait for the bus.",
           "A cyclist rides up a hill.", "Children build a sandcastle."]
POSITIVES = ["Someone performs music.", "Children play outside.", "A person is cutting a vegetable.",
             "An animal plays with a toy.", "Food is being prepared.", "Commuters stand at a stop.",
             "A person is riding a bike.", "Kids are at the beach."]
NEGATIVES = ["Nobody is playing music.", "The kids are asleep indoors.", "A man is sleeping.",
             "The cat is sleeping on the couch.", "The kitchen is empty.", "A plane takes off.",
             "A car is parked.", "It is snowing in the mountains."]
WORLD = 2


def _model(model_dir: str) -> EmbeddingModel:
    cfg = EmbedConfig(base_model=model_dir, lora_r=4, pooling="last_layer_trainable", attention="bidirectional",
                      num_latents=4, max_length=32)
    m = EmbeddingModel.from_config(cfg, seed=7).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.backbone.named_parameters():
            if "lora_B" in n:  # PEFT starts B at zero; move it so that lora_A gets gradients too
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return m


def _roles(model: EmbeddingModel, lo: int, hi: int) -> dict:
    return {"query": model.tokenize(QUERIES[lo:hi]), "positive": model.tokenize(POSITIVES[lo:hi]),
            "negative": model.tokenize(NEGATIVES[lo:hi])}


def _step(model: EmbeddingModel, roles: dict, chunk: int | None):
    def loss_fn(reps):
        return info_nce(reps["query"], reps["positive"], reps["negative"], temperature=0.05)

    embed = lambda c: model(c["input_ids"], c["attention_mask"])  # noqa: E731
    fn = grad_cache_step if chunk else full_batch_step
    return fn(embed, roles, loss_fn, chunk)


def _grads(model: EmbeddingModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        n = len(QUERIES) // WORLD
        results = {}
        for chunk in (None, 2):
            model = _model(model_dir)
            loss, _ = _step(model, _roles(model, rank * n, (rank + 1) * n), chunk)
            grads = _grads(model)
            for g in grads.values():  # data-parallel averaging, as DeepSpeed does
                dist.all_reduce(g)
                g /= WORLD
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[str(chunk)] = {"loss": mean_loss / WORLD, "grads": grads}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_workers_equal_one_worker_with_peft_lora(tiny_dirs, tmp_path):
    mp.spawn(_worker, args=(_port(), str(tiny_dirs["llama"]), str(tmp_path)), nprocs=WORLD, join=True)
    model = _model(str(tiny_dirs["llama"]))
    ref_loss, _ = _step(model, _roles(model, 0, len(QUERIES)), None)
    ref = _grads(model)
    lora = [n for n in ref if "lora_A" in n or "lora_B" in n]
    assert lora and any("pooler" in n for n in ref)
    assert all(ref[n].abs().max() > 0 for n in lora)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for chunk in ("None", "2"):
            torch.testing.assert_close(res[chunk]["loss"], ref_loss.detach(), rtol=1e-8, atol=1e-10)
            assert res[chunk]["grads"].keys() == ref.keys()
            for n, g in ref.items():
                torch.testing.assert_close(res[chunk]["grads"][n], g, rtol=1e-7, atol=1e-10, msg=n)
