"""The DeepSpeed engine of a run: the task's model (with activation checkpointing when asked), AdamW over the
decay / no-decay parameter groups, and the generated DeepSpeed config."""
from __future__ import annotations

import contextlib

import torch

from wmfast.tasks import Task, param_groups

from .config import TrainConfig, deepspeed_config
from .distributed import free_memory
from .schedule import lr_at


def enable_activation_checkpointing(blocks: list[torch.nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant torch.utils.checkpoint, which
    also works with ZeRO-3's parameter gathering hooks and keeps dropout masks identical)."""
    from torch.utils.checkpoint import checkpoint

    if not blocks:
        raise ValueError("activation checkpointing requested but the task exposes no blocks")
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward


# ---- engine ------------------------------------------------------------------------------------------------
def build_engine(task: Task, cfg: TrainConfig, micro_batch: int, world: int, device: torch.device,
                 precision: str):
    import deepspeed

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every trial
    model = task.build_model()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(task.blocks(model))
    groups = param_groups(model, task, cfg.weight_decay)
    for g in groups:
        g.pop("names")
    # torch's fused AdamW on GPU (one kernel for all parameters); plain AdamW on CPU. A client optimizer
    # means DeepSpeed builds none of its own ops (its FusedAdam/CPUAdam are JIT-compiled on first use).
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(0, cfg.lr, cfg.warmup_steps, cfg.steps,
                                                                          cfg.lr_schedule),
                                  betas=tuple(cfg.betas), eps=cfg.eps, fused=device.type == "cuda")
    ds_config = deepspeed_config(cfg, micro_batch, world, precision)
    engine, _, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer, config=ds_config)
    return engine, optimizer, ds_config


def destroy_engine(engine) -> None:
    with contextlib.suppress(Exception):
        engine.destroy()
    free_memory()
