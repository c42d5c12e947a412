"""Score-materialising (eager) attention on the model layout [B, T, S, H, Dh]: what `full_attention_impl="eager"`
runs, and what the memory-complexity table counts (wmfast.bench.attention_memory measures it).

Full attention (block-causal over time) holds (T S)^2 scores per (batch, head); factorized attention holds
T S^2 (spatial: one S x S matrix a frame) + S T^2 (temporal: one T x T matrix a token).
"""
from __future__ import annotations

import torch


def _attend(q, k, v, mask=None, mask_view=None):
    """q, k, v: [..., L, Dh] -> o; scores [..., L, L] masked in place (True = hidden) through `mask_view`."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        view = scores.view(mask_view) if mask_view is not None else scores
        view.masked_fill_(mask, float("-inf"))
    return scores.softmax(-1) @ v


def eager_full_attention(q, k, v):
    """Block-causal full attention over all T*S tokens, scores materialised. [B, T, S, H, Dh] -> same."""
    B, T, S, H, Dh = q.shape
    q2, k2, v2 = (x.reshape(B, T * S, H, Dh).transpose(1, 2) for x in (q, k, v))  # [B, H, TS, Dh]
    frame = torch.arange(T, device=q.device)
    hidden = (frame[:, None] < frame[None, :])[:, None, :, None]  # [T, 1, T, 1]: broadcast, never [TS, TS]
    o = _attend(q2, k2, v2, hidden, (B, H, T, S, T, S))
    return o.transpose(1, 2).reshape(B, T, S, H, Dh)


def eager_factorized_attention(q, k, v):
    """Spatial (bidirectional, per frame) then causal temporal (per token) attention, scores materialised.
    Both use the same q, k, v so the count is per pair of attentions, as in the table."""
    B, T, S, H, Dh = q.shape
    qs, ks, vs = (x.reshape(B * T, S, H, Dh).transpose(1, 2) for x in (q, k, v))  # [B*T, H, S, Dh]
    o_s = _attend(qs, ks, vs).transpose(1, 2).reshape(B, T, S, H, Dh)
    qt, kt, vt = (x.permute(0, 2, 3, 1, 4) for x in (q, k, v))  # [B, S, H, T, Dh]
    hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    o_t = _attend(qt, kt, vt, hidden).permute(0, 3, 1, 2, 4)
    return o_s + o_t
