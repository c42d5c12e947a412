"""Inference: the two tracks' prediction loops.

- Compression track: greedy token generation of the ST-Transformer with a static temporal KV cache. The loop is
  `STTransformer.generate`, so it lives with the model (wmfast.models.st_transformer.generate, .kv_cache: a model
  may not import the inference layer) and is exported here as `generate`, `decode_step`, `TemporalKVCache`.
- Sampling track: batched ensemble sampling of a flow-matching denoiser and frame averaging (ensemble:
  `from wmfast.inference.ensemble import ...`).
"""
from wmfast.models.st_transformer.generate import decode_step, generate
from wmfast.models.st_transformer.kv_cache import TemporalKVCache

__all__ = ["TemporalKVCache", "decode_step", "generate"]
