"""Tests for embed_core.loss: InfoNCE against a hand-computed reference, the NaN guard, and the
exactness of cross-device negatives (2 gloo processes == 1 process on the concatenated batch),
also through GradCache. Real torch throughout (no mocks)."""
from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from embed_core.errors import ConfigError, DataError
from embed_core.gradcache import full_batch_step, grad_cache_step
from embed_core.loss import all_gather_with_grad, check_finite, info_nce


# --------------------------------------------------------------------------- reference (numpy)
def _ref_info_nce(q, p, negs, t):
    """Loop-by-loop InfoNCE in float64 numpy: candidates = all positives + all hard negatives."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    cands = [unit(p)]
    if negs is not None:
        n = np.asarray(negs, np.float64)
        cands.append(unit(n.reshape(-1, n.shape[-1])))
    c = np.concatenate(cands, 0)
    qn = unit(q)
    losses, hits = [], []
    for i in range(len(q)):
        logits = np.array([qn[i] @ c[j] for j in range(len(c))]) / t
        mx = logits.max()
        losses.append(-(logits[i] - (mx + math.log(np.exp(logits - mx).sum()))))
        hits.append(float(np.argmax(logits) == i))
    pos_sim = float(np.mean([qn[i] @ c[i] for i in range(len(q))]))
    return float(np.mean(losses)), float(np.mean(hits)), pos_sim


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# --------------------------------------------------------------------------- single process
def test_info_nce_matches_hand_computed_reference():
    b, k, d = 6, 3, 5
    q, p, negs = _rand(b, d, seed=1), _rand(b, d, seed=2), _rand(b, k, d, seed=3)
    p = p + 1.5 * q  # make positives related so the accuracy metric is not trivially 0
    loss, m = info_nce(q, p, negs, temperature=0.07)
    ref_loss, ref_acc, ref_pos = _ref_info_nce(q.numpy(), p.numpy(), negs.numpy(), 0.07)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    assert m["acc"] == pytest.approx(ref_acc)
    assert m["pos_sim"] == pytest.approx(ref_pos, abs=1e-12)
    assert set(m) == {"acc", "pos_sim", "neg_sim", "hard_neg_sim"}
    # flattened [B*K, d] negatives are the same candidate set
    loss_flat, _ = info_nce(q, p, negs.reshape(-1, d), temperature=0.07)
    assert loss_flat.item() == pytest.approx(loss.item(), rel=1e-14)
    # without negatives: only in-batch candidates
    loss0, m0 = info_nce(q, p, None, temperature=0.07)
    assert loss0.item() == pytest.approx(_ref_info_nce(q.numpy(), p.numpy(), None, 0.07)[0], rel=1e-12)
    assert "hard_neg_sim" not in m0


def test_temperature_scaling_and_cosine_invariance():
    q, p, negs = _rand(5, 4, seed=4), _rand(5, 4, seed=5), _rand(5, 2, 4, seed=6)
    for t in (0.01, 0.05, 0.3, 1.0):
        loss, _ = info_nce(q, p, negs, temperature=t)
        assert loss.item() == pytest.approx(_ref_info_nce(q, p, negs, t)[0], rel=1e-12)
    # cosine similarity: rescaling embeddings changes nothing
    loss, _ = info_nce(q, p, negs, temperature=0.05)
    loss_scaled, _ = info_nce(3.0 * q, 0.2 * p, 7.0 * negs, temperature=0.05)
    assert loss_scaled.item() == pytest.approx(loss.item(), rel=1e-12)
    # logits are cos / t: with perfectly aligned, mutually orthogonal pairs a lower t means lower loss
    eye = torch.eye(4, dtype=torch.float64)
    hi, _ = info_nce(eye, eye, temperature=1.0)
    lo, _ = info_nce(eye, eye, temperature=0.1)
    assert hi.item() == pytest.approx(-(1.0 - math.log(math.e + 3)), rel=1e-12)
    assert lo.item() < hi.item()
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            info_nce(q, p, temperature=bad)


def test_hard_negatives_change_the_loss():
    q, p = _rand(4, 8, seed=7), _rand(4, 8, seed=8)
    base, _ = info_nce(q, p, None)
    easy, m_easy = info_nce(q, p, -q.unsqueeze(1))  # anti-aligned with their own query
    hard, m_hard = info_nce(q, p, (q + 0.01 * _rand(4, 8, seed=9)).unsqueeze(1))  # near copies of q
    assert base.item() < easy.item() < hard.item()  # any extra candidate raises the loss
    assert hard.item() - base.item() > 1.0
    assert m_hard["hard_neg_sim"] > m_easy["hard_neg_sim"]


def test_info_nce_gradcheck_and_shapes():
    q = _rand(3, 4, seed=10).requires_grad_()
    p = _rand(3, 4, seed=11).requires_grad_()
    n = _rand(3, 2, 4, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: info_nce(a, b, c, temperature=0.2)[0], (q, p, n))
    with pytest.raises(ValueError):
        info_nce(_rand(3, 4), _rand(2, 4))
    with pytest.raises(ValueError):
        info_nce(_rand(3, 4), _rand(3, 4), _rand(2, 2, 4))
    # bf16 inputs: logits computed in float32
    loss, _ = info_nce(q.detach().bfloat16(), p.detach().bfloat16(), n.detach().bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # no process group: gather is a no-op
    assert all_gather_with_grad(q) is q
    assert info_nce(q, p, n, gather=True)[0].item() == info_nce(q, p, n, gather=False)[0].item()


def test_unsynced_metrics_are_device_tensors_with_the_same_values():
    """sync=False (the Trainer's call: no host sync between forward and backward) keeps the metrics as
    0-dim tensors; their values are the synced floats."""
    q, p, n = _rand(5, 8), _rand(5, 8, seed=1), _rand(5, 2, 8, seed=2)
    loss, floats = info_nce(q, p, n, temperature=0.05)
    loss2, tensors = info_nce(q, p, n, temperature=0.05, sync=False)
    assert loss2.item() == loss.item() and set(tensors) == set(floats) == {"acc", "pos_sim", "neg_sim", "hard_neg_sim"}
    for k, v in tensors.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and isinstance(floats[k], float)
        assert v.item() == pytest.approx(floats[k], rel=1e-12)


def test_check_finite_guard():
    check_finite(torch.tensor(0.3), step=1)
    check_finite(2.5, step=2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(FloatingPointError, match=r"step 7"):
            check_finite(torch.tensor(bad), step=7)
    q = _rand(3, 4)
    q[0, 0] = float("nan")
    loss, _ = info_nce(q, _rand(3, 4, seed=1))
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        check_finite(loss, step=11)


# --------------------------------------------------------------------------- distributed (gloo)
B_TOTAL, K_NEG, SEQ, VOCAB, HID, OUT, LORA_R = 8, 2, 6, 30, 16, 8, 4
WORLD = 2


class TinyEncoder(nn.Module):
    """Embedding -> Linear + LoRA-like low-rank adapter -> tanh -> masked mean pool -> head."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HID)
        self.base = nn.Linear(HID, HID)
        self.lora_a = nn.Parameter(0.3 * torch.randn(LORA_R, HID))
        self.lora_b = nn.Parameter(0.3 * torch.randn(HID, LORA_R))  # non-zero so both get grads
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(HID, OUT)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.emb(input_ids))
        h = torch.tanh(self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T * 0.5)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def _make_model() -> TinyEncoder:
    torch.manual_seed(1234)  # identical init on every rank
    return TinyEncoder().double()


def _make_batch() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(99)

    def role(n):
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        lens = torch.randint(1, SEQ + 1, (n,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lens[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}

    return {"query": role(B_TOTAL), "positive": role(B_TOTAL), "negative": role(B_TOTAL * K_NEG)}


def _local(batch, rank: int, world: int):
    """Rank `rank`'s shard: its queries, their positives and their K hard negatives each."""
    out = {}
    for name, fields in batch.items():
        n = fields["input_ids"].shape[0] // world
        out[name] = {k: v[rank * n:(rank + 1) * n] for k, v in fields.items()}
    return out


def _embed(model):
    return lambda chunk: model(chunk["input_ids"], chunk["attention_mask"])


def _loss_fn(reps):
    q = reps["query"]
    return info_nce(q, reps["positive"], reps["negative"].view(q.shape[0], K_NEG, -1), temperature=0.05)


def _flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        local = _local(_make_batch(), rank, world)
        results = {}
        for name, step, chunk in (("full", full_batch_step, None), ("gradcache", grad_cache_step, 3)):
            model = _make_model()
            loss, metrics = step(_embed(model), local, _loss_fn, chunk)
            grads = _flat_grads(model)
            dist.all_reduce(grads)  # data-parallel gradient AVERAGING, as DDP / DeepSpeed do
            grads /= world
            loss_mean = loss.clone()
            dist.all_reduce(loss_mean)
            loss_mean /= world
            results[name] = {"loss": loss_mean, "grads": grads, "local_loss": loss}
        # unequal local batch sizes are refused on every rank (and do not hang)
        n = 3 if rank == 0 else 2
        try:
            info_nce(torch.randn(n, 4), torch.randn(n, 4))
            results["unequal_error"] = None
        except DataError as e:
            results["unequal_error"] = str(e)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_ranks_with_gathered_negatives_equal_one_big_batch(tmp_path):
    """2 gloo ranks x 4 queries (+8 hard negatives each), gather + grad averaging == 1 rank x 8.

    Tolerance: float64, rtol 1e-9 / atol 1e-12 (only summation order differs).
    """
    mp.spawn(_dist_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = _make_model()
    ref_loss, _ = full_batch_step(_embed(model), _make_batch(), _loss_fn)
    ref_grads = _flat_grads(model)
    assert ref_grads.abs().max() > 1e-4  # a meaningful comparison

    for res in ranks:
        for name in ("full", "gradcache"):
            torch.testing.assert_close(res[name]["loss"], ref_loss, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(res[name]["grads"], ref_grads, rtol=1e-9, atol=1e-12)
        assert res["unequal_error"] is not None and "same local batch" in res["unequal_error"]
    # the two ranks really computed different local losses (their queries differ)
    assert not torch.allclose(ranks[0]["full"]["local_loss"], ranks[1]["full"]["local_loss"])
    # without the gather (local negatives only) the mean loss would differ from the big batch
    model = _make_model()
    per_rank = [
        full_batch_step(_embed(model), _local(_make_batch(), r, WORLD), _loss_fn)[0] for r in range(WORLD)
    ]
    assert abs(float(sum(per_rank)) / WORLD - ref_loss.item()) > 1e-3
