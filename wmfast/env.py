"""What this machine offers wmfast: versions, GPUs, and which op backends are usable (and why not).

`collect_env()` returns a plain dict (JSON-serialisable; benchmarks record it next to their numbers);
`format_env()` renders it for `wmfast env`."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

import torch

from wmfast.telemetry import list_gpus

_PACKAGES = ("triton", "diffusers", "peft", "deepspeed", "transformers", "flash-attn", "nvidia-ml-py")
_ENV_VARS = ("WMFAST_BACKEND", "WMFAST_AUTOTUNE", "WMFAST_CUDA_JIT", "WMFAST_CUDA_ARCHS", "TRITON_INTERPRET",
             "CUDA_VISIBLE_DEVICES", "WMFAST_SKIP_CUDA_BUILD")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvcc_version() -> str | None:
    """The CUDA toolkit's nvcc release ("release 12.8, V12.8.93"), from PATH or CUDA_HOME; None without one.
    It builds the extension, so a mismatch with torch's CUDA (`torch_cuda`) is worth seeing next to it."""
    home = os.environ.get("CUDA_HOME")
    nvcc = shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc") if home else None)
    if nvcc is None or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc}: {e}"
    release = [line for line in out.splitlines() if "release" in line]
    return release[-1].split("tools, ")[-1].strip() if release else out.strip() or None


def gpus_torch() -> list[dict]:
    """GPUs as torch sees them (the ones this process can use: CUDA_VISIBLE_DEVICES applies)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_total_gib": round(p.total_memory / 2**30, 2),
                    "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count})
    return out


def backends() -> dict[str, dict]:
    """Every backend of wmfast.ops.dispatch: usable or not, and why."""
    from wmfast.ops import dispatch as _backend  # the report reads the ops layer: imported when asked

    return {name: dict(zip(("usable", "reason"), b.available())) for name, b in _backend.REGISTRY.items()}


def selected_backends() -> dict[str, str]:
    """The backend the fused AdaLN ops would pick for CPU and (when present) CUDA tensors."""
    from wmfast.ops import dispatch as _backend

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = {}
    for dev in devices:
        try:  # quiet: the report says why itself, so no fallback line in the middle of it
            out[dev] = _backend.select_backend("layernorm_modulate", torch.device(dev), quiet=True)
        except ValueError as e:  # a forced backend that cannot run here
            out[dev] = f"error: {e}"
    return out


def collect_env() -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvcc": nvcc_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "env_vars": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        **dict(zip(("gpus_nvml", "nvml_note"), list_gpus())),
        "gpus_torch": gpus_torch(),
        "backends": backends(),
        "selected": selected_backends(),
    }


def format_env(env: dict) -> str:
    lines = [f"python {env['python']} on {env['platform']}",
             f"torch {env['torch']} (CUDA {env['torch_cuda'] or 'none'}; cuda available: {env['cuda_available']})",
             f"nvcc {env['nvcc'] or 'not found (PATH, CUDA_HOME)'}"]
    lines += [f"{name} {ver or 'not installed'}" for name, ver in env["packages"].items()]
    gpus, note = env["gpus_nvml"], env["nvml_note"]
    if gpus:
        lines += [f"GPU {g['index']}: {g['name']}, {g['memory_total_gib']} GiB ({g['memory_used_gib']} GiB used), "
                  f"driver {g['driver']}" for g in gpus]
    elif env["gpus_torch"]:
        lines += [f"GPU {g['index']}: {g['name']}, {g['memory_total_gib']} GiB (from torch; {note})"
                  for g in env["gpus_torch"]]
    else:
        lines.append(f"GPU: none ({note})")
    lines.append("backends:")
    for name, b in env["backends"].items():
        lines.append(f"  {name:6s} {'usable' if b['usable'] else 'unusable':8s} {b['reason']}")
    lines.append("AdaLN ops would use: " + ", ".join(f"{d} tensors -> {b}" for d, b in env["selected"].items()))
    if env["env_vars"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in env["env_vars"].items()))
    return "\n".join(lines)
