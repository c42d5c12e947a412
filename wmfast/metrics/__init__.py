"""Evaluation metrics of wmfast."""
from wmfast.metrics.psnr import psnr, psnr_per_frame, to_uint8

__all__ = ["psnr", "psnr_per_frame", "to_uint8"]
