"""Saving benchmark figures: every PNG under wmfast.bench is written by `save_figure`, which marks a figure whose
numbers were not measured on a GPU (a CPU run: the Triton kernels through the interpreter, torch on the host)
with a red subtitle, so that a plot seen without its CSV is not taken for GPU performance.

Where the numbers came from is read from the run's own records when the figure is redrawn from files
(`gpu_name` of results.csv rows, the `method` of attention_memory.csv rows) and from the measuring process
(its device and TRITON_INTERPRET) when the figure is drawn during the run.
"""
from __future__ import annotations

import os
from pathlib import Path

NOT_GPU_NOTE = "CPU / Triton interpreter: not GPU performance"
NOTE_COLOR = "red"


def recorded_off_gpu(gpu_name: str | None) -> bool:
    """True when an environment record's gpu_name (wmfast.bench.results.environment, a results.csv column) names
    a CPU ("cpu (x86_64, 16 threads)"); an empty or missing name says nothing and is not marked."""
    return bool(gpu_name) and gpu_name.strip().lower().startswith("cpu")


def running_off_gpu(device) -> bool:
    """True when this process measures off the GPU: `device` is not CUDA, or Triton runs interpreted
    (TRITON_INTERPRET=1, set by wmfast.bench.context.interpret_triton_without_gpu or by hand)."""
    return not str(device).startswith("cuda") or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mark_off_gpu(fig) -> None:
    """Put NOT_GPU_NOTE on `fig` as its suptitle (bold, red), below any suptitle the figure has."""
    previous = fig.get_suptitle()
    fig.suptitle(f"{previous}\n{NOT_GPU_NOTE}" if previous else NOT_GPU_NOTE, color=NOTE_COLOR, fontweight="bold")


def save_figure(fig, path: str | os.PathLike, *, off_gpu: bool, dpi: int = 120) -> Path:
    """Lay out `fig` (marked with NOT_GPU_NOTE when off_gpu), write it to `path` as PNG and close it."""
    import matplotlib.pyplot as plt

    if off_gpu:
        mark_off_gpu(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
