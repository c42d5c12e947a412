"""The greedy rollout of the ST-Transformer, shared by `generate` (eager) and `Generator` (static buffers, one CUDA
graph): the loop over the future grids, one decode step, the greedy head, and the checks of their inputs.

The head: each token's next id is the argmax of its logits over the tied embedding. Unless the logits are asked
for, `wmfast.ops.greedy_head` computes it chunked over the vocabulary with a running max, so no [B, S, V] logits
exist (ties go to the first index, as torch.argmax)."""
from __future__ import annotations

import torch

from wmfast import ops
from wmfast.data.format import SAMPLE_FRAMES

from .kv_cache import TemporalKVCache


def next_tokens(model, h):
    """Hidden states [B, T, S, D] -> the greedy next ids [B, T, S] (int64), without the logits."""
    return ops.greedy_head(h, model.tok_emb.weight)[0]


def decode_step(model, tokens, state_grids, t: int, kv_cache: TemporalKVCache, *, return_logits: bool = False):
    """One cached step: tokens [B, 1, S] of grid t -> the argmax ids [B, 1, S] of grid t+1 (with return_logits,
    (ids, logits [B, 1, S, V]))."""
    h = model.hidden(tokens, state_grids=state_grids, start=t, kv_cache=kv_cache)
    if not return_logits:
        return next_tokens(model, h)
    logits = model.logits(h)
    return logits.argmax(-1), logits


def rollout(model, ctx, state_grids, num_frames: int, kv_cache: TemporalKVCache | None, *,
            return_logits: bool = False):
    """The greedy loop: context ids [B, C, S] and state grids [B, 6, D] -> (ids [B, F, S], logits [B, F, S, V] or
    None). kv_cache: prefill it, then one grid a step; None: rerun every grid so far at every step."""
    C = ctx.shape[1]
    frames, new, kept = ctx, [], []
    for i in range(num_frames):
        if kv_cache is None:
            h = model.hidden(frames, state_grids=state_grids)[:, -1:]
        elif i == 0:  # prefill: positions 0..C-1 of the cache, the last grid's hidden predicts grid C
            h = model.hidden(ctx, state_grids=state_grids, kv_cache=kv_cache)[:, -1:]
        else:  # t = C + i - 1: a Python int, the temporal position of the grid fed in
            h = model.hidden(new[-1], state_grids=state_grids, start=C + i - 1, kv_cache=kv_cache)
        if return_logits:
            kept.append(model.logits(h))
            new.append(kept[-1].argmax(-1))
        else:
            new.append(next_tokens(model, h))
        if kv_cache is None and i + 1 < num_frames:
            frames = torch.cat([frames, new[-1]], 1)
    return torch.cat(new, 1), torch.cat(kept, 1) if return_logits else None


def check_rollout(config, context_frames: int, num_frames: int, use_cache: bool) -> None:
    c = config
    if not isinstance(num_frames, int) or num_frames < 1 or context_frames < 1 \
            or context_frames + num_frames - 1 > c.num_frames:
        raise ValueError(f"{context_frames} context grids with num_frames={num_frames}: the model takes at most "
                         f"{c.num_frames} input grids, so C + num_frames - 1 must be <= {c.num_frames}")
    if use_cache and c.attention != "factorized":
        raise ValueError(f"use_cache=True needs attention='factorized' (the temporal KV cache); the model has "
                         f"attention={c.attention!r}: pass use_cache=False")


def check_inputs(model, context_tokens, states, num_frames: int, use_cache: bool) -> None:
    """ValueError naming the argument for context tokens, states or frame counts the model cannot take."""
    c = model.config
    if not isinstance(context_tokens, torch.Tensor) or context_tokens.ndim not in (3, 4) \
            or 0 in context_tokens.shape or context_tokens[0, 0].numel() != c.seq_len \
            or context_tokens.is_floating_point() or context_tokens.dtype == torch.bool:
        got = tuple(context_tokens.shape) if isinstance(context_tokens, torch.Tensor) else type(context_tokens)
        raise ValueError(f"context_tokens: expected integer ids [B, C, {c.grid_size}, {c.grid_size}] or "
                         f"[B, C, {c.seq_len}], got {got}")
    B, C = context_tokens.shape[:2]
    if not isinstance(states, torch.Tensor) or tuple(states.shape) != (B, SAMPLE_FRAMES, c.state_dim):
        got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states)
        raise ValueError(f"states: expected [B={B}, {SAMPLE_FRAMES}, {c.state_dim}], got {got}")
    check_rollout(c, C, num_frames, use_cache)
