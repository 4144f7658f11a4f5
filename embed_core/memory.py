"""How much GPU memory one training run needs, estimated before it starts (no weights read).

A trial's peak is the frozen backbone's weights, the trainable tensors with their optimizer state, the activations
that one forward keeps for its backward, and a fixed overhead (CUDA context, cuBLAS / NCCL workspaces, the
compiled kernels)::

    weights      = backbone parameters x bytes of the training dtype
    trainable    = LoRA + pooling-head parameters x 16 bytes (bf16 copy, fp32 master, Adam m and v, fp32 grad)
    activations  = tokens of one forward x layers x (ACT_HIDDEN x hidden + ACT_INTERMEDIATE x intermediate) x 2 bytes
                   (x EAGER_ACTIVATIONS when the layers are not compiled: every elementwise op keeps its output)
    total        = (weights + trainable + activations) x SAFETY + OVERHEAD_GIB

One forward embeds every role of the worker's share of a batch (packed or padded), or one GradCache chunk of it.
Its tokens are estimated from the training texts: the largest of ``SAMPLE_STEPS`` sampled global batches, at
``CHARS_PER_TOKEN`` characters a token, or ``max_length`` a text without packing (padding). The constants are fitted to two GPU figures: SmolLM2-135M
trials of 256 triplets (~38k tokens a step, 30 layers) took ~16 GB each on an H100 in the first GPU run of the
sweep (nvidia-smi), and the `study` preset's SmolLM2-135M trials (128 triplets, ~11k tokens a step) peaked at
9.8-11.0 GiB per trial process (NVML, ``bench/results/sweep_gpu_h100.json``; the estimate then was 8.9 GiB with a
1.5 GiB overhead, now 10.9). The first is overestimated (~23 GiB): the estimate errs on the safe side for large
steps; the fixed part (the CUDA context, cuBLAS / NCCL / Inductor workspaces, the allocator's cache after the
held-out evaluation) is what the second figure pins.

The `study` preset on an H100 (``bench/results/study_parts_h100.json``), per trial process, measured (NVML peak,
or the trainer's ``max_memory_allocated`` + the ~2.1 GiB its processes hold beyond it) against the estimate:

| trial (128 triplets, ~15k tokens a forward) | compiled layers | eager layers |
|---|---|---|
| SmolLM2-135M | 11.0 measured / 11.7 estimated | ~12.7 / 15.6 |
| Gemma-3-270M | 10.9 / 10.2 | ~13.2 / 13.0 |

EAGER_ACTIVATIONS is fitted to Gemma's eager peak (its 4 norms a layer keep more activations than the hidden-size
term counts); SmolLM2 is then overestimated by ~3 GiB, which still lets 5 eager trials share an 80 GB card.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ACT_HIDDEN = 6.0          # activation elements kept per token and layer, per unit of hidden size
ACT_INTERMEDIATE = 2.5    # ... per unit of MLP intermediate size
CHARS_PER_TOKEN = 4.0     # English training text through SmolLM2's BPE measured 4.8: on the safe side
SAFETY = 1.15             # allocator fragmentation and the variation between steps
OVERHEAD_GIB = 4.3        # CUDA context, library workspaces, compiled kernels, the allocator's cache
EAGER_ACTIVATIONS = 1.55  # activations kept without torch.compile's fusion, relative to compiled layers
SAMPLE_STEPS = 64


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    trainable_gib: float
    activations_gib: float
    tokens_per_forward: int
    total_gib: float

    def fits(self, gpu_gib: float) -> int:
        """How many such runs share a GPU of `gpu_gib`."""
        return max(0, math.floor(gpu_gib / self.total_gib))

    def describe(self) -> str:
        return (f"~{self.total_gib:.1f} GiB (weights {self.weights_gib:.1f}, activations {self.activations_gib:.1f} "
                f"for ~{self.tokens_per_forward / 1000:.0f}k tokens a forward, optimizer {self.trainable_gib:.2f}, "
                f"overhead {OVERHEAD_GIB})")


def forward_tokens(texts_per_example: Sequence[Sequence[str]], batch_size: int, world_size: int,
                   chunk_size: int | None, packing: bool, max_length: int, seed: int = 0) -> int:
    """Tokens in one forward of one worker: the largest of SAMPLE_STEPS random global batches (each example's
    texts: query, positive, negatives), split over the workers, cut to a GradCache chunk."""
    n = len(texts_per_example)
    if n == 0:
        return 0
    rng = np.random.default_rng(seed)
    lengths = np.array([sum(min(max_length, math.ceil(len(t) / CHARS_PER_TOKEN) + 1) if packing else max_length
                            for t in texts) for texts in texts_per_example], dtype=np.int64)
    per_step = [int(lengths[rng.choice(n, size=min(batch_size, n), replace=False)].sum())
                for _ in range(SAMPLE_STEPS)]
    local = max(per_step) / world_size
    texts_local = batch_size / world_size * max(1, len(texts_per_example[0]))
    if chunk_size is not None and chunk_size < texts_local:
        local *= chunk_size / texts_local
    return int(math.ceil(local))


def estimate(n_params: int, n_trainable: int, num_layers: int, hidden: int, intermediate: int,
             tokens: int, dtype_bytes: int = 2, compiled: bool = True) -> MemoryEstimate:
    weights = n_params * dtype_bytes / 2**30
    trainable = n_trainable * 16 / 2**30
    acts = tokens * num_layers * (ACT_HIDDEN * hidden + ACT_INTERMEDIATE * intermediate) * 2 / 2**30
    acts *= 1.0 if compiled else EAGER_ACTIVATIONS
    total = (weights + trainable + acts) * SAFETY + OVERHEAD_GIB
    return MemoryEstimate(round(weights, 3), round(trainable, 4), round(acts, 3), tokens, round(total, 2))


def gpu_total_gib() -> float | None:
    """The smallest visible GPU's memory (NVML), or None where there is none."""
    try:
        import pynvml  # NVIDIA machines only

        pynvml.nvmlInit()
        sizes = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total
                 for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - no NVIDIA driver / library: no GPU to plan for
        return None
    return min(sizes) / 2**30 if sizes else None


def gpu_share(need_gib: float, gpu_gib: float, requested: float) -> float:
    """The GPU fraction a worker gets: `requested`, or the largest 1/k of the GPU that holds `need_gib` when the
    requested share is too small (ValueError when not even a whole GPU holds it)."""
    if requested >= 1 or requested * gpu_gib >= need_gib:
        return requested
    k = math.floor(gpu_gib / need_gib)
    if k < 1:
        raise ValueError(f"needs ~{need_gib:.1f} GiB but the GPU has {gpu_gib:.1f} GiB")
    return 1.0 / k


# A trial admitted ahead of its turn (ray_jobs/gpu_ledger.py) waits with the CUDA context Ray Train's worker created
# (cudaSetDevice) before its training function ran: ~0.5 GiB, with a margin.
WAITING_GIB = 0.6


@dataclass(frozen=True)
class Admission:
    """How many trials of one estimate a GPU takes: ``training`` at once (their estimates fit) and ``ahead`` more
    starting up beside them (their waiting contexts fit in what the training ones leave)."""

    training: int
    ahead: int

    @property
    def total(self) -> int:
        return self.training + self.ahead

    @property
    def share(self) -> float:
        """The GPU fraction each trial asks Ray for, so that Ray places ``total`` of them on one GPU."""
        return 1.0 / self.total


def admission(need_gib: float, gpu_gib: float, share: float, ahead: bool = True) -> Admission:
    """Trials of `need_gib` on a GPU of `gpu_gib` given the share each trial was planned (`gpu_share`): 1/share
    of them train at once (at most as many as hold), and, with `ahead`, as many more start up beside them as the
    memory left over holds waiting contexts, at most a whole next wave."""
    k = max(1, min(round(1 / share) if share < 1 else 1, math.floor(gpu_gib / need_gib)))
    spare = gpu_gib - k * need_gib
    return Admission(k, min(k, max(0, math.floor(spare / WAITING_GIB))) if ahead else 0)


@dataclass(frozen=True)
class Placement:
    """One trial's place on a GPU: the ``share`` its memory needs (the requested ``gpus_per_worker``, raised to fit:
    `gpu_share`) and, for a worker of at most one GPU, its `Admission`."""

    share: float
    admission: Admission | None

    @property
    def ray_share(self) -> float:
        """The GPU fraction to ask Ray for: with trials admitted ahead, Ray must place those too."""
        return self.admission.share if self.admission and self.admission.ahead else self.share


def placement(need_gib: float, gpu_gib: float, requested: float, ahead: bool = True) -> Placement:
    """`gpu_share` then `admission`, the one way from an estimate and a GPU to how trials share it (ValueError when
    not even a whole GPU holds `need_gib`)."""
    share = gpu_share(need_gib, gpu_gib, requested)
    return Placement(share, admission(need_gib, gpu_gib, share, ahead) if share <= 1 else None)


__all__ = ["Admission", "MemoryEstimate", "Placement", "WAITING_GIB", "admission", "estimate", "forward_tokens",
           "gpu_share", "gpu_total_gib", "placement"]
