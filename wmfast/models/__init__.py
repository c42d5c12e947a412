"""Models: the compression-track ST-Transformer."""
from wmfast.models.st_transformer import (
    PRESETS,
    STTransformer,
    STTransformerConfig,
    compression_loss,
    describe,
    flops_per_sample,
    load_checkpoint,
    param_count,
)

__all__ = [
    "PRESETS",
    "STTransformer",
    "STTransformerConfig",
    "compression_loss",
    "describe",
    "flops_per_sample",
    "load_checkpoint",
    "param_count",
]
