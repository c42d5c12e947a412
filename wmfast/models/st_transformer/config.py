"""ST-Transformer configuration: the dataclass, its named presets, and the architecture's parameter and FLOP
counts (from the config alone, no model built)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from wmfast.data.format import CONTEXT_GRIDS, SAMPLE_FRAMES, SAMPLE_GRIDS, STATE_DIM, VOCAB_SIZE

ATTENTION_KINDS = ("factorized", "full")
BLOCK_KINDS = ("fused", "reference")
RECOMPUTE_KINDS = ("elementwise", "none")


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
    # "fused": wmfast's LayerNorm kernels (the attention residual adds fused with the LayerNorm after them, QK-norm
    # in one launch), residual stream in the compute dtype
    # (bf16 under autocast); "reference": nn.LayerNorm and plain adds (an fp32 residual stream under autocast).
    # Same parameters and names, same mathematics: a checkpoint of either loads into the other.
    block: str = "fused"
    # "elementwise": norms, activations and dropout are recomputed in the backward pass, matmul and attention
    # outputs are saved (selective activation checkpointing, no extra matmul FLOPs); "none": autograd saves
    # what every op asks for. Whole-block recomputation is the trainer's activation_checkpointing.
    recompute: str = "elementwise"

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION_KINDS}")
        if self.full_attention_impl not in ("sdpa", "eager"):
            raise ValueError(f"full_attention_impl={self.full_attention_impl!r}: expected 'sdpa' or 'eager'")
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"block={self.block!r}: expected one of {BLOCK_KINDS}")
        if self.recompute not in RECOMPUTE_KINDS:
            raise ValueError(f"recompute={self.recompute!r}: expected one of {RECOMPUTE_KINDS}")
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
    # the same model as wmfast built it before the fused block: nn.LayerNorm, fp32 residual stream under
    # autocast, every activation saved (the baseline of the training benchmark; checkpoints interchange)
    "1x-compression-reference": STTransformerConfig(block="reference", recompute="none"),
    # throughput runs: dropout off (the team trained with dropout 0.1, the default above)
    "1x-compression-nodrop": STTransformerConfig(dropout=0.0),
    # CPU tests and demos: 8x8 grids, 512 ids (write data with grid_size=8, vocab_size=512)
    "tiny": STTransformerConfig(num_layers=2, num_heads=2, d_model=64, grid_size=8, vocab_size=512, dropout=0.0),
    # the tiny model with full (block-causal) attention over all T*S tokens: the memory and learning comparison
    "tiny-full": STTransformerConfig(num_layers=2, num_heads=2, d_model=64, grid_size=8, vocab_size=512, dropout=0.0,
                                     attention="full"),
    "tiny-reference": STTransformerConfig(num_layers=2, num_heads=2, d_model=64, grid_size=8, vocab_size=512,
                                          dropout=0.0, block="reference", recompute="none"),
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


def _fmt(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def describe(config: STTransformerConfig) -> str:
    return (f"STTransformer {config.num_layers}x{config.d_model} ({config.attention}), "
            f"{_fmt(param_count(config))} parameters, {flops_per_sample(config) / 1e9:,.1f} GFLOP/sample (fwd+bwd), "
            f"T={config.num_frames} S={config.seq_len} V={config.vocab_size}")
