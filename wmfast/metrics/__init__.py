"""Metrics for the compression track: full-vocabulary and top-k (Top-500) cross-entropy, chunked."""
from wmfast.metrics.ce import (
    cross_entropy,
    linear_cross_entropy,
    token_cross_entropy,
    token_topk_cross_entropy,
    topk_cross_entropy,
)

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "token_cross_entropy",
    "token_topk_cross_entropy",
    "topk_cross_entropy",
]
