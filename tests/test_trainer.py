"""Tests of embed_core.trainer (DeepSpeed ZeRO 1/2/3 + GradCache, on CPU over gloo) and ray_jobs.train
(Ray Train V2, 2 CPU workers): real DeepSpeed, real Ray, tiny random backbones from `tiny_dirs`.

* single process (a 1-rank gloo group in this process): every ZeRO stage trains; the GradCache
  (chunked) gradients equal plain PyTorch autograd on the whole batch and the chunked step's update
  equals the unchunked one; ZeRO-3 saves a non-empty adapter that EmbeddingModel.load reads back
  with the trained model's embeddings; a checkpoint resumes to the same next step; a NaN loss stops.
* Ray: 2 workers / ZeRO-2 / 4 steps; a worker SIGKILLed at step 3 resumes from the step-2
  checkpoint and ends with the same batches, losses and weights as the uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

# Before ray is imported / started: no token auth for the throw-away local cluster (Ray >= 2.59 turns
# it on by default for a new local ray.init()), full worker logs, generous start-up on a busy machine.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from embed_core.errors import ConfigError, DataError  # noqa: E402
from embed_core.model import EmbeddingModel  # noqa: E402
from embed_core.distributed import configure_cuda_allocator, destroy_single_process_group, init_single_process_group  # noqa: E402
from embed_core.engine import WarmupLinear, ds_config, gathered_trainable_state  # noqa: E402
from embed_core.train_config import TrainConfig  # noqa: E402
from embed_core.train_data import batch_fingerprint  # noqa: E402
from embed_core.trainer import DEEPSPEED_DIR, MODEL_DIR, STATE_FILE, Trainer, read_trainer_state  # noqa: E402

pytestmark = pytest.mark.slow

TINY_MODEL = dict(lora_r=4, max_length=32, pooling="last_layer_trainable", num_latents=4)
COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
THINGS = ["car", "house", "bird", "boat", "lamp", "chair", "kite", "cup", "shoe", "book"]


# ============================================================================================ fixtures
@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """64 small (query, positive, 2 negatives) examples, half with an instruction."""
    path = tmp_path_factory.mktemp("train_data") / "train.jsonl"
    with path.open("w") as fh:
        for i in range(64):
            c, t = COLORS[i % 8], THINGS[(i // 8) % 10]
            row = {"query": f"which {t} is {c} number {i}?",
                   "positive": f"The {c} {t} with the tag {i} stands here.",
                   "negatives": [f"The {COLORS[(i + 3) % 8]} {t} is elsewhere.",
                                 f"A {c} {THINGS[(i + 1) % 10]} without a tag."],
                   "instruction": "Retrieve the matching description" if i % 2 else None}
            fh.write(json.dumps(row) + "\n")
    return path


def make_config(tiny_dirs, train_file, **kw) -> TrainConfig:
    base = dict(model=dict(TINY_MODEL, base_model=str(tiny_dirs["llama"])), train_data=[str(train_file)],
                batch_size=8, num_negatives=2, lr=1e-3, max_steps=3, zero_stage=2, seed=0)
    base.update(kw)
    if base["zero_stage"] == 3 and "deepspeed_overrides" not in kw:
        # partition even the tiny LoRA tensors (DeepSpeed keeps params < 1e5 elements whole by default),
        # so the ZeRO-3 gather / save path is really exercised
        base["deepspeed_overrides"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def single_process():
    """A 1-rank gloo group in this process (what DeepSpeed needs), one intra-op thread (no
    oversubscription on a 2-core machine); torn down with DeepSpeed's global comm backend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_single_process_group()
    yield
    torch.set_num_threads(threads)
    destroy_single_process_group()


def trainable_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).detach().float().clone()
            for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference_step(single_process, tiny_dirs, train_file):
    """Plain PyTorch (no DeepSpeed, no chunking): loss and parameter gradients on step 0's batch."""
    from embed_core.gradcache import full_batch_step
    from embed_core.loss import info_nce
    from embed_core.train_config import model_config
    from embed_core.train_data import TrainData

    tcfg = make_config(tiny_dirs, train_file)
    model = EmbeddingModel.from_config(model_config(tcfg, on_gpu=False), device="cpu", seed=tcfg.seed).train()
    batch = TrainData(tcfg).local_batch(0, 0, 1, model.cfg.format_query)
    roles = {"query": model.tokenize(batch["queries"]), "positive": model.tokenize(batch["positives"]),
             "negative": model.tokenize(batch["negatives"])}
    loss, _ = full_batch_step(lambda c: model(c["input_ids"], c["attention_mask"]), roles,
                              lambda r: info_nce(r["query"], r["positive"], r["negative"], tcfg.temperature))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return batch, float(loss), grads


# ============================================================================================ config
@pytest.mark.parametrize("changes, world, match", [
    (dict(batch_size=15), 2, "not divisible by the number of workers"),
    (dict(zero_stage=4), None, "zero_stage must be 1, 2 or 3"),
    (dict(zero_stage=0), None, "zero_stage must be 1, 2 or 3"),
    (dict(lr=-1e-5), None, "lr must be"),
    (dict(lr=float("nan")), None, "lr must be"),
    (dict(lr=3.0), None, "lr must be"),
    (dict(temperature=0.0), None, "temperature"),
    (dict(chunk_size=0), None, "chunk_size"),
    (dict(max_steps=0), None, "max_steps"),
    (dict(warmup_steps=10, max_steps=3), None, "warmup_steps"),
    (dict(eval_every=5, val_size=0), None, "val_size"),
    (dict(precision="fp16"), None, "unknown precision"),
    (dict(train_data=[]), None, "no training data"),
    (dict(builders=["sick"]), None, "unknown builder"),
    (dict(model={"base_model": "x", "pooling": "max"}), None, "unknown pooling"),
    (dict(model={"base_model": "x", "poling": "mean"}), None, "unknown EmbedConfig field"),
    (dict(model={"base_model": "x", "lora_r": 0, "pooling": "mean"}), None, "nothing to train"),
    (dict(deepspeed_overrides={"gradient_accumulation_steps": 4}), None, "may not set"),
    (dict(deepspeed_overrides={"zero_optimization": {"stage": 0}}), None, "may not set"),
])
def test_bad_config_raises_config_error(tiny_dirs, train_file, changes, world, match):
    with pytest.raises(ConfigError, match=match):
        make_config(tiny_dirs, train_file, **changes).validate(world)


def test_run_training_rejects_bad_config_and_data_before_ray(tiny_dirs, train_file, tmp_path, monkeypatch):
    import ray
    import ray.train.torch

    from ray_jobs.train import run_training

    def boom(*a, **k):
        raise AssertionError("Ray must not be touched when the config or data is bad")

    monkeypatch.setattr(ray, "init", boom)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", boom)
    with pytest.raises(ConfigError, match="not divisible"):
        run_training(make_config(tiny_dirs, train_file, batch_size=15), num_workers=2, storage_path=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        run_training(make_config(tiny_dirs, train_file, train_data=[str(tmp_path / "missing.jsonl")]),
                     num_workers=2, storage_path=tmp_path)
    with pytest.raises(DataError, match="do not fill one global batch"):
        run_training(make_config(tiny_dirs, train_file, batch_size=128), num_workers=2, storage_path=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(['{"query": "q"}', "not json", '{"positive": "p"}'] * 10))
    with pytest.raises(DataError, match="malformed"):
        run_training(make_config(tiny_dirs, train_file, train_data=[str(bad)]), num_workers=2, storage_path=tmp_path)


def test_cli_arguments_build_the_config(tmp_path):
    from sweeps.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(
        ["train", "--base-model", "/m", "--pooling", "mean", "--attention", "bidirectional", "--num-workers", "2",
         "--zero-stage", "3", "--max-steps", "3", "--batch-size", "16", "--max-length", "64", "--chunk-size", "4",
         "--train-data", "a.jsonl", "b.jsonl", "--output", str(tmp_path)])
    tcfg = train_config_from_args(args)
    assert (tcfg.model.pooling, tcfg.model.attention, tcfg.model.max_length) == ("mean", "bidirectional", 64)
    assert (tcfg.zero_stage, tcfg.max_steps, tcfg.batch_size, tcfg.chunk_size) == (3, 3, 16, 4)
    assert tcfg.train_data == ["a.jsonl", "b.jsonl"] and args.num_workers == 2


def test_ds_config_and_schedule(tiny_dirs, train_file):
    tcfg = make_config(tiny_dirs, train_file, batch_size=16, zero_stage=3, grad_clip=0.5,
                       deepspeed_overrides={"zero_optimization": {"overlap_comm": False}})
    conf = ds_config(tcfg, world_size=2, on_gpu=False)
    assert conf["zero_optimization"] == {"stage": 3, "overlap_comm": False}  # overrides merged
    assert conf["train_batch_size"] == 16 and conf["train_micro_batch_size_per_gpu"] == 8
    assert conf["gradient_accumulation_steps"] == 1 and conf["zero_optimization"]["stage"] == 3
    assert conf["gradient_clipping"] == 0.5 and conf["bf16"]["enabled"] is False
    assert ds_config(tcfg, 2, on_gpu=True)["bf16"]["enabled"] is True  # precision auto: bf16 on GPU
    # DeepSpeed's per-tensor overflow check: kept for ZeRO-3, replaced by the Trainer's fused one for ZeRO-1/2
    assert conf["bf16"]["check_grad_overflow"] is True
    assert ds_config(tcfg.replace(zero_stage=2), 2, on_gpu=True)["bf16"]["check_grad_overflow"] is False
    back_on = tcfg.replace(zero_stage=2, deepspeed_overrides={"bf16": {"check_grad_overflow": True}})
    assert ds_config(back_on, 2, on_gpu=True)["bf16"] == {"enabled": True, "check_grad_overflow": True}
    sched = WarmupLinear(warmup=2, total=6)
    assert [round(sched(s), 4) for s in range(6)] == [0.3333, 0.6667, 1.0, 0.75, 0.5, 0.25]


def test_batches_are_deterministic_resumable_and_independent_of_world_size(tiny_dirs, train_file):
    from embed_core.train_data import TrainData

    tcfg = make_config(tiny_dirs, train_file, batch_size=8, val_size=8, num_negatives=2)
    data = TrainData(tcfg)
    assert (len(data.train), len(data.val), data.steps_per_epoch) == (56, 8, 7)
    assert not {e.query for e in data.val} & {e.query for e in data.train}  # held out of training
    assert data.position(7) == (1, 0) and data.position(15) == (2, 1)
    epoch0 = [batch_fingerprint(data.global_batch(s)) for s in range(7)]
    epoch1 = [batch_fingerprint(data.global_batch(s)) for s in range(7, 14)]
    assert len(set(epoch0)) == 7 and epoch0 != epoch1
    again = TrainData(tcfg)  # a fresh process (a resumed worker) computes the same order
    assert [batch_fingerprint(again.global_batch(s)) for s in range(14)] == epoch0 + epoch1
    def fmt(text, instruction):
        return f"{instruction}|{text}" if instruction else text

    whole = data.local_batch(9, 0, 1, fmt)
    halves = [data.local_batch(9, r, 2, fmt) for r in (0, 1)]
    for key in ("queries", "positives", "negatives"):
        assert halves[0][key] + halves[1][key] == whole[key]
    assert len(whole["negatives"]) == 8 * 2 and halves[0]["fingerprint"] == whole["fingerprint"]


# ============================================================================================ DeepSpeed, 1 process
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_gradcache_is_exact(stage, single_process, reference_step, tiny_dirs, train_file):
    """Chunked GradCache through DeepSpeed (several engine.backward calls per step, one accumulation
    boundary) gives the plain-autograd full-batch gradients, and the same update as the unchunked step."""
    batch, ref_loss, ref_grads = reference_step
    chunked = Trainer(make_config(tiny_dirs, train_file, zero_stage=stage, chunk_size=3))
    assert chunked.engine.zero_optimization_stage() == stage
    loss, _, _ = chunked.forward_backward(batch)  # query 3+3+2, positive 3+3+2, negative 6x3 rows: 12 backwards
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    grads = trainable_grads(chunked)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    chunked.engine.step()
    after_chunked = gathered_trainable_state(chunked.engine, chunked.model)

    plain = Trainer(make_config(tiny_dirs, train_file, zero_stage=stage, chunk_size=None))
    before = gathered_trainable_state(plain.engine, plain.model)
    first = plain.run_step()  # step 1: the same batch, one forward and one backward
    assert first["loss"] == pytest.approx(ref_loss, rel=1e-5)
    after_plain = gathered_trainable_state(plain.engine, plain.model)
    # Adam's first update is lr * g / (|g| + eps): elements whose gradient is ~eps amplify float noise,
    # so the updates agree to a tenth of the lr (each weight moved by ~lr); the gradients were exact above
    for part in (0, 1):  # LoRA adapter, pooling head
        for k, v in after_plain[part].items():
            torch.testing.assert_close(after_chunked[part][k], v, rtol=0, atol=0.1 * 1e-3, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(v, before[0][k]) for k, v in after_plain[0].items()), "LoRA weights did not move"
    rest = [plain.run_step() for _ in range(2)]
    assert [m["step"] for m in rest] == [2, 3] and all(math.isfinite(m["loss"]) for m in [first, *rest])


def test_zero3_saves_nonempty_adapter_and_resumes(single_process, tiny_dirs, train_file, tmp_path):
    tcfg = make_config(tiny_dirs, train_file, zero_stage=3, chunk_size=4, max_steps=3, val_size=8, eval_every=2)
    trainer = Trainer(tcfg, log_dir=str(tmp_path / "tb"))
    for _ in range(2):
        metrics = trainer.run_step()
    assert 0.0 <= metrics["val_acc"] <= 1.0 and "val_margin" in metrics
    # the pitfall: under ZeRO-3 the module's own LoRA tensors are empty placeholders ...
    naive_adapter, _ = trainer.model.trainable_state()
    assert any(v.numel() == 0 for v in naive_adapter.values())
    with pytest.raises(RuntimeError, match="empty LoRA adapter"):
        trainer.model.save(tmp_path / "naive")
    # ... so save_checkpoint gathers them first
    ckpt = trainer.save_checkpoint(tmp_path / "ckpt")
    adapter, head = gathered_trainable_state(trainer.engine, trainer.model)
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # trained (B starts at 0)
    assert (ckpt / MODEL_DIR / "adapter" / "adapter_model.safetensors").is_file()
    assert (ckpt / DEEPSPEED_DIR / "latest").read_text().strip() == "step_00000002"
    state = read_trainer_state(ckpt)
    assert state["step"] == 2 and [h["step"] for h in state["history"]] == [1, 2]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    loaded = EmbeddingModel.load(ckpt / MODEL_DIR)
    texts = ["which red car is number 0?", "The blue kite with the tag 12 stands here.", "a cup"]
    enc = loaded.tokenize(texts)
    trainer.engine.eval()
    with torch.no_grad():
        trained = trainer.engine(enc["input_ids"], enc["attention_mask"]).float()
        again = loaded(enc["input_ids"], enc["attention_mask"]).float()
    trainer.engine.train()
    torch.testing.assert_close(again, trained, rtol=1e-4, atol=1e-5)

    # resume: a fresh ZeRO-3 trainer loaded from the checkpoint takes the same 3rd step
    expected = trainer.run_step()
    expected_state = gathered_trainable_state(trainer.engine, trainer.model)
    resumed = Trainer(tcfg)
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 2 and resumed.resumes == [2]
    got = resumed.run_step()
    assert got["step"] == 3 and got["batch_fp"] == expected["batch_fp"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5) and got["lr"] == expected["lr"]
    got_state = gathered_trainable_state(resumed.engine, resumed.model)
    for k, v in expected_state[0].items():
        torch.testing.assert_close(got_state[0][k], v, rtol=1e-5, atol=1e-6)
    trainer.close()


def test_nan_loss_stops_with_clear_error(single_process, tiny_dirs, train_file):
    """temperature 1e-40: cos / tau overflows float32 to inf, the cross-entropy turns NaN."""
    trainer = Trainer(make_config(tiny_dirs, train_file, temperature=1e-40))
    before = gathered_trainable_state(trainer.engine, trainer.model)[0]
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at step 1"):
        trainer.run_step()
    assert trainer.step == 0 and trainer.history == []
    after = gathered_trainable_state(trainer.engine, trainer.model)[0]
    assert all(torch.equal(after[k], before[k]) for k in before)  # stopped before any update


@pytest.mark.parametrize("stage", [1, 2])
def test_nan_gradient_with_finite_loss_stops_before_the_update(stage, single_process, tiny_dirs, train_file):
    """DeepSpeed's per-tensor overflow check is off for ZeRO-1/2 (ds_config): the Trainer's own fused check finds a
    NaN gradient behind a finite loss in the gradients DeepSpeed would step on, and refuses the step."""
    from embed_core.engine import gradients_finite_flag, pending_gradients

    trainer = Trainer(make_config(tiny_dirs, train_file, zero_stage=stage))
    grads = pending_gradients(trainer.engine)
    assert grads is not None
    trainer.run_step()  # a clean step: the check passes and the update happens
    assert trainer.step == 1
    before = gathered_trainable_state(trainer.engine, trainer.model)[0]
    param = next(p for n, p in trainer.model.backbone.named_parameters() if "lora_B" in n)
    handle = param.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite gradients .* at step 2 with a finite loss"):
        trainer.run_step()
    handle.remove()
    grads = pending_gradients(trainer.engine)
    assert grads and not torch.isfinite(gradients_finite_flag(grads, trainer.device))  # the NaN reached them
    assert trainer.step == 1 and len(trainer.history) == 1
    after = gathered_trainable_state(trainer.engine, trainer.model)[0]
    assert all(torch.equal(after[k], before[k]) for k in before)  # no update
    trainer.close()


def test_zero3_leaves_the_gradient_check_to_deepspeed(single_process, tiny_dirs, train_file):
    from embed_core.engine import pending_gradients

    trainer = Trainer(make_config(tiny_dirs, train_file, zero_stage=3))
    assert pending_gradients(trainer.engine) is None
    trainer.close()


# ============================================================================================ Ray Train
@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_config(tiny_dirs, train_file) -> TrainConfig:
    return make_config(tiny_dirs, train_file, batch_size=16, chunk_size=4, num_negatives=1, max_steps=4,
                       checkpoint_every=2, zero_stage=2)


@pytest.fixture(scope="module")
def plain_run(ray_local, ray_config, tmp_path_factory):
    from ray_jobs.train import run_training

    return run_training(ray_config, num_workers=2, storage_path=tmp_path_factory.mktemp("ray_runs"),
                        name="plain", max_failures=0)


def expected_fingerprints(tcfg: TrainConfig, steps: int) -> list[str]:
    """The deterministic batch order straight from the data layer (val_size 0: all examples train)."""
    from embed_core.data import make_batches, read_jsonl

    batches = make_batches(read_jsonl(tcfg.train_data[0]), tcfg.batch_size, seed=tcfg.seed, epoch=0)
    return [batch_fingerprint(b) for b in batches[:steps]]


def test_ray_train_two_workers_zero2(plain_run, ray_config):
    out = plain_run
    assert out.metrics["step"] == 4 and out.metrics["world_size"] == 2 and math.isfinite(out.metrics["loss"])
    assert Path(out.checkpoint_path).name == "checkpoint_00000004"
    assert [h["step"] for h in out.history] == [1, 2, 3, 4] and out.resumes == []
    assert [h["batch_fp"] for h in out.history] == expected_fingerprints(ray_config, 4)
    # both workers' DeepSpeed shards were merged into the one checkpoint directory
    tag_dir = Path(out.checkpoint_path) / DEEPSPEED_DIR / "step_00000004"
    assert sorted(p.name for p in tag_dir.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (Path(out.checkpoint_path) / STATE_FILE).is_file()
    model = EmbeddingModel.load(out.model_dir)
    vecs = model.encode(["which red car is number 0?", "The red car with the tag 0 stands here."])
    assert vecs.shape == (2, 64) and abs(float((vecs[0] ** 2).sum()) - 1.0) < 1e-4
    assert list((Path(out.run_dir) / "tensorboard").glob("events.out.tfevents.*"))


def test_ray_worker_killed_resumes_from_checkpoint(plain_run, ray_config, tmp_path):
    """Rank 1 SIGKILLs itself after step 3 (once); max_failures=1 restarts the worker group from the
    step-2 checkpoint; the run ends at step 4 with the batches, losses and weights of the plain run."""
    from safetensors.torch import load_file

    from ray_jobs.train import run_training

    marker = tmp_path / "killed_once"
    fault = {"step": 3, "rank": 1, "marker": str(marker), "delay_s": 5.0}
    out = run_training(ray_config, num_workers=2, storage_path=tmp_path / "runs", name="killed", max_failures=1,
                       fault_injection=fault)
    assert json.loads(marker.read_text())["step"] == 3  # the kill did happen
    assert out.metrics["step"] == 4 and out.metrics["resumed_from_step"] == 2
    assert out.resumes == [2]  # continued from the last checkpoint, not from scratch or from step 3
    assert [h["step"] for h in out.history] == [1, 2, 3, 4]
    assert [h["batch_fp"] for h in out.history] == [h["batch_fp"] for h in plain_run.history]
    assert [h["loss"] for h in out.history] == pytest.approx([h["loss"] for h in plain_run.history], rel=1e-5)
    got = load_file(str(Path(out.model_dir) / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(Path(plain_run.model_dir) / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_ray_nan_loss_fails_the_run_without_retrying_it(ray_local, ray_config, tmp_path):
    """A diverged run raises FloatingPointError from run_training; the retry allowed by max_failures
    finds the run's DIVERGED marker and stops at once instead of training into the same NaN."""
    from ray_jobs.train import DIVERGED_FILE, run_training

    with pytest.raises(FloatingPointError, match="non-finite training loss") as info:
        run_training(ray_config.replace(temperature=1e-40), num_workers=2, storage_path=tmp_path, name="nan",
                     max_failures=1)
    assert "already diverged" in str(info.value)  # the retried worker group stopped before training
    marker = json.loads((tmp_path / "nan" / DIVERGED_FILE).read_text())
    assert marker["step"] == 1 and "non-finite training loss" in marker["error"]


def test_cuda_allocator_setting_respects_the_users_environment(monkeypatch):
    """The Trainer turns on expandable segments on a GPU (packed rows change size every step) unless the user
    configured the allocator; without a GPU it does nothing."""
    applied = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", applied.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert configure_cuda_allocator({}) is None and applied == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for users in ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}):
        assert configure_cuda_allocator(users) is None and applied == []
    assert configure_cuda_allocator({"PYTORCH_CUDA_ALLOC_CONF": ""}) == "expandable_segments:True"
    assert applied == ["expandable_segments:True"]


def test_missing_zero_gradients_is_a_clear_error(single_process, tiny_dirs, train_file, monkeypatch):
    """DeepSpeed's own check is off for ZeRO-2 on the promise of the Trainer's: a DeepSpeed that no longer exposes
    the gradients fails at construction with the override to use, and the override works."""
    import embed_core.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "pending_gradients", lambda engine: None)
    with pytest.raises(RuntimeError, match="check_grad_overflow"):
        Trainer(make_config(tiny_dirs, train_file))
    Trainer(make_config(tiny_dirs, train_file,
                        deepspeed_overrides={"bf16": {"check_grad_overflow": True}})).close()


# ============================================================================================ reporting cadence
def test_cadence_reports_and_checkpoints_when_due():
    """A worker reports after its first step, at held-out evaluations, at checkpoints (by step or by wall time)
    and every report_every_s seconds; nothing else reaches the driver (its poll paces every report)."""
    from ray_jobs.train import Cadence

    c = Cadence(max_steps=10, checkpoint_every=4, checkpoint_every_s=60.0, report_every_s=10.0,
                last_report=0.0, last_checkpoint=0.0)
    assert c.due(1, evaluated=False, first=True, now=1.0) == (True, False)
    c.done(True, False, 1.0)
    assert c.due(2, evaluated=False, first=False, now=2.0) == (False, False)
    assert c.due(3, evaluated=True, first=False, now=3.0) == (True, False)
    assert c.due(4, evaluated=False, first=False, now=4.0) == (True, True)  # checkpoint_every
    c.done(True, True, 4.0)
    assert c.due(5, evaluated=False, first=False, now=14.5) == (True, False)  # report_every_s
    c.done(True, False, 14.5)
    assert c.due(7, evaluated=False, first=False, now=64.5) == (True, True)  # checkpoint_every_s
    c.done(True, True, 64.5)
    assert c.due(10, evaluated=False, first=False, now=65.0) == (True, True)  # the last step
    off = Cadence(max_steps=10, checkpoint_every=0, checkpoint_every_s=0.0, report_every_s=0.0,
                  last_report=0.0, last_checkpoint=0.0)
    assert off.due(3, evaluated=False, first=False, now=1e9) == (True, False)  # report_every_s=0: every step


def test_prefetched_batches_train_like_the_plain_loop(single_process, tiny_dirs, train_file):
    """The next step's batch is collated and tokenised on a host thread: the same batches, losses and weights."""
    runs = []
    for prefetch in (False, True):
        trainer = Trainer(make_config(tiny_dirs, train_file, max_steps=3, eval_every=3, val_size=8), prefetch=prefetch)
        runs.append([trainer.run_step() for _ in range(3)])
        trainer.close()
    plain, fetched = runs
    assert [m["batch_fp"] for m in fetched] == [m["batch_fp"] for m in plain]
    assert [m["loss"] for m in fetched] == pytest.approx([m["loss"] for m in plain], rel=1e-6)
    assert fetched[-1]["val_acc"] == pytest.approx(plain[-1]["val_acc"])


def test_gate_holds_the_host_built_model_before_the_engine_and_is_timed(single_process, tiny_dirs, train_file,
                                                                        monkeypatch):
    """A sweep trial admitted ahead of its turn waits in `gate` (the GPU memory ledger) with its data and model
    built on the host and its DeepSpeed engine not yet: the wait is timed apart from the build, and it trains."""
    import time

    import embed_core.trainer as trainer_mod

    order = []
    real_build_engine = trainer_mod.build_engine
    monkeypatch.setattr(trainer_mod, "build_engine", lambda *a, **k: order.append("engine") or real_build_engine(*a, **k))

    def gate():
        order.append("gate")
        time.sleep(0.3)

    trainer = Trainer(make_config(tiny_dirs, train_file, max_steps=2), gate=gate)
    assert order == ["gate", "engine"]
    assert set(trainer.build_s) == {"data", "model", "gpu_wait", "engine"}
    assert trainer.build_s["gpu_wait"] >= 0.3
    assert math.isfinite(trainer.run_step()["loss"])
    trainer.close()


def test_ray_worker_waits_in_the_ledger_with_its_model_built_then_trains(ray_local, ray_config, tmp_path,
                                                                          monkeypatch):
    """The start-ahead path through Ray Train (a CPU ledger stands in for the GPU's: ray_jobs/test_hooks.py): while
    this process holds the whole budget, the run's worker registers and waits; released, it trains to the end,
    and its first step's metrics carry the wait."""
    import threading

    from ray_jobs.gpu_ledger import GpuLedger
    from ray_jobs.train import run_training
    from sweeps.layout import GPU_WAIT_FILE

    root = tmp_path / "ledger"
    monkeypatch.setenv("EMBED_TEST_CPU_LEDGER", json.dumps({"key": "cpu-test", "budget_gib": 10.0, "root": str(root)}))
    mine = GpuLedger("cpu-test", 10.0, root=root)
    mine.acquire(10.0)
    out = {}
    run = threading.Thread(target=lambda: out.update(r=run_training(
        ray_config.replace(max_steps=2), num_workers=1, storage_path=tmp_path / "runs", name="ahead",
        gpu_admission=(1, 0))), daemon=True)
    run.start()
    mark = tmp_path / "runs" / "ahead" / GPU_WAIT_FILE  # what `sweeps status` reads
    try:
        _wait_while_held(root, mine, run)
        assert mark.is_file() and json.loads(mark.read_text())["pid"] != os.getpid()
    finally:
        mine.release()
    run.join(timeout=600)
    result = out["r"]
    assert result.metrics["step"] == 2 and not mark.exists()
    first = result.history[0]
    assert first["build_gpu_wait_s"] >= 3.0 and first["build_model_s"] > 0


def _wait_while_held(root, mine, run) -> None:
    """The worker registers as waiting and stays so while `mine` holds the budget."""
    import time

    def states() -> list[str]:  # the other entries' states (an entry being rewritten reads empty: read again)
        for _ in range(20):
            texts = [p.read_text() for p in (root / "cpu-test").glob("*.json") if p != mine.path]
            if all(t.strip() for t in texts):
                return [json.loads(t)["state"] for t in texts]
            time.sleep(0.05)
        raise AssertionError("a ledger entry stayed empty")

    deadline = time.time() + 600
    while not states() and time.time() < deadline:
        time.sleep(0.5)
    assert states() == ["waiting"], "the worker never reached the ledger"
    time.sleep(3.0)
    assert states() == ["waiting"] and run.is_alive()


def test_ray_time_based_checkpoint_limits_lost_work(ray_local, ray_config, tmp_path):
    """No step-based checkpoint, one every (tiny) wall-clock interval instead: rank 1 SIGKILLs itself after step 3
    and the restarted workers resume from the step-2 checkpoint, not from scratch. Reports reach the driver at
    checkpoints and at the end only (report_every_s is an hour)."""
    from ray_jobs.train import run_training

    marker = tmp_path / "killed_once"
    fault = {"step": 3, "rank": 1, "marker": str(marker), "delay_s": 5.0}
    cfg = ray_config.replace(checkpoint_every=0, checkpoint_every_s=1e-6, report_every_s=3600.0)
    out = run_training(cfg, num_workers=2, storage_path=tmp_path / "runs", name="timed", max_failures=1,
                       fault_injection=fault, num_to_keep=1)
    assert json.loads(marker.read_text())["step"] == 3
    assert out.resumes == [2] and out.metrics["step"] == 4
    assert [h["step"] for h in out.history] == [1, 2, 3, 4]
    assert all(h["reported"] for h in out.history)  # every step checkpointed, so every step reported
    assert sorted(p.name for p in Path(out.run_dir).glob("checkpoint_0*")) == ["checkpoint_00000004"]
