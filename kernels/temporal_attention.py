"""Temporal attention over T at each (b, s, h) of [B, T, S, H, Dh] tensors, and the cached decode step.

Reading order (STYLE.md): references, jit kernels, launchers, torch.library registration.
"""
from __future__ import annotations

import torch


def temporal_attention_ref(q, k, v, *, causal=True, upcast=True):
    """Reference. q, k, v: [B, T, S, H, Dh] -> o [B, T, S, H, Dh]; softmax scale Dh**-0.5.

    causal: frame t attends to frames <= t."""
    dt = torch.float32 if upcast else q.dtype
    T, Dh = q.shape[1], q.shape[-1]
    scores = torch.einsum("btshd,bushd->bshtu", q.to(dt), k.to(dt)) * Dh ** -0.5  # [B, S, H, T, T]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(dim=-1)
    return torch.einsum("bshtu,bushd->btshd", p, v.to(dt)).to(q.dtype)


def temporal_decode_ref(q, k, v, k_cache, v_cache, t: int, *, upcast=True):
    """Reference decode step. q, k, v: [B, 1, S, H, Dh] (the new frame); k_cache, v_cache:
    [B, S, H, T_max, Dh]. Writes k, v at position t (in place) and returns o [B, 1, S, H, Dh], the new
    frame attending to cached positions 0..t."""
    k_cache[:, :, :, t] = k[:, 0]
    v_cache[:, :, :, t] = v[:, 0]
    dt = torch.float32 if upcast else q.dtype
    Dh = q.shape[-1]
    kc, vc = k_cache[:, :, :, : t + 1].to(dt), v_cache[:, :, :, : t + 1].to(dt)  # [B, S, H, t+1, Dh]
    scores = torch.einsum("bshd,bshud->bshu", q[:, 0].to(dt), kc) * Dh ** -0.5
    o = torch.einsum("bshu,bshud->bshd", scores.softmax(dim=-1), vc)
    return o[:, None].to(q.dtype)
