"""Selective activation checkpointing of a transformer block: save what is expensive to recompute (matmul and
attention outputs), recompute the rest (norms, activations, dropout, residual adds, dtype casts) in the backward.

Built on torch.utils.checkpoint's selective checkpointing (`create_selective_checkpoint_contexts`, the mechanism
torchtitan uses), so it composes with torch.compile (the policy is honoured by the partitioner) and with full
activation checkpointing. Dropout masks are regenerated, not stored: checkpoint restores the RNG state before
the recomputation (preserve_rng_state), so the backward sees the forward's masks.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


def _is_attention(op) -> bool:
    """SDPA's fused kernels (flash, memory-efficient, cuDNN, the CPU flash), flash-attn's op and wmfast's
    temporal attention: their outputs (and log-sum-exps) are kept; recomputing them would cost FLOPs."""
    name = str(op)
    return ("attention" in name or "flash_attn" in name) and "backward" not in name and "_bwd" not in name


def _policy(ctx, op, *args, **kwargs):
    if op in _MATMULS or _is_attention(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_contexts = functools.partial(create_selective_checkpoint_contexts, _policy)


def recompute_elementwise(fn, *args):
    """fn(*args) under selective activation checkpointing (the policy above); use only when a backward follows."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
