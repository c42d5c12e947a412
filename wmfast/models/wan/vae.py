"""The frozen Wan2.2 VAE: building it (pretrained or seeded random weights) and normalised encode / decode of
frame tensors."""
from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKLWan

from wmfast.models.wan.presets import VAE_SEED, WanPreset, cast_keeping_fp32
from wmfast.models.wan.tiny_vae import ASSET as TINY_VAE_ASSET
from wmfast.models.wan.tiny_vae import load_tiny_vae_weights, tiny_vae_config


def build_vae(preset: WanPreset, pretrained: str | None = None, device="cpu", dtype=torch.float32):
    """AutoencoderKLWan from the preset config, or from `pretrained` (a vae or pipeline directory); frozen."""
    if pretrained is not None:
        sub = os.path.join(pretrained, "vae")
        path = sub if os.path.isdir(sub) else pretrained
        vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device)
    else:
        # Random weights from a fixed seed, apart from the global RNG: training (the task's VAE), `data encode`
        # and sampling then all use the same VAE, so tiny latents stay meaningful across processes. A preset with
        # fitted weights shipped in the package (the tiny one: wmfast.models.wan.tiny_vae) loads them over those.
        config = tiny_vae_config(preset.vae) if preset.fitted_vae else preset.vae
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(VAE_SEED)
            vae = AutoencoderKLWan(**config)
        if preset.fitted_vae and not load_tiny_vae_weights(vae):
            raise FileNotFoundError(f"the {preset.name} preset's fitted VAE weights are missing ({TINY_VAE_ASSET}: "
                                    "part of the package; `python -m wmfast.models.wan.tiny_vae` writes them)")
        vae = cast_keeping_fp32(vae, dtype)
    vae.requires_grad_(False).eval()
    return vae


def vae_encode(vae, frames: torch.Tensor) -> torch.Tensor:
    """WanWorldModel.encode_frames with an explicit VAE (the training task holds its VAE apart)."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames: expected [B, F, 3, H, W], got {tuple(frames.shape)}")
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    x = (x * 2 - 1).permute(0, 2, 1, 3, 4).to(_module_dtype(vae))              # [B, 3, F, H, W] in [-1, 1]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """WanWorldModel.decode_latents with an explicit VAE."""
    mean, std = _latent_stats(vae, latents)
    with torch.no_grad():
        x = vae.decode((latents * std + mean).to(_module_dtype(vae))).sample      # [B, 3, F, H, W] in [-1, 1]
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)


def _module_dtype(m):
    return next(m.parameters()).dtype


def _latent_stats(vae, z):
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=z.device, dtype=torch.float32).view(shape)
    return mean.to(z.dtype), std.to(z.dtype)

