"""Fused AdaLN-Zero modulation: LayerNorm + modulate, gated residual, and both fused.

Reading order (STYLE.md): references, jit kernels, launchers, torch.library registration, public ops.

Semantics (fp32 math, result cast to x.dtype):
    y   = LayerNorm(x; no affine, eps) * (1 + scale) + shift
    out = residual + gate * x
Modulation tensors (shift, scale, gate) are per-sample [B, D] or [B, 1, D], per-frame [B, F, D] with
`frame_len` (token l uses row l // frame_len, F * frame_len == L), or per-token [B, L, D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_modulation(mod: torch.Tensor, L: int, frame_len: int | None) -> torch.Tensor:
    """A [B, L or 1, D] view/copy of a modulation tensor, for the references only (kernels never expand)."""
    if mod.dim() == 2:
        return mod[:, None, :]
    if mod.shape[1] == 1 or mod.shape[1] == L:
        return mod
    return mod.repeat_interleave(frame_len, dim=1)


def layernorm_modulate_ref(x, shift, scale, *, eps=1e-6, frame_len=None, upcast=True):
    """Reference: LayerNorm(x) * (1 + scale) + shift. upcast=True computes in fp32 (the specification),
    upcast=False in x.dtype (what plain PyTorch does in low precision)."""
    L, D = x.shape[1], x.shape[2]
    dt = torch.float32 if upcast else x.dtype
    shift = expand_modulation(shift, L, frame_len).to(dt)
    scale = expand_modulation(scale, L, frame_len).to(dt)
    y = F.layer_norm(x.to(dt), (D,), eps=eps) * (1 + scale) + shift
    return y.to(x.dtype)


def gated_residual_ref(residual, x, gate, *, frame_len=None, upcast=True):
    """Reference: residual + gate * x."""
    dt = torch.float32 if upcast else x.dtype
    gate = expand_modulation(gate, x.shape[1], frame_len).to(dt)
    return (residual.to(dt) + gate * x.to(dt)).to(x.dtype)


def gated_residual_layernorm_modulate_ref(residual, x, gate, shift, scale, *, eps=1e-6, frame_len=None,
                                          upcast=True):
    """Reference: out = residual + gate * x; y = layernorm_modulate(out, shift, scale). Returns (y, out).

    With upcast=True, y is computed from the fp32 `out` (before its cast), as a fused kernel does."""
    dt = torch.float32 if upcast else x.dtype
    L, D = x.shape[1], x.shape[2]
    gate = expand_modulation(gate, L, frame_len).to(dt)
    out = residual.to(dt) + gate * x.to(dt)
    shift = expand_modulation(shift, L, frame_len).to(dt)
    scale = expand_modulation(scale, L, frame_len).to(dt)
    y = F.layer_norm(out, (D,), eps=eps) * (1 + scale) + shift
    return y.to(x.dtype), out.to(x.dtype)
