"""ST-Transformer for the compression track (1X World Model Challenge), factorized attention on [B, T, S, D].

Layout: activations stay [B, T, S, D] (T grids of S = G*G tokens); q/k/v are strided views
[B, T, S, H, Dh] of one qkv projection (head dim contiguous), handed to `wmfast.ops.spatial_attention`
(within a frame, bidirectional) and `wmfast.ops.temporal_attention` (over T at each token, causal) with no
transposes in between.

States -> grids. A sample holds 34 frames of states and 6 token grids (two 17-frame windows, each 3 grids:
Cosmos DV 8x8x8 compresses time 8x causally, 1 + 16/8 = 3; grid 0 of a window encodes its frame 0, grid 1
frames 1-8, grid 2 frames 9-16; `wmfast.data.format.GRID_OF_FRAME`). The state encoder maps each frame's 25
states through an MLP, mixes neighbouring frames with Conv1d(k=3, p=1), adds a learned per-frame position
embedding, and averages the frames of each grid -> 6 state vectors. Input position t (grid t) predicts
grid t+1, so it is given the state vector of grid t+1 (the motion the next grid must show; the challenge
provides future states); earlier states reach it through causal temporal attention.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from wmfast import ops
from wmfast.data.format import CONTEXT_GRIDS, GRID_OF_FRAME, SAMPLE_FRAMES, SAMPLE_GRIDS, STATE_DIM, VOCAB_SIZE

ATTENTION_KINDS = ("factorized", "full")


@dataclass(frozen=True)
class STTransformerConfig:
    num_layers: int = 24
    num_heads: int = 8
    d_model: int = 512
    mlp_ratio: int = 4
    num_frames: int = SAMPLE_GRIDS - 1  # T input grids: 6 grids, teacher forcing -> 5 inputs
    context_frames: int = CONTEXT_GRIDS  # grids given at inference; the rest are predicted
    grid_size: int = 32  # S = grid_size ** 2 tokens a grid
    vocab_size: int = VOCAB_SIZE
    state_dim: int = STATE_DIM
    dropout: float = 0.1
    qk_norm: bool = True
    attention: str = "factorized"  # or "full": block-causal attention over all T*S tokens (memory comparison)
    # attention="full" only: "sdpa" (PyTorch picks a fused kernel where it can; on GPU the memory-efficient one
    # takes the mask and never materialises scores) or "eager" (scores materialised: the O((T S)^2) of the table)
    full_attention_impl: str = "sdpa"
    init_std: float = 0.02
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION_KINDS}")
        if self.full_attention_impl not in ("sdpa", "eager"):
            raise ValueError(f"full_attention_impl={self.full_attention_impl!r}: expected 'sdpa' or 'eager'")
        if not 1 <= self.context_frames <= self.num_frames:
            raise ValueError(f"context_frames={self.context_frames} must be in [1, num_frames={self.num_frames}]")

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def future_frames(self) -> int:
        """Grids predicted from the context (3 for the challenge): positions context-1 .. T-1 predict them."""
        return self.num_frames + 1 - self.context_frames

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> STTransformerConfig:
        """From `to_dict()` output (e.g. a checkpoint's model_config); keys that are not fields are ignored."""
        valid = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in valid})

    @classmethod
    def from_name(cls, name: str, **overrides) -> STTransformerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        valid = {f.name for f in fields(cls)}
        unknown = set(overrides) - valid
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    # the winning team's compression model (arXiv 2510.07092): ~135M parameters
    "1x-compression": STTransformerConfig(),
    # CPU tests and demos: 8x8 grids, 512 ids (write data with grid_size=8, vocab_size=512)
    "tiny": STTransformerConfig(num_layers=2, num_heads=2, d_model=64, grid_size=8, vocab_size=512, dropout=0.0),
}


def flops_per_sample(config: STTransformerConfig, *, training: bool = True) -> float:
    """Matmul FLOPs of one sample (2 FLOPs a multiply-add), as computed by `compression_loss`.

    Per token and layer, with D = d_model, S = tokens a grid, T = input grids, r = mlp_ratio:
      projections  2 * (a * 4 D^2 + 2 r D^2)   a = 2 attentions (factorized) or 1 (full); qkv 3D^2 + out D^2
      attention    factorized: 4 S D (spatial QK^T and PV) + 4 T D (temporal; full T: the kernel does not
                   skip masked work at T <= 16);  full: 4 T S D
    forward = L * T * S * (projections + attention) + 2 D V * F * S  (tied head on the F = 3 future grids only)
    training = 3 * forward (backward = 2 x forward). Embedding lookups, norms and the state encoder (<0.1%)
    are left out. 1x-compression: 1.49 TFLOP forward, 4.47 TFLOP a training sample (the 4.9 of the team's
    estimate puts the head on all 5 grids).
    """
    c = config
    D, S, T, L = c.d_model, c.seq_len, c.num_frames, c.num_layers
    n_attn = 2 if c.attention == "factorized" else 1
    proj = 2 * (n_attn * 4 * D * D + 2 * c.mlp_ratio * D * D)
    attn = 4 * S * D + 4 * T * D if c.attention == "factorized" else 4 * T * S * D
    forward = L * T * S * (proj + attn) + 2 * D * c.vocab_size * c.future_frames * S
    return float(3 * forward if training else forward)


class Attention(nn.Module):
    """qkv projection -> [B, T, S, H, Dh] views (+ QK-norm) -> attention -> output projection."""

    def __init__(self, c: STTransformerConfig, kind: str):
        super().__init__()
        self.kind, self.h, self.dh = kind, c.num_heads, c.head_dim
        self.eager_full = c.full_attention_impl == "eager"
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        # QK-norm: LayerNorm over the head dim, shared by the heads (keeps logits bounded at lr 8e-4)
        self.q_norm = nn.LayerNorm(c.head_dim, eps=c.norm_eps) if c.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(c.head_dim, eps=c.norm_eps) if c.qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(c.dropout)  # on the attention output: the fused kernels have no prob dropout
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(self, x, kv_cache=None, pos: int = 0):  # x: [B, T, S, D]
        B, T, S, D = x.shape
        q, k, v = self.qkv(x).view(B, T, S, 3, self.h, self.dh).unbind(3)  # [B, T, S, H, Dh] strided views
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # autocast runs LayerNorm in fp32
        if self.kind == "spatial":
            o = ops.spatial_attention(q, k, v)
        elif self.kind == "temporal":
            o = self._temporal(q, k, v, kv_cache, pos)
        elif self.eager_full:
            from wmfast.analysis import eager_full_attention

            o = eager_full_attention(q, k, v)
        else:
            o = block_causal_attention(q, k, v)
        return self.resid_drop(self.proj(self.attn_drop(o.reshape(B, T, S, D))))

    @staticmethod
    def _temporal(q, k, v, kv_cache, pos: int):
        if kv_cache is None:
            return ops.temporal_attention(q, k, v, causal=True)
        k_cache, v_cache = kv_cache  # [B, S, H, T_max, Dh]
        T = q.shape[1]
        if T == 1:  # decode: write position `pos`, attend over 0..pos, one launch
            return ops.temporal_decode_step(q, k, v, k_cache, v_cache, pos)
        if pos != 0:
            raise ValueError(f"prefill of {T} frames must start at position 0, got pos={pos}")
        k_cache[:, :, :, :T] = k.permute(0, 2, 3, 1, 4)
        v_cache[:, :, :, :T] = v.permute(0, 2, 3, 1, 4)
        return ops.temporal_attention(q, k, v, causal=True)


def block_causal_attention(q, k, v):
    """Full attention over all T*S tokens, block-causal in time (a token sees every token of its own and
    earlier frames). q, k, v: [B, T, S, H, Dh] -> [B, T, S, H, Dh]. For the memory comparison only."""
    B, T, S, H, Dh = q.shape
    q2, k2, v2 = (t.reshape(B, T * S, H, Dh).transpose(1, 2) for t in (q, k, v))  # [B, H, TS, Dh]
    frame = torch.arange(T, device=q.device).repeat_interleave(S)
    mask = frame[:, None] >= frame[None, :]  # [TS, TS]
    o = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask)
    return o.transpose(1, 2).reshape(B, T, S, H, Dh)


class Block(nn.Module):
    """Pre-LN: x += spatial(LN x); x += temporal(LN x); x += MLP(LN x). attention="full" has one block-causal
    attention in place of the two."""

    def __init__(self, c: STTransformerConfig):
        super().__init__()
        self.factorized = c.attention == "factorized"
        self.ln1 = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.attn1 = Attention(c, "spatial" if self.factorized else "full")
        if self.factorized:
            self.ln2 = nn.LayerNorm(c.d_model, eps=c.norm_eps)
            self.attn2 = Attention(c, "temporal")
        self.ln3 = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(c.d_model, c.mlp_ratio * c.d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(c.mlp_ratio * c.d_model, c.d_model), nn.Dropout(c.dropout))

    def forward(self, x, kv_cache=None, pos: int = 0):  # [B, T, S, D]
        x = x + self.attn1(self.ln1(x))
        if self.factorized:
            x = x + self.attn2(self.ln2(x), kv_cache, pos)
        return x + self.mlp(self.ln3(x))


class StateEncoder(nn.Module):
    """states [B, 34, 25] -> one vector a grid [B, 6, D] (MLP -> Conv1d(k=3, p=1) -> + pos-emb -> grid mean)."""

    def __init__(self, c: STTransformerConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c.state_dim, c.d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(c.d_model, c.d_model))
        self.conv = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, padding=1)
        self.pos = nn.Parameter(torch.zeros(SAMPLE_FRAMES, c.d_model))
        avg = torch.zeros(SAMPLE_GRIDS, SAMPLE_FRAMES)
        avg[torch.tensor(GRID_OF_FRAME), torch.arange(SAMPLE_FRAMES)] = 1.0
        self.register_buffer("frame_to_grid", avg / avg.sum(1, keepdim=True), persistent=False)  # [6, 34]

    def forward(self, states):  # [B, 34, 25]
        if states.shape[1:] != (SAMPLE_FRAMES, self.mlp[0].in_features):
            raise ValueError(f"states: expected [B, {SAMPLE_FRAMES}, {self.mlp[0].in_features}], "
                             f"got {tuple(states.shape)}")
        h = self.mlp(states.to(self.pos.dtype))  # [B, 34, D]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2) + self.pos
        return torch.einsum("gf,bfd->bgd", self.frame_to_grid.to(h.dtype), h)  # [B, 6, D]


class STTransformer(nn.Module):
    """tokens [B, T, S] (or [B, T, G, G]) + states [B, 34, 25] -> logits [B, T, S, V] (tied embedding head).

    Position t of the input predicts grid t+1 (teacher forcing). `forward(..., targets=...)` returns the
    cross-entropy of the last targets.shape[1] positions without materialising their logits at once.
    """

    def __init__(self, config: STTransformerConfig):
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_s = nn.Parameter(torch.zeros(c.seq_len, c.d_model))  # learned spatial position embedding
        self.pos_t = nn.Parameter(torch.zeros(c.num_frames, c.d_model))  # learned temporal position embedding
        self.state_encoder = StateEncoder(c)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.reset_parameters()

    def reset_parameters(self):
        """Weights N(0, init_std), biases 0, norms (1, 0): the team's published init."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.pos_s, self.pos_t, self.state_encoder.pos):
            nn.init.normal_(p, 0.0, std)

    def no_weight_decay_names(self) -> set[str]:
        """Parameters the team excludes from weight decay: biases, norms, position embeddings (not matrices)."""
        return {n for n, p in self.named_parameters() if p.ndim < 2 or n.endswith(("pos_s", "pos_t", ".pos"))}

    def embed(self, tokens, state_grids, start: int = 0):
        """tokens [B, T, S] at positions start..start+T-1, state_grids [B, 6, D] -> x [B, T, S, D]."""
        c = self.config
        B, T = tokens.shape[:2]
        tokens = tokens.reshape(B, T, -1)
        if tokens.shape[2] != c.seq_len or start + T > c.num_frames:
            raise ValueError(f"tokens: expected [B, T <= {c.num_frames - start}, {c.seq_len}] at start={start}, "
                             f"got {tuple(tokens.shape)}")
        x = self.tok_emb(tokens) + self.pos_s + self.pos_t[start: start + T, None]  # [B, T, S, D]
        x = x + state_grids[:, start + 1: start + 1 + T, None]  # position t gets the states of grid t+1
        return self.drop(x)

    def hidden(self, tokens, states=None, *, state_grids=None, start: int = 0, kv_cache=None):
        """Final-norm hidden states [B, T, S, D]. kv_cache (a TemporalKVCache): prefill (T > 1, start 0) or
        one decode step (T == 1) at temporal position `start`, a Python int."""
        if state_grids is None:
            state_grids = self.state_encoder(states)
        x = self.embed(tokens, state_grids, start)
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache[i], start)
        return self.ln_f(x)

    def logits(self, h):  # [..., D] -> [..., V]
        return F.linear(h, self.tok_emb.weight)

    def forward(self, tokens, states, targets=None, *, chunk_size: int = 4096):
        """targets None: logits [B, T, S, V]. targets [B, F, S] (or [B, F, G, G]): the grids that positions
        T-F .. T-1 predict -> (mean CE, metrics) from a chunked linear-cross-entropy (no [N, V] logits)."""
        h = self.hidden(tokens, states)
        if targets is None:
            return self.logits(h)
        from wmfast.metrics.ce import linear_cross_entropy

        B, F_ = targets.shape[:2]
        targets = targets.reshape(B, F_, -1)
        h = h[:, h.shape[1] - F_:]  # [B, F, S, D]
        loss, token_loss, correct = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.tok_emb.weight,
                                                         targets.reshape(-1), chunk_size=chunk_size)
        token_loss, correct = token_loss.view(B, F_, -1), correct.view(B, F_, -1)
        metrics = {"loss": loss.detach(), "accuracy": correct.float().mean()}
        for f in range(F_):
            metrics[f"ce_future_{f}"] = token_loss[:, f].mean()
        return loss, metrics

    @torch.no_grad()
    def generate(self, context_tokens, states, num_frames: int | None = None, use_cache: bool = True, **kw):
        """Greedy generation: see `wmfast.inference.generate`."""
        from wmfast.inference import generate

        return generate(self, context_tokens, states, num_frames=num_frames, use_cache=use_cache, **kw)


def compression_loss(model, batch: dict, *, chunk_size: int = 4096, future_reduction: str = "mean"):
    """Teacher-forced training loss: (CE of the future grids, metrics of detached tensors).

    future_reduction: "mean" (default) = mean CE over every token of the 3 future grids; "sum" = the per-grid
    mean CEs summed over the 3 future grids (the winning team's "CE summed over future steps"), i.e. 3x "mean".
    The factor matters with gradient clipping (clip 1.0 binds 3x sooner under "sum") and scales the effective LR
    of the loss; wmfast defaults to "mean" so the logged loss is directly the per-token CE of the val metrics.

    batch: {"tokens": [B, 6, G, G] int, "states": [B, 34, 25]} as `wmfast.data.TokenizedDataset` yields. The
    model sees grids 0..4 and is scored on the predictions of grids 3..5 (positions 2..4) only. `model` may be
    an STTransformer or a wrapper that forwards to it (DeepSpeed engine, DDP): it is called, not inspected
    beyond `.config`. metrics: loss, accuracy (top-1), ce_future_{0,1,2}; no host sync happens here.
    """
    # wrappers (DeepSpeed engine, DDP) hold the model in .module; a DeepSpeed engine's own .config is its
    # DeepSpeed config dict, so unwrap first (torch.compile's wrapper forwards .config to the model)
    c = getattr(model, "module", model).config
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    states = batch["states"].to(device, non_blocking=True)
    if tokens.shape[1] != c.num_frames + 1:
        raise ValueError(f"batch['tokens']: expected [B, {c.num_frames + 1}, G, G], got {tuple(tokens.shape)}")
    if future_reduction not in ("mean", "sum"):
        raise ValueError(f"future_reduction must be 'mean' or 'sum', got {future_reduction!r}")
    future = tokens[:, c.context_frames:]
    loss, metrics = model(tokens[:, : c.num_frames], states, future, chunk_size=chunk_size)
    # every future grid has the same number of tokens, so the sum of the per-grid means is F x the mean
    return (loss * future.shape[1] if future_reduction == "sum" else loss), metrics


def param_count(config: STTransformerConfig) -> int:
    """Parameters of STTransformer(config), from the architecture (the tied head adds none)."""
    c = config
    D, r, L = c.d_model, c.mlp_ratio, c.num_layers
    ln = 2 * D
    attn = (3 * D * D + 3 * D) + (D * D + D) + (4 * c.head_dim if c.qk_norm else 0)
    n_attn = 2 if c.attention == "factorized" else 1
    block = (n_attn + 1) * ln + n_attn * attn + (r * D * D + r * D) + (r * D * D + D)
    states = (c.state_dim * D + D) + (D * D + D) + (3 * D * D + D) + SAMPLE_FRAMES * D
    return c.vocab_size * D + c.seq_len * D + c.num_frames * D + states + L * block + ln


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


def _clean_state_dict(sd: dict) -> dict:
    """Drop the prefixes DDP / torch.compile / DeepSpeed and activation-checkpoint wrappers add to names."""
    out = {}
    for k, v in sd.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k.replace("_checkpoint_wrapped_module.", "")] = v
    return out


def _zero_stage(obj, trainer_state: dict) -> int:
    """The ZeRO stage a DeepSpeed checkpoint was written with: DeepSpeed stores the run's config in the model
    states file ("ds_config"); wmfast's trainer_state.json has it too (train_config.zero_stage)."""
    ds_config = obj.get("ds_config") if isinstance(obj, dict) else None
    if isinstance(ds_config, dict) and isinstance(ds_config.get("zero_optimization"), dict):
        return int(ds_config["zero_optimization"].get("stage", 0))
    return int((trainer_state.get("train_config") or {}).get("zero_stage", 0))


def _load_deepspeed_dir(path: str, map_location) -> tuple[dict | None, dict]:
    """(model config, fp32 weights) of a `wmfast train` checkpoint directory. Under ZeRO-3 the model states
    files hold only empty placeholders of the partitioned parameters (the run saves with
    stage3_gather_16bit_weights_on_model_save=False, which avoids gathering the model on one rank at every
    save): the weights are rebuilt from every rank's fp32 master partition by DeepSpeed's zero_to_fp32."""
    trainer_state = {}
    state_json = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state_json):
        with open(state_json) as f:
            trainer_state = json.load(f)
    # ZeRO-3 names its model states per data-parallel rank (zero_pp_rank_R_...): rank 0's carries the config
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    weights = next((os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise ValueError(f"{path}: a checkpoint directory needs {' or '.join(names)}")
    obj = torch.load(weights, map_location=map_location, weights_only=False)
    config_dict = trainer_state.get("model_config") or (obj.get("config") if isinstance(obj, dict) else None)
    if _zero_stage(obj, trainer_state) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        parent, tag = os.path.split(os.path.abspath(path))
        return config_dict, get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
    return config_dict, obj["module"] if isinstance(obj, dict) and isinstance(obj.get("module"), dict) else obj


def load_checkpoint(path: str, *, preset: str | None = None, map_location="cpu") -> STTransformer:
    """An STTransformer with the weights of `path`:
    - a `wmfast train` run directory (its newest complete checkpoint);
    - a training checkpoint directory (wmfast train: DeepSpeed's mp_rank_00_model_states.pt with the weights
      under "module", or, for ZeRO-3 (zero_pp_rank_*_model_states.pt files), the fp32 partitions of every rank's optimizer states, consolidated with
      deepspeed.utils.zero_to_fp32; trainer_state.json's "model_config" gives the config);
    - a torch.save file: {"model" | "module" | "state_dict": weights, optional "config": dict} or bare weights;
    - a .safetensors file of weights.
    The config comes from the checkpoint when it has one, else from `preset` (a ValueError if neither)."""
    config_dict, sd = None, None
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a `wmfast train` run dir: its newest complete checkpoint
        from wmfast.train.checkpoint import latest_checkpoint

        found = latest_checkpoint(os.path.join(path, "checkpoints"))
        if found is None:
            raise ValueError(f"{path}: a run directory with no complete checkpoint under checkpoints/")
        path = found[1]
    if os.path.isdir(path):
        config_dict, sd = _load_deepspeed_dir(path, map_location)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device=str(map_location))
    else:
        obj = torch.load(path, map_location=map_location, weights_only=False)
        for key in ("model", "module", "state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                config_dict = obj.get("config")
                sd = obj[key]
                break
        else:
            sd = obj
    if config_dict:
        config = STTransformerConfig.from_dict(config_dict)
    elif preset:
        config = STTransformerConfig.from_name(preset)
    else:
        raise ValueError(f"{path}: the checkpoint holds no model config; pass a preset")
    model = STTransformer(config)
    model.load_state_dict(_clean_state_dict(sd))
    return model


def _fmt(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def describe(config: STTransformerConfig) -> str:
    return (f"STTransformer {config.num_layers}x{config.d_model} ({config.attention}), "
            f"{_fmt(param_count(config))} parameters, {flops_per_sample(config) / 1e9:,.1f} GFLOP/sample (fwd+bwd), "
            f"T={config.num_frames} S={config.seq_len} V={config.vocab_size}")


