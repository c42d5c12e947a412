"""The Wan transformer of the world model: diffusers' WanTransformer3DModel with the world-model forward
(per-latent-frame timesteps, state modulation, cached text K/V, fused AdaLN blocks) and its builder."""
from __future__ import annotations

import contextlib
import os

import torch
from diffusers import WanTransformer3DModel
from torch.utils.checkpoint import checkpoint

from wmfast import ops
from wmfast.models.wan.blocks import patch_blocks
from wmfast.models.wan.conditioning import attach_state_modules
from wmfast.models.wan.presets import WanPreset, cast_keeping_fp32, without_image_conditioning
from wmfast.models.wan.schedule import FrameSchedule
from wmfast.models.wan.step_cache import BodyCache
from wmfast.modules.compile import compile_blocks
from wmfast.ops.dispatch import forced_backend


def unpatchify(x: torch.Tensor, B: int, n_frames: int, H: int, W: int, patch) -> torch.Tensor:
    """Output tokens [B, L, p_t * p_h * p_w * C] -> latents [B, C, F', H', W'] (diffusers' unpatchify)."""
    p_t, p_h, p_w = patch
    x = x.reshape(B, n_frames // p_t, H // p_h, W // p_w, p_t, p_h, p_w, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class WmWanTransformer(WanTransformer3DModel):
    """diffusers' WanTransformer3DModel plus the world-model forward. Same parameters and names (plus the
    state modules); called without `cond` it is diffusers' forward, unchanged."""

    def forward(self, hidden_states, timestep=None, encoder_hidden_states=None, *args, cond=None, fused=None,
                cache: BodyCache | None = None, **kwargs):
        if cond is None:
            return super().forward(hidden_states, timestep, encoder_hidden_states, *args, **kwargs)
        if fused is None:
            fused = forced_backend() != "torch"
        if fused:
            return self._fused_forward(hidden_states, timestep, cond, cache)
        return self._reference_forward(hidden_states, timestep, cond, cache)

    def compile_blocks(self, **compile_kwargs) -> None:
        """Regional compilation of the transformer blocks (wmfast.modules.compile: one compiled graph serves all
        30), static shapes by default (a new micro-batch size compiles once more); the rest of the forward
        (embeddings, the step cache's branch, the output head) stays eager. compile_kwargs go to torch.compile."""
        compile_blocks(list(self.blocks), **{"dynamic": False, **compile_kwargs})

    def frame_time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype):
        """timestep [Bt, F'] -> (temb [Bt, F', D], timestep_proj [Bt, F', 6, D]); diffusers' arithmetic,
        per latent frame instead of per token."""
        ce = self.condition_embedder
        t = ce.timesteps_proj(timestep.flatten()).unflatten(0, timestep.shape)
        t = t.to(next(ce.time_embedder.parameters()).dtype)
        temb = ce.time_embedder(t).to(dtype)
        return temb, ce.time_proj(ce.act_fn(temb)).unflatten(2, (6, -1))

    def _fused_forward(self, latents, timestep, cond, cache=None):
        B, _, n_frames, H, W = latents.shape
        _, p_h, p_w = self.config.patch_size
        rotary = self.rope(latents)
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()   # [B, L, D]
        frame_len = (H // p_h) * (W // p_w)
        temb, tproj = self.frame_time_embedding(timestep, x.dtype)                  # [Bt, F', D], [Bt, F', 6, D]
        layers = list(zip(self.blocks, cond.state_temb, cond.text_kv))

        def run(h, part):
            for block, state, kv in part:
                temb_i = tproj + state.to(tproj.dtype)                               # [max(Bt, Bc), F', 6, D]
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    h = checkpoint(block, h, None, temb_i, rotary, frame_len=frame_len, kv=kv, use_reentrant=False)
                else:
                    h = block(h, None, temb_i, rotary, frame_len=frame_len, kv=kv)
            return h

        # with a step cache the first block always runs, and the cache decides whether the others do
        x = run(x, layers) if cache is None else cache.body(x, run(x, layers[:1]), lambda h: run(h, layers[1:]))
        mod = self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)                # [Bt, F', 2, D] fp32
        shift, scale = (m.expand(B, -1, -1) for m in mod.unbind(2))                   # views, no copies
        x = ops.layernorm_modulate(x, shift, scale, eps=self.norm_out.eps, frame_len=frame_len)
        x = self.proj_out(x)
        return unpatchify(x, B, n_frames, H, W, self.config.patch_size)

    def _reference_forward(self, latents, timestep, cond, cache=None):
        """diffusers' forward, op for op (per-token timesteps, diffusers' unfused block forward), plus the state
        term added to each block's per-token temb: the unfused reference and the WMFAST_BACKEND=torch path.
        With zero state projections it is bit-identical to WanTransformer3DModel.forward."""
        B, _, n_frames, H, W = latents.shape
        _, p_h, p_w = self.config.patch_size
        frame_len = (H // p_h) * (W // p_w)
        t_tok = timestep.expand(B, -1).repeat_interleave(frame_len, dim=1)          # [B, L]
        rotary = self.rope(latents)
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()   # [B, L, D]
        temb, tproj, text, _ = self.condition_embedder(
            t_tok.flatten(), cond.text.to(latents.dtype).expand(B, -1, -1), None, timestep_seq_len=t_tok.shape[1])
        tproj = tproj.unflatten(2, (6, -1))                                          # [B, L, 6, D]
        layers = list(zip(self.blocks, cond.state_temb))

        def run(h, part):
            for block, state in part:
                temb_i = tproj + state.expand(B, -1, -1, -1).repeat_interleave(frame_len, dim=1).to(tproj.dtype)
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    h = checkpoint(block, h, text, temb_i, rotary, use_reentrant=False)
                else:
                    h = block(h, text, temb_i, rotary)
            return h

        x = run(x, layers) if cache is None else cache.body(x, run(x, layers[:1]), lambda h: run(h, layers[1:]))
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        x = (self.norm_out(x.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(x)
        x = self.proj_out(x)
        return unpatchify(x, B, n_frames, H, W, self.config.patch_size)


def check_pretrained_dir(path: str) -> None:
    """A local diffusers Wan directory: a pipeline (with transformer/) or a transformer directory (config.json).
    Checked before diffusers sees the path: given a name that is not a directory, it would look for a hub repo."""
    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r}: no such directory (a local Wan2.2-TI2V-5B diffusers directory; nothing "
                         "is downloaded)")
    if not any(os.path.isfile(os.path.join(path, *sub, "config.json")) for sub in ((), ("transformer",))):
        raise ValueError(f"--model {path!r}: neither a diffusers pipeline directory (transformer/config.json) nor a "
                         "transformer directory (config.json)")


@contextlib.contextmanager
def _quiet_diffusers(quiet: bool):
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    if quiet:
        diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def build_transformer(preset: WanPreset, pretrained: str | None = None, device="cpu", dtype=torch.float32):
    """A WmWanTransformer (fused blocks, zero-init state modules). `pretrained`: a diffusers transformer
    directory (or a pipeline directory with transformer/); never downloads. device="meta" builds without
    memory (parameter counting)."""
    if pretrained is not None:
        check_pretrained_dir(pretrained)
        sub = os.path.join(pretrained, "transformer")
        path = sub if os.path.isdir(sub) else pretrained
        overrides = without_image_conditioning(WanTransformer3DModel.load_config(path), path)
        with _quiet_diffusers(bool(overrides)):  # its unused-weights list of the dropped layers, key by key
            transformer = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                                **overrides)
        transformer.to(device)
    else:
        config = {**preset.transformer, **without_image_conditioning(preset.transformer, f"preset {preset.name!r}")}
        with torch.device(device):
            transformer = cast_keeping_fp32(WanTransformer3DModel(**config), dtype)
    # from_pretrained and the config constructor build diffusers' class; switching the class in place adds the
    # world-model forward without copying the weights or renaming a parameter
    transformer.__class__ = WmWanTransformer
    patch_blocks(transformer)
    with torch.device(device):
        attach_state_modules(transformer, FrameSchedule(preset.frame_stride), preset.state_embed_dim)
    return transformer
