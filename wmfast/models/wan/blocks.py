"""Fused Wan2.2 blocks: diffusers' `WanTransformerBlock` with its AdaLN-Zero arithmetic routed through
`wmfast.ops` and per-frame modulation.

diffusers (TI2V, per-token timesteps) builds a (B, L, 6, D) fp32 modulation tensor in every block and
runs four unfused elementwise expressions over [B, L, D]. Timesteps (and our state conditioning) are
constant within a latent frame, so a (B, F, 6, D) tensor plus `frame_len = L // F` carries the same
information with L/F = H'*W' times fewer bytes; the fused ops read row `l // frame_len`.

The subclass only replaces `forward`; parameters, buffers and their names are unchanged, so pretrained
checkpoints and LoRA keys (`blocks.{i}.attn1.to_q.lora_A.weight`, ...) load exactly as before. Called
without the wmfast keyword arguments it is diffusers' block (used by the unfused reference path).
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformerBlock

from wmfast import ops


def text_kv(attn: WanAttention, text_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention key/value of the (constant) text tokens: [Bc, S, D] -> two [Bc, S, H, Dh].

    Same arithmetic as diffusers' WanAttnProcessor (to_k -> norm_k, to_v), LoRA layers included."""
    if attn.add_k_proj is not None:
        raise ValueError("text_kv: image-conditioned cross-attention (added_kv_proj_dim) is not supported")
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(text_hidden).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(text_hidden), attn.to_v(text_hidden)
    key = attn.norm_k(key)
    return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))


def cross_attention(attn: WanAttention, hidden: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-attention of hidden [B, L, D] to cached K/V [Bc, S, H, Dh] with Bc in {1, B}.

    With Bc == 1 < B the batch is folded into the query sequence ([1, B*L, H, Dh]): cross-attention has no
    query-query interaction, so this is exact and the shared K/V are never copied or expanded."""
    key, value = kv
    B, L, _ = hidden.shape
    query = attn.norm_q(attn.to_q(hidden)).unflatten(2, (attn.heads, -1))  # [B, L, H, Dh]
    if key.shape[0] == 1 and B > 1:
        query = query.reshape(1, B * L, *query.shape[2:])
    elif key.shape[0] != B:
        raise ValueError(f"cross_attention: K/V batch {key.shape[0]} must be 1 or the hidden batch {B}")
    out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                backend=getattr(attn.processor, "_attention_backend", None))
    out = out.flatten(2, 3).type_as(query).reshape(B, L, -1)
    return attn.to_out[1](attn.to_out[0](out))


class FusedWanTransformerBlock(WanTransformerBlock):
    """WanTransformerBlock whose norm/modulate and gated residuals run through wmfast.ops."""

    def forward(self, hidden_states, encoder_hidden_states=None, temb=None, rotary_emb=None, *,
                frame_len=None, kv=None):
        """With frame_len: temb is per-frame [Bt, F, 6, D] (Bt in {1, B}) and kv this block's cached text
        K/V; without: diffusers' block, unchanged (pipelines, the unfused reference path)."""
        if frame_len is None:
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        # The table is added here, inside the block's own forward, so that ZeRO-3's hooks have gathered it.
        modulation = self.scale_shift_table.unsqueeze(0) + temb.float()  # [Bt, F, 6, D] fp32
        if modulation.shape[0] != hidden_states.shape[0]:
            modulation = modulation.expand(hidden_states.shape[0], -1, -1, -1)  # batch-1 conditioning: a view
        return fused_block_forward(self, hidden_states, modulation, frame_len, kv, rotary_emb)


def fused_block_forward(block: WanTransformerBlock, x: torch.Tensor, modulation: torch.Tensor, frame_len: int,
                        kv: tuple[torch.Tensor, torch.Tensor], rotary_emb) -> torch.Tensor:
    """x [B, L, D]; modulation [B, F, 6, D] fp32 (scale_shift_table + timestep + state, summed);
    kv: this block's cached cross-attention K/V; returns the new x [B, L, D]."""
    # unbind gives strided [B, F, D] views (stride 6*D over frames): the ops read them in place.
    shift, scale, gate, c_shift, c_scale, c_gate = modulation.unbind(2)
    eps = block.norm1.eps
    h = ops.layernorm_modulate(x, shift, scale, eps=eps, frame_len=frame_len)     # norm1 + modulate
    attn = block.attn1(h, None, None, rotary_emb)
    x = ops.gated_residual(x, attn.to(x.dtype), gate, frame_len=frame_len)        # gated residual 1
    h = block.norm2(x.float()).type_as(x)                                        # affine LayerNorm: kept
    ca = cross_attention(block.attn2, h, kv).to(x.dtype)
    # The cross-attention residual has no gate: fuse it with norm3 + modulate through a gate of ones
    # (one pass over x instead of two; exact in fp32, fp32 accumulation in bf16).
    ones = torch.ones((1, x.shape[-1]), device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
    h, x = ops.gated_residual_layernorm_modulate(x, ca, ones, c_shift, c_scale, eps=block.norm3.eps,
                                                 frame_len=frame_len)
    ff = block.ffn(h)
    return ops.gated_residual(x, ff.to(x.dtype), c_gate, frame_len=frame_len)  # gated residual 2


def patch_blocks(transformer) -> None:
    """Switch every WanTransformerBlock of `transformer` to FusedWanTransformerBlock (in place; same
    parameters, same names). Idempotent."""
    for block in transformer.blocks:
        if type(block) is WanTransformerBlock:
            block.__class__ = FusedWanTransformerBlock
