"""Greedy generation for the ST-Transformer: autoregressive over time, parallel over space (gpt-fast style).

With the cache: one prefill pass over the context grids writes every layer's temporal k, v into a
`TemporalKVCache`; each later step feeds one grid ([B, 1, S]) through the model, with `temporal_decode_step`
writing its k, v at position t (a Python int) and attending over 0..t in one launch; spatial attention stays
within the new grid. A step therefore costs one grid of compute, not t+1. Without the cache: every step runs the
model over all grids so far (the 1xgpt way), the reference.

The head: each token's next id is the argmax of its logits over the tied embedding. Unless the logits are asked
for, `wmfast.ops.greedy_head` computes it chunked over the vocabulary with a running max, so no [B, S, V] logits
exist (ties go to the first index, as torch.argmax). In eval mode without autograd the blocks run their fused
inference path (`Block.infer`).

Nothing in the loop reads a tensor on the host (no .item(), no printing), so on a GPU the host runs ahead, and
`graph=True` (or a `Generator`, generator.py) replays the whole rollout, prefill and every step, as one CUDA
graph captured once per model and batch size. The eager call here is the reference that path must match.
"""
from __future__ import annotations

import torch

from .generator import Generator
from .kv_cache import TemporalKVCache
from .rollout import check_inputs, rollout


@torch.no_grad()
def generate(model, context_tokens, states, num_frames: int | None = None, use_cache: bool = True, *,
             return_logits: bool = False, graph: bool = False, precision: str = "fp32", cache_dtype=None):
    """Greedy (argmax) generation of `num_frames` grids (default config.future_frames = 3).

    context_tokens: [B, C, G, G] (or [B, C, S]) int, the C = 3 context grids; states: [B, 34, 25] (past and
    future states of the two windows). Returns tokens [B, num_frames, G, G] (same layout as the context), and
    with return_logits=True also the logits [B, num_frames, S, V] that produced them. The model is put in eval
    mode for the call and restored after.

    graph=True: the rollout runs through the model's cached `Generator` for this batch size and `precision`
    (fp32 | tf32 | bf16): captured once in a CUDA graph, replayed at every later call (no logits; on a CPU model
    the Generator's static buffers without a graph). The eager call (graph=False) runs in the model's dtype and the caller's matmul settings."""
    c = model.config
    num_frames = c.future_frames if num_frames is None else num_frames
    check_inputs(model, context_tokens, states, num_frames, use_cache)
    B, C = context_tokens.shape[:2]
    if graph:
        if return_logits or cache_dtype is not None:
            raise ValueError("graph=True returns tokens only, in the cache dtype of its precision: drop "
                             "return_logits / cache_dtype or use graph=False")
        return Generator.cached(model, B, num_frames=num_frames, context_frames=C, precision=precision,
                                use_cache=use_cache)(context_tokens, states)
    if precision != "fp32":
        raise ValueError(f"precision={precision!r} is a Generator setting (graph=True); the eager call runs the "
                         "model as it is (cast it, or set torch.set_float32_matmul_precision, yourself)")
    was_training = model.training
    model.eval()
    try:
        sg = model.state_encoder(states)  # [B, 6, D], all states are known up front
        cache = TemporalKVCache.for_model(model, B, dtype=cache_dtype) if use_cache else None
        tokens, logits = rollout(model, context_tokens.reshape(B, C, c.seq_len), sg, num_frames, cache,
                                 return_logits=return_logits)
    finally:
        model.train(was_training)
    tokens = tokens.reshape(B, num_frames, *context_tokens.shape[2:])
    return (tokens, logits) if return_logits else tokens
