"""Backend selection for wmfast ops.

Backends:
- "triton": the Triton kernels of `wmfast.kernels`. Runs on CUDA tensors, and on CPU tensors when
  TRITON_INTERPRET=1 was set before triton was imported (the interpreter runs the real kernel code).
- "cuda": the CUDA C++ extension `wmfast._C` (CUDA tensors only; optional build).
- "torch": the pure-torch reference of each op (any device; torch.compile traces it natively).

`WMFAST_BACKEND=triton|cuda|torch` forces a backend (an error if it cannot run the given tensors).
Otherwise: CUDA tensors -> the fastest available of cuda/triton for the op (the cuda issue's measured
table decides; Triton until then); CPU tensors -> triton under the interpreter, else torch, and one log
line says why.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger("wmfast")

BACKENDS = ("triton", "cuda", "torch")


def triton_interpret() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> tuple[bool, str]:
    """(usable, reason) for the Triton backend on this machine."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the backend is unusable
        return False, f"triton cannot be imported: {e}"
    if triton_interpret():
        return True, "TRITON_INTERPRET=1: kernels run on the CPU through the interpreter"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return True, f"CUDA device {torch.cuda.get_device_name()}"


@functools.lru_cache(maxsize=None)
def cuda_ext_available() -> tuple[bool, str]:
    """(usable, reason) for the CUDA C++ extension."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import wmfast._C  # noqa: F401
    except ImportError as e:
        return False, f"extension not built ({e}); reinstall with a CUDA toolkit and a CUDA build of torch"
    return True, "built"


def forced_backend() -> str | None:
    value = os.environ.get("WMFAST_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"WMFAST_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.info(message)


def select_backend(op: str, device: torch.device, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend that runs `op` on tensors of `device`.

    `supported` lists the backends that implement `op` (in preference order for CUDA tensors).
    """
    forced = forced_backend()
    if forced is not None:
        if forced not in supported:
            raise ValueError(f"WMFAST_BACKEND={forced} but {op} has no {forced} implementation "
                             f"(it has: {', '.join(supported)})")
        if forced == "triton" and device.type == "cpu" and not triton_interpret():
            raise ValueError(f"WMFAST_BACKEND=triton for {op} on CPU tensors needs TRITON_INTERPRET=1 "
                             "(set before importing triton)")
        if forced == "cuda" and device.type != "cuda":
            raise ValueError(f"WMFAST_BACKEND=cuda for {op} needs CUDA tensors, got {device}")
        return forced
    if device.type == "cuda":
        for name in supported:
            if name == "cuda" and cuda_ext_available()[0]:
                return "cuda"
            if name == "triton" and triton_available()[0]:
                return "triton"
        _log_once(f"wmfast: {op} on {device}: no kernel backend usable; using the torch reference")
        return "torch"
    if "triton" in supported and triton_interpret() and triton_available()[0]:
        return "triton"
    _log_once(f"wmfast: {op} on {device} tensors: using the torch reference "
              "(Triton needs a CUDA device or TRITON_INTERPRET=1)")
    return "torch"
