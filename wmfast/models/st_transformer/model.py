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

import torch
import torch.nn.functional as F
from torch import nn

from wmfast import ops
from wmfast.data.format import GRID_OF_FRAME, SAMPLE_FRAMES, SAMPLE_GRIDS
from wmfast.models.st_transformer.config import STTransformerConfig
from wmfast.models.st_transformer.eager_attention import eager_full_attention
from wmfast.models.st_transformer.generate import generate
from wmfast.models.st_transformer.recompute import recompute_elementwise
from wmfast.ops.linear_cross_entropy import linear_cross_entropy


class Attention(nn.Module):
    """qkv projection -> [B, T, S, H, Dh] views (+ QK-norm) -> attention -> output projection."""

    def __init__(self, c: STTransformerConfig, kind: str):
        super().__init__()
        self.kind, self.h, self.dh = kind, c.num_heads, c.head_dim
        self.eager_full = c.full_attention_impl == "eager"
        self.fused = c.block == "fused"
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        # QK-norm: LayerNorm over the head dim, shared by the heads (keeps logits bounded at lr 8e-4)
        self.q_norm = nn.LayerNorm(c.head_dim, eps=c.norm_eps) if c.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(c.head_dim, eps=c.norm_eps) if c.qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(c.dropout)  # on the attention output: the fused kernels have no prob dropout
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(self, x, kv_cache=None, pos: int = 0):  # x: [B, T, S, D]
        B, T, S, D = x.shape
        qkv = self.qkv(x)  # [B, T, S, 3D]: (q, k, v) x H x Dh
        q, k, v = qkv.view(B, T, S, 3, self.h, self.dh).unbind(3)  # [B, T, S, H, Dh] strided views
        if self.fused and isinstance(self.q_norm, nn.LayerNorm):  # both norms in one launch, in qkv's dtype
            qn, kn = self.q_norm, self.k_norm
            q, k = ops.qk_layer_norm(qkv, qn.weight, qn.bias, kn.weight, kn.bias, num_heads=self.h, eps=qn.eps)
        else:
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # autocast runs LayerNorm in fp32
        if self.kind == "spatial":
            o = ops.spatial_attention(q, k, v)
        elif self.kind == "temporal":
            o = self._temporal(q, k, v, kv_cache, pos)
        elif self.eager_full:
            o = eager_full_attention(q, k, v)
        else:
            o = block_causal_attention(q, k, v)
        return self.resid_drop(self.proj(self.attn_drop(o.reshape(B, T, S, D))))

    def infer(self, x, residual, ln: nn.LayerNorm, kv_cache=None, pos: int = 0):
        """Inference (no autograd, no dropout): (branch, stream). stream = x + residual (x when residual is None);
        the LayerNorm `ln` of the stream, this qkv projection and QK-norm run as one `wmfast.ops.norm_linear`."""
        B, T, S, D = x.shape
        qk = {}
        if isinstance(self.q_norm, nn.LayerNorm):
            qk = {"qk_norm": (self.q_norm.weight, self.q_norm.bias, self.k_norm.weight, self.k_norm.bias),
                  "num_heads": self.h, "qk_eps": self.q_norm.eps}
        qkv, x = ops.norm_linear(x, self.qkv.weight, self.qkv.bias, ln.weight, ln.bias, residual=residual,
                                 eps=ln.eps, **qk)  # [B, T, S, 3D]
        q, k, v = qkv.view(B, T, S, 3, self.h, self.dh).unbind(3)
        o = ops.spatial_attention(q, k, v) if self.kind == "spatial" else self._temporal(q, k, v, kv_cache, pos)
        return self.proj(o.reshape(B, T, S, D)), x

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
    attention in place of the two.

    block="fused": the residual stream is kept in the compute dtype (bf16 under autocast; the fp32 master weights
    stay fp32), the two attention residual adds are fused with the LayerNorm after them
    (`wmfast.ops.residual_layer_norm`; the MLP's add is a plain add) and
    QK-norm runs on the qkv projection in place (`wmfast.ops.qk_layer_norm`). block="reference": nn.LayerNorm
    and plain adds (under autocast the stream is fp32). recompute="elementwise": in training the block runs under
    selective activation checkpointing (`recompute.recompute_elementwise`): matmul and attention outputs are
    saved, norms, activations and dropout are recomputed in the backward."""

    def __init__(self, c: STTransformerConfig):
        super().__init__()
        self.fused = c.block == "fused"
        self.recompute = c.recompute == "elementwise"
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
        run = self._fused if self.fused else self._reference
        if self.recompute and kv_cache is None and torch.is_grad_enabled():
            return recompute_elementwise(run, x)
        return run(x, kv_cache, pos)

    def infer(self, x, branch, kv_cache=None, pos: int = 0):
        """The fused block for inference (eval mode, no autograd, weights and stream in one dtype): 8 launches
        (3 `norm_linear`, 2 attentions, 3 linears) where `_fused` has 19. It takes and returns the residual stream
        with the block's last branch not yet added, (stream, branch): the add is fused into the next block's first
        `norm_linear` (or the final norm), so the block's output is stream + branch."""
        a, x = self.attn1.infer(x, branch, self.ln1)
        a, x = self.attn2.infer(x, a, self.ln2, kv_cache, pos)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        h, x = ops.norm_linear(x, fc1.weight, fc1.bias, self.ln3.weight, self.ln3.bias, residual=a,
                               eps=self.ln3.eps, activation="gelu_tanh")
        return x, fc2(h)

    def _reference(self, x, kv_cache=None, pos: int = 0):
        x = x + self.attn1(self.ln1(x))
        if self.factorized:
            x = x + self.attn2(self.ln2(x), kv_cache, pos)
        return x + self.mlp(self.ln3(x))

    def _fused(self, x, kv_cache=None, pos: int = 0):
        if torch.is_autocast_enabled(x.device.type):  # the stream in the compute dtype (a no-op after block 0)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        a = self.attn1(ops.layer_norm(x, self.ln1.weight, self.ln1.bias, eps=self.ln1.eps))
        if self.factorized:
            y, x = ops.residual_layer_norm(x, a.to(x.dtype), self.ln2.weight, self.ln2.bias, eps=self.ln2.eps)
            a = self.attn2(y, kv_cache, pos)
        y, x = ops.residual_layer_norm(x, a.to(x.dtype), self.ln3.weight, self.ln3.bias, eps=self.ln3.eps)
        return x + self.mlp(y).to(x.dtype)


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
        one decode step (T == 1) at temporal position `start`, a Python int. In eval mode without autograd the
        fused blocks run their inference path (`Block.infer`); the same mathematics, fewer launches."""
        if state_grids is None:
            state_grids = self.state_encoder(states)
        x = self.embed(tokens, state_grids, start)
        if self._inference_blocks(x):
            branch = None
            for i, block in enumerate(self.blocks):
                x, branch = block.infer(x, branch, None if kv_cache is None else kv_cache[i], start)
            return ops.residual_layer_norm(x, branch, self.ln_f.weight, self.ln_f.bias, eps=self.ln_f.eps)[0]
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache[i], start)
        if self.config.block == "fused":
            return ops.layer_norm(x, self.ln_f.weight, self.ln_f.bias, eps=self.ln_f.eps)
        return self.ln_f(x)

    def _inference_blocks(self, x) -> bool:
        """Whether hidden() runs the blocks' inference path: the fused factorized block in eval mode, no autograd,
        no autocast, the activations in the weights' dtype (the path has no dropout, no backward, no casts)."""
        c = self.config
        return (c.block == "fused" and c.attention == "factorized" and not self.training
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
                and x.dtype == self.tok_emb.weight.dtype)

    def logits(self, h):  # [..., D] -> [..., V]
        return F.linear(h, self.tok_emb.weight)

    def forward(self, tokens, states, targets=None, *, chunk_size: int = 4096, check_targets: bool = True):
        """targets None: logits [B, T, S, V]. targets [B, F, S] (or [B, F, G, G]): the grids that positions
        T-F .. T-1 predict -> (mean CE, metrics) from a chunked linear-cross-entropy (no [N, V] logits).
        check_targets: linear_cross_entropy's range check of the target ids (one host sync)."""
        h = self.hidden(tokens, states)
        if targets is None:
            return self.logits(h)
        B, F_ = targets.shape[:2]
        targets = targets.reshape(B, F_, -1)
        h = h[:, h.shape[1] - F_:]  # [B, F, S, D]
        loss, token_loss, correct = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.tok_emb.weight,
                                                         targets.reshape(-1), chunk_size=chunk_size,
                                                         check_targets=check_targets)
        token_loss, correct = token_loss.view(B, F_, -1), correct.view(B, F_, -1)
        metrics = {"loss": loss.detach(), "accuracy": correct.float().mean()}
        for f in range(F_):
            metrics[f"ce_future_{f}"] = token_loss[:, f].mean()
        return loss, metrics

    @torch.no_grad()
    def generate(self, context_tokens, states, num_frames: int | None = None, use_cache: bool = True, **kw):
        """Greedy generation: see `wmfast.models.st_transformer.generate` (also `wmfast.inference.generate`)."""
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
    beyond `.config`. metrics: loss, accuracy (top-1), ce_future_{0,1,2}; no host sync happens here: the token
    ids are not checked again on the device (TokenizedDataset checks every sample's ids on the host; an id
    outside the vocabulary from another source gives a NaN loss, which the trainer's nan policy reports).
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
    loss, metrics = model(tokens[:, : c.num_frames], states, future, chunk_size=chunk_size, check_targets=False)
    # every future grid has the same number of tokens, so the sum of the per-grid means is F x the mean
    return (loss * future.shape[1] if future_reduction == "sum" else loss), metrics

