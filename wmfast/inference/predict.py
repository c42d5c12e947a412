"""One 1X sample -> the ensemble's predicted frame: encode the context, sample the ensemble
(wmfast.inference.ensemble), decode and average the members in pixel and/or latent space."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from wmfast import ops
from wmfast.inference.ensemble import EnsembleConfig, chunks, sample_ensemble


@dataclass
class EnsembleFrames:
    """The predicted frame under both averagings, plus what the strip shows. Pixel tensors: [3, H, W] in [0, 1]
    (members: [N, 3, H, W])."""
    members: torch.Tensor | None     # each member's decoded frame (pixel averaging decodes them anyway)
    pixel_mean: torch.Tensor | None  # decode every member, then average (the team's way)
    pixel_std: torch.Tensor | None   # per-pixel spread over members (uncertainty map)
    latent_mean: torch.Tensor | None  # average the latents, decode once (N - 1 fewer VAE decodes)


@torch.no_grad()
def average_frames(latents: torch.Tensor, decode_frame: Callable[[torch.Tensor], torch.Tensor],
                   modes: Sequence[str] = ("pixel", "latent"), decode_batch: int = 1) -> EnsembleFrames:
    """Average N members' final latents [N, C, F', H', W'] in pixel space and/or latent space.

    decode_frame: latents [B, C, F', H', W'] -> the target frame [B, 3, H, W] in [0, 1]. Members are decoded
    decode_batch at a time (the VAE decode of a full clip dominates memory at 512x512)."""
    bad = set(modes) - {"pixel", "latent"}
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of ('pixel', 'latent'), got {tuple(modes)}")
    members = pixel_mean = pixel_std = latent_mean = None
    if "pixel" in modes:
        members = torch.cat([decode_frame(latents[r.start : r.stop]).float()
                             for r in chunks(latents.shape[0], decode_batch)])
        pixel_mean, var = ops.ensemble_mean_var(members)
        pixel_std = var.clamp_min(0).sqrt()
    if "latent" in modes:
        mean_latents, _ = ops.ensemble_mean_var(latents)
        latent_mean = decode_frame(mean_latents[None])[0].float()
    return EnsembleFrames(members, pixel_mean, pixel_std, latent_mean)


# --------------------------------------------------------------------------------------------------------
# the world model end to end (wmfast.models.wan.WanWorldModel: encode_frames, decode_latents, schedule)
# --------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    frames: EnsembleFrames
    latents: torch.Tensor  # [N, C, F', H', W'] final member latents
    denoise_s: float = float("nan")  # wall time of the denoising loop (sample_ensemble), device synchronized


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.transformer.parameters())
    return p.device, p.dtype


def predict_sample(model, context_frames: torch.Tensor, states: torch.Tensor, cfg: EnsembleConfig,
                   modes: Sequence[str] = ("pixel", "latent"), decode_batch: int = 1,
                   seeds: Sequence[int] | None = None) -> Prediction:
    """One 1X sample -> the ensemble's predicted target frame (frame 76), both averagings.

    context_frames: [c, 3, H, W] uint8, the context frames the model's FrameSchedule encodes
    (model.schedule.frame_indices[:model.schedule.context_count]: 30 Hz frames 4, 7, .., 16 with stride 3), at
    the model's resolution; states: [77, 25] robot states. Frame 76 is the last frame of the last latent."""
    sched = model.schedule
    if context_frames.dim() != 4 or context_frames.shape[0] != sched.context_count:
        raise ValueError(f"context_frames must be [{sched.context_count}, 3, H, W] (the schedule's context frames "
                         f"{sched.frame_indices[: sched.context_count]}), got shape {tuple(context_frames.shape)}")
    device, dtype = model_device_dtype(model)
    with torch.no_grad():
        context = model.encode_frames(context_frames[None].to(device)).to(dtype)  # [1, C, Fc, H', W']
        cond = model.prepare_conditioning(states[None].to(device, dtype))            # batch 1, computed once
        _synchronize(device)  # the timing below covers the denoising loop alone, not the encode before it
        start = time.perf_counter()
        latents = sample_ensemble(model, context, cond, sched.num_latents, cfg, seeds)
        _synchronize(device)  # after the loop: the decode needs the latents anyway
        denoise_s = time.perf_counter() - start

        def decode_frame(z):  # the causal VAE decodes the whole clip; frame 76 is its last frame
            return model.decode_latents(z)[:, -1]

        frames = average_frames(latents, decode_frame, modes, decode_batch)
    return Prediction(frames, latents, denoise_s)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
