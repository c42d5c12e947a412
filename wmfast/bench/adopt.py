"""Adoption of measured launch configurations and backends: results.csv rows -> the per-GPU table that
`wmfast.kernels.tuning` reads at run time (`wmfast bench --adopt RESULTS_DIR`; the lease writes the same table
as launch_configs.json).

`choose(rows)` builds the table: for each sweep (SWEEPS) the fastest configuration per kernel and key (least
summed median over the shapes timed), adopted only where it beats the kernel's hand-set default beyond the
noise (its 80th percentile under the default's 20th, on every shape); for each op the CUDA kernels implement,
the faster of the two wmfast providers per shape key under the same rule, with "*" the backend that won the
most shapes; for spatial attention the fastest of its kernels (SDPA's cuDNN, flash and memory-efficient,
flash-attn), adopted where it beats the runner-up beyond the noise (the op reads only exact shape keys).
Configurations that did not beat the default are kept under "kept_defaults" for the record, and the kernels
run their defaults there. The hand-set defaults come from the kernels themselves
(`default_launch`), which is why this lives above them and not in wmfast.kernels.tuning.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wmfast.kernels.tuning import (
    adaln_key,
    adaln_shape_key,
    decode_key,
    decode_shape_key,
    spatial_shape_key,
    temporal_key,
)

_DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "fp32",
                "fp32": "fp32"}


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
def _temporal_sweep_key(f: dict) -> str:
    return temporal_key(f["T"], f["Dh"], f["dtype"])


def _decode_sweep_key(f: dict) -> str:
    return decode_key(f["T_max"], f["Dh"], f["dtype"])


def _adaln_sweep_key(f: dict) -> str:
    return adaln_key(f["D"], f["dtype"])


@dataclass(frozen=True)
class Sweep:
    """A sweep's rows: op name in results.csv; kernel name per mode; provider regex (named groups: the
    launcher's int parameters); the launch key from a row's shape fields."""

    op: str
    kernels: dict
    provider: str
    key_of: Callable[[dict], str]

    def key(self, shape: str) -> str | None:
        try:
            return self.key_of(_fields(shape))
        except KeyError:
            return None


SWEEPS = (
    Sweep("temporal_attention_sweep", {"fwd": "temporal_attention_fwd", "bwd": "temporal_attention_bwd"},
          r"triton-br(?P<block_r>\d+)-w(?P<num_warps>\d+)", _temporal_sweep_key),
    Sweep("temporal_decode_sweep", {"fwd": "temporal_decode"}, r"triton-br(?P<block_r>\d+)-w(?P<num_warps>\d+)",
          _decode_sweep_key),
    Sweep("gated_residual_layernorm_modulate_sweep", {"fwd": "adaln_fwd", "bwd": "adaln_bwd"},
          r"wmfast-triton-tile(?P<tile>\d+)-w(?P<num_warps>\d+)", _adaln_sweep_key),
)

# The bench providers of the kernel backends: wmfast's two, and spatial attention's (bench_st_attention rows are
# named by wmfast.ops.attention.SPATIAL_BACKENDS; "sdpa", PyTorch's own pick, is timed for reference only).
BACKEND_PROVIDERS = {"wmfast-cuda": "cuda", "wmfast-triton": "triton", "cuda-fused": "cuda", "triton-fused": "triton",
                     **{name: name for name in ("flash-attn", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")}}


def _adaln_shape_key(shape: str, mode: str) -> str | None:
    """The key wmfast.ops.adaln builds for the same call (one modulation layout per bench row)."""
    f = _fields(shape)
    layout = f.get("mod", "").split("-")[0]
    kind = {"sample": "per-sample", "frame": "per-frame", "token": "per-token"}.get(layout)
    if not kind or not all(k in f for k in ("B", "L", "D", "dtype")):
        return None
    return adaln_shape_key(f["B"], f["L"], f["D"], f["dtype"], [kind], mode != "fwd")


def _decode_shape_key(shape: str, mode: str) -> str | None:
    f = _fields(shape)
    if not all(k in f for k in ("B", "S", "H", "T_max", "Dh", "dtype")):
        return None
    return decode_shape_key(f["B"], f["S"], f["H"], f["T_max"], f["Dh"], f["dtype"])


def _spatial_shape_key(shape: str, mode: str) -> str | None:
    """"B=8 T=5 S=1024 H=8 Dh=64 bfloat16", fwd or full (fwd+bwd) -> the key wmfast.ops.attention builds."""
    f = _fields(shape)
    if not all(k in f for k in ("B", "T", "S", "H", "Dh", "dtype")):
        return None
    return spatial_shape_key(int(f["B"]) * int(f["T"]), f["H"], f["S"], f["Dh"], f["dtype"], mode != "fwd")


BACKEND_OPS = {  # op -> (modes compared, shape key from a row)
    "layernorm_modulate": (("fwd", "fwd+bwd"), _adaln_shape_key),
    "gated_residual_layernorm_modulate": (("fwd", "fwd+bwd"), _adaln_shape_key),
    "temporal_decode_step": (("fwd",), _decode_shape_key),
    "spatial_attention": (("fwd", "full"), _spatial_shape_key),
}


def _ms(row, key: str = "median_ms") -> float | None:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return None


def _beats(fast: dict, slow: dict) -> bool:
    """fast beats slow beyond the noise: its 80th percentile under slow's 20th."""
    f80, s20 = _ms(fast, "p80_ms"), _ms(slow, "p20_ms")
    f80 = f80 if f80 is not None else _ms(fast)
    s20 = s20 if s20 is not None else _ms(slow)
    return f80 is not None and s20 is not None and f80 < s20


def default_launch(kernel: str, key: str) -> dict | None:
    """The kernels' hand-set GPU launch configuration for `key` (imports the kernels: offline use only)."""
    f = dict(part.split("=", 1) for part in key.split(",") if "=" in part)
    try:
        if kernel.startswith("adaln"):
            from wmfast.kernels.adaln import default_launch as adaln_default

            return adaln_default(kernel, int(f["D"]))
        from wmfast.kernels.temporal_attention import default_launch as attention_default

        return attention_default("temporal_attention_bwd" if kernel.endswith("bwd") else kernel,
                                 int(f.get("T", f.get("T_max", 0))), int(f["Dh"]))
    except (ImportError, KeyError, ValueError):
        return None


def _choose_launch(sweep: Sweep, op_rows: list[dict], table: dict) -> None:
    """Per (kernel, key): the configuration with the least summed median over the shapes every configuration
    was timed on, adopted only when it beats the hand-set default beyond the noise on each of those shapes."""
    pattern = re.compile(sweep.provider + "$")
    timed: dict[tuple, dict] = defaultdict(dict)  # (kernel, key) -> {(params, shape): row}
    for r in op_rows:
        m = pattern.match(r["provider"]) if r["op"] == sweep.op else None
        key = sweep.key(r["shape"]) if m else None
        if m and key and r["mode"] in sweep.kernels and _ms(r) is not None:
            params = tuple(sorted((k, int(v)) for k, v in m.groupdict().items()))
            timed[(sweep.kernels[r["mode"]], key)][(params, r["shape"])] = r
    for (kernel, key), rows in sorted(timed.items()):
        shapes = sorted({shape for _, shape in rows})
        configs = {p for p, _ in rows if all((p, sh) in rows for sh in shapes)}
        if not configs:
            continue
        best = min(sorted(configs), key=lambda p: sum(_ms(rows[(p, sh)]) for sh in shapes))
        default = default_launch(kernel, key)
        dflt = tuple(sorted(default.items())) if default else None
        entry = {**dict(best), "median_ms": round(sum(_ms(rows[(best, sh)]) for sh in shapes), 4),
                 "configs_timed": len(configs), "shapes": shapes, "default": default}
        if dflt is not None and dflt in configs:
            entry["default_median_ms"] = round(sum(_ms(rows[(dflt, sh)]) for sh in shapes), 4)
        if best == dflt:
            reason = "the hand-set default is the fastest"
        elif dflt is None or dflt not in configs:
            reason = "the hand-set default was not timed on every shape: no evidence against it"
        elif all(_beats(rows[(best, sh)], rows[(dflt, sh)]) for sh in shapes):
            reason = ""
        else:
            reason = "within the noise of the hand-set default (p80 not under the default's p20 on every shape)"
        if reason:
            table["kept_defaults"].setdefault(kernel, {})[key] = {**entry, "reason": reason}
        else:
            table["launch"].setdefault(kernel, {})[key] = entry


def choose(rows: list[dict]) -> dict:
    """The table (see the module docstring) from results.csv rows; GPU and versions from the first op row.
    Only decisive results enter it ("launch", "backend"); the rest is kept for the record ("kept_defaults")."""
    op_rows = [r for r in rows if not r["op"].startswith("ceiling:")]
    first = (op_rows or rows or [{}])[0]
    table = {"gpu": first.get("gpu_name", "?"),
             "measured": {k: first.get(k, "") for k in ("commit", "torch", "triton", "cuda", "driver", "timestamp")},
             "launch": {}, "backend": {}, "kept_defaults": {}}
    for sweep in SWEEPS:
        _choose_launch(sweep, op_rows, table)
    for op, (modes, shape_key) in BACKEND_OPS.items():
        fastest: dict[str, dict[str, dict]] = defaultdict(dict)  # key -> backend -> its fastest row
        for r in op_rows:
            backend = BACKEND_PROVIDERS.get(r["provider"])
            key = shape_key(r["shape"], r["mode"]) if r["op"] == op and r["mode"] in modes else None
            if backend and key and _ms(r) is not None and (
                    backend not in fastest[key] or _ms(r) < _ms(fastest[key][backend])):
                fastest[key][backend] = r
        chosen = {}
        for key, by_backend in sorted(fastest.items()):
            if len(by_backend) < 2:  # a choice needs two kernels timed on the same shape
                continue
            win, lose = sorted(by_backend, key=lambda b: _ms(by_backend[b]))[:2]  # the fastest and the runner-up
            if _beats(by_backend[win], by_backend[lose]):
                chosen[key] = win
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
