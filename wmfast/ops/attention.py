"""Public factorized attention ops on [B, T, S, H, Dh] tensors. Placeholder bodies (SDPA / references)
until the compression-track kernels land."""
from __future__ import annotations

import torch.nn.functional as F

from wmfast.kernels.temporal_attention import temporal_attention_ref, temporal_decode_ref


def spatial_attention(q, k, v):
    """Bidirectional attention within each frame. q, k, v: [B, T, S, H, Dh] -> [B, T, S, H, Dh]."""
    B, T, S, H, Dh = q.shape
    q2, k2, v2 = (t.reshape(B * T, S, H, Dh).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q2, k2, v2)  # [B*T, H, S, Dh]
    return o.transpose(1, 2).reshape(B, T, S, H, Dh)


def temporal_attention(q, k, v, *, causal=True):
    """Attention over T at each (b, s, h). q, k, v: [B, T, S, H, Dh] -> [B, T, S, H, Dh]."""
    return temporal_attention_ref(q, k, v, causal=causal)


def temporal_decode_step(q, k, v, k_cache, v_cache, t: int):
    """Cached decode step: write k, v ([B, 1, S, H, Dh]) at position t of k_cache, v_cache
    ([B, S, H, T_max, Dh]) and attend the new frame's q over positions <= t. Returns [B, 1, S, H, Dh]."""
    return temporal_decode_ref(q, k, v, k_cache, v_cache, t)
