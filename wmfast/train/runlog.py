"""The run log: metrics.jsonl (+ TensorBoard when installed), MFU, peak memory, GPU telemetry (wmfast.telemetry).

MFU = achieved model FLOP/s / (peak dense bf16 FLOP/s per device x devices), where achieved FLOP/s =
samples/s x task.flops_per_sample() (forward + backward, counted from the model's matmuls and attention in
the task; activation-checkpoint recomputation is not counted, as is customary for MFU).
"""
from __future__ import annotations

import json
import logging
import os
import resource
from typing import Any

import torch

from wmfast.telemetry import Nvml

logger = logging.getLogger("wmfast")

# dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets (SXM parts, no sparsity)
PEAK_BF16_FLOPS = {
    "B200": 2.25e15,
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is 756e12 (matched first below)
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}
PEAK_ENV = "WMFAST_PEAK_TFLOPS"  # override the per-device peak (TFLOP/s), e.g. for CPUs or unlisted GPUs


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (MFU is then not reported)."""
    env = os.environ.get(PEAK_ENV)
    if env:
        return float(env) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def mfu(flops_per_s: float, device: torch.device, devices: int = 1) -> float | None:
    """THE MFU of wmfast, used by the training log and every benchmark: achieved model FLOP/s over the
    datasheet dense bf16 peak (`peak_flops`) of `devices` devices; None when the peak is unknown. A fraction of
    a matmul ceiling measured in a run is a different number and is reported separately (as
    `fraction_of_ceiling` / `fraction_of_matmul_ceiling`), never as MFU."""
    peak = peak_flops(device)
    return flops_per_s / (peak * devices) if peak else None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB; process lifetime max


class GpuTelemetry:
    """Utilisation (%), power (W) and temperature (C) of this rank's GPU (wmfast.telemetry); no-op without one."""

    def __init__(self, device: torch.device):
        self.reader = None
        if device.type != "cuda":
            return
        self.reader, why = Nvml.open(device.index if device.index is not None else torch.cuda.current_device())
        if self.reader is None:
            logger.info("wmfast: GPU telemetry off (%s)", why)

    def read(self) -> dict[str, float]:
        if self.reader is None:
            return {}
        try:
            r = self.reader.read(("gpu_util", "power_w", "temp_c"))
        except Exception:  # noqa: BLE001 - a failed query skips this step's telemetry
            return {}
        return {"gpu_util": r["gpu_util"], "gpu_power_w": r["power_w"], "gpu_temp_c": r["temp_c"]}


class RunLog:
    """Rank-0 writer of RUN_DIR/metrics.jsonl (one JSON object per line, flushed) and TensorBoard events."""

    def __init__(self, run_dir: str, enabled: bool, append: bool = True):
        """append: keep earlier records (a resumed run); a run starting at step 0 starts a fresh file."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.f = open(self.path, "a" if append else "w") if enabled else None  # noqa: SIM115 - closed by close()
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def train_losses(run_dir: str) -> list[float]:
    """The training loss of every logged step of a run, in step order (a step logged twice, as after a resume
    that repeats it, counts once: its last record)."""
    by_step = {r["step"]: r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


def read_jsonl(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
    return out
