"""What every op module of wmfast.ops shares: the dtype table, shape descriptions for error messages, the eps
check, and the once-per-message log line."""
from __future__ import annotations

import functools
import logging

import torch

from wmfast.kernels.tuning import dtype_name

logger = logging.getLogger("wmfast")

# The dtypes every op and kernel takes.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = "float32, float16, bfloat16"

__all__ = ["DTYPES", "DTYPE_NAMES", "check_eps", "describe", "dtype_name", "log_once", "logger", "shape"]


def shape(t) -> str:
    """"(2, 4, 8)" for a tensor, else the type's name (for messages about a wrong argument)."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_eps(eps) -> None:
    """ValueError unless eps is a non-negative int or float (a norm's epsilon)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def describe(t) -> str:
    """Shape, strides, dtype and device of a tensor, for messages about layouts."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} (strides {tuple(t.stride())}, {t.dtype}, {t.device})"


@functools.cache
def log_once(message: str) -> None:
    """Log `message` at INFO on the "wmfast" logger the first time it is seen (a fallback says why, once)."""
    logger.info(message)
