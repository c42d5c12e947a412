"""fp8 weights for the GEMMs inside the Wan DiT blocks (inference only, off by default: `--fp8`).

Quantized, in every block: self-attention to_q/to_k/to_v/to_out.0, cross-attention to_q/to_k/to_v/to_out.0 and
the FFN (net.0.proj, net.2), also as the base layer of a peft LoRA layer (the LoRA A/B stay in full precision).
Left in their dtype: the patch embedding, the time/text embedders, proj_out, the state modules (state_embedder,
blocks.{i}.state_proj), the norms and the modulation tables - small layers next to the model's input and output,
where the error would not be averaged over 30 blocks and the time saved is nil.

Quantize last: after loading weights and adapters and casting (cast_keeping_fp32 writes param.data directly), and
call prepare_conditioning again afterwards (a WanConditioning built before holds the old text K/V; the model's own
cache keys on the attn2.to_k/to_v parameters, which the replacement changes, so it recomputes by itself).
"""
from __future__ import annotations

import re

from torch import nn

from wmfast.modules.fp8_linear import fp8_support, quantize_linears

BLOCK_GEMM = re.compile(r"blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ffn\.net\.(0\.proj|2))(\.base_layer)?")


def is_block_gemm(name: str, linear: nn.Linear | None = None) -> bool:
    """Whether the transformer's Linear `name` (e.g. `blocks.3.attn2.to_k`) is one of the quantized block GEMMs."""
    return BLOCK_GEMM.fullmatch(name) is not None


def quantize_dit_fp8(transformer: nn.Module, *, emulate: bool = False) -> int:
    """Replace the block GEMMs of `transformer` (a WmWanTransformer) by Fp8Linear, in place; returns how many
    (10 per block; 0 when already quantized).

    Without `emulate` the weights' device must run fp8 GEMMs (CUDA, compute capability 8.9+), else ValueError
    ("--fp8: <reason>"). With it, devices without fp8 tensor cores run the fp32 emulation (tests, CPU runs);
    devices with them still take the fp8 GEMM."""
    if not emulate:
        reason = fp8_support(transformer.patch_embedding.weight.device)
        if reason is not None:
            raise ValueError(f"--fp8: {reason}")
    return len(quantize_linears(transformer, is_block_gemm))
