"""Tests for embed_core.gradcache: GradCache is exact (same loss and parameter gradients as the
plain full-batch step, dropout included thanks to RNG replay) and its activation memory grows with
the chunk size, not with the batch. Real torch (float64 on CPU), no mocks."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn as nn

from embed_core import gradcache
from embed_core.gradcache import (RandContext, full_batch_step, grad_cache_step, iter_chunks, merged_chunk_count,
                                  merged_chunks, merged_grad_cache_step)
from embed_core.loss import info_nce

VOCAB = 40


class TinyEncoder(nn.Module):
    """Embedding -> dropout -> Linear + LoRA-like adapter -> tanh -> masked mean pool -> head."""

    def __init__(self, hidden: int = 16, out: int = 8, rank: int = 4, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, hidden)
        self.base = nn.Linear(hidden, hidden)
        self.lora_a = nn.Parameter(0.3 * torch.randn(rank, hidden))
        self.lora_b = nn.Parameter(0.3 * torch.randn(hidden, rank))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.emb(input_ids))
        h = torch.tanh(self.base(x) + self.drop(x @ self.lora_a.T) @ self.lora_b.T * 0.5)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def make_model(seed: int = 0, **kw) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder(**kw).double().train()


def make_roles(b: int, k: int = 2, seq: int = 7, seed: int = 5) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def role(n):
        ids = torch.randint(0, VOCAB, (n, seq), generator=g)
        lens = torch.randint(1, seq + 1, (n,), generator=g)
        return {"input_ids": ids, "attention_mask": (torch.arange(seq)[None] < lens[:, None]).long()}

    return {"query": role(b), "positive": role(b), "negative": role(b * k)}


def embed_with(model):
    return lambda chunk: model(chunk["input_ids"], chunk["attention_mask"])


def loss_fn(reps):
    return info_nce(reps["query"], reps["positive"], reps["negative"], temperature=0.05)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def run(step, chunk, dropout=0.0, b=10, seed_rng=7, **kw):
    model = make_model(dropout=dropout)
    roles = make_roles(b)
    torch.manual_seed(seed_rng)  # same RNG stream for dropout in both methods
    loss, metrics = step(embed_with(model), roles, loss_fn, chunk, **kw)
    return loss, metrics, grads_of(model), torch.get_rng_state()


def assert_grads_close(a, b, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_grad_cache_matches_full_batch(chunk):
    """No dropout: any chunking gives the full-batch loss and gradients (float64, rtol 1e-9)."""
    ref_loss, ref_m, ref_g, _ = run(full_batch_step, None)
    loss, m, g, _ = run(grad_cache_step, chunk)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert m == pytest.approx(ref_m)
    assert_grads_close(g, ref_g)
    assert all(v.abs().max() > 0 for v in ref_g.values())  # LoRA A and B both get gradient


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_grad_cache_replays_dropout(chunk):
    """Dropout 0.3: the re-embedding pass replays each chunk's masks, so results are exact."""
    ref_loss, _, ref_g, ref_rng = run(full_batch_step, chunk, dropout=0.3)
    loss, _, g, rng = run(grad_cache_step, chunk, dropout=0.3)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_grads_close(g, ref_g)
    # the replay forks the RNG: the caller's stream advances exactly as in the plain step
    assert torch.equal(rng, ref_rng)
    # and dropout is really active (different from the dropout-free loss)
    assert abs(loss.item() - run(full_batch_step, chunk)[0].item()) > 1e-6


def test_without_rng_replay_gradients_would_differ(monkeypatch):
    class NoReplay:  # records nothing, restores nothing
        def __init__(self, *a):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    ref_loss, _, ref_g, _ = run(full_batch_step, 3, dropout=0.3)
    monkeypatch.setattr(gradcache, "RandContext", NoReplay)
    loss, _, g, _ = run(grad_cache_step, 3, dropout=0.3)
    torch.testing.assert_close(loss, ref_loss)  # the loss comes from the first (no-grad) pass
    assert any(not torch.allclose(g[n], ref_g[n], rtol=1e-6, atol=1e-9) for n in g)


def test_rand_context_replays_and_restores():
    torch.manual_seed(0)
    ctx = RandContext()
    a = torch.rand(5)
    after = torch.get_rng_state()
    with ctx:
        b = torch.rand(5)
        torch.rand(100)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), after)


def test_backward_fn_hook_is_used_per_chunk():
    """backward_fn(surrogate) (e.g. DeepSpeed engine.backward) gives the same gradients."""
    calls = []

    def backward_fn(surrogate):
        assert surrogate.dim() == 0 and surrogate.requires_grad
        calls.append(1)
        surrogate.backward()

    ref_loss, _, ref_g, _ = run(full_batch_step, 4, dropout=0.2)
    loss, _, g, _ = run(grad_cache_step, 4, dropout=0.2, backward_fn=backward_fn)
    assert len(calls) == 3 + 3 + 5  # ceil(10/4) query + positive chunks, ceil(20/4) negatives
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_grads_close(g, ref_g)
    # full_batch_step passes the loss itself to backward_fn
    seen = []
    run(full_batch_step, None, dropout=0.2, backward_fn=lambda l: (seen.append(l), l.backward()))
    assert len(seen) == 1


@pytest.mark.parametrize("chunk", [1, 4, 9, 1000])
def test_merged_grad_cache_matches_full_batch(chunk):
    """Chunks holding every role (the packed Trainer's GradCache): the full-batch loss, metrics and gradients,
    one backward per merged chunk."""
    calls = []
    ref_loss, ref_m, ref_g, _ = run(full_batch_step, None)
    loss, m, g, _ = run(merged_grad_cache_step, chunk, backward_fn=lambda s: (calls.append(1), s.backward()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert m == pytest.approx(ref_m)
    assert_grads_close(g, ref_g)
    assert len(calls) == merged_chunk_count(make_roles(10), chunk) == min(-(-40 // chunk), 20)


def test_merged_chunks_cover_every_row_once_in_proportion():
    roles = {"query": {"row": list(range(10))}, "positive": {"row": list(range(100, 110))},
             "negative": {"row": list(range(200, 220))}}  # 2 hard negatives per query
    chunks, layout = merged_chunks(roles, 8)
    assert len(chunks) == merged_chunk_count(roles, 8) == 5
    assert sorted(x for c in chunks for x in c["row"]) == sorted(x for f in roles.values() for x in f["row"])
    for c, pieces in zip(chunks, layout):
        assert len(c["row"]) <= 8 + len(roles) - 1
        assert [r for r, _, _ in pieces] == ["query", "positive", "negative"]  # every chunk holds every role
        sizes = {r: b - a for r, a, b in pieces}
        assert sizes["query"] == sizes["positive"] and sizes["negative"] == 2 * sizes["query"]
        assert c["row"] == [x for r, a, b in pieces for x in roles[r]["row"][a:b]]
    with pytest.raises(ValueError, match="same fields"):
        merged_chunks({"query": {"row": [1]}, "positive": {"ids": [2]}}, 1)


def test_grads_accumulate_like_backward():
    model = make_model()
    roles = make_roles(6)
    grad_cache_step(embed_with(model), roles, loss_fn, 4)
    once = grads_of(model)
    grad_cache_step(embed_with(model), roles, loss_fn, 4)
    assert_grads_close(grads_of(model), {n: 2 * v for n, v in once.items()})


def test_list_fields_are_chunked_with_tensors_and_inputs_validated():
    roles = make_roles(5)
    for name, fields in roles.items():
        fields["row"] = list(range(fields["input_ids"].shape[0]))
    model = make_model()
    seen = []

    def embed(chunk):
        assert isinstance(chunk["row"], list) and len(chunk["row"]) == chunk["input_ids"].shape[0]
        seen.extend(chunk["row"])
        return model(chunk["input_ids"], chunk["attention_mask"])

    grad_cache_step(embed, roles, loss_fn, 2)
    assert seen == 2 * (list(range(5)) + list(range(5)) + list(range(10)))  # two passes, in order
    assert [len(c["row"]) for c in iter_chunks(roles["query"], 2)] == [2, 2, 1]

    with pytest.raises(ValueError, match="share their first dimension"):
        grad_cache_step(embed, {"query": {"input_ids": torch.zeros(3, 2), "row": [1, 2]}}, loss_fn, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_step(embed, roles, loss_fn, 0)
    with pytest.raises(ValueError, match="roles is empty"):
        full_batch_step(embed, {}, loss_fn)
    with pytest.raises(ValueError, match=r"Tensor\[n, d\]"):
        grad_cache_step(lambda c: torch.zeros(1), roles, loss_fn, 2)


# --------------------------------------------------------------------------- memory
class SavedBytes:
    """Live and peak bytes of tensors saved for backward (saved_tensors_hooks), by storage."""

    class _Handle:
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def __init__(self):
        self.refs: dict[int, list[int]] = {}
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [1, st.nbytes()]
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        h = self._Handle(t)
        weakref.finalize(h, self._release, key)  # fires when autograd frees the saved tensor
        return h

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    @staticmethod
    def unpack(h):
        return h.t


def peak_saved_bytes(step, b: int, chunk: int | None) -> int:
    model = make_model(hidden=128, out=16, rank=8)
    roles = make_roles(b, k=1, seq=64)
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        step(embed_with(model), roles, loss_fn, chunk)
    assert counter.live == 0 and not counter.refs  # every saved tensor was released again
    return counter.peak


def test_memory_grows_with_chunk_size_not_batch():
    gc_64_8 = peak_saved_bytes(grad_cache_step, 64, 8)
    gc_16_8 = peak_saved_bytes(grad_cache_step, 16, 8)
    gc_64_16 = peak_saved_bytes(grad_cache_step, 64, 16)
    full_64 = peak_saved_bytes(full_batch_step, 64, None)
    full_16 = peak_saved_bytes(full_batch_step, 16, None)
    print(f"peak saved bytes: gc(64,8)={gc_64_8} gc(16,8)={gc_16_8} gc(64,16)={gc_64_16} "
          f"full(64)={full_64} full(16)={full_16}")
    assert gc_64_8 <= 1.1 * gc_16_8  # 4x the batch, same chunk: ~same memory
    assert gc_64_16 >= 1.6 * gc_64_8  # 2x the chunk: ~2x memory
    assert full_64 >= 3.5 * full_16  # plain step: memory ~ batch
    assert full_64 >= 10 * gc_64_8  # (3 roles x 64 rows) / 8-row chunk = 24x in theory
