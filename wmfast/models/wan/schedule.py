"""Which frames of a 1X sampling sample go into the Wan VAE, and how they map to latent frames and states.

A sample (1X sampling track) is 77 consecutive frames at 30 Hz, index 0..76, all in one segment: frames
0..16 are the context, frame 76 (60 frames = 2 s after frame 16) is the one scored, and one robot
state per frame (77 states).

The Wan2.2 VAE is causal in time: F frames -> 1 + (F - 1) // 4 latent frames (F % 4 == 1); latent 0
encodes the first frame alone, latent k >= 1 encodes input frames 4k-3 .. 4k. We sub-sample the 30 Hz
frames with a stride s and choose the frames so that
  * the context frames fill whole latents (their count c has c % 4 == 1), ending at frame 16, so the
    context latents are exactly "encode(context alone)" and can be held clean;
  * the future frames (16+s, ..., 76) fill whole latents (60 / s is a multiple of 4), ending at frame 76,
    so the last latent frame decodes to frame 76 as its last frame.
That admits s in {1, 3, 5, 15}:
  s = 1 (30 Hz): frames 0..76 = 77 frames -> 20 latents (5 clean context + 15 denoised); 512x512 gives
          32x32 latents, 16x16 = 256 tokens per latent frame: L = 5120.
  s = 3 (10 Hz, the default): frames 4, 7, ..., 76 = 25 frames (5 context: 4..16) -> 7 latents
          (2 clean + 5 denoised), L = 1792: ~3x fewer tokens (and ~8x less attention work) than s = 1
          while frame 16 (the newest context frame) and frame 76 (the scored one) are both kept exactly.
  s = 5, 15: a single context frame: allowed, not recommended.

States are 30 Hz; latent frame k "covers" the 30 Hz frames (e_{k-1}, e_k] where e_k is the original index
of its last input frame. Its state window is the W = 4 s states ending at e_k (for latent 0, which covers
fewer frames, the window is left-padded with state 0): every latent sees exactly the states of the motion
that happened during its frames, at full 30 Hz resolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_FRAMES = 77        # frames per 1X sampling sample (0..76)
NUM_CONTEXT = 17       # context frames (0..16)
TARGET_FRAME = 76      # the scored frame


def num_latent_frames(num_frames: int) -> int:
    """Causal VAE: F frames -> 1 + (F - 1) // 4 latent frames (requires F % 4 == 1)."""
    if num_frames % 4 != 1:
        raise ValueError(f"num_frames={num_frames}: the Wan VAE needs F % 4 == 1")
    return 1 + (num_frames - 1) // 4


@dataclass(frozen=True)
class FrameSchedule:
    """Temporal sub-sampling of a 77-frame sample; see the module docstring."""

    stride: int = 3
    num_frames: int = NUM_FRAMES
    num_context: int = NUM_CONTEXT

    def __post_init__(self):
        last_ctx = self.num_context - 1
        future = self.num_frames - 1 - last_ctx
        if self.stride < 1 or future % (4 * self.stride) != 0:
            raise ValueError(f"FrameSchedule: stride={self.stride}: the {future} future frames must split into "
                             f"whole latents (need {future} % (4 * stride) == 0; valid strides for 17+60 frames: "
                             "1, 3, 5, 15)")

    @property
    def context_count(self) -> int:
        """Sub-sampled context frames c: the largest c <= 1 + 16 // s with c % 4 == 1."""
        c = 1 + (self.num_context - 1) // self.stride
        return c - (c - 1) % 4

    @property
    def frame_indices(self) -> list[int]:
        """Original (30 Hz) indices of the frames fed to the VAE, oldest first; the last is 76."""
        last_ctx = self.num_context - 1
        first = last_ctx - self.stride * (self.context_count - 1)
        return list(range(first, self.num_frames, self.stride))

    @property
    def num_latents(self) -> int:
        return num_latent_frames(len(self.frame_indices))

    @property
    def num_context_latents(self) -> int:
        return num_latent_frames(self.context_count)

    @property
    def state_window(self) -> int:
        return 4 * self.stride

    def latent_end_frames(self) -> list[int]:
        """e_k: original index of the last input frame of latent k."""
        idx = self.frame_indices
        return [idx[0]] + [idx[4 * k] for k in range(1, self.num_latents)]

    def state_index(self) -> torch.Tensor:
        """[F', W] long: the state rows (0..76) each latent frame embeds, oldest first, clamped at 0."""
        ends = torch.tensor(self.latent_end_frames())
        offsets = torch.arange(-self.state_window + 1, 1)
        return (ends[:, None] + offsets[None, :]).clamp(min=0)
