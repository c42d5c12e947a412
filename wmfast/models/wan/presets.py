"""Wan2.2 presets: the TI2V-5B transformer and VAE configurations, the tiny test configs, and the seeds of
randomly initialised weights, and the dtype cast both the transformer and VAE builders use."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("wmfast")

TI2V_5B_TRANSFORMER = {
    "patch_size": (1, 2, 2), "num_attention_heads": 24, "attention_head_dim": 128, "in_channels": 48,
    "out_channels": 48, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 14336, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6}
# Latent statistics come from the checkpoint's config when loading; the built-from-config VAE is for counting.
TI2V_5B_VAE = {
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12, "out_channels": 12,
    "patch_size": 2, "scale_factor_temporal": 4, "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}
# The tiny configs: the same classes, milliseconds on a CPU. The tiny DiT is 192 wide (4 heads of 48), the width of
# one token's latent patch (48 channels x 2 x 2): narrower, its output could not span the velocity of a token.
TINY_TRANSFORMER = {**TI2V_5B_TRANSFORMER, "num_attention_heads": 4, "attention_head_dim": 48, "ffn_dim": 384,
                    "num_layers": 2, "text_dim": 32, "rope_max_seq_len": 32}
# The tiny VAE is wider than the context doc's test config (base_dim 3, dim_mult [1, 1, 1, 1]: 3 channels at every
# level pass 48 numbers a latent frame, too few to reconstruct a 64x64 frame): 24 channels at the 4x4 level.
TINY_VAE = {
    "base_dim": 6, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
    "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12, "out_channels": 12,
    "patch_size": 2, "scale_factor_temporal": 4, "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}


VAE_SEED = 1234  # seed of the random VAE weights when no pretrained VAE is given
# Seed of the random base transformer of a from-scratch model built with base_seed=TINY_BASE_SEED (training's
# SamplingTask and `wmfast sample --model tiny`), so a LoRA trained on it samples on the same base whatever
# --seed either command used.
TINY_BASE_SEED = 0


@dataclass(frozen=True)
class WanPreset:
    name: str
    transformer: dict
    vae: dict
    height: int = 512
    width: int = 512
    frame_stride: int = 3
    # State embedding width. The per-block projection is Linear(state_embed_dim, 6 * D); with D = 3072 a
    # width of D would add 30 * 56.6M = 1.7B trainable parameters, 256 adds 142M.
    state_embed_dim: int = 256
    text_len: int = 512    # UMT5 sequence length Wan pads the prompt to
    # without pretrained weights, the VAE loads the weights fitted to the synthetic frames that ship with the
    # package (wmfast.models.wan.tiny_vae) instead of keeping random ones
    fitted_vae: bool = False
    # LoRA rank of the sampling task's adapters: the recipe's 32 for the 5B model (width 3072); the tiny model's
    # adapters span its whole width, as a rank-32 adapter on a random base that narrow cannot learn the flow
    lora_rank: int = 32
    extra: dict = field(default_factory=dict)


PRESETS = {
    "ti2v-5b": WanPreset("ti2v-5b", TI2V_5B_TRANSFORMER, TI2V_5B_VAE),
    "tiny": WanPreset("tiny", TINY_TRANSFORMER, TINY_VAE, height=64, width=64, state_embed_dim=16, text_len=8,
                      fitted_vae=True, lora_rank=192),
}


# Image cross-attention (Wan2.1 I2V / FLF2V: CLIP image tokens through extra K/V projections in every block). TI2V
# conditions on images through the latents instead, and some published TI2V-5B configs still carry these keys.
IMAGE_CONDITIONING_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def without_image_conditioning(config: dict, source: str) -> dict:
    """The config overrides that drop the image cross-attention (the world model never passes image tokens, so
    those layers would be unused weights), with one warning line naming what was dropped; {} when unset."""
    found = {k: config[k] for k in IMAGE_CONDITIONING_KEYS if config.get(k) is not None}
    if found:
        logger.warning("wmfast: %s sets %s: the image cross-attention is unused by the world model (no image tokens) "
                       "and is left out", source, ", ".join(f"{k}={v}" for k, v in found.items()))
    return dict.fromkeys(found)


def get_preset(name: str) -> WanPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def cast_keeping_fp32(model, dtype):
    """model.to(dtype), keeping diffusers' `_keep_in_fp32_modules` in fp32 as from_pretrained(torch_dtype=)
    does (the timestep embedder, the norms and the modulation tables)."""
    if dtype == torch.float32:
        return model
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    return model
