"""One 1X sample -> the ensemble's predicted frame: encode the context, sample the ensemble
(wmfast.inference.ensemble), decode and average the members in pixel and/or latent space; the wall time of each
phase (`Prediction.timings`) and the VAE's decode tiling (`set_vae_tiling`)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from wmfast import ops
from wmfast.inference.ensemble import (
    EnsembleConfig,
    calibrate_skip_steps,
    drop_cached_runners,
    halving_on_oom,
    sample_ensemble,
)

# The phases of one prediction, in order; Prediction.timings has these keys plus "total".
PHASES = ("conditioning", "denoise", "decode", "average")


class PhaseTimer:
    """Wall seconds per phase (PHASES), the device synchronized at the end of each phase and never inside one:
    a phase boundary is a host-visible boundary of predict_sample anyway (the sampler's step loop stays free of
    syncs). device None: no synchronization (CPU work, or a caller that times nothing). track_memory (CUDA):
    the peak allocated bytes of each phase, from torch.cuda.max_memory_allocated reset at the phase's start."""

    def __init__(self, device: torch.device | None = None, track_memory: bool = False):
        self.device = device
        self.track_memory = track_memory and device is not None and device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.peak_bytes: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.track_memory:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start
            if self.track_memory:
                peak = torch.cuda.max_memory_allocated(self.device)
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)


@dataclass
class EnsembleFrames:
    """The predicted frame under both averagings, plus what the strip shows. Pixel tensors: [3, H, W] in [0, 1]
    (members: [N, 3, H, W])."""
    members: torch.Tensor | None     # each member's decoded frame (pixel averaging decodes them anyway)
    pixel_mean: torch.Tensor | None  # decode every member, then average (the team's way)
    pixel_std: torch.Tensor | None   # per-pixel spread over members (uncertainty map)
    latent_mean: torch.Tensor | None  # average the latents, decode once (N - 1 fewer VAE decodes)


def decode_members(latents: torch.Tensor, decode_frame: Callable[[torch.Tensor], torch.Tensor],
                   decode_batch: int | None = None) -> torch.Tensor:
    """decode_frame over latents [N, ...] in batches of decode_batch members (None: all N), as float [N, ...].

    A batch that runs out of GPU memory is halved and retried (down to 1, then the error propagates), like the
    sampler's micro-batches; the members decoded before are kept. Batching changes no member's result beyond float
    rounding: the VAE decodes each member independently (tested on the CPU: batch 1 vs N differ by 3e-6 at most,
    oneDNN picking its convolution blocking per batch size)."""
    n = latents.shape[0]
    if decode_batch is not None and decode_batch < 1:
        raise ValueError(f"decode_batch must be >= 1 or None (all members at once), got {decode_batch}")
    out: list[torch.Tensor] = []  # members decoded so far: kept when a batch is retried smaller

    def decode_rest(batch: int) -> torch.Tensor:
        start = sum(t.shape[0] for t in out)
        while start < n:
            out.append(decode_frame(latents[start : start + batch]).float())
            start += batch
        return torch.cat(out)

    return halving_on_oom(decode_rest, min(decode_batch or n, n), f"the VAE decode of {n} members")


@torch.no_grad()
def average_frames(latents: torch.Tensor, decode_frame: Callable[[torch.Tensor], torch.Tensor],
                   modes: Sequence[str] = ("pixel", "latent"), decode_batch: int | None = None,
                   timer: PhaseTimer | None = None) -> EnsembleFrames:
    """Average N members' final latents [N, C, F', H', W'] in pixel space and/or latent space.

    decode_frame: latents [B, C, F', H', W'] -> the target frame [B, 3, H, W] in [0, 1]. Members are decoded
    decode_batch at a time (None: all N at once, halved on CUDA OOM; see decode_members). timer: the VAE decodes
    count as its "decode" phase, the means and the spread as "average"."""
    bad = set(modes) - {"pixel", "latent"}
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of ('pixel', 'latent'), got {tuple(modes)}")
    timer = timer or PhaseTimer()
    members = pixel_mean = pixel_std = latent_mean = mean_latents = None
    if "latent" in modes:
        with timer.phase("average"):
            mean_latents, _ = ops.ensemble_mean_var(latents)
    with timer.phase("decode"):
        if "pixel" in modes:
            members = decode_members(latents, decode_frame, decode_batch)
        if mean_latents is not None:
            latent_mean = decode_frame(mean_latents[None])[0].float()
    if members is not None:
        with timer.phase("average"):
            pixel_mean, var = ops.ensemble_mean_var(members)
            pixel_std = var.clamp_min(0).sqrt()
    return EnsembleFrames(members, pixel_mean, pixel_std, latent_mean)


# --------------------------------------------------------------------------------------------------------
# the world model end to end (wmfast.models.wan.WanWorldModel: encode_frames, decode_latents, schedule)
# --------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    frames: EnsembleFrames
    latents: torch.Tensor  # [N, C, F', H', W'] final member latents
    denoise_s: float = float("nan")  # wall time of the denoising loop (sample_ensemble), device synchronized
    # seconds per phase (PHASES) and "total" (the whole call), each phase device synchronized at its end
    timings: dict[str, float] = field(default_factory=dict)
    # with track_memory on CUDA: peak allocated bytes per phase and "total" (the max), all measured from 0,
    # i.e. including the weights; empty otherwise
    peak_memory: dict[str, int] = field(default_factory=dict)


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.transformer.parameters())
    return p.device, p.dtype


def predict_sample(model, context_frames: torch.Tensor, states: torch.Tensor, cfg: EnsembleConfig,
                   modes: Sequence[str] = ("pixel", "latent"), decode_batch: int | None = None,
                   seeds: Sequence[int] | None = None, track_memory: bool = False) -> Prediction:
    """One 1X sample -> the ensemble's predicted target frame (frame 76), both averagings.

    context_frames: [c, 3, H, W] uint8, the context frames the model's FrameSchedule encodes
    (model.schedule.frame_indices[:model.schedule.context_count]: 30 Hz frames 4, 7, .., 16 with stride 3), at
    the model's resolution; states: [77, 25] robot states. Frame 76 is the last frame of the last latent.
    decode_batch: members per VAE decode (None: all N, halved on CUDA OOM). track_memory (CUDA): fill
    Prediction.peak_memory (resets the device's peak-memory statistics at each phase)."""
    sched = model.schedule
    if context_frames.dim() != 4 or context_frames.shape[0] != sched.context_count:
        raise ValueError(f"context_frames must be [{sched.context_count}, 3, H, W] (the schedule's context frames "
                         f"{sched.frame_indices[: sched.context_count]}), got shape {tuple(context_frames.shape)}")
    device, _ = model_device_dtype(model)
    timer = PhaseTimer(device, track_memory)
    _synchronize(device)  # work queued before the call is not this prediction's
    start = time.perf_counter()
    with torch.no_grad():
        with timer.phase("conditioning"):
            context, cond = _encode_inputs(model, context_frames, states)
        with timer.phase("denoise"):
            latents = sample_ensemble(model, context, cond, sched.num_latents, cfg, seeds)
            drop_cached_runners(model)  # this conditioning is never seen again: free the graphs before the decode
        frames = average_frames(latents, _frame_decoder(model), modes, decode_batch, timer)
    timings = {**timer.seconds, "total": time.perf_counter() - start}
    peaks = {**timer.peak_bytes, "total": max(timer.peak_bytes.values())} if timer.peak_bytes else {}
    return Prediction(frames, latents, timings["denoise"], timings, peaks)


def calibrate_sample_skips(model, context_frames: torch.Tensor, states: torch.Tensor, cfg: EnsembleConfig,
                           threshold: float) -> tuple[int, ...]:
    """The step-cache schedule at `threshold` for cfg's solver and steps, calibrated on this sample (the inputs
    of predict_sample) with one member (wmfast.inference.ensemble.calibrate_skip_steps); () for threshold 0."""
    if threshold == 0:
        return ()
    with torch.no_grad():
        context, cond = _encode_inputs(model, context_frames, states)
        skip = calibrate_skip_steps(model, context, cond, model.schedule.num_latents, cfg, threshold)
    _synchronize(context.device)  # its last steps are still queued: a caller timing the calibration waits for them
    return skip


def _encode_inputs(model, context_frames: torch.Tensor, states: torch.Tensor):
    """(clean context latents [1, C, Fc, H', W'], the conditioning of batch 1): what every member shares."""
    device, dtype = model_device_dtype(model)
    context = model.encode_frames(context_frames[None].to(device)).to(dtype)
    return context, model.prepare_conditioning(states[None].to(device, dtype))


def _frame_decoder(model) -> Callable[[torch.Tensor], torch.Tensor]:
    def decode_frame(z):  # the causal VAE decodes the whole clip; frame 76 is its last frame
        try:
            return model.decode_latents(z)[:, -1].clone()  # not a view: the rest of the clip is freed
        except torch.cuda.OutOfMemoryError:
            clear = getattr(model.vae, "clear_cache", None)  # diffusers keeps the causal conv cache on the VAE
            if clear is not None:
                clear()
            raise

    return decode_frame


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# VAE decode tiling
# --------------------------------------------------------------------------------------------------------


def vae_tile_sizes(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((tile_h, tile_w), (stride_h, stride_w)) in pixels: 2 x 2 tiles per frame that overlap by 1/8 of the side
    (at least one latent, 16 px), multiples of 16 (one latent). At 512 x 512: tiles of 320 px (20 latents) every
    256 px, blended over 64 px: each tile decodes (20/32)^2 = 0.39 of the frame (the decoder's activations shrink
    alike), and the four decode 1.27x the frame's area. diffusers' default (256 every 192) makes 3 x 3 tiles
    at 512: 0.25 of the frame each but 1.56x the area, and its tiles of the last row start where the blend
    already covers them."""
    def side(s: int) -> tuple[int, int]:
        stride = max(16, -(-s // 32) * 16)           # half the side, rounded up to a latent
        overlap = max(16, round(s / 8 / 16) * 16)    # 1/8 of the side, at least one latent
        return stride + overlap, stride

    (th, sh), (tw, sw) = side(height), side(width)
    return (th, tw), (sh, sw)


def set_vae_tiling(model, enabled: bool = True) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Tile the VAE decode spatially (diffusers' AutoencoderKLWan.enable_tiling with vae_tile_sizes at the
    model's resolution), or turn tiling off; returns the (tile, stride) sizes in pixels (None when off).

    What diffusers does for the Wan VAE: each tile (the latents of a spatial window, every latent frame) is decoded
    on its own with its own causal cache, and neighbouring tiles are blended linearly over their overlap, so
    results differ from the untiled decode near the seams only: the decoder's receptive field sees the tile's
    zero padding instead of the neighbours (measured on the tiny model: docs/ensemble.md). The encode is left
    untiled: diffusers compares the patchified width (half the frame's) with the tile, which these tiles exceed."""
    vae = model.vae
    if vae is None:
        raise ValueError("this model has no VAE (built with vae=False): nothing to tile")
    if not enabled:
        vae.disable_tiling()
        return None
    (th, tw), (sh, sw) = sizes = vae_tile_sizes(model.preset.height, model.preset.width)
    vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw, tile_sample_stride_height=sh,
                      tile_sample_stride_width=sw)
    return sizes
