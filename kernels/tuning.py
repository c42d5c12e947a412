"""Per-GPU launch configurations and backend choices, measured by the benchmark sweeps: the run-time side.

One JSON file per GPU name, `kernels/configs/<gpu-slug>.json` (installed as `wmfast/kernels/configs/`),
committed after a benchmark run on that GPU (`wmfast bench --adopt RESULTS_DIR`, which builds it with
`wmfast.bench.adopt`). The kernels' launchers ask `launch_config(kernel, key, device)` for their block sizes
and warps and fall back to their hand-set constants when the table has no entry; `wmfast.ops.dispatch` asks
`measured_backend(...)` which of the CUDA and Triton kernels to run. Both read the same file:

    {"gpu": "NVIDIA H200",
     "measured": {"commit": ..., "torch": ..., "triton": ..., "cuda": ..., "driver": ..., "timestamp": ...},
     "launch": {"temporal_attention_fwd": {"T=5,Dh=64,bf16": {"block_r": 16, "num_warps": 4, "median_ms": ...,
                                                             "default": {...}, "default_median_ms": ..., ...}}},
     "backend": {"layernorm_modulate": {"B=8,L=1536,D=3072,bf16,per-frame,grad": "cuda", "*": "cuda"}},
     "kept_defaults": {kernel: {key: {... "reason": why the hand-set default stays}}}}

Keys are built here (`temporal_key`, `adaln_key`, `decode_key` for launches; `adaln_shape_key`,
`decode_shape_key`, `spatial_shape_key` for backends) and used by the launchers, the ops and the
adoption rule alike, so a sweep row and a launch meet on the same string.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

def dtype_name(dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).removeprefix("torch."))


# -------------------------------------------------------------------------------------------- the keys
def temporal_key(T: int, Dh: int, dtype) -> str:
    """Key of the temporal-attention kernels: what sets their tile ([BLOCK_R, T, Dh])."""
    return f"T={int(T)},Dh={int(Dh)},{dtype_name(dtype)}"


def decode_key(T_max: int, Dh: int, dtype) -> str:
    return f"T_max={int(T_max)},Dh={int(Dh)},{dtype_name(dtype)}"


def adaln_key(D: int, dtype) -> str:
    """Key of the AdaLN kernels: the row width sets BLOCK_D, the rest of the tile follows from `tile`."""
    return f"D={int(D)},{dtype_name(dtype)}"


def adaln_shape_key(B: int, L: int, D: int, dtype, kinds, grad: bool) -> str:
    """Key of the AdaLN backend choice: "B=1,L=1536,D=3072,bf16,per-frame[,grad]" (kinds: the modulation
    layouts of the call, joined with "+"; grad: the call needs a backward)."""
    return f"B={int(B)},L={int(L)},D={int(D)},{dtype_name(dtype)},{'+'.join(kinds)}" + (",grad" if grad else "")


def decode_shape_key(B: int, S: int, H: int, T_max: int, Dh: int, dtype) -> str:
    """Key of the decode step's backend choice: "B=1,S=1024,H=8,T_max=16,Dh=64,bf16"."""
    return f"B={int(B)},S={int(S)},H={int(H)},T_max={int(T_max)},Dh={int(Dh)},{dtype_name(dtype)}"


SPATIAL_BT_CLASS = 32  # from here on B*T frames are one class: "BT=32+"


def spatial_shape_key(BT: int, H: int, S: int, Dh: int, dtype, grad: bool) -> str:
    """Key of spatial attention's SDPA-backend choice: "BT=32+,H=8,S=1024,Dh=64,bf16[,grad]" (BT: the B*T frames
    attended independently, exact below 32 and one class from 32 on: every kernel then has thousands of tiles
    (B*T x H x S / 128 >= 2048 at the model's H = 8, S = 1024), so the ranking measured at one micro-batch (the
    benchmark's B*T = 40) holds for the training run's (B*T = 100 at micro-batch 20); grad: a backward follows)."""
    bt = f"{SPATIAL_BT_CLASS}+" if int(BT) >= SPATIAL_BT_CLASS else str(int(BT))
    return f"BT={bt},H={int(H)},S={int(S)},Dh={int(Dh)},{dtype_name(dtype)}" + (",grad" if grad else "")


def config_dir() -> Path:
    """kernels/configs/ of the installed wmfast.kernels package."""
    return Path(__file__).resolve().parent / "configs"


def gpu_slug(name: str) -> str:
    """The table's file stem for a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3" (the same rule
    as the benchmark results directories)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def table_path(gpu_name: str) -> Path:
    return config_dir() / f"{gpu_slug(gpu_name)}.json"


# ------------------------------------------------------------------------------------------ run time
@functools.cache
def load_table(gpu_name: str) -> dict:
    """The committed table of this GPU ({} when none: the kernels' hand-set defaults apply)."""
    path = table_path(gpu_name)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # a broken table must not stop the kernels: defaults, and say why
        import logging

        logging.getLogger("wmfast").warning("wmfast: ignoring %s (%s); using the default launch configurations",
                                            path, e)
        return {}


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_gpu(device) -> str | None:
    """The GPU name of a CUDA `device` (cached per index), None for any other device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _gpu_name(device.index if device.index is not None else torch.cuda.current_device())


def launch_config(kernel: str, key: str, device) -> dict:
    """{parameter: value} measured for `kernel` at `key` on `device`'s GPU; {} when not measured (or CPU)."""
    gpu = device_gpu(device)
    if gpu is None:
        return {}
    entry = load_table(gpu).get("launch", {}).get(kernel, {}).get(key)
    if not entry:
        return {}
    return {k: v for k, v in entry.items() if k in ("block_r", "num_warps", "tile")}


def measured_backend(gpu_name: str, op: str, shape_key: str | None, exact: bool = False) -> str | None:
    """The backend measured fastest for `op` at `shape_key` (else, unless `exact`, the op's "*" entry) on this
    GPU, or None."""
    choices = load_table(gpu_name).get("backend", {}).get(op, {})
    for key in (shape_key,) if exact else (shape_key, "*"):
        if key is not None and key in choices:
            return choices[key]
    return None
