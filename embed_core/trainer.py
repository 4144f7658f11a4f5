"""Contrastive training of an `EmbeddingModel` with DeepSpeed ZeRO 1/2/3 and GradCache (no ray import).

One optimizer step on a global batch of ``batch_size`` examples::

    global batch (deterministic in (seed, step))  --collate-->  queries / positives / K negatives
        --shard by rank-->  local lists  --tokenise-->  roles {query, positive, negative}
        --GradCache (or one plain forward/backward)-->  InfoNCE over the *global* batch
        (positives and negatives all-gathered with gradients)  -->  engine.step()

The pieces (each in its module; this one holds the `Trainer` and its checkpoints):

* `TrainConfig` (embed_core/train_config.py): every hyper-parameter, validated (`ConfigError`) before any
  worker starts.
* `ds_config` / `build_engine` (embed_core/engine.py): the DeepSpeed config and engine (ZeRO 1/2/3; AdamW over the trainable
  parameters only -- LoRA + pooling head; warm-up then linear decay; gradient clipping; bf16 on GPU,
  fp32 on CPU). On CPU it runs over gloo with no compiled ops.
* `TrainData` (embed_core/train_data.py): loads the training data (JSONL files and/or builders over the shared data folder),
  holds out ``val_size`` examples for a cheap in-training metric, and gives the global batch of any
  step -- the order is a pure function of (seed, step), so a resumed run sees exactly the batches
  an uninterrupted run would have seen.
* `Trainer`: ``train_step(batch)``, ``run_step()``, ``evaluate()``, ``save_checkpoint(dir)``,
  ``load_checkpoint(dir)``, and a TensorBoard writer on rank 0.
* `init_single_process_group` & co. (embed_core/distributed.py): the process group when no launcher made one.
* `gathered_trainable_state` (embed_core/engine.py): the LoRA + head tensors, gathered from ZeRO-3 partitions when needed.

GradCache and DeepSpeed gradient accumulation
---------------------------------------------
GradCache calls the backward once per chunk of every role within one optimizer step. The engine runs
with ``gradient_accumulation_steps = 1`` (so ``engine.backward`` never divides the loss) and the step
marks every backward but the last as *not* an accumulation boundary
(``engine.set_gradient_accumulation_boundary``): ZeRO then accumulates the chunks' gradients and
reduces / averages across ranks exactly once, at the boundary, and ``engine.step()`` updates. The
sum of the chunk surrogates' gradients equals the full-batch loss gradient (see
`embed_core.gradcache`), which `tests/test_trainer.py` checks against plain PyTorch autograd.

Checkpoint layout (``save_checkpoint(dir)``)::

    dir/model/                 EmbeddingModel.save: config, LoRA adapter, pooling head, tokenizer
                               (loadable with EmbeddingModel.load; written by rank 0)
    dir/deepspeed/latest       DeepSpeed engine state: module (trainable tensors only), optimizer,
    dir/deepspeed/<tag>/...    LR scheduler; ZeRO files are per rank (zero_pp_rank_<r>_...)
    dir/trainer_state.json     step, epoch, position in the epoch, seed, data fingerprint, metrics
                               history (with a per-step batch fingerprint), resumes (rank 0)

Every rank writes only files of its own (distinct names), so per-rank directories can be merged
into one (what Ray Train does with the directories that several workers report).
"""
from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .config import read_versioned_json
from .distributed import configure_cuda_allocator, init_single_process_group
from .engine import build_engine, gathered_trainable_state, gradients_finite_flag, pending_gradients
from .errors import ConfigError
from .files import atomic_write_json
from .gradcache import (full_batch_step, grad_cache_step, iter_chunks, merged_batch_step, merged_chunk_count,
                        merged_grad_cache_step)
from .loss import check_finite, dist_world, info_nce
from .model import EmbeddingModel
from .train_config import TrainConfig, model_config, resolve_precision
from .train_data import TrainData, derived_seed

# deepspeed and TensorBoard are imported where used: seconds to import, and reading a checkpoint's trainer state
# (`read_trainer_state`) needs neither.

log = logging.getLogger(__name__)

__all__ = ["DEEPSPEED_DIR", "MODEL_DIR", "STATE_FILE", "Trainer", "read_trainer_state"]

MODEL_DIR = "model"
DEEPSPEED_DIR = "deepspeed"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = "embed_core.trainer/v1"


def _is_timestamp(key: str) -> bool:
    """Metrics that are wall-clock times (unix seconds), kept in the history but not plotted."""
    return key == "wall_time" or key.endswith("_at")


# ====================================================================================== trainer
def read_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The trainer_state.json of a checkpoint directory."""
    return read_versioned_json(checkpoint_dir, STATE_FILE, STATE_FORMAT, "a training checkpoint")


class Trainer:
    """DeepSpeed + GradCache contrastive trainer for one process of a (possibly 1-rank) process group.

    >>> init_single_process_group()                                   # doctest: +SKIP
    >>> trainer = Trainer(TrainConfig(model={...}, train_data=["train.jsonl"], max_steps=10))
    >>> while trainer.step < trainer.tcfg.max_steps: print(trainer.run_step())

    `model` / `examples` may be passed in (otherwise built from the config). ``step`` counts
    completed optimizer steps; ``history`` holds one metrics dict per step (with the global batch's
    fingerprint); ``resumes`` lists the steps this run was resumed from. ``gate``, if given, is called once the
    data and the model are built on the host and before anything of the model goes to the device.
    """

    def __init__(self, tcfg: TrainConfig, model: EmbeddingModel | None = None, examples: Sequence | None = None,
                 *, device: str | torch.device | None = None, log_dir: str | None = None,
                 prefetch: bool | None = None, gate: Callable[[], None] | None = None) -> None:
        if not dist.is_initialized():
            init_single_process_group()
        self.rank, self.world_size = dist_world()
        tcfg.validate(self.world_size)
        self.tcfg = tcfg
        self.on_gpu = torch.cuda.is_available()
        if device is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if self.on_gpu else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(tcfg, self.on_gpu)
        self.allocator_setting = configure_cuda_allocator() if self.on_gpu else None
        t = time.perf_counter()
        self.data = TrainData(tcfg, examples)
        t_data = time.perf_counter()
        # the model is built on the host; `gate` (a sweep's GPU memory ledger) may hold it there while earlier
        # trials train, so that this trial's start-up overlaps their steps
        self.model = model if model is not None else EmbeddingModel.from_config(
            model_config(tcfg, self.on_gpu), seed=tcfg.seed)
        t_model = time.perf_counter()
        if gate is not None:
            gate()
        t_gate = time.perf_counter()
        self.model.to(self.device)
        self.engine = build_engine(self.model, tcfg, self.world_size, self.on_gpu)
        self.engine.train()
        # where a trial's start-up goes (bench/sweep_gpu.py's startup profile reads it from the first step's metrics)
        self.build_s = {"data": t_data - t, "model": t_model - t_data, "gpu_wait": t_gate - t_model,
                        "engine": time.perf_counter() - t_gate}
        # the Trainer's own fused gradient check (train_step) wherever DeepSpeed's per-tensor one is off (the config
        # the engine was built with); under fp16 DeepSpeed's loss scaler owns overflow
        ds_checks = self.engine.config.get("bf16", {}).get("check_grad_overflow", True)
        self._own_grad_check = not ds_checks and not self.engine.fp16_enabled()
        if self._own_grad_check and pending_gradients(self.engine) is None:
            import deepspeed

            raise RuntimeError(  # ds_config turned DeepSpeed's check off on the promise of this one
                f"this DeepSpeed version ({deepspeed.__version__}) does not expose the ZeRO-{tcfg.zero_stage} "
                "gradients the Trainer checks for NaN / inf: set deepspeed_overrides "
                "{'bf16': {'check_grad_overflow': true}}")
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.resumes: list[int] = []
        self.log_dir = log_dir if log_dir is not None else tcfg.log_dir
        self._writer = None
        # the next step's batch is collated and tokenised on a host thread while the device runs this step
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="batch") if (
            self.on_gpu if prefetch is None else prefetch) else None
        self._next: tuple[int, Future] | None = None

    # ------------------------------------------------------------------ one step
    def _tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        """Host-side inputs of one role: token-id lists (packed; each chunk is packed in _embed) or CPU tensors."""
        if self.tcfg.packing:
            return {"ids": self.model.token_ids(texts)}
        return dict(self.model.tokenize(texts))

    def prepare_batch(self, step: int) -> dict[str, Any]:
        """Step `step`'s local batch, collated and tokenised (host work only: safe on the prefetch thread)."""
        batch = self.data.local_batch(step, self.rank, self.world_size, self.model.cfg.format_query)
        roles = {"query": self._tokenize(batch["queries"]), "positive": self._tokenize(batch["positives"])}
        if batch.get("negatives"):
            roles["negative"] = self._tokenize(batch["negatives"])
        return {**batch, "roles": roles}

    def _take_batch(self, step: int) -> dict[str, Any]:
        """The prepared batch of `step` (prefetched when it was asked for), and the next one asked for.

        The tokenizer is not thread-safe: the prefetch only runs while `train_step` keeps the host busy with
        device work, and `_settle` waits for it before anything else tokenises (evaluation, checkpoints)."""
        ready = self._next[1].result() if self._next is not None and self._next[0] == step else None
        self._next = None
        batch = ready if ready is not None else self.prepare_batch(step)
        if self._prefetch is not None and step + 1 < self.tcfg.max_steps:
            self._next = (step + 1, self._prefetch.submit(self.prepare_batch, step + 1))
        return batch

    def _settle(self) -> None:
        if self._next is not None:
            self._next[1].result()

    def _embed(self, chunk: dict[str, Any]) -> torch.Tensor:
        if "ids" in chunk:
            return self.engine(packed=self.model.pack(chunk["ids"]).to(self.device))
        return self.engine(chunk["input_ids"].to(self.device), chunk["attention_mask"].to(self.device))

    def _loss(self, reps: dict[str, torch.Tensor]):
        # no host sync here: the metrics stay on the device and the loss is checked for NaN / inf in
        # train_step, after the backward was launched and before the optimizer step (one sync per step)
        return info_nce(reps["query"], reps["positive"], reps.get("negative"),
                        temperature=self.tcfg.temperature, gather=True, sync=False)

    def forward_backward(self, batch: dict[str, list[str]]) -> tuple[torch.Tensor, dict[str, Any], int]:
        """Run GradCache (or the plain step) with DeepSpeed backward calls on the local batch (tokenised by
        `prepare_batch` unless it carries its ``roles`` already).

        Returns (local loss, local metrics, local non-padding tokens). Gradients are accumulated and
        reduced at the last backward (the accumulation boundary); call ``engine.step()`` next. The loss
        and metrics are device tensors (not yet checked for NaN / inf: `train_step` does that)."""
        roles = batch["roles"] if "roles" in batch else {
            name: self._tokenize(batch[key]) for name, key in (("query", "queries"), ("positive", "positives"),
                                                               ("negative", "negatives")) if batch.get(key)}
        if self.tcfg.packing:
            tokens = sum(len(x) for r in roles.values() for x in r["ids"])
        else:
            tokens = int(sum(r["attention_mask"].sum().item() for r in roles.values()))
            roles = {name: {k: v.to(self.device) for k, v in r.items()} for name, r in roles.items()}
        chunk = self.tcfg.chunk_size
        if chunk is None:
            step_fn, n_backward = (merged_batch_step if self.tcfg.packing else full_batch_step), 1
        elif self.tcfg.packing:  # each chunk: all roles of a slice of the batch, one packed row
            step_fn, n_backward = merged_grad_cache_step, merged_chunk_count(roles, chunk)
        else:
            step_fn = grad_cache_step
            n_backward = sum(len(iter_chunks(r, chunk, name)) for name, r in roles.items())
        calls = 0

        def backward(surrogate: torch.Tensor) -> None:
            nonlocal calls
            calls += 1
            self.engine.set_gradient_accumulation_boundary(calls == n_backward)
            self.engine.backward(surrogate)

        loss, metrics = step_fn(self._embed, roles, self._loss, chunk, backward_fn=backward)
        if calls != n_backward:
            raise RuntimeError(f"expected {n_backward} backward calls in one step, got {calls}")
        return loss, metrics, tokens

    def train_step(self, batch: dict[str, list[str]]) -> dict[str, Any]:
        """One optimizer step on this rank's share of a global batch; metrics are global (averaged / summed
        over ranks): loss, acc, pos_sim, neg_sim, [hard_neg_sim], lr, grad_norm, tokens_per_s,
        examples_per_s, step_time_s, [gpu_mem_gb]."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # dropout masks are a pure function of (seed, step, rank): a resumed run replays them
        torch.manual_seed(derived_seed(self.tcfg.seed, "dropout", self.step, self.rank))
        t0 = time.perf_counter()
        lr = float(self.engine.get_lr()[0])
        loss, m, tokens = self.forward_backward(batch)
        keys = ["acc", "pos_sim", "neg_sim"] + (["hard_neg_sim"] if "hard_neg_sim" in m else [])
        # the step's one host sync, after the backward is queued: local loss + metrics summed over ranks;
        # a NaN / inf loss on any rank makes the summed loss non-finite, so every rank stops here,
        # before the optimizer step (the weights stay as they were)
        local = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device)
                             for x in [loss.detach()] + [m[k] for k in keys]])  # metrics: tensors or floats
        # the gradients too, when DeepSpeed's per-tensor overflow check is off (ds_config): one fused reduction
        grad_flag = gradients_finite_flag(pending_gradients(self.engine) if self._own_grad_check else [], self.device)
        summed = torch.cat([local, torch.tensor([tokens, len(batch["queries"])], dtype=torch.float64,
                                                device=self.device), grad_flag[None]])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        vals = torch.cat([summed, local[:1]]).tolist()
        sums, grad_sum, own_loss = vals[:-2], vals[-2], vals[-1]
        if not math.isfinite(sums[0]):
            check_finite(own_loss, self.step + 1)  # raises here if this rank's own loss is the bad one
            raise FloatingPointError(f"non-finite training loss on another rank at step {self.step + 1}: "
                                     "see that rank's error for the causes to check")
        if not math.isfinite(grad_sum):
            raise FloatingPointError(
                f"non-finite gradients (NaN or inf) at step {self.step + 1} with a finite loss: the optimizer step "
                "was not taken (the weights are as before the step). Lower the learning rate, keep gradient "
                "clipping on, prefer bf16 over fp16 and check the batch of this step.")
        self.engine.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        world = self.world_size
        out: dict[str, Any] = {"loss": sums[0] / world}
        out.update({k: v / world for k, v in zip(keys, sums[1:1 + len(keys)])})
        n_tokens, n_examples = sums[-2], sums[-1]
        out.update({"lr": lr, "tokens_per_s": n_tokens / dt, "examples_per_s": n_examples / dt, "step_time_s": dt})
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        if self.device.type == "cuda":
            out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def run_step(self) -> dict[str, Any]:
        """Train on the next global batch (step ``self.step``), evaluate if due, log, return the metrics."""
        if self.step >= self.tcfg.max_steps:
            raise RuntimeError(f"training already reached max_steps={self.tcfg.max_steps}")
        batch = self._take_batch(self.step)
        epoch, index = self.data.position(self.step)
        metrics = self.train_step(batch)
        self._settle()
        self.step += 1
        metrics.update({"step": self.step, "epoch": epoch, "batch_in_epoch": index, "batch_fp": batch["fingerprint"],
                        "wall_time": time.time()})
        if self.tcfg.eval_every and (self.step % self.tcfg.eval_every == 0 or self.step == self.tcfg.max_steps):
            metrics.update(self.evaluate())
        self.history.append(metrics)
        self._log(metrics)
        return metrics

    # ------------------------------------------------------------------ held-out metric
    @torch.no_grad()
    def evaluate(self, batch_size: int | None = None) -> dict[str, float]:
        """In-batch retrieval on the held-out training slice: every rank embeds the same ``val_size``
        queries and positives (same number of forwards on all ranks, as ZeRO-3 requires).

        ``val_acc``: top-1 accuracy of the query's own positive among all held-out positives;
        ``val_margin``: mean of cos(q, own positive) - max cos(q, other positive)."""
        val = self.data.val
        if len(val) < 2:
            return {}
        bs = batch_size or max(1, self.tcfg.chunk_size or self.tcfg.batch_size // self.world_size)
        self.engine.eval()
        try:
            def embed(texts: list[str]) -> torch.Tensor:
                out = []
                for i in range(0, len(texts), bs):
                    out.append(torch.nn.functional.normalize(self._embed(self._tokenize(texts[i:i + bs])).float(), dim=-1))
                return torch.cat(out)

            q = embed([self.model.cfg.format_query(ex.query, ex.instruction) for ex in val])
            p = embed([ex.positive for ex in val])
        finally:
            self.engine.train()
        sims = q @ p.T
        own = sims.diagonal()
        others = sims.clone()
        others.fill_diagonal_(-float("inf"))
        acc = (sims.argmax(dim=1) == torch.arange(len(val), device=sims.device)).float().mean().item()
        margin = (own - others.max(dim=1).values).mean().item()
        return {"val_acc": acc, "val_margin": margin}

    # ------------------------------------------------------------------ logging
    def _log(self, metrics: dict[str, Any]) -> None:
        if self.rank != 0 or not self.log_dir:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a crashed attempt wrote after the checkpoint we resumed from
            self._writer = SummaryWriter(self.log_dir, purge_step=self.step if self.resumes else None)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and not _is_timestamp(k):
                self._writer.add_scalar(f"train/{k}", v, metrics["step"])

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=True, cancel_futures=True)
            self._prefetch, self._next = None, None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def ds_tag(self) -> str:
        return f"step_{self.step:08d}"

    def state(self) -> dict[str, Any]:
        epoch, index = self.data.position(self.step)
        return {"format": STATE_FORMAT, "step": self.step, "epoch": epoch, "batch_in_epoch": index,
                "seed": self.tcfg.seed, "world_size": self.world_size, "batch_size": self.tcfg.batch_size,
                "steps_per_epoch": self.data.steps_per_epoch, "data_fingerprint": self.data.fingerprint,
                "num_train": len(self.data.train), "num_val": len(self.data.val), "deepspeed_tag": self.ds_tag,
                "precision": self.precision, "config": self.tcfg.to_dict(), "history": self.history,
                "resumes": self.resumes}

    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        """Write model/ (rank 0), the DeepSpeed state (every rank, its own files) and trainer_state.json
        (rank 0) into `directory`. Collective: call on every rank (directories may differ per rank)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        adapter, head = gathered_trainable_state(self.engine, self.model)
        if self.rank == 0:
            self.model.save(directory / MODEL_DIR, adapter_state=adapter, head_state=head)
        self.engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=self.ds_tag, save_latest=True,
                                    exclude_frozen_parameters=True)
        if self.rank == 0:
            atomic_write_json(directory / STATE_FILE, self.state())
        if self._writer is not None:
            self._writer.flush()
        dist.barrier()
        return directory

    def load_checkpoint(self, directory: str | os.PathLike) -> dict[str, Any]:
        """Restore engine (weights, optimizer, LR schedule), step, history from `directory`, so the run
        continues at the same step with the same data order. Returns the trainer state."""
        directory = Path(directory)
        state = read_trainer_state(directory)
        checks = {"seed": (state["seed"], self.tcfg.seed), "batch_size": (state["batch_size"], self.tcfg.batch_size),
                  "world_size": (state["world_size"], self.world_size),
                  "data_fingerprint": (state["data_fingerprint"], self.data.fingerprint)}
        bad = {k: v for k, v in checks.items() if v[0] != v[1]}
        if bad:
            raise ConfigError(f"checkpoint {str(directory)!r} does not match this run (checkpoint, run): {bad}. "
                              "Resume with the same seed, global batch size, number of workers and training data")
        load_path, _ = self.engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=state["deepspeed_tag"],
                                                   load_module_strict=False, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise ConfigError(f"no DeepSpeed state {state['deepspeed_tag']!r} under {directory / DEEPSPEED_DIR}")
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.resumes = list(state.get("resumes", [])) + [self.step]
        return state
