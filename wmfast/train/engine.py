"""The DeepSpeed engine of a run: the task's model (with activation checkpointing and regional torch.compile when
asked), AdamW over the decay / no-decay parameter groups, and the generated DeepSpeed config."""
from __future__ import annotations

import contextlib
import logging

import torch

from wmfast.modules.compile import compile_blocks
from wmfast.tasks import Task, param_groups

from .config import TrainConfig, deepspeed_config
from .distributed import free_memory
from .schedule import lr_at

logger = logging.getLogger("wmfast")


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


def compile_fullgraph(zero_stage: int) -> bool:
    """Whether a block compiles as one graph: ZeRO-3 gathers each submodule's parameters in forward hooks that
    DeepSpeed wraps in torch.compiler.disable, so every submodule call is a graph break there (fullgraph=True
    raises); ZeRO-0/1/2 add no hooks inside a block's forward."""
    return zero_stage < 3


def disable_selective_recompute(blocks: list[torch.nn.Module], cfg: TrainConfig) -> None:
    """Blocks that checkpoint themselves selectively (a boolean `recompute` attribute: the ST-Transformer's) stop
    doing so under whole-block activation checkpointing, which recomputes everything anyway (nesting would
    recompute the elementwise ops twice), and under ZeRO-3, whose parameter gathering runs different ops inside
    the block in the forward and in the recomputation (torch's selective checkpointing then refuses the
    backward: "aten.cat ... not found in storage"). Under ZeRO-3 a block then saves every activation: add
    --activation-checkpointing for the memory."""
    selective = [b for b in blocks if getattr(b, "recompute", False) is True]
    if not selective or not (cfg.activation_checkpointing or cfg.zero_stage == 3):
        return
    for block in selective:
        block.recompute = False
    why = "whole-block activation checkpointing" if cfg.activation_checkpointing else "ZeRO-3"
    logger.info("wmfast train: selective recomputation in the blocks is off under %s", why)


# ---- engine ------------------------------------------------------------------------------------------------
def build_engine(task: Task, cfg: TrainConfig, micro_batch: int, world: int, device: torch.device,
                 precision: str):
    import deepspeed

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every trial
    model = task.build_model()
    disable_selective_recompute(task.blocks(model), cfg)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(task.blocks(model))
    if cfg.compile:  # after activation checkpointing: the checkpoint is traced inside each compiled block
        compile_blocks(task.blocks(model), fullgraph=compile_fullgraph(cfg.zero_stage))
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
    if cfg.zero_stage == 0:
        keep_clip_norm(engine)
    return engine, optimizer, ds_config


def keep_clip_norm(engine) -> None:
    """Without ZeRO (stage 0) DeepSpeed clips the gradients with its clip_grad_norm_ and drops the norm that
    returns, so get_global_grad_norm() stays None and the training log would have no grad_norm (ZeRO's
    optimizers report theirs): keep it, computed once as before."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_fp32_gradients


def destroy_engine(engine) -> None:
    with contextlib.suppress(Exception):
        engine.destroy()
    # a ZeRO-3 engine built with memory_efficient_linear (a user's DeepSpeed override) leaves its replacement of
    # torch.nn.functional.linear installed for the rest of the process: put torch's own back
    if (getattr(torch.nn.functional.linear, "__module__", None) or "").startswith("deepspeed."):
        torch.nn.functional.linear = torch._C._nn.linear
    free_memory()
