"""Public AdaLN-Zero ops (validation + backend dispatch). Placeholder bodies call the references until the
Triton kernels land (issue: foundation)."""
from __future__ import annotations

from wmfast.kernels.adaln import (
    gated_residual_layernorm_modulate_ref,
    gated_residual_ref,
    layernorm_modulate_ref,
)


def layernorm_modulate(x, shift, scale, *, eps=1e-6, frame_len=None):
    """y = LayerNorm(x) * (1 + scale) + shift. x: [B, L, D]; shift/scale: [B, D], [B, 1, D], [B, F, D]
    (with frame_len) or [B, L, D]."""
    return layernorm_modulate_ref(x, shift, scale, eps=eps, frame_len=frame_len)


def gated_residual(residual, x, gate, *, frame_len=None):
    """out = residual + gate * x."""
    return gated_residual_ref(residual, x, gate, frame_len=frame_len)


def gated_residual_layernorm_modulate(residual, x, gate, shift, scale, *, eps=1e-6, frame_len=None):
    """(y, out) with out = residual + gate * x and y = layernorm_modulate(out, shift, scale)."""
    return gated_residual_layernorm_modulate_ref(residual, x, gate, shift, scale, eps=eps, frame_len=frame_len)
