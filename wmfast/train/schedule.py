"""The learning-rate schedule: linear warm-up to the peak, then linear decay to 0 at the last step ("linear", the
compression recipe) or the peak held to the end ("constant", the sampling recipe).

A pure function of the step, set on the optimizer before every step: nothing to save or restore beyond the
step counter, so a resumed run gets exactly the LRs of an uninterrupted one.
"""
from __future__ import annotations


def lr_at(step: int, peak: float, warmup: int, total: int, schedule: str = "linear") -> float:
    """LR of optimizer step `step` (0-based) of `total`.

    warm-up, step < warmup:  peak * (step + 1) / warmup   (the first step already moves; the last reaches peak)
    decay,   step >= warmup: peak * (total - step) / (total - warmup)   (peak at step == warmup, 0 at total)
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":  # the sampling recipe: constant LR after the warm-up
        return peak if step < total else 0.0
    if step >= total:
        return 0.0
    return peak * (total - step) / (total - warmup)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
