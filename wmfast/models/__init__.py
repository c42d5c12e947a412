"""Models: the ST-Transformer of the compression track (st_transformer/: config, model, checkpoint loading;
exported here) and the Wan2.2 world model of the sampling track (wan/: import `wmfast.models.wan`, which needs
diffusers). Models import no trainer and no task."""
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
