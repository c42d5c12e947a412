"""Triton kernels of wmfast, installed as `wmfast.kernels` (one op family per file: reference, jit kernels,
launchers, torch.library registration): adaln, layernorm, temporal_attention, ensemble_sampler, cross_entropy,
norm_linear, greedy_head. `_launch` is the registration and launch helper they share; `tuning` reads the per-GPU launch tables in configs/
(wmfast.bench.adopt builds them).
Import the public API from `wmfast.ops`, not from here."""
