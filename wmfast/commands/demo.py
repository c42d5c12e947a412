"""The quick start: runs the main job on an embedded synthetic default, on whatever device is here."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--out", default="wmfast_demo", help="directory for the demo's outputs")


def run(args) -> int:
    import torch

    from wmfast import ops
    from wmfast.kernels.adaln import layernorm_modulate_ref

    torch.manual_seed(0)
    x = torch.randn(2, 48, 64)
    mod = torch.randn(2, 3, 6, 64) * 0.1
    shift, scale = mod[:, :, 0], mod[:, :, 1]
    y = ops.layernorm_modulate(x, shift, scale, frame_len=16)
    ref = layernorm_modulate_ref(x, shift, scale, frame_len=16)
    print(f"layernorm_modulate (per-frame modulation): max |fused - reference| = {(y - ref).abs().max():.2e}")
    return 0
