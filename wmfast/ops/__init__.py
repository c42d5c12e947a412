"""The public functional API of wmfast: every op validates its inputs, picks a backend
(`wmfast.backend`) and runs it. Shapes are documented on each op."""
from wmfast.ops.adaln import gated_residual, gated_residual_layernorm_modulate, layernorm_modulate
from wmfast.ops.attention import spatial_attention, temporal_attention, temporal_decode_step
from wmfast.ops.sampler import ensemble_euler_step, ensemble_mean_var

__all__ = [
    "ensemble_euler_step",
    "ensemble_mean_var",
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "layernorm_modulate",
    "spatial_attention",
    "temporal_attention",
    "temporal_decode_step",
]
