"""Per-GPU launch configurations and backend choices, measured by the benchmark sweeps.

One JSON file per GPU name, `kernels/configs/<gpu-slug>.json` (installed as `wmfast/kernels/configs/`),
committed after a benchmark run on that GPU (`wmfast bench --adopt RESULTS_DIR`). The kernels' launchers ask
`launch_config(kernel, key, device)` for their block sizes and warps and fall back to their hand-set
constants when the table has no entry; `wmfast.backend` asks `measured_backend(...)` which of the CUDA and
Triton kernels to run. Both read the same file:

    {"gpu": "NVIDIA H200",
     "measured": {"commit": ..., "torch": ..., "triton": ..., "timestamp": ..., "results": "<run dir>"},
     "launch": {"temporal_attention_fwd": {"T=5,Dh=64,bf16": {"block_r": 2, "num_warps": 2,
                                                             "median_ms": 0.28, "configs_timed": 18}}},
     "backend": {"layernorm_modulate": {"B=1,L=1536,D=3072,bf16,per-frame,grad": "cuda", "*": "cuda"}}}

`choose(rows)` builds that table from the rows of a results.csv: for each sweep (SWEEPS) the fastest
configuration per kernel and key, and for each op the CUDA kernels implement the faster of the two wmfast
providers per shape key, with "*" the backend that won the most shapes. Keys are built by the same
functions the launchers and ops use (`temporal_key`, `adaln_key`, `decode_key`), so a sweep row and a
launch meet on the same string.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "fp32",
                "fp32": "fp32"}


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


def _fields(shape: str) -> dict[str, str]:
    """"wan2.2-5b B=1 L=1536 D=3072 bf16 mod=frame-fp32" -> {"B": "1", ..., "dtype": "bf16", "mod": ...}."""
    out = {}
    for tok in shape.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
        elif tok in _DTYPE_NAMES:
            out["dtype"] = _DTYPE_NAMES[tok]
    return out


# ------------------------------------------------------------------------------------------- the sweeps
@dataclass(frozen=True)
class Sweep:
    """A sweep's rows: op name in results.csv; kernel name per mode; provider -> parameters; shape -> key."""

    op: str
    kernels: dict
    provider: str  # regex with named groups, each an int parameter of the launcher

    def key(self, shape: str) -> str | None:
        f = _fields(shape)
        try:
            if self.op == "temporal_attention_sweep":
                return temporal_key(f["T"], f["Dh"], f["dtype"])
            if self.op == "temporal_decode_sweep":
                return decode_key(f["T_max"], f["Dh"], f["dtype"])
            return adaln_key(f["D"], f["dtype"])
        except KeyError:
            return None


SWEEPS = (
    Sweep("temporal_attention_sweep", {"fwd": "temporal_attention_fwd", "bwd": "temporal_attention_bwd"},
          r"triton-br(?P<block_r>\d+)-w(?P<num_warps>\d+)"),
    Sweep("temporal_decode_sweep", {"fwd": "temporal_decode"}, r"triton-br(?P<block_r>\d+)-w(?P<num_warps>\d+)"),
    Sweep("gated_residual_layernorm_modulate_sweep", {"fwd": "adaln_fwd", "bwd": "adaln_bwd"},
          r"wmfast-triton-tile(?P<tile>\d+)-w(?P<num_warps>\d+)"),
)

# Ops with both a CUDA and a Triton kernel: the bench providers compared, and the op's shape key from a row.
BACKEND_PROVIDERS = {"wmfast-cuda": "cuda", "wmfast-triton": "triton", "cuda-fused": "cuda", "triton-fused": "triton"}


def _adaln_shape_key(shape: str, mode: str) -> str | None:
    """The key wmfast.ops.adaln builds for the same call ("B=1,L=1536,D=3072,bf16,per-frame[,grad]")."""
    f = _fields(shape)
    layout = f.get("mod", "").split("-")[0]
    kind = {"sample": "per-sample", "frame": "per-frame", "token": "per-token"}.get(layout)
    if not kind or not all(k in f for k in ("B", "L", "D", "dtype")):
        return None
    return f"B={f['B']},L={f['L']},D={f['D']},{f['dtype']},{kind}" + (",grad" if mode != "fwd" else "")


def _decode_shape_key(shape: str, mode: str) -> str | None:
    f = _fields(shape)
    if not all(k in f for k in ("B", "S", "H", "T_max", "Dh", "dtype")):
        return None
    return f"B={f['B']},S={f['S']},H={f['H']},T_max={f['T_max']},Dh={f['Dh']},{f['dtype']}"


BACKEND_OPS = {  # op -> (modes compared, shape key from a row)
    "layernorm_modulate": (("fwd", "fwd+bwd"), _adaln_shape_key),
    "gated_residual_layernorm_modulate": (("fwd", "fwd+bwd"), _adaln_shape_key),
    "temporal_decode_step": (("fwd",), _decode_shape_key),
}


def _ms(row) -> float | None:
    try:
        return float(row["median_ms"])
    except (KeyError, TypeError, ValueError):
        return None


def choose(rows: list[dict]) -> dict:
    """The table (see the module docstring) from results.csv rows; GPU and versions from the first op row."""
    op_rows = [r for r in rows if not r["op"].startswith("ceiling:")]
    first = (op_rows or rows or [{}])[0]
    table = {"gpu": first.get("gpu_name", "?"),
             "measured": {k: first.get(k, "") for k in ("commit", "torch", "triton", "cuda", "driver", "timestamp")},
             "launch": {}, "backend": {}}
    for sweep in SWEEPS:
        pattern = re.compile(sweep.provider + "$")
        groups: dict[tuple, list] = defaultdict(list)
        for r in op_rows:
            m = pattern.match(r["provider"]) if r["op"] == sweep.op else None
            if m and r["mode"] in sweep.kernels and _ms(r) is not None and sweep.key(r["shape"]):
                groups[(sweep.kernels[r["mode"]], sweep.key(r["shape"]))].append((_ms(r), m.groupdict(), r))
        for (kernel, key), cands in sorted(groups.items()):
            ms, params, r = min(cands, key=lambda c: c[0])
            table["launch"].setdefault(kernel, {})[key] = {
                **{k: int(v) for k, v in params.items()}, "median_ms": ms, "configs_timed": len(cands),
                "shape": r["shape"]}
    for op, (modes, shape_key) in BACKEND_OPS.items():
        times: dict[str, dict[str, float]] = defaultdict(dict)  # key -> backend -> fastest median
        for r in op_rows:
            backend = BACKEND_PROVIDERS.get(r["provider"])
            key = shape_key(r["shape"], r["mode"]) if r["op"] == op and r["mode"] in modes else None
            if backend and key and _ms(r) is not None:
                times[key][backend] = min(_ms(r), times[key].get(backend, float("inf")))
        # a choice needs both kernels timed on the same shape (a CPU run, or one without the extension, has one)
        chosen = {k: min(t, key=t.get) for k, t in sorted(times.items()) if len(t) > 1}
        if chosen:
            wins = Counter(chosen.values())
            chosen["*"] = max(sorted(wins), key=lambda b: wins[b])
            table["backend"][op] = chosen
    return table


def write_table(table: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return path


def config_dir() -> Path:
    """kernels/configs/ of the installed wmfast.kernels package (found without importing it: no triton)."""
    import importlib.util

    return Path(importlib.util.find_spec("wmfast.kernels").submodule_search_locations[0]) / "configs"


def table_path(gpu_name: str) -> Path:
    from wmfast.benchmarking import slug

    return config_dir() / f"{slug(gpu_name)}.json"


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


def _device_gpu(device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _gpu_name(device.index if device.index is not None else torch.cuda.current_device())


def launch_config(kernel: str, key: str, device) -> dict:
    """{parameter: value} measured for `kernel` at `key` on `device`'s GPU; {} when not measured (or CPU)."""
    gpu = _device_gpu(device)
    if gpu is None:
        return {}
    entry = load_table(gpu).get("launch", {}).get(kernel, {}).get(key)
    if not entry:
        return {}
    return {k: v for k, v in entry.items() if k in ("block_r", "num_warps", "tile")}


def measured_backend(gpu_name: str, op: str, shape_key: str | None) -> str | None:
    """The backend measured fastest for `op` at `shape_key` (else the op's "*" entry) on this GPU, or None."""
    choices = load_table(gpu_name).get("backend", {}).get(op, {})
    for key in (shape_key, "*"):
        if key is not None and key in choices:
            return choices[key]
    return None
