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

__all__ = ["DTYPES", "DTYPE_NAMES", "check_eps", "check_rows", "check_vector", "describe", "dtype_name", "log_once",
           "logger", "shape"]


def shape(t) -> str:
    """"(2, 4, 8)" for a tensor, else the type's name (for messages about a wrong argument)."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_eps(eps) -> None:
    """ValueError unless eps is a non-negative int or float (a norm's epsilon)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def check_rows(name: str, x, like=None) -> None:
    """ValueError unless x is a non-empty [..., D] tensor of a supported dtype (with `like`: of its shape, dtype
    and device)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")  # noqa: TRY004
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [..., D] tensor, got shape {shape(x)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} dtype {x.dtype} not supported ({DTYPE_NAMES})")
    if like is not None and (x.shape != like.shape or x.dtype != like.dtype or x.device != like.device):
        raise ValueError(f"{name} {shape(x)} {x.dtype} on {x.device} does not match x {shape(like)} {like.dtype} "
                         f"on {like.device}")


def check_vector(name: str, p, width: int, x, what: str | None = None) -> None:
    """ValueError unless p is a [width] tensor of a supported dtype on x's device (a norm's weight or bias);
    `what` says where width comes from (default: the D of x)."""
    if not isinstance(p, torch.Tensor) or p.shape != (width,):
        raise ValueError(f"{name} must be a [{width}] tensor ({what or f'D of x {shape(x)}'}), got {shape(p)}")
    if p.dtype not in DTYPES or p.device != x.device:
        raise ValueError(f"{name}: {p.dtype} on {p.device}; expected one of {DTYPE_NAMES} on {x.device}")


def describe(t) -> str:
    """Shape, strides, dtype and device of a tensor, for messages about layouts."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} (strides {tuple(t.stride())}, {t.dtype}, {t.device})"


@functools.cache
def log_once(message: str) -> None:
    """Log `message` at INFO on the "wmfast" logger the first time it is seen (a fallback says why, once)."""
    logger.info(message)
