"""Evaluation metrics of wmfast: cross-entropy (full vocabulary and Top-500, chunked; ce), PSNR and sharpness
(psnr), and the reference points of the compression scores (baselines: copy-last-grid, a known distribution).

`linear_cross_entropy` is the training loss op of wmfast.ops, re-exported here beside the metrics."""
from wmfast.metrics.ce import cross_entropy, token_cross_entropy, token_topk_cross_entropy, topk_cross_entropy
from wmfast.metrics.psnr import psnr, psnr_per_frame, sharpness, sharpness_per_frame, to_uint8
from wmfast.ops.linear_cross_entropy import linear_cross_entropy

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "psnr",
    "psnr_per_frame",
    "sharpness",
    "sharpness_per_frame",
    "to_uint8",
    "token_cross_entropy",
    "token_topk_cross_entropy",
    "topk_cross_entropy",
]
