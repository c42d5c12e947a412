"""The public functional API of wmfast: every op validates its inputs, picks a backend (`wmfast.ops.dispatch`,
forced with `use_backend`) and runs it. Shapes are documented on each op.

Modules: adaln, attention, ensemble_sampler, greedy_head, layernorm, linear_cross_entropy, norm_linear (the ops);
dispatch (backend capabilities and choice); common
(dtype table, shape descriptions, log-once); cuda_ext (the CUDA extension: loading, limits, raw functions);
cuda_build (the extension's build logic, shared with setup.py)."""
from wmfast.ops.adaln import gated_residual, gated_residual_layernorm_modulate, layernorm_modulate
from wmfast.ops.attention import spatial_attention, temporal_attention, temporal_decode_step
from wmfast.ops.dispatch import use_backend
from wmfast.ops.ensemble_sampler import ensemble_euler_step, ensemble_mean_var
from wmfast.ops.greedy_head import greedy_head
from wmfast.ops.layernorm import layer_norm, qk_layer_norm, residual_layer_norm
from wmfast.ops.linear_cross_entropy import linear_cross_entropy
from wmfast.ops.norm_linear import norm_linear

__all__ = [
    "ensemble_euler_step",
    "ensemble_mean_var",
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "greedy_head",
    "layer_norm",
    "layernorm_modulate",
    "linear_cross_entropy",
    "norm_linear",
    "qk_layer_norm",
    "residual_layer_norm",
    "spatial_attention",
    "temporal_attention",
    "temporal_decode_step",
    "use_backend",
]
