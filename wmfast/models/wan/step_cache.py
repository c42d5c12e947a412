"""Step skipping for the Wan DiT: a first-block cache.

Over the denoising loop the DiT's output changes slowly on many steps. The first block always runs; its
residual (output - input) is the cheap probe of how much the step's input differs from the last one. On a step
marked `skip`, the other blocks are not run: the body's output is the first block's output plus the body
residual (body output - first block output) kept from the last step that ran them all. This is ParaAttention's
first-block cache with TeaCache's accumulation rule (see `wmfast.inference.ensemble.calibrate_skip_steps`).

The schedule of skipped steps is fixed before the loop (Python booleans: a skipped step and a full step are two
CUDA graphs, never a host read inside the loop). Only calibration measures: with `decide` set, the relative L1
change of the first block's residual since the previous step is computed on the device and handed to
`decide(change)`, which reads it on the host and says whether to skip (one sync per step, calibration only).
The change is one number for the whole micro-batch: all members skip together.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class BodyCache:
    """The cache of one micro-batch size (its buffers have the batch's shape). The sampler sets `skip` before
    every step; `body` is called by the transformer between the first block and the rest."""

    def __init__(self, decide: Callable[[torch.Tensor | None], bool] | None = None):
        self.skip = False
        self.decide = decide
        self.residual: torch.Tensor | None = None  # [B, L, D] body output - first block output (last full step)
        self.first: torch.Tensor | None = None     # the previous step's first-block residual (calibration only)

    def state(self):
        """The residual (what a CUDA-graph check replay rewrites), to put back with load_state."""
        return None if self.residual is None else self.residual.clone()

    def load_state(self, state) -> None:
        if state is not None and self.residual is not None:
            self.residual.copy_(state)

    def reset(self) -> None:
        """Before the first step of a new trajectory: nothing to compare with, nothing to reuse."""
        self.first = None
        self.skip = False

    def body(self, x0: torch.Tensor, x1: torch.Tensor, rest: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x0: the body's input (after the patch embedding); x1: the first block's output; rest: the other
        blocks. Returns the body's output: rest(x1), or x1 + the cached residual on a skipped step."""
        if self.decide is not None:
            self.skip = self.decide(self._change(x1 - x0))
        if self.skip:
            if self.residual is None or self.residual.shape != x1.shape:
                raise RuntimeError("BodyCache: a skipped step needs a full step before it (the first step of a "
                                   "trajectory always runs every block)")
            return x1 + self.residual
        out = rest(x1)
        if self.residual is None or self.residual.shape != out.shape or self.residual.dtype != out.dtype:
            self.residual = torch.empty_like(out)
        torch.sub(out.detach(), x1.detach(), out=self.residual)  # in place: a graph rewrites the same buffer
        return out

    def _change(self, r1: torch.Tensor) -> torch.Tensor | None:
        """Relative L1 change of the first block's residual since the previous step (None on the first)."""
        previous, self.first = self.first, r1.detach().clone()
        if previous is None or previous.shape != r1.shape:
            return None
        num = (r1.float() - previous.float()).abs().mean()
        return num / previous.float().abs().mean().clamp_min(1e-12)
