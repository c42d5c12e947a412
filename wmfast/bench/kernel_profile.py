"""Where a step's time goes: one call of a function under torch.profiler, its kernels grouped by name.

On CUDA the device time of every kernel (memcpy/memset included, as they cost time); on the CPU the self time
of each aten op (what the CPU executes), so the same report runs everywhere. A benchmark that falls short of
its target writes this beside its numbers, so the shortfall comes with its breakdown by kernel.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import torch

FIELDS = ("rank", "kernel", "calls", "total_ms", "share")


def kernel_breakdown(fn: Callable[[], object], device: torch.device, top: int = 30) -> list[dict]:
    """Rows {rank, kernel, calls, total_ms, share} of one fn() call, the `top` kernels by total time; the last row
    sums the rest ("(other)"). share: of the total device (CUDA) or CPU self time of the call."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {}
    for e in prof.events():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        else:
            if not e.name.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        entry = times.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    total = sum(t for _, t in times.values()) or 1.0
    ranked = sorted(times.items(), key=lambda kv: -kv[1][1])
    rows = [{"rank": i + 1, "kernel": name[:200], "calls": n, "total_ms": round(us / 1e3, 4),
             "share": round(us / total, 4)} for i, (name, (n, us)) in enumerate(ranked[:top])]
    rest = ranked[top:]
    if rest:
        us = sum(t for _, (_, t) in rest)
        rows.append({"rank": "", "kernel": "(other)", "calls": sum(n for _, (n, _) in rest),
                     "total_ms": round(us / 1e3, 4), "share": round(us / total, 4)})
    return rows


def write_breakdown(path: str | Path, rows: list[dict], label: str) -> None:
    """Append rows to a CSV with a leading `config` column naming what was profiled (header when new)."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("config", *FIELDS))
        if new:
            w.writeheader()
        w.writerows({"config": label, **r} for r in rows)
