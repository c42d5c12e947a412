"""The ST-Transformer of the compression track: config and counts (config), the model and its training loss
(model), weight loading from training runs and files (checkpoint), greedy generation with a static temporal
KV cache (generate, kv_cache; `STTransformer.generate` runs it, `wmfast.inference` exports it), the low-latency
`Generator` holding one CUDA graph of a whole rollout (generator), and the attention
that materialises its scores for the memory table (eager_attention)."""
from wmfast.models.st_transformer.checkpoint import load_checkpoint
from wmfast.models.st_transformer.config import (
    ATTENTION_KINDS,
    PRESETS,
    STTransformerConfig,
    describe,
    flops_per_sample,
    param_count,
)
from wmfast.models.st_transformer.model import (
    Attention,
    Block,
    StateEncoder,
    STTransformer,
    block_causal_attention,
    compression_loss,
)

__all__ = [
    "ATTENTION_KINDS",
    "PRESETS",
    "Attention",
    "Block",
    "STTransformer",
    "STTransformerConfig",
    "StateEncoder",
    "block_causal_attention",
    "compression_loss",
    "describe",
    "flops_per_sample",
    "load_checkpoint",
    "param_count",
]
