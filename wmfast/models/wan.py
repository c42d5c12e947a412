"""Wan2.2 TI2V-5B as a 1X world model: video + robot-state conditioning, fused AdaLN kernels, cached text K/V.

Public API (used by training, the ensemble sampler and the demo; see docs/sampling.md):

    model = build_world_model("tiny")                        # or "ti2v-5b" (meta device) / pretrained=path
    lat = model.encode_frames(frames)                         # [B, F, 3, H, W] uint8 / float [0,1] -> [B, C, F', H', W']
    cond = model.prepare_conditioning(states)                 # [Bc, 77, 25] -> WanConditioning (once per sample)
    v = model.velocity(x_t, timestep, cond)                   # [B, C, F', H', W'], [Bt, F'] -> velocity
    frames = model.decode_latents(lat)                        # -> [B, F, 3, H, W] float in [0, 1]

Bc and Bt may be 1 while B = N (an ensemble): conditioning is broadcast by views, never copied.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from wmfast import ops
from wmfast.backend import forced_backend
from wmfast.models.wan_blocks import patch_blocks, text_kv
from wmfast.models.wan_schedule import STATE_DIM, FrameSchedule

logger = logging.getLogger("wmfast")

# ---------------------------------------------------------------------------------------------- configs
TI2V_5B_TRANSFORMER = {
    "patch_size": (1, 2, 2), "num_attention_heads": 24, "attention_head_dim": 128, "in_channels": 48,
    "out_channels": 48, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 14336, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6}
# Latent statistics come from the checkpoint's config when loading; the built-from-config VAE is for counting.
TI2V_5B_VAE = {
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12, "out_channels": 12,
    "patch_size": 2, "scale_factor_temporal": 4, "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}
# The context doc's tiny configs: same classes, milliseconds on a CPU.
TINY_TRANSFORMER = {**TI2V_5B_TRANSFORMER, "num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32,
                    "num_layers": 2, "text_dim": 32, "rope_max_seq_len": 32}
TINY_VAE = {
    "base_dim": 3, "z_dim": 48, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
    "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12, "out_channels": 12,
    "patch_size": 2, "scale_factor_temporal": 4, "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}


VAE_SEED = 1234  # seed of the random VAE weights when no pretrained VAE is given
# Seed of the random base transformer of a from-scratch model built with base_seed=TINY_BASE_SEED (training's
# SamplingTask and `wmfast sample --model tiny`), so a LoRA trained on it samples on the same base whatever
# --seed either command used.
TINY_BASE_SEED = 0


@dataclass(frozen=True)
class WanPreset:
    name: str
    transformer: dict
    vae: dict
    height: int = 512
    width: int = 512
    frame_stride: int = 3
    # State embedding width. The per-block projection is Linear(state_embed_dim, 6 * D); with D = 3072 a
    # width of D would add 30 * 56.6M = 1.7B trainable parameters, 256 adds 142M.
    state_embed_dim: int = 256
    text_len: int = 512    # UMT5 sequence length Wan pads the prompt to
    extra: dict = field(default_factory=dict)


PRESETS = {
    "ti2v-5b": WanPreset("ti2v-5b", TI2V_5B_TRANSFORMER, TI2V_5B_VAE),
    "tiny": WanPreset("tiny", TINY_TRANSFORMER, TINY_VAE, height=64, width=64, state_embed_dim=16, text_len=8),
}


def get_preset(name: str) -> WanPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ------------------------------------------------------------------------------------------ state path
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


# ------------------------------------------------------------------------------------------- transformer
class WmWanTransformer(WanTransformer3DModel):
    """diffusers' WanTransformer3DModel plus the world-model forward. Same parameters and names (plus the
    state modules); called without `cond` it is diffusers' forward, unchanged."""

    def forward(self, hidden_states, timestep=None, encoder_hidden_states=None, *args, cond=None, fused=None,
                **kwargs):
        if cond is None:
            return super().forward(hidden_states, timestep, encoder_hidden_states, *args, **kwargs)
        if fused is None:
            fused = forced_backend() != "torch"
        if fused:
            return self._fused_forward(hidden_states, timestep, cond)
        return self._reference_forward(hidden_states, timestep, cond)

    def frame_time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype):
        """timestep [Bt, F'] -> (temb [Bt, F', D], timestep_proj [Bt, F', 6, D]); diffusers' arithmetic,
        per latent frame instead of per token."""
        ce = self.condition_embedder
        t = ce.timesteps_proj(timestep.flatten()).unflatten(0, timestep.shape)
        t = t.to(next(ce.time_embedder.parameters()).dtype)
        temb = ce.time_embedder(t).to(dtype)
        return temb, ce.time_proj(ce.act_fn(temb)).unflatten(2, (6, -1))

    def _fused_forward(self, latents, timestep, cond):
        B, _, n_frames, H, W = latents.shape
        p_t, p_h, p_w = self.config.patch_size
        rotary = self.rope(latents)
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()   # [B, L, D]
        frame_len = (H // p_h) * (W // p_w)
        temb, tproj = self.frame_time_embedding(timestep, x.dtype)                  # [Bt, F', D], [Bt, F', 6, D]
        for block, state, kv in zip(self.blocks, cond.state_temb, cond.text_kv):
            temb_i = tproj + state.to(tproj.dtype)                                   # [max(Bt, Bc), F', 6, D]
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = checkpoint(block, x, None, temb_i, rotary, frame_len=frame_len, kv=kv, use_reentrant=False)
            else:
                x = block(x, None, temb_i, rotary, frame_len=frame_len, kv=kv)
        mod = self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)                # [Bt, F', 2, D] fp32
        shift, scale = (m.expand(B, -1, -1) for m in mod.unbind(2))                   # views, no copies
        x = ops.layernorm_modulate(x, shift, scale, eps=self.norm_out.eps, frame_len=frame_len)
        x = self.proj_out(x)
        x = x.reshape(B, n_frames // p_t, H // p_h, W // p_w, p_t, p_h, p_w, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _reference_forward(self, latents, timestep, cond):
        """diffusers' forward, op for op (per-token timesteps, diffusers' unfused block forward), plus the state
        term added to each block's per-token temb: the unfused reference and the WMFAST_BACKEND=torch path.
        With zero state projections it is bit-identical to WanTransformer3DModel.forward."""
        B, _, n_frames, H, W = latents.shape
        p_t, p_h, p_w = self.config.patch_size
        frame_len = (H // p_h) * (W // p_w)
        t_tok = timestep.expand(B, -1).repeat_interleave(frame_len, dim=1)          # [B, L]
        rotary = self.rope(latents)
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()   # [B, L, D]
        temb, tproj, text, _ = self.condition_embedder(
            t_tok.flatten(), cond.text.to(latents.dtype).expand(B, -1, -1), None, timestep_seq_len=t_tok.shape[1])
        tproj = tproj.unflatten(2, (6, -1))                                          # [B, L, 6, D]
        for block, state in zip(self.blocks, cond.state_temb):
            temb_i = tproj + state.expand(B, -1, -1, -1).repeat_interleave(frame_len, dim=1).to(tproj.dtype)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = checkpoint(block, x, text, temb_i, rotary, use_reentrant=False)
            else:
                x = block(x, text, temb_i, rotary)
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        x = (self.norm_out(x.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(B, n_frames // p_t, H // p_h, W // p_w, p_t, p_h, p_w, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ---------------------------------------------------------------------------------------------- builders
def build_transformer(preset: WanPreset, pretrained: str | None = None, device="cpu", dtype=torch.float32):
    """A WmWanTransformer (fused blocks, zero-init state modules). `pretrained`: a diffusers transformer
    directory (or a pipeline directory with transformer/); never downloads. device="meta" builds without
    memory (parameter counting)."""
    if pretrained is not None:
        import os

        sub = os.path.join(pretrained, "transformer")
        path = sub if os.path.isdir(sub) else pretrained
        transformer = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        transformer.to(device)
    else:
        with torch.device(device):
            transformer = _cast(WanTransformer3DModel(**preset.transformer), dtype)
    transformer.__class__ = WmWanTransformer
    patch_blocks(transformer)
    with torch.device(device):
        attach_state_modules(transformer, FrameSchedule(preset.frame_stride), preset.state_embed_dim)
    return transformer


def _cast(model, dtype):
    """model.to(dtype), keeping diffusers' `_keep_in_fp32_modules` in fp32 as from_pretrained(torch_dtype=)
    does (the timestep embedder, the norms and the modulation tables)."""
    if dtype == torch.float32:
        return model
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    return model


def build_vae(preset: WanPreset, pretrained: str | None = None, device="cpu", dtype=torch.float32):
    """AutoencoderKLWan from the preset config, or from `pretrained` (a vae or pipeline directory); frozen."""
    if pretrained is not None:
        import os

        sub = os.path.join(pretrained, "vae")
        path = sub if os.path.isdir(sub) else pretrained
        vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True).to(device)
    else:
        # Random weights from a fixed seed, apart from the global RNG: training (the task's VAE), `data encode`
        # and sampling then all use the same VAE, so tiny latents stay meaningful across processes.
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(VAE_SEED)
            vae = _cast(AutoencoderKLWan(**preset.vae), dtype)
    vae.requires_grad_(False).eval()
    return vae


TEXT_CACHE_NAME = "wmfast_empty_prompt_{text_len}.pt"  # written beside the pretrained weights


def empty_prompt_embedding(preset: WanPreset, text_encoder: str | None = None, cache: str | None = None,
                           seed: int = 0, required: bool = False) -> torch.Tensor:
    """The constant text embedding [1, S, text_dim] of the empty prompt.

    Order: `cache` (a .pt file) if it exists; else the real UMT5 encoder from `text_encoder` (a pipeline
    directory with text_encoder/ and tokenizer/, loaded locally; the result is written to `cache` when
    given); else, unless `required` (pretrained weights: a random embedding would silently give wrong
    predictions, so that raises), a fixed seeded tensor (tiny presets and from-scratch runs: any constant works)."""
    import os

    shape = (1, preset.text_len, preset.transformer["text_dim"])
    if cache and os.path.exists(cache):
        emb = torch.load(cache, map_location="cpu")
        if tuple(emb.shape) != shape:
            raise ValueError(f"text cache {cache}: shape {tuple(emb.shape)}, expected {shape}; delete it to recompute")
        return emb
    if text_encoder is not None:
        emb = _umt5_empty_prompt(text_encoder, preset.text_len)
    elif required:
        raise ValueError(
            f"a pretrained Wan needs the UMT5 embedding of the empty prompt {shape}, and there is neither a UMT5 "
            f"encoder (text_encoder/ and tokenizer/ in the weights directory, or text_encoder=<a Wan2.2 diffusers "
            f"pipeline directory>) nor a cached embedding (text_cache={cache!r} does not exist). Copy text_encoder/ "
            f"and tokenizer/ of Wan-AI/Wan2.2-TI2V-5B-Diffusers next to transformer/, or pass text_cache= a .pt "
            f"file computed once by a run that had them.")
    else:
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(*shape, generator=g) * 0.1
    if cache:
        try:
            _save_atomic(emb, cache)
        except OSError as e:  # a read-only or full disk costs a recomputation next time, not this run
            logger.warning(f"wmfast: could not write the empty-prompt cache {cache} ({e}); UMT5 will run again")
    return emb


def default_text_cache(pretrained: str, text_len: int) -> str:
    """Where the empty-prompt embedding of `pretrained` is cached: beside the weights, so UMT5-XXL runs once
    per weights directory (not per rank, engine build or sample call); if that directory is not writable, under
    $XDG_CACHE_HOME/wmfast (default ~/.cache/wmfast), named after the directory's absolute path."""
    import hashlib
    import os

    name = TEXT_CACHE_NAME.format(text_len=text_len)
    beside = os.path.join(pretrained, name)
    if os.path.exists(beside) or os.access(pretrained, os.W_OK):
        return beside
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wmfast")
    digest = hashlib.sha1(os.path.abspath(pretrained).encode()).hexdigest()[:16]
    return os.path.join(root, f"{digest}_{name}")


def _save_atomic(tensor: torch.Tensor, path: str) -> None:
    """Write then rename: ranks that start together never read a half-written file."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(tensor, tmp)
    os.replace(tmp, path)


def _umt5_empty_prompt(path: str, text_len: int) -> torch.Tensor:
    """UMT5 on "" exactly as diffusers' WanPipeline: real tokens kept, padded with zeros to text_len. On a GPU
    the encoder runs in bf16 there (as the pipeline runs it; UMT5-XXL is 5.7B parameters: 23 GB in fp32 on the
    CPU); returns fp32 on the CPU."""
    import os

    from transformers import AutoTokenizer, UMT5EncoderModel

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
    enc = UMT5EncoderModel.from_pretrained(os.path.join(path, "text_encoder"), torch_dtype=dtype,
                                           local_files_only=True).to(device).eval()
    inputs = tok([""], padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
                 return_attention_mask=True, return_tensors="pt").to(device)
    with torch.no_grad():
        hidden = enc(inputs.input_ids, inputs.attention_mask).last_hidden_state.float().cpu()
    del enc
    if cuda:
        torch.cuda.empty_cache()
    n = int(inputs.attention_mask.sum())
    out = torch.zeros_like(hidden)
    out[:, :n] = hidden[:, :n]
    return out


# ---------------------------------------------------------------------------------------------- the model
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
                 fused: bool | None = None) -> torch.Tensor:
        """latents [B, C, F', H', W'] (noisy future, clean context), timestep [Bt, F'] (1000 * sigma per latent
        frame, 0 on context frames; Bt in {1, B}), cond (batch 1 or B) -> velocity [B, C, F', H', W'].

        fused=None: the fused path unless WMFAST_BACKEND=torch; False: diffusers' unfused blocks."""
        _check_velocity_args(latents, timestep, cond, self.transformer)
        return self.transformer(latents, timestep, cond=cond, fused=fused)

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
        if text_encoder is None and _has_umt5(pretrained):
            text_encoder = pretrained
        if text_cache is None and pretrained is not None:
            text_cache = default_text_cache(pretrained, preset.text_len)
        text = empty_prompt_embedding(preset, text_encoder, text_cache, required=pretrained is not None).to(device)
    v = build_vae(preset, pretrained, device, dtype) if vae else None
    return WanWorldModel(transformer, text, v, preset)


def _has_umt5(path) -> bool:
    import os

    return bool(path) and os.path.isdir(os.path.join(path, "text_encoder"))


__all__ = [
    "PRESETS",
    "FrameSchedule",
    "WanConditioning",
    "WanWorldModel",
    "WmWanTransformer",
    "build_transformer",
    "build_vae",
    "build_world_model",
    "default_text_cache",
    "empty_prompt_embedding",
    "get_preset",
]
