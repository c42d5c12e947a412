"""Timing: `measure(fn)` -> Measurement (median, 20th and 80th percentile ms per call, peak memory above the inputs).

CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed before every call). CPU: a `time.perf_counter` loop with
the same statistics. `warmup` and `rep` are time budgets in milliseconds, as in `do_bench`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from wmfast.bench.memory import LiveBytesTracker

logger = logging.getLogger("wmfast.bench")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Measurement:
    """One measured callable: times in ms per call, peak memory in bytes above the inputs (None: unknown)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_bytes: int | None = None
    peak_mem_method: str = "none"  # "cuda" | "cpu-estimate" | "none"
    reps: int = 0


def _clear_grads(grad_to_none: Sequence[torch.Tensor] | None) -> None:
    for t in grad_to_none or ():
        t.grad = None


def _cpu_times(fn: Callable, warmup: float, rep: float, grad_to_none) -> list[float]:
    """Per-call wall times (ms) from a perf_counter loop sized from one timed call, like do_bench."""
    _clear_grads(grad_to_none)
    t0 = time.perf_counter()
    fn()
    est = max((time.perf_counter() - t0) * 1e3, 1e-4)
    n_warmup = min(1000, int(warmup / est))  # the sizing call above already warmed up once
    n_rep = max(5, min(1000, int(rep / est)))
    for _ in range(n_warmup):
        _clear_grads(grad_to_none)
        fn()
    times = []
    for _ in range(n_rep):
        _clear_grads(grad_to_none)  # outside the timed region, as do_bench does
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(fn: Callable, *, warmup: float = 25, rep: float = 100, grad_to_none: Sequence[torch.Tensor] | None = None,
            device: torch.device | str | None = None, memory: bool = True) -> Measurement:
    """Time `fn()` (median, p20, p80 in ms) and measure its peak memory above the inputs.

    warmup, rep: time budgets in ms (triton.testing.do_bench semantics). grad_to_none: tensors whose .grad
    is reset before each call (for backward benchmarks). device: where fn runs (default: CUDA if present).
    memory: False skips the extra memory-measuring call."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        reps = 0  # do_bench does not report its repetition count
    else:
        times = sorted(_cpu_times(fn, warmup, rep, grad_to_none))
        med, p20, p80 = (_quantile(times, q) for q in (0.5, 0.2, 0.8))
        reps = len(times)
    peak, method = (peak_memory(fn, device=device, grad_to_none=grad_to_none) if memory else (None, "none"))
    return Measurement(float(med), float(p20), float(p80), peak, method, reps)


def peak_memory(fn: Callable, *, device: torch.device | str | None = None,
                grad_to_none: Sequence[torch.Tensor] | None = None) -> tuple[int | None, str]:
    """(bytes, method): the peak memory of one call of fn above what was allocated before it.

    CUDA: `torch.cuda.max_memory_allocated` ("cuda"). CPU: the peak live bytes of the storages aten ops create
    during the call (wmfast.bench.memory.LiveBytesTracker, "cpu-estimate"); it misses library-internal scratch."""
    device = torch.device(device) if device is not None else default_device()
    _clear_grads(grad_to_none)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), "cuda"
    try:
        with LiveBytesTracker() as tracker:
            out = fn()
            del out
    except Exception as e:  # noqa: BLE001 - some ops (custom kernels) may not run under a dispatch mode
        logger.info(f"wmfast.bench: CPU peak-memory estimate unavailable ({type(e).__name__}: {e})")
        return None, "none"
    return int(tracker.peak), "cpu-estimate"


@contextlib.contextmanager
def direct_triton_launches():
    """Launch `wrap_triton` kernels directly, as a `triton_op` does in eager mode. A kernel launcher called
    outside its op (the launch-configuration sweeps) otherwise goes through the triton_kernel_wrapper_mutation
    higher-order op, whose dispatch hides the kernel's own time: on an H200 (torch 2.11) the decode step at
    B=1 took 0.21 ms a call through its launcher and 0.05 ms through its op."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # an older torch: its wrap_triton has no such switch
        yield
        return
    with set_wrap_triton_enabled(False):
        yield
