"""Preallocated temporal KV cache of the ST-Transformer: per layer k, v of shape [B, S, H, T_max, Dh].

Why this layout: a decode step reads, for every (b, s, h) row, positions 0..t; with T innermost after the
row they form one contiguous [t+1, Dh] tile (docs/attention.md). Spatial attention needs no cache: it stays
inside the new frame. Memory: 2 * L * S * T_max * D elements a batch element: 126M (503 MB fp32)
for the 1x-compression preset (L=24, S=1024, T_max=5, D=512).
"""
from __future__ import annotations

import torch


class TemporalKVCache:
    """k[i], v[i]: [B, S, H, T_max, Dh] for layer i, allocated once (uninitialised), written in place at Python-int
    positions."""

    def __init__(self, num_layers: int, batch: int, seq_len: int, num_heads: int, max_frames: int, head_dim: int,
                 *, device=None, dtype=torch.float32):
        shape = (batch, seq_len, num_heads, max_frames, head_dim)
        # empty, not zeros: the prefill writes positions 0..C-1 and a decode step writes t before it reads 0..t,
        # so no reader sees an unwritten slot (zero-filling cost 2 x L writes of the whole cache every call)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model, batch: int, *, device=None, dtype=None) -> TemporalKVCache:
        c, p = model.config, next(model.parameters())
        return cls(c.num_layers, batch, c.seq_len, c.num_heads, c.num_frames, c.head_dim,
                   device=device or p.device, dtype=dtype or p.dtype)

    def __getitem__(self, layer: int):
        return self.k[layer], self.v[layer]

    def __len__(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
