"""The embed_core mteb encoder runs a real local mteb task end to end (STSBenchmark from shared/data), and
each checkpoint gets its own revision so mteb's result cache never mixes two checkpoints."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("MTEB_CACHE", tempfile.mkdtemp(prefix="embed-core-test-mteb-cache-"))

import mteb  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from embed_core.config import EmbedConfig  # noqa: E402
from embed_core.model import EmbeddingModel  # noqa: E402
from embed_core.mteb_encoder import load_encoder, make_encoder  # noqa: E402
from embed_core.mteb_tasks import local_task  # noqa: E402
from tests.conftest import save_tiny_checkpoint  # noqa: E402


def _score(result):
    assert not result.exceptions, result.exceptions
    (tr,) = result.task_results
    return tr.scores["test"][0]["cosine_spearman"]


@pytest.mark.slow
def test_smollm2_encoder_on_local_stsbenchmark(tmp_path):
    """Real SmolLM2-135M (untrained EOS pooling, causal) on local STSBenchmark through mteb.evaluate.

    200 of the 1379 test pairs: the full split takes SmolLM2 ~5 minutes on 2 CPU cores. The full-split
    loading and a full-split score check (all-MiniLM-L6-v2 vs MTEB's published score) are in test_mteb_tasks."""
    model = EmbeddingModel.from_config(EmbedConfig(lora_r=0, max_length=128))
    enc = make_encoder(model, name="embed-sweeps/smollm2-eos-causal", batch_size=64)
    meta = enc.mteb_model_meta
    assert meta.similarity_fn_name.value == "cosine" and meta.embed_dim == 576
    result = mteb.evaluate(enc, [local_task("STSBenchmark", subsample=200)], cache=mteb.ResultCache(tmp_path / "c"),
                           show_progress_bar=False, co2_tracker=False)
    score = _score(result)
    # A base decoder's raw EOS state is a weak sentence embedding, but clearly better than chance.
    assert 0.05 < score < 0.95, score
    saved = tmp_path / "c" / "results" / meta.model_name_as_path() / meta.revision / "STSBenchmark.json"
    assert saved.is_file()


def test_each_checkpoint_gets_its_own_revision_and_result(tiny_dirs, tmp_path):
    dirs = [save_tiny_checkpoint(tiny_dirs["llama"], tmp_path / f"ckpt{seed}", seed, pooling="mean",
                                 attention="bidirectional") for seed in (0, 1)]
    encs = [load_encoder(d, name="embed-sweeps/tiny") for d in dirs]
    revs = [e.mteb_model_meta.revision for e in encs]
    assert revs[0] != revs[1] and all(len(r) == 16 for r in revs)
    # the revision is a content fingerprint: reloading the same checkpoint gives the same one
    assert load_encoder(dirs[0], name="embed-sweeps/tiny").mteb_model_meta.revision == revs[0]

    cache = mteb.ResultCache(tmp_path / "cache")
    task = local_task("STSBenchmark", subsample=64)
    scores = [_score(mteb.evaluate(e, [task], cache=cache, show_progress_bar=False, co2_tracker=False)) for e in encs]
    for r in revs:
        assert (tmp_path / "cache" / "results" / "embed-sweeps__tiny" / r / "STSBenchmark.json").is_file()
    assert scores[0] != scores[1]


def test_instructions_go_to_queries_not_documents(tiny_dirs):
    from mteb.types import PromptType

    m = EmbeddingModel.from_config(EmbedConfig(base_model=str(tiny_dirs["qwen2"]), lora_r=0))
    enc = make_encoder(m)
    task = mteb.get_task("SciFact")
    loader = [{"text": ["aspirin reduces fever"]}]
    q = enc.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    d = enc.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default", prompt_type=PromptType.document)
    plain = m.encode(["aspirin reduces fever"])
    np.testing.assert_allclose(d, plain, atol=1e-6)
    assert np.abs(q - plain).max() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)


def test_small_similarity_products_stay_on_the_cpu(monkeypatch):
    """mteb's device choice is wrapped so that a one-row similarity never pays a GPU round trip; a product above
    the threshold keeps mteb's choice, and wrapping twice is a no-op. The choice mteb would make is pinned to
    CUDA (there is none here) to see the wrapper decide."""
    import mteb.similarity_functions as sf
    import torch

    from embed_core.mteb_encoder import SMALL_SCORING_MACS, fast_mteb_scoring

    monkeypatch.setattr(sf, "_select_device", lambda a, b: torch.device("cuda"))
    fast_mteb_scoring()
    fast_mteb_scoring()
    one, few = torch.zeros(640), torch.zeros(11, 640)
    assert sf._select_device(one, few) == torch.device("cpu")
    rows = SMALL_SCORING_MACS // 640 + 1
    assert sf._select_device(torch.zeros(rows, 640), torch.zeros(2, 640)) == torch.device("cuda")
    assert sf._select_device.keeps_small_on_cpu and sf.cos_sim(one, few).shape == (1, 11)


def test_mteb_scoring_is_not_compiled_call_by_call(monkeypatch):
    """On an H100 (capability 9.0) mteb wraps each cos_sim / dot_score call in torch.compile (~2 ms a call: SummEval's
    ~53k calls took ~100 s a checkpoint). The capability check is pinned to say yes (there is no GPU here): mteb
    compiles, and after fast_mteb_scoring it does not, with the same scores."""
    import mteb.similarity_functions as sf
    import torch

    from embed_core.mteb_encoder import fast_mteb_scoring

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    monkeypatch.setattr(sf, "_use_torch_compile", lambda: True)
    monkeypatch.setattr(sf, "_select_device", sf._select_device)  # restored after the test
    a, b = np.random.default_rng(0).normal(size=(1, 64)), np.random.default_rng(1).normal(size=(11, 64))
    before = sf.cos_sim(a, b)
    assert len(compiled) == 1
    fast_mteb_scoring()
    after = sf.cos_sim(a, b), sf.dot_score(a, b)
    assert len(compiled) == 1 and torch.equal(after[0], before)
