"""Greedy generation for the ST-Transformer: autoregressive over time, parallel over space (gpt-fast style).

With the cache: one prefill pass over the context grids writes every layer's temporal k, v into a
preallocated `TemporalKVCache`; each later step feeds one grid ([B, 1, S]) through the model, with
`temporal_decode_step` writing its k, v at position t (a Python int) and attending over 0..t in one launch;
spatial attention stays within the new grid. A step therefore costs one grid of compute, not t+1.
Without the cache: every step runs the model over all grids so far (the 1xgpt way) - the reference.

Nothing in the loop reads a tensor on the host (no .item(), no printing), so on a GPU the step runs ahead of
the host, and `compile_step=True` wraps it in torch.compile(mode="reduce-overhead") (CUDA graphs: one graph
per position t, since t is a Python int the compiler specialises on).
"""
from __future__ import annotations

import torch

from .kv_cache import TemporalKVCache


def decode_step(model, tokens, state_grids, t: int, kv_cache: TemporalKVCache):
    """One cached step: tokens [B, 1, S] of grid t -> (logits [B, 1, S, V] for grid t+1, argmax [B, 1, S])."""
    logits = model.logits(model.hidden(tokens, state_grids=state_grids, start=t, kv_cache=kv_cache))
    return logits, logits.argmax(-1)


_compiled_steps: dict = {}


def _step_fn(compile_step: bool):
    if not compile_step:
        return decode_step
    if "step" not in _compiled_steps:
        # dynamic=False: t stays a constant of each graph (automatic dynamic shapes would turn the second
        # distinct t into a SymInt); 2 positions for the challenge's 3 frames -> 2 graphs
        _compiled_steps["step"] = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return _compiled_steps["step"]


def _check(model, context_tokens, states, num_frames: int, use_cache: bool):
    c = model.config
    B, C = context_tokens.shape[:2]
    if context_tokens.ndim not in (3, 4) or context_tokens[0, 0].numel() != c.seq_len:
        raise ValueError(f"context_tokens: expected [B, C, {c.grid_size}, {c.grid_size}] or [B, C, {c.seq_len}], "
                         f"got {tuple(context_tokens.shape)}")
    if num_frames < 1 or C < 1 or C + num_frames - 1 > c.num_frames:
        raise ValueError(f"context_tokens {tuple(context_tokens.shape)} with num_frames={num_frames}: the model "
                         f"takes at most {c.num_frames} input grids, so C + num_frames - 1 must be <= {c.num_frames}")
    if states.ndim != 3 or states.shape[0] != B:
        raise ValueError(f"states: expected [B={B}, 34, {c.state_dim}], got {tuple(states.shape)}")
    if use_cache and c.attention != "factorized":
        raise ValueError(f"use_cache=True needs attention='factorized' (the temporal KV cache); the model has "
                         f"attention={c.attention!r}: pass use_cache=False")


@torch.no_grad()
def generate(model, context_tokens, states, num_frames: int | None = None, use_cache: bool = True, *,
             return_logits: bool = False, compile_step: bool = False, cache_dtype=None):
    """Greedy (argmax) generation of `num_frames` grids (default config.future_frames = 3).

    context_tokens: [B, C, G, G] (or [B, C, S]) int, the C = 3 context grids; states: [B, 34, 25] (past and
    future states of the two windows). Returns tokens [B, num_frames, G, G] (same layout as the context), and
    with return_logits=True also the logits [B, num_frames, S, V] that produced them. The model is put in eval
    mode for the call (dropout off) and restored after."""
    c = model.config
    num_frames = c.future_frames if num_frames is None else num_frames
    _check(model, context_tokens, states, num_frames, use_cache)
    B, C = context_tokens.shape[:2]
    was_training = model.training
    model.eval()
    try:
        sg = model.state_encoder(states)  # [B, 6, D], all states are known up front
        ctx = context_tokens.reshape(B, C, c.seq_len)
        if use_cache:
            logits = _cached(model, ctx, sg, num_frames, return_logits, compile_step, cache_dtype)
        else:
            logits = _recompute(model, ctx, sg, num_frames, return_logits)
    finally:
        model.train(was_training)
    new, logits = logits
    tokens = torch.cat(new, 1).reshape(B, num_frames, *context_tokens.shape[2:])
    return (tokens, torch.cat(logits, 1)) if return_logits else tokens


def _cached(model, ctx, sg, num_frames, keep_logits, compile_step, cache_dtype):
    B, C = ctx.shape[:2]
    cache = TemporalKVCache.for_model(model, B, dtype=cache_dtype)
    logits = model.logits(model.hidden(ctx, state_grids=sg, kv_cache=cache)[:, -1:])  # prefill: [B, 1, S, V]
    new, kept = [logits.argmax(-1)], [logits] if keep_logits else []
    step = _step_fn(compile_step)
    if compile_step:
        cache.mark_static()
        # a new generation for CUDA-graph trees: the last call's graph outputs may be reused (we copied them)
        torch.compiler.cudagraph_mark_step_begin()
    for t in range(C, C + num_frames - 1):  # t: a Python int, the temporal position of the grid fed in
        logits, nxt = step(model, new[-1], sg, t, cache)
        new.append(nxt)
        if keep_logits:
            kept.append(logits.clone() if compile_step else logits)  # CUDA-graph outputs are overwritten
    return new, kept


def _recompute(model, ctx, sg, num_frames, keep_logits):
    frames, new, kept = ctx, [], []
    for _ in range(num_frames):
        logits = model.logits(model.hidden(frames, state_grids=sg)[:, -1:])  # every grid so far, every step
        new.append(logits.argmax(-1))
        if keep_logits:
            kept.append(logits)
        frames = torch.cat([frames, new[-1]], 1)
    return new, kept
