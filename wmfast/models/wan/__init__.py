"""Wan2.2 TI2V-5B as a 1X world model: video + robot-state conditioning, fused AdaLN kernels, cached text K/V.

Public API (used by training, the ensemble sampler and the demo; see docs/sampling.md):

    model = build_world_model("tiny")                        # or "ti2v-5b" (meta device) / pretrained=path
    lat = model.encode_frames(frames)                         # [B, F, 3, H, W] uint8 / float [0,1] -> [B, C, F', H', W']
    cond = model.prepare_conditioning(states)                 # [Bc, 77, 25] -> WanConditioning (once per sample)
    v = model.velocity(x_t, timestep, cond)                   # [B, C, F', H', W'], [Bt, F'] -> velocity
    frames = model.decode_latents(lat)                        # -> [B, F, 3, H, W] float in [0, 1]

Bc and Bt may be 1 while B = N (an ensemble): conditioning is broadcast by views, never copied.

Modules: presets (configs, seeds), schedule (which frames become latents), conditioning (state embedder,
WanConditioning), blocks (fused AdaLN blocks, cached text K/V), transformer (WmWanTransformer), text_encoder
(empty-prompt UMT5 embedding and its cache), vae (build, encode, decode), model (WanWorldModel,
build_world_model), lora (peft adapters in diffusers' format). Importing this package imports diffusers.
"""
from wmfast.models.wan.conditioning import StateEmbedder, WanConditioning, attach_state_modules
from wmfast.models.wan.model import WanWorldModel, build_world_model
from wmfast.models.wan.presets import PRESETS, TINY_BASE_SEED, VAE_SEED, WanPreset, get_preset
from wmfast.models.wan.schedule import FrameSchedule
from wmfast.models.wan.text_encoder import default_text_cache, empty_prompt_embedding
from wmfast.models.wan.transformer import WmWanTransformer, build_transformer, check_pretrained_dir
from wmfast.models.wan.vae import build_vae, vae_decode, vae_encode

__all__ = [
    "PRESETS",
    "TINY_BASE_SEED",
    "VAE_SEED",
    "FrameSchedule",
    "StateEmbedder",
    "WanConditioning",
    "WanPreset",
    "WanWorldModel",
    "WmWanTransformer",
    "attach_state_modules",
    "build_transformer",
    "build_vae",
    "build_world_model",
    "check_pretrained_dir",
    "default_text_cache",
    "empty_prompt_embedding",
    "get_preset",
    "vae_decode",
    "vae_encode",
]
