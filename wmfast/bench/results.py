"""Results: the one CSV schema (`COLUMNS`), `ResultWriter` (rows with throughput, roofline fraction and the
environment columns), `read_rows`, and the environment every row carries (GPU, driver, versions, commit).

Throughput: a row given `bytes` (moved to/from memory by an ideal kernel) and/or `flops` gets GB/s and/or
TFLOP/s and `fraction_of_ceiling` = roofline time / measured time, with roofline time = max(flops / matmul
ceiling[dtype], bytes / copy bandwidth); 1.0 means at the roofline.
"""
from __future__ import annotations

import csv
import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wmfast.bench.timing import Measurement, default_device
from wmfast.kernels.tuning import gpu_slug
from wmfast.telemetry import driver_version

if TYPE_CHECKING:
    from wmfast.bench.ceilings import Ceilings

COLUMNS = ("op", "shape", "provider", "mode", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops",
           "fraction_of_ceiling", "peak_mem_mb", "gpu_name", "driver", "torch", "triton", "cuda",
           "commit", "timestamp")


def git_commit(path: str | os.PathLike | None = None) -> str:
    """Short commit (+"-dirty") of the checkout holding `path` (default: this package); "unknown" outside git.
    $WMFAST_COMMIT overrides it: a copy of a working tree whose .git is not its own (a GPU machine's copy)."""
    if os.environ.get("WMFAST_COMMIT"):
        return os.environ["WMFAST_COMMIT"]
    path = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=path, capture_output=True, text=True,
                             timeout=10, check=False)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10, check=False)
        return sha.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def environment(device: str = "") -> dict[str, str]:
    """The per-row environment columns: gpu_name, driver, torch, triton, cuda, commit."""
    dev = torch.device(device) if device else default_device()
    try:  # the version from metadata: importing triton here would fix its interpreter mode too early
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    if dev.type == "cuda":
        gpu_name, driver = torch.cuda.get_device_name(dev), driver_version()
    else:
        gpu_name, driver = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)", ""
    return {"gpu_name": gpu_name, "driver": driver, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none", "commit": git_commit()}


def slug(name: str) -> str:
    """A directory- and file-safe name ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"): the launch tables'
    rule (wmfast.kernels.tuning.gpu_slug), so that a results directory and its GPU's table share one name."""
    return gpu_slug(name)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


class ResultWriter:
    """Appends rows with exactly `COLUMNS` to a CSV (header written when the file is new) and keeps them.

    path None keeps rows in memory only. Appending to a CSV with a different header is an error."""

    def __init__(self, path: str | os.PathLike | None, *, ceilings: Ceilings | None = None, device=None):
        self.path = Path(path) if path is not None else None
        self.ceilings = ceilings
        self.device = str(torch.device(device) if device is not None else default_device())
        self.rows: list[dict[str, str]] = []
        if self.path is not None and self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != COLUMNS:
                raise ValueError(f"{self.path}: existing CSV header {header} differs from {list(COLUMNS)}; "
                                 "write to a new file or directory")

    def add(self, op: str, shape: str, provider: str, mode: str, m: Measurement, *, bytes: float | None = None,
            flops: float | None = None, dtype=None, ceilings: Ceilings | None = None) -> dict[str, str]:
        """Write one row. bytes/flops: ideal memory traffic / FLOPs per call; dtype picks the matmul ceiling."""
        ceil = ceilings or self.ceilings
        sec = m.median_ms * 1e-3
        gbps = bytes / sec / 1e9 if bytes and sec > 0 else None
        tflops = flops / sec / 1e12 if flops and sec > 0 else None
        fraction = roofline_fraction(m.median_ms, bytes=bytes, flops=flops, dtype=dtype, ceilings=ceil)
        row = {"op": op, "shape": shape, "provider": provider, "mode": mode, "median_ms": _fmt(m.median_ms),
               "p20_ms": _fmt(m.p20_ms), "p80_ms": _fmt(m.p80_ms), "gbps": _fmt(gbps), "tflops": _fmt(tflops),
               "fraction_of_ceiling": _fmt(fraction, 3),
               "peak_mem_mb": "" if m.peak_mem_bytes is None else f"{m.peak_mem_bytes / 2**20:.3f}",
               **environment(self.device),
               "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.rows.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                if new:
                    w.writeheader()
                w.writerow(row)
        return row


def roofline_fraction(median_ms: float, *, bytes=None, flops=None, dtype=None, ceilings: Ceilings | None = None
                      ) -> float | None:
    """Roofline time / measured time: max(flops / peak TFLOP/s[dtype], bytes / copy GB/s) / median."""
    if ceilings is None or median_ms <= 0:
        return None
    bound = []
    if bytes and ceilings.copy_gbps > 0:
        bound.append(bytes / (ceilings.copy_gbps * 1e9))
    peak = ceilings.tflops_for(dtype if dtype is not None else "bf16") if flops else None
    if flops and peak:
        bound.append(flops / (peak * 1e12))
    return max(bound) / (median_ms * 1e-3) if bound else None


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
