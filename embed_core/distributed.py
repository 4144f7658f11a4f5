"""Process-group setup for the trainer: a 1-rank group when no launcher made one, its teardown (which resets
DeepSpeed's cached groups, see embed_core/compat.py), the CUDA allocator setting and DeepSpeed's import.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket

import torch
import torch.distributed as dist

# deepspeed is imported where used: it takes seconds and probes the accelerator at import.

__all__ = ["ALLOC_ENV_VARS", "configure_cuda_allocator", "destroy_single_process_group", "init_single_process_group",
           "prepare_deepspeed"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(backend: str = "gloo") -> None:
    """Initialise a 1-rank torch.distributed group on 127.0.0.1 (DeepSpeed needs one) unless one exists.

    Uses a tcp:// init method on a free port; sets only LOCAL_RANK=0 if unset (deepspeed.initialize
    asserts that it exists)."""
    os.environ.setdefault("LOCAL_RANK", "0")
    if dist.is_initialized():
        return
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def destroy_single_process_group() -> None:
    """Tear down the group of :func:`init_single_process_group` so that a later one works in this process
    (notebooks, test modules): DeepSpeed caches its comm backend and a clone of the world group
    (``deepspeed.utils.groups._WORLD_GROUP``); a new ``deepspeed.initialize`` would reuse the dead clone
    ("Group ... is not registered")."""
    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        import deepspeed.comm.comm as ds_comm
        from deepspeed.utils import groups
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return
    ds_comm.cdb = None
    groups._WORLD_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    groups._DATA_PARALLEL_GROUP = None
    groups.mesh_device = None
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()


ALLOC_ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def configure_cuda_allocator(environ: dict | None = None) -> str | None:
    """Turn on expandable segments in PyTorch's CUDA caching allocator unless the user configured it.

    Packed training asks for activations of a different size every step (the packed row's length follows the
    batch's texts); with fixed-size cached blocks the allocator can end up freeing its cache and mapping new
    memory inside the step (synchronising cudaFree / cudaMalloc). One profile of Qwen2-0.5B at 512 triplets on an
    H100 showed ~105 ms of those in a ~565 ms step (bench/results/trainer_profile_h100.json); later runs did not
    reproduce it, and with expandable segments the step was 0.388 vs 0.408 s (trainer_alloc_h100.json): a guard,
    small gain at most. Returns the setting applied, or None when the environment already sets
    ``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF`` (the user's choice wins) or there is no GPU.
    """
    environ = os.environ if environ is None else environ
    if any(environ.get(k) for k in ALLOC_ENV_VARS) or not torch.cuda.is_available():
        return None
    setting = "expandable_segments:True"
    torch.cuda.memory._set_allocator_settings(setting)
    return setting


def prepare_deepspeed(on_gpu: bool) -> None:
    """Import DeepSpeed with its INFO logging muted; on CPU, keep it from JIT-compiling its shared-memory
    all-reduce op (~100 s with a C++ compiler, only used for inference all-reduce): gloo does the work."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not on_gpu:
        with contextlib.suppress(Exception):
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
