"""Inputs the bench scripts share: a random training batch of the compression task (timing only: the values do
not change the work)."""
from __future__ import annotations

import torch


def compression_batch(config, batch: int, device, dtype=torch.float32) -> dict:
    """A random batch in the data reader's format for an STTransformerConfig: tokens [B, T + 1, G, G] (the input
    frames and the target frame), states [B, 34, state_dim] of `dtype`."""
    from wmfast.data.format import SAMPLE_FRAMES

    g = config.grid_size
    tokens = torch.randint(0, config.vocab_size, (batch, config.num_frames + 1, g, g), device=device)
    return {"tokens": tokens, "states": torch.randn(batch, SAMPLE_FRAMES, config.state_dim, device=device, dtype=dtype)}
