"""Backend selection for wmfast ops.

Backends:
- "triton": the Triton kernels of `wmfast.kernels`. Runs on CUDA tensors, and on CPU tensors when
  TRITON_INTERPRET=1 was set before triton was imported (the interpreter runs the real kernel code).
- "cuda": the CUDA C++ extension `wmfast._C` (CUDA tensors only; optional build).
- "torch": the pure-torch reference of each op (any device; torch.compile traces it natively).

`WMFAST_BACKEND=triton|cuda|torch` forces a backend (an error if it cannot run the given tensors; forcing
cuda for an op the extension does not implement falls back to the next backend with one log line).
Otherwise, CUDA tensors -> the fastest usable of cuda/triton for the op and shape:
1. the measured table of this GPU (`wmfast.tuning`: kernels/configs/<gpu>.json, written from a benchmark run;
   per op, per caller-given shape key, or "*");
2. else, when the caller passes `runners` (one zero-argument callable per backend), a one-time timing at
   first use (cached per GPU, op and shape key; never while torch.compile traces or a CUDA graph captures;
   WMFAST_AUTOTUNE=0 turns it off);
3. else the caller's preference order (`supported`).
CPU tensors -> triton under the interpreter, else torch, and one log line says why.
"""
from __future__ import annotations

import functools
import logging
import os
import statistics
from collections.abc import Callable, Mapping

import torch

from wmfast import tuning

logger = logging.getLogger("wmfast")

BACKENDS = ("triton", "cuda", "torch")


def triton_interpret() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
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


# Ops the CUDA extension implements (csrc/); any other op never selects "cuda".
CUDA_OPS = frozenset({"layernorm_modulate", "gated_residual_layernorm_modulate", "temporal_decode_step"})

_TIMED: dict[tuple[str, str, str], str] = {}  # (gpu, op, shape key) -> fastest backend, from first-use timing


@functools.cache
def cuda_ext_available() -> tuple[bool, str]:
    """(usable, reason) for the CUDA C++ extension; loading it also registers its fake/autograd functions."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (the extension needs a CUDA build of torch)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    from wmfast import csrc_ops

    return csrc_ops.load()


def forced_backend() -> str | None:
    value = os.environ.get("WMFAST_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"WMFAST_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def _timing_allowed() -> bool:
    if os.environ.get("WMFAST_AUTOTUNE", "1") == "0":
        return False
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    return not compiling and not torch.cuda.is_current_stream_capturing()


def time_backends(runners: Mapping[str, Callable[[], object]], reps: int = 10) -> dict[str, float]:
    """Median milliseconds of each runner over `reps` CUDA-event-timed calls, after 2 warm-up calls."""
    times = {}
    for name, run in runners.items():
        for _ in range(2):
            run()
        samples = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        times[name] = statistics.median(samples)
    return times


def _fastest(op: str, device: torch.device, usable: list[str], shape_key: str | None,
             runners: Mapping[str, Callable[[], object]] | None) -> str:
    """The measured-table or first-use-timing choice among `usable` (>= 2 backends), else usable[0]."""
    gpu = torch.cuda.get_device_name(device)
    measured = tuning.measured_backend(gpu, op, shape_key)
    if measured in usable:
        return measured
    cache_key = (gpu, op, shape_key or "*")
    if cache_key in _TIMED:
        return _TIMED[cache_key]
    if runners is None or not _timing_allowed() or not all(name in runners for name in usable):
        return usable[0]
    times = time_backends({name: runners[name] for name in usable})
    best = min(times, key=times.get)
    _TIMED[cache_key] = best
    logger.info("wmfast: %s %s on %s: timed %s -> %s", op, shape_key or "", gpu,
                ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()), best)
    return best


def select_backend(op: str, device: torch.device, supported: tuple[str, ...] = BACKENDS, *,
                   shape_key: str | None = None, runners: Mapping[str, Callable[[], object]] | None = None) -> str:
    """The backend that runs `op` on tensors of `device`.

    `supported` lists the backends that implement `op` (in preference order for CUDA tensors). Optional, for
    a shape-dependent choice: `shape_key` (a string naming the shape class, looked up in the measured table) and
    `runners` (backend -> zero-argument callable running the op on the actual inputs, timed once).
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
        if forced == "cuda" and op not in CUDA_OPS:
            rest = tuple(name for name in supported if name != "cuda")
            _log_once(f"wmfast: WMFAST_BACKEND=cuda but the CUDA extension has no {op}; using {rest[0]}")
            return rest[0]
        return forced
    if device.type == "cuda":
        usable = [name for name in supported
                  if (name == "cuda" and op in CUDA_OPS and cuda_ext_available()[0])
                  or (name == "triton" and triton_available()[0])]
        if len(usable) > 1:
            return _fastest(op, device, usable, shape_key, runners)
        if usable:
            return usable[0]
        _log_once(f"wmfast: {op} on {device}: no kernel backend usable; using the torch reference")
        return "torch"
    if "triton" in supported and triton_interpret() and triton_available()[0]:
        return "triton"
    _log_once(f"wmfast: {op} on {device} tensors: using the torch reference "
              "(Triton needs a CUDA device or TRITON_INTERPRET=1)")
    return "torch"


@torch.compiler.assume_constant_result
def _constant_choice(op: str, device: torch.device, supported: tuple[str, ...], shape_key: str) -> str:
    return select_backend(op, device, supported, shape_key=shape_key or None)


def traceable_backend(op: str, device: torch.device, supported: tuple[str, ...] = BACKENDS,
                      shape_key: str | None = None) -> str:
    """select_backend for code that torch.compile traces: while it traces, the choice is evaluated once and
    baked into the graph (dynamo cannot trace the device queries inside: torch.cuda.get_device_name broke a
    fullgraph compile of temporal_attention on an H200); in eager code, select_backend itself."""
    if torch.compiler.is_compiling():
        return _constant_choice(op, device, tuple(supported), shape_key or "")
    return select_backend(op, device, supported, shape_key=shape_key)

