"""Roofline ceilings measured in the same run: device-to-device copy bandwidth (bytes read + written per second)
and dense matmul TFLOP/s for bf16 and fp32 (plus tf32 on CUDA).

Each is computed from the 20th-percentile time (the fastest the device sustains); the ceiling rows in the CSV
keep all three statistics.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from wmfast.bench.timing import Measurement, default_device, measure

if TYPE_CHECKING:
    from wmfast.bench.results import ResultWriter


@dataclass
class Ceilings:
    """Roofline ceilings measured on `device` in this run. copy_gbps counts bytes read + written."""

    device: str
    copy_gbps: float
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # "bf16" | "fp32" | "tf32" -> TFLOP/s
    shapes: dict[str, str] = field(default_factory=dict)

    def tflops_for(self, dtype: torch.dtype | str | None) -> float | None:
        key = _dtype_key(dtype)
        return self.matmul_tflops.get(key) if key else None


def _dtype_key(dtype) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return dtype
    return {torch.bfloat16: "bf16", torch.float16: "bf16", torch.float32: "fp32"}.get(dtype)


def ceilings(device: torch.device | str | None = None, *, quick: bool = False, writer: ResultWriter | None = None
             ) -> Ceilings:
    """Measure copy bandwidth and matmul TFLOP/s on `device` (tiny sizes when quick or on the CPU in CI).

    When `writer` is given each ceiling is also written as a row (op "ceiling:copy", "ceiling:matmul")."""
    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    # 1 GiB copies and 8192^3 matmuls are large enough to saturate a datacenter GPU; on the CPU 64 MiB /
    # 1024^3 keep the whole ceiling step near a second, and quick runs shrink further for CI.
    n_copy = (1 << 28 if cuda else 1 << 24) if not quick else 1 << 20  # fp32 elements
    n_mm = (8192 if cuda else 1024) if not quick else 256
    budget = {"warmup": 25, "rep": 100} if not quick else {"warmup": 2, "rep": 10}
    m_copy = _time_copy(n_copy, device, budget)
    # A ceiling is the fastest the device goes: rate from the 20th-percentile time (robust to a shared or
    # throttling machine, where the median drifts with other load) while the row keeps all three statistics.
    result = Ceilings(str(device), 2 * n_copy * 4 / (m_copy.p20_ms * 1e-3) / 1e9,
                      shapes={"copy": f"N={n_copy} fp32", "matmul": f"M=N=K={n_mm}"})
    rows = [("ceiling:copy", f"N={n_copy} fp32", "copy", m_copy, 2 * n_copy * 4, None, None)]
    dtypes = [("bf16", torch.bfloat16, False), ("fp32", torch.float32, False)]
    if cuda:  # TF32 tensor cores: what fp32 matmuls get with torch.backends.cuda.matmul.allow_tf32
        dtypes.append(("tf32", torch.float32, True))
    for key, dtype, tf32 in dtypes:
        m = _time_matmul(n_mm, dtype, tf32, device, budget)
        flops = 2 * n_mm ** 3
        result.matmul_tflops[key] = flops / (m.p20_ms * 1e-3) / 1e12
        rows.append(("ceiling:matmul", f"M=N=K={n_mm} {key}", key, m, None, flops, key))
    if writer is not None:
        writer.ceilings = writer.ceilings or result
        for op, shape, mode, meas, nbytes, flops, dtype in rows:
            writer.add(op, shape, "torch", mode, meas, bytes=nbytes, flops=flops, dtype=dtype, ceilings=result)
    return result


def _time_copy(n: int, device: torch.device, budget: dict) -> Measurement:
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), device=device, memory=False, **budget)


def _time_matmul(n: int, dtype: torch.dtype, tf32: bool, device: torch.device, budget: dict) -> Measurement:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with _tf32(tf32):
        return measure(lambda: a @ b, device=device, memory=False, **budget)


@contextlib.contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
