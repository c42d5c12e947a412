"""PSNR as the 1X sampling track scores it (higher is better).

Definition (wmfast; the challenge publishes only "PSNR between the predicted and the true 77th frame"):
- inputs are uint8 frames (data range 255): predictions are quantised exactly as a saved PNG would be, so
  the number a user computes from written files equals the one reported here;
- per frame: MSE over all pixels and all channels of that frame, PSNR = 10 * log10(255^2 / MSE), in fp64;
- over a split: the mean of the per-frame PSNRs (not the PSNR of the mean MSE, which weights bad frames
  less); identical frames give +inf, which `psnr` returns unchanged (a perfect prediction is not capped).
A "frame" is the last three dimensions ([C, H, W] or [H, W, C]: the layout does not matter, every value of
the frame is averaged), every leading dimension indexes frames.
"""
from __future__ import annotations

import math

import torch

DATA_RANGE = 255.0


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] (the world model's decoded range) -> uint8 in [0, 255], rounded to nearest like a
    PNG writer (values outside [0, 1] are clamped)."""
    return (frames.float().clamp(0, 1) * 255.0).round().to(torch.uint8)


def psnr_per_frame(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB. pred, target: uint8 [..., A, B, C] (one frame = the last three dims) -> fp64 [...]."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise ValueError(f"psnr: {name} must be a uint8 tensor (data range 255; convert with to_uint8), "
                             f"got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() < 3:
            raise ValueError(f"psnr: {name} must be [..., C, H, W] or [..., H, W, C], got shape {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"psnr: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    diff = pred.to(torch.float64) - target.to(torch.float64)
    mse = diff.square().flatten(-3).mean(-1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)  # mse = 0 -> +inf


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over frames of the per-frame PSNR (dB); see the module docstring for the exact definition."""
    values = psnr_per_frame(pred, target)
    return float(values.mean()) if values.numel() else math.nan


def sharpness_per_frame(frames: torch.Tensor) -> torch.Tensor:
    """RMS gradient magnitude of uint8 frames [..., C, H, W] (grey levels per pixel, fp64 [...]):
    sqrt(mean(dx^2 + dy^2)) over each channel's forward differences on the [H - 1, W - 1] interior. Averaging frames
    that disagree (an ensemble mean) lowers it: the squared gradient is convex, so the mean frame's mean squared
    gradient is at most the frames' average one, equal only when they agree. (The plain mean gradient magnitude would
    not show it: N copies of an edge at 1/N contrast have the same total gradient as one sharp edge.)"""
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() < 3:
        raise ValueError(f"sharpness: frames must be a uint8 tensor [..., C, H, W], got "
                         f"{getattr(frames, 'dtype', type(frames).__name__)} {tuple(getattr(frames, 'shape', ()))}")
    x = frames.to(torch.float64)
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx.square() + dy.square()).flatten(-3).mean(-1).sqrt()


def sharpness(frames: torch.Tensor) -> float:
    """Mean over frames of `sharpness_per_frame`."""
    values = sharpness_per_frame(frames)
    return float(values.mean()) if values.numel() else math.nan
