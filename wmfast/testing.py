"""Test oracle shared by the whole suite (and usable for your own kernels).

The 2x rule (flash-attention's oracle): the kernel's error against the fp32 reference must be at most
twice the error of plain PyTorch computing in the same low precision, plus an absolute floor per dtype.
"""
from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual.float() - expected.float()).abs()
    nan_a, nan_e = actual.isnan(), expected.isnan()
    return (f"max {diff.nan_to_num(0).max().item():.3e} mean {diff.nan_to_num(0).mean().item():.3e} "
            f"nan(actual) {int(nan_a.sum())} nan(expected) {int(nan_e.sum())}")


def assert_2x_rule(actual: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, name: str = "output",
                   dtype: torch.dtype | None = None) -> None:
    """max|actual - ref_fp32| <= 2 * max|ref_lowp - ref_fp32| + ATOL[dtype]; NaNs must sit in the same places.

    actual: the kernel's result; ref_fp32: the reference computed in fp32; ref_lowp: the reference computed
    by PyTorch in `dtype` (the kernel's working precision)."""
    dtype = dtype or actual.dtype
    assert actual.shape == ref_fp32.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref_fp32.shape)}"
    nan_a, nan_r = actual.isnan(), ref_fp32.isnan()
    assert torch.equal(nan_a, nan_r), f"{name}: NaN positions differ ({error_report(actual, ref_fp32)})"
    a, r, lp = (t.float().nan_to_num(0.0) for t in (actual, ref_fp32, ref_lowp))
    err = (a - r).abs().max().item() if a.numel() else 0.0
    base = (lp - r).abs().max().item() if a.numel() else 0.0
    bound = 2 * base + ATOL[dtype]
    assert err <= bound, (f"{name} ({dtype}): error {err:.3e} > 2 * {base:.3e} + {ATOL[dtype]:.0e}; "
                          f"{error_report(actual, ref_fp32)}")
