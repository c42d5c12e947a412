"""Robot-state conditioning of the Wan world model: the state embedder, the zero-initialised per-block state
projections (AdaLN-Zero), and the per-sample conditioning bundle the denoiser consumes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wmfast.data.format import STATE_DIM
from wmfast.models.wan.schedule import FrameSchedule


class StateEmbedder(nn.Module):
    """states [B, 77, 25] (30 Hz) -> per-latent-frame embedding [B, F', E].

    Latent frame k embeds the window of W = 4 * stride states ending at its last frame (FrameSchedule),
    flattened in time order, through a 2-layer MLP; the window index is a buffer."""

    def __init__(self, schedule: FrameSchedule, embed_dim: int, state_dim: int = STATE_DIM):
        super().__init__()
        self.register_buffer("state_index", schedule.state_index(), persistent=False)  # [F', W]
        window = self.state_index.shape[1]
        self.fc1 = nn.Linear(window * state_dim, embed_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states.dim() != 3 or states.shape[-1] != self.fc1.in_features // self.state_index.shape[1]:
            raise ValueError(f"states: expected [B, T, {self.fc1.in_features // self.state_index.shape[1]}], "
                             f"got {tuple(states.shape)}")
        windows = states[:, self.state_index]                       # [B, F', W, S]
        return self.fc2(self.act(self.fc1(windows.flatten(2).to(self.fc1.weight.dtype))))  # [B, F', E]


def attach_state_modules(transformer, schedule: FrameSchedule, embed_dim: int) -> None:
    """Adds `state_embedder` and a zero-initialised `blocks[i].state_proj` (AdaLN-Zero) to a diffusers
    transformer. The base parameters and their names are untouched."""
    D = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    device = transformer.patch_embedding.weight.device
    transformer.state_embedder = StateEmbedder(schedule, embed_dim).to(device)
    for block in transformer.blocks:
        proj = nn.Linear(embed_dim, 6 * D, device=device)
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
        block.state_proj = proj


@dataclass
class WanConditioning:
    """Everything that is constant over the denoising steps of one sample (or an ensemble of it).

    state_temb: per block [Bc, F', 6, D], added to the block's timestep modulation (zero at init).
    text_kv: per block the cross-attention (K, V) of the empty prompt, [1, S, H, Dh] each.
    text: the raw empty-prompt embedding [1, S, text_dim] (the unfused reference path re-projects it)."""

    state_temb: list
    text_kv: list
    text: torch.Tensor

    @property
    def batch(self) -> int:
        return self.state_temb[0].shape[0]

