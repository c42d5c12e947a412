"""Triton kernels of wmfast, installed as `wmfast.kernels` (one op per file: reference, jit kernels,
launchers, torch.library registration). Import the public API from `wmfast.ops`, not from here."""
