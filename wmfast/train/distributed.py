"""The process group and the device: with no launcher (no RANK/WORLD_SIZE in the environment) a 1-rank group of
our own (gloo on CPU, nccl on GPU); under torchrun or the `deepspeed` launcher, theirs. Also the collective and
the host-to-device copy the step and validation use."""
from __future__ import annotations

import atexit
import gc
import os
import socket
from typing import Any

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, we_created_the_group)."""
    if not torch.cuda.is_available():  # name the accelerator, instead of DeepSpeed warning that it guessed it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    created = False
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        # DeepSpeed JIT-builds a shared-memory allreduce op (~26 s of C++ compilation) whenever it wraps a
        # process group on its CPU accelerator; gloo does the job for us, so mark the op unusable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:  # no launcher: a 1-rank group of our own (DeepSpeed needs one)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("LOCAL_RANK", "0")
            # an in-memory store: one rank needs no TCP rendezvous (and no port that another process could take)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
        # kept for the life of the process: DeepSpeed caches the group objects, so a second run in the same
        # process (tests, notebooks) must find the same group rather than a re-created one
        atexit.register(_destroy_group)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world, device, created


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(float_dtype) if float_dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, float_dtype) for v in batch)
    return batch


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def free_memory() -> None:
    """Return freed memory to the device: collect garbage, then empty the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
