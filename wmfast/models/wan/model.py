"""The Wan world model: transformer + empty-prompt text + optional frozen VAE behind one API (conditioning,
velocity, encode / decode), and `build_world_model`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from torch import nn

from wmfast.models.wan.blocks import text_kv
from wmfast.models.wan.conditioning import WanConditioning
from wmfast.models.wan.presets import WanPreset, get_preset
from wmfast.models.wan.schedule import FrameSchedule
from wmfast.models.wan.step_cache import BodyCache
from wmfast.models.wan.text_encoder import default_text_cache, empty_prompt_embedding, has_umt5
from wmfast.models.wan.transformer import WmWanTransformer, build_transformer
from wmfast.models.wan.vae import build_vae, vae_decode, vae_encode


class WanWorldModel(nn.Module):
    """Transformer (+ optional frozen VAE, not a submodule: it stays outside DeepSpeed and the optimizer)."""

    def __init__(self, transformer: WmWanTransformer, text: torch.Tensor, vae: AutoencoderKLWan | None = None,
                 preset: WanPreset | None = None):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("empty_text", text, persistent=False)  # [1, S, text_dim]
        self.__dict__["vae"] = vae  # deliberately unregistered (see class docstring)
        self.preset = preset
        self.schedule = FrameSchedule(preset.frame_stride if preset else 3)
        self._kv_cache = None
        self._kv_key = None

    # ------------------------------------------------------------------ conditioning
    def prepare_conditioning(self, states: torch.Tensor) -> WanConditioning:
        """states [Bc, 77, 25] (30 Hz, frames 0..76) -> WanConditioning. Call once per sample; the text K/V
        are cached on the model under no_grad (keyed on the weights' versions and the trainable weights'
        contents, and dropped by train()/eval(), so training invalidates it) and recomputed with autograd when
        gradients are enabled (LoRA trains to_k/to_v)."""
        tr = self.transformer
        emb = tr.state_embedder(states)                                            # [Bc, F', E]
        act = F.silu(emb)
        D = tr.config.num_attention_heads * tr.config.attention_head_dim
        state_temb = [block.state_proj(act).unflatten(-1, (6, D)) for block in tr.blocks]  # [Bc, F', 6, D]
        return WanConditioning(state_temb, self._text_kv(), self.empty_text)

    def _text_kv(self):
        if torch.is_grad_enabled():
            return self._compute_text_kv()
        key = self._text_params_key()
        if self._kv_key != key:
            self._kv_cache, self._kv_key = self._compute_text_kv(), key
        return self._kv_cache

    def _compute_text_kv(self):
        tr = self.transformer
        dtype = tr.patch_embedding.weight.dtype
        hidden = tr.condition_embedder.text_embedder(self.empty_text.to(dtype))   # [1, S, D]
        return [text_kv(block.attn2, hidden) for block in tr.blocks]

    def _text_params(self):
        return [p for n, p in self.transformer.named_parameters() if "text_embedder" in n or ".attn2.to_k" in n
                or ".attn2.to_v" in n or ".attn2.norm_k" in n]

    def _text_params_key(self):
        """(data_ptr, _version) of every parameter the K/V depend on, plus a content fingerprint of the
        trainable ones. The version alone is not enough: DeepSpeed ZeRO-1/2 makes each trainable parameter's
        .data a view of a flat buffer and writes the optimizer's result into that buffer, which bumps the
        buffer's version counter, not the parameter's. Frozen parameters change only through in-place ops on
        themselves (load_state_dict, copy_), which do bump it, so only trainable ones are fingerprinted
        (LoRA: the small A/B matrices; one host sync per prepare_conditioning)."""
        tr = self.transformer
        ps = self._text_params()
        try:  # switching adapters changes the K/V without touching any parameter's version
            adapters = tuple(tr.active_adapters()) if getattr(tr, "_hf_peft_config_loaded", False) else ()
        except ValueError:
            adapters = ()
        trainable = [p.detach() for p in ps if p.requires_grad]
        fingerprint = ()
        if trainable:  # sum and squared norm per tensor, in fp32, fetched with one sync
            sums = torch.stack([torch.stack([p.sum(dtype=torch.float32), p.float().square().sum()])
                                for p in trainable])
            fingerprint = tuple(sums.flatten().tolist())
        return (tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in ps)
                + (self.empty_text.data_ptr(), adapters, fingerprint))

    def train(self, mode: bool = True):
        """Also drops the cached text K/V: engine.eval() / engine.train() around a validation pass reach here,
        so validation never scores with K/V cached before the last optimizer steps."""
        self.clear_cache()
        return super().train(mode)

    def clear_cache(self) -> None:
        """Drop the cached text K/V (needed only after changing LoRA scales with set_adapters(weights=...))."""
        self._kv_cache = self._kv_key = None

    # ------------------------------------------------------------------ denoiser
    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor, cond: WanConditioning,
                 fused: bool | None = None, cache: BodyCache | None = None) -> torch.Tensor:
        """latents [B, C, F', H', W'] (noisy future, clean context), timestep [Bt, F'] (1000 * sigma per latent
        frame, 0 on context frames; Bt in {1, B}), cond (batch 1 or B) -> velocity [B, C, F', H', W'].

        fused=None: the fused path unless WMFAST_BACKEND=torch; False: diffusers' unfused blocks.
        cache: a step cache (`step_cache()`): on a step it marks skipped, only the first block runs."""
        _check_velocity_args(latents, timestep, cond, self.transformer)
        return self.transformer(latents, timestep, cond=cond, fused=fused, cache=cache)

    def step_cache(self, decide=None) -> BodyCache:
        """A first-block step cache for one micro-batch size (wmfast.models.wan.step_cache)."""
        return BodyCache(decide)

    forward = velocity

    # ------------------------------------------------------------------ VAE
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, F, 3, H, W] uint8 (0..255) or float in [0, 1], F % 4 == 1 -> normalised latents
        [B, 48, 1 + (F-1)//4, H/16, W/16] (the posterior mode: deterministic, so precomputed == on the fly)."""
        return vae_encode(self._need_vae(), frames)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, 48, F', H', W'] -> frames [B, 4(F'-1)+1, 3, 16H', 16W'] float in [0, 1]."""
        return vae_decode(self._need_vae(), latents)

    def _need_vae(self):
        if self.vae is None:
            raise ValueError("this WanWorldModel has no VAE (built with vae=False); pass latents instead")
        return self.vae

    @property
    def num_context_latents(self) -> int:
        return self.schedule.num_context_latents


def _check_velocity_args(latents, timestep, cond, tr):
    if latents.dim() != 5:
        raise ValueError(f"latents: expected [B, C, F', H', W'], got {tuple(latents.shape)}")
    B, _, n_frames, H, W = latents.shape
    p_t, p_h, p_w = tr.config.patch_size
    if p_t != 1 or H % p_h or W % p_w:
        raise ValueError(f"latents {tuple(latents.shape)}: H', W' must be multiples of the patch {p_h}x{p_w}")
    if timestep.dim() != 2 or timestep.shape[1] != n_frames or timestep.shape[0] not in (1, B):
        raise ValueError(f"timestep: expected [1 or {B}, {n_frames}] (per latent frame), got {tuple(timestep.shape)}")
    st = cond.state_temb[0]
    if st.shape[1] != n_frames or st.shape[0] not in (1, B):
        raise ValueError(f"cond: state modulation {tuple(st.shape)} does not fit latents {tuple(latents.shape)} "
                         f"(batch 1 or {B}, {n_frames} latent frames)")


def build_world_model(preset: str | WanPreset = "tiny", pretrained: str | None = None, *, vae: bool = True,
                      device="cpu", dtype=torch.float32, text_encoder: str | None = None,
                      text_cache: str | None = None, base_seed: int | None = None) -> WanWorldModel:
    """The world model from a preset config (tests, demo, counting on device="meta") or from pretrained
    weights (a local diffusers Wan2.2-TI2V-5B pipeline directory). Nothing is downloaded.

    The empty-prompt embedding of pretrained weights comes from `text_cache` (default: default_text_cache(),
    beside the weights), else from UMT5 (`text_encoder`, default: the pretrained directory when it has
    text_encoder/), which fills the cache; with neither, a ValueError says what to provide.

    base_seed: random (not pretrained) weights drawn from this seed apart from the global RNG (which is left
    as it was); None: from the global RNG."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if base_seed is not None and pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base_seed)
            transformer = build_transformer(preset, pretrained, device, dtype)
    else:
        transformer = build_transformer(preset, pretrained, device, dtype)
    if device == "meta":
        text = torch.zeros(1, preset.text_len, preset.transformer["text_dim"], device="meta")
    else:
        if text_encoder is None and has_umt5(pretrained):
            text_encoder = pretrained
        if text_cache is None and pretrained is not None:
            text_cache = default_text_cache(pretrained, preset.text_len)
        text = empty_prompt_embedding(preset, text_encoder, text_cache, required=pretrained is not None).to(device)
    v = build_vae(preset, pretrained, device, dtype) if vae else None
    return WanWorldModel(transformer, text, v, preset)
