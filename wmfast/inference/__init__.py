"""Inference: batched ensemble sampling (sampling track) and token generation (compression track)."""
from wmfast.inference.generate import decode_step, generate
from wmfast.inference.kv_cache import TemporalKVCache

__all__ = ["TemporalKVCache", "decode_step", "generate"]
