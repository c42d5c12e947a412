"""AdaLN-Zero conditioning and a DiT-style block on the fused ops of `wmfast.ops`.

`AdaLNZero` maps a conditioning vector to the six modulation vectors of a block
(shift/scale/gate for attention, then for the MLP), zero-initialised so that every gate starts at 0 and the
block starts as the identity (DiT; the 1X state conditioning of Wan2.2 relies on this to leave the pretrained
model unchanged). Its output is one [B, (F or L,) 6, D] tensor; the block unbinds it into strided views that the
fused kernels read in place (no per-chunk copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wmfast.ops import gated_residual, gated_residual_layernorm_modulate, layernorm_modulate

N_CHUNKS = 6  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLNZero(nn.Module):
    """cond -> SiLU -> Linear(cond_dim, n_chunks * dim), zero-initialised.

    cond: [B, C] (per-sample), [B, F, C] (per-frame) or [B, L, C] (per-token).
    Returns [B, n_chunks, D], [B, F, n_chunks, D] or [B, L, n_chunks, D]; `.unbind(-2)` gives the chunks as
    views of per-sample [B, D], per-frame [B, F, D] or per-token [B, L, D] modulation."""

    def __init__(self, cond_dim: int, dim: int, n_chunks: int = N_CHUNKS, bias: bool = True):
        super().__init__()
        self.dim, self.n_chunks = dim, n_chunks
        self.linear = nn.Linear(cond_dim, n_chunks * dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        mod = self.linear(F.silu(cond))  # [B, (F,) n_chunks * D]
        return mod.unflatten(-1, (self.n_chunks, self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_chunks={self.n_chunks}"


def dit_block(x, mod, attn, mlp, *, eps: float = 1e-6, frame_len: int | None = None):
    """One AdaLN-Zero DiT block with the fused ops (three launches around attention and MLP):

        h = LN(x) * (1 + scale_msa) + shift_msa                      layernorm_modulate
        x = x + gate_msa * attn(h);  h = LN(x) * (1 + scale_mlp) + shift_mlp   gated_residual_layernorm_modulate
        x = x + gate_mlp * mlp(h)                                   gated_residual

    x: [B, L, D]; mod: [B, 6, D], [B, F, 6, D] (with frame_len) or [B, L, 6, D], any dtype the ops accept;
    attn, mlp: callables [B, L, D] -> [B, L, D]. Returns [B, L, D]."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(-2)  # strided views, no copies
    h = layernorm_modulate(x, shift_msa, scale_msa, eps=eps, frame_len=frame_len)
    h, x = gated_residual_layernorm_modulate(x, attn(h), gate_msa, shift_mlp, scale_mlp, eps=eps,
                                             frame_len=frame_len)
    return gated_residual(x, mlp(h), gate_mlp, frame_len=frame_len)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention (SDPA) over the L tokens of [B, L, D]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # [B, H, L, Dh] each
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).flatten(2))


class DiTBlock(nn.Module):
    """A DiT block: AdaLN-Zero conditioning, self-attention and a GELU MLP around the fused ops.

    forward(x [B, L, D], cond [B, C] | [B, F, C] | [B, L, C], frame_len=None) -> [B, L, D].
    `attn` / `mlp` replace the default self-attention / MLP (any module [B, L, D] -> [B, L, D]). At
    initialisation every gate is 0, so the block returns x exactly."""

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: float = 4.0, eps: float = 1e-6,
                 attn: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.eps = eps
        self.adaln = AdaLNZero(cond_dim, dim)
        self.attn = attn if attn is not None else SelfAttention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = mlp if mlp is not None else nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, frame_len: int | None = None) -> torch.Tensor:
        mod = self.adaln(cond)  # [B, (F or L,) 6, D]
        return dit_block(x, mod, self.attn, self.mlp, eps=self.eps, frame_len=frame_len)
