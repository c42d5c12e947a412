"""Inference: the two tracks' prediction loops.

- Compression track: greedy token generation of the ST-Transformer with a static temporal KV cache. The loop is
  `STTransformer.generate`, so it lives with the model (wmfast.models.st_transformer.generate, .kv_cache: a model
  may not import the inference layer) and is exported here as `generate`, `decode_step`, `TemporalKVCache`, and
  `Generator` (static buffers and one CUDA graph of the whole rollout, for low latency) with `precision_scope`.
- Sampling track: batched ensemble sampling of a flow-matching denoiser, its solvers and step cache
  (`wmfast.inference.ensemble`, `.solvers`), and one prediction end to end with its latency split, the VAE decode
  and the averaging (`wmfast.inference.predict`).
"""
from wmfast.models.st_transformer.generate import generate
from wmfast.models.st_transformer.generator import PRECISIONS, Generator, precision_scope
from wmfast.models.st_transformer.kv_cache import TemporalKVCache
from wmfast.models.st_transformer.rollout import decode_step

__all__ = ["PRECISIONS", "Generator", "TemporalKVCache", "decode_step", "generate", "precision_scope"]
