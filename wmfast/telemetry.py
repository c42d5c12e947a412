"""The one NVML reader: GPU utilisation, clocks, power and temperature through nvidia-ml-py.

`list_gpus()` lists the GPUs NVML sees (`wmfast env`). `Nvml.open(index)` returns a reader, or None and the reason
(no GPU, nvidia-ml-py absent, NVML not permitted): telemetry is always optional. `GpuSampler` samples it in a
background thread while a block runs (the benchmark harness); the training loop reads it once per logged step.
"""
from __future__ import annotations

import csv
import os
import statistics
import threading
import time


def _text(value) -> str:
    """NVML strings come back as bytes from older nvidia-ml-py releases."""
    return value.decode() if isinstance(value, bytes) else str(value)


# field -> query on (pynvml, handle); a reader asks only for the fields its caller records
QUERIES = {
    "gpu_util": lambda nv, h: float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
    "sm_clock_mhz": lambda nv, h: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
    "mem_clock_mhz": lambda nv, h: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
    "power_w": lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1e3,
    "temp_c": lambda nv, h: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
}


class Nvml:
    """One GPU's NVML handle; read(fields) -> {field: value} for fields of QUERIES."""

    def __init__(self, nvml, handle):
        self._nv, self._handle = nvml, handle

    @classmethod
    def open(cls, index: int = 0) -> tuple[Nvml | None, str]:
        """(reader, "") or (None, why not)."""
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)), ""
        except Exception as e:  # noqa: BLE001 - NVML absent or not permitted: the caller goes on without it
            return None, f"nvidia-ml-py unusable: {e}"

    def read(self, fields) -> dict[str, float]:
        """Raises pynvml's error when a query fails (the GPU fell off the bus, permissions changed)."""
        return {f: QUERIES[f](self._nv, self._handle) for f in fields}


def driver_version() -> str:
    """The NVIDIA driver version, or "" without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return _text(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 - NVML absent or not permitted
        return ""


def list_gpus() -> tuple[list[dict], str]:
    """GPUs as NVML sees them (name, memory in GiB, driver), and a note: why NVML gave nothing, if so."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound / DriverNotLoaded / ...: no usable driver
        return [], f"NVML unavailable: {e}"
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "name": _text(pynvml.nvmlDeviceGetName(h)),
                        "memory_total_gib": round(mem.total / 2**30, 2), "memory_used_gib": round(mem.used / 2**30, 2),
                        "driver": driver})
        return out, "NVML"
    finally:
        pynvml.nvmlShutdown()


class GpuSampler:
    """Samples SM/memory clocks (MHz), power (W) and temperature (C) in a background thread while the context
    is open. A no-op (no samples, `available` False, `reason` says why) without a GPU or NVML."""

    FIELDS = ("time_s", "sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c")

    def __init__(self, interval_s: float = 0.1, index: int | None = None):
        import torch

        self.interval_s = interval_s
        self.index = index if index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
        self.samples: list[tuple[float, ...]] = []
        self.available = False
        self.reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        import torch

        if not torch.cuda.is_available():
            self.reason = "no CUDA device"
            return self
        self._reader, self.reason = Nvml.open(self.index)
        if self._reader is None:
            return self
        self.available = True
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="wmfast-gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                r = self._reader.read(self.FIELDS[1:])
            except Exception as e:  # noqa: BLE001 - stop sampling on the first NVML error, keep the reason
                self.reason = f"NVML sampling stopped: {e}"
                return
            self.samples.append((time.perf_counter() - self._t0, *(r[f] for f in self.FIELDS[1:])))
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return False

    def summary(self) -> dict[str, dict[str, float]]:
        """{field: {min, median, max}} over the samples; {} when nothing was sampled."""
        out = {}
        for i, name in enumerate(self.FIELDS[1:], start=1):
            vals = [s[i] for s in self.samples]
            if vals:
                out[name] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
        return out

    def write_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.FIELDS)
            w.writerows(self.samples)
