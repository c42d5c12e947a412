"""Test oracle shared by the whole suite (and usable for your own kernels).

The 2x rule (flash-attention's oracle): the kernel's error against the fp32 reference must be at most
twice the error of plain PyTorch computing in the same low precision, plus an absolute floor per dtype.
Also the AdaLN modulation layouts and the forward + gradient / decode-step checks that the Triton, CUDA and
emulated-CUDA tests share, and `no_host_reads` (a loop that must not sync, checked on the CPU).
"""
from __future__ import annotations

import contextlib

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


# ------------------------------------------------------------------------ shared by the AdaLN and decode tests
LAYOUTS = ["per-sample-2d", "per-sample", "per-frame", "per-token", "chunk-views", "mixed", "strided-last-dim"]


def modulation_layout(kind, B, L, D, F, dtype, device, mod_dtype=None):
    """(mods, frame_len): three modulation tensors (gate, shift, scale) in one of the LAYOUTS the AdaLN ops accept."""
    md = mod_dtype or dtype
    if kind == "per-sample-2d":
        return [torch.randn(B, D, dtype=md, device=device) for _ in range(3)], None
    if kind == "per-sample":
        return [torch.randn(B, 1, D, dtype=md, device=device) for _ in range(3)], None
    if kind == "per-frame":
        return [torch.randn(B, F, D, dtype=md, device=device) for _ in range(3)], L // F
    if kind == "per-token":
        return [torch.randn(B, L, D, dtype=md, device=device) for _ in range(3)], None
    if kind == "chunk-views":  # diffusers' (B, F, 6, D) fp32 table, chunked: strided views, no copies
        table = torch.randn(B, F, 6, D, dtype=md, device=device)
        return [table[:, :, i] for i in (2, 0, 1)], L // F
    if kind == "mixed":  # gate per-token, shift per-sample, scale per-frame: one op, three reductions
        return [torch.randn(B, L, D, dtype=md, device=device), torch.randn(B, 1, D, dtype=md, device=device),
                torch.randn(B, F, D, dtype=md, device=device)], L // F
    if kind == "strided-last-dim":
        return [torch.randn(B, 1, 2 * D, dtype=md, device=device)[..., ::2] for _ in range(3)], None
    raise AssertionError(kind)


def leaves(ts):
    """Detached copies of `ts` that require grad."""
    return [t.detach().clone().requires_grad_(True) for t in ts]


def check_grads(outs_kernel, inputs_kernel, ref_fn, inputs, dtype, names):
    """Forward and every gradient of a kernel path vs the fp32 and the low-precision references (2x rule).
    ref_fn(inputs, upcast) returns the reference outputs."""
    ref32_in, lowp_in = leaves([t.float() for t in inputs]), leaves(inputs)
    ref32, lowp = ref_fn(ref32_in, True), ref_fn(lowp_in, False)
    grads_out = [torch.randn_like(o) for o in outs_kernel]
    for o, r, lp, name in zip(outs_kernel, ref32, lowp, ("y", "out")):
        assert_2x_rule(o, r, lp, name=name, dtype=dtype)
    gk = torch.autograd.grad(outs_kernel, inputs_kernel, grads_out)
    g32 = torch.autograd.grad(ref32, ref32_in, [g.float() for g in grads_out])
    glp = torch.autograd.grad(lowp, lowp_in, grads_out)
    for a, r, lp, name in zip(gk, g32, glp, names):
        assert a.shape == r.shape, name
        assert_2x_rule(a, r, lp, name=f"d{name}", dtype=dtype)


def decode_ref32(q, k, v, cache, t):
    """The decode reference in fp32 on fp32 copies: its output is not rounded to q's dtype (the 2x rule's
    ref_fp32; temporal_decode_ref itself returns q.dtype)."""
    from wmfast.kernels.temporal_attention import temporal_decode_ref

    kf, vf = (c.float() for c in cache)
    return temporal_decode_ref(q.float(), k.float(), v.float(), kf, vf, t)


def check_decode(decode, q, k, v, cache, t, dtype):
    """Run `decode(q, k, v, k_cache, v_cache, t)` on copies of `cache`: the cache append must equal the
    reference's exactly, the output pass the 2x rule. Returns (o, fp32 reference)."""
    from wmfast.kernels.temporal_attention import temporal_decode_ref

    kc, vc = (c.clone() for c in cache)
    o = decode(q, k, v, kc, vc, t)
    kr, vr = (c.clone() for c in cache)
    temporal_decode_ref(q, k, v, kr, vr, t)  # the cache append to compare with
    kl, vl = (c.clone() for c in cache)
    lowp = temporal_decode_ref(q, k, v, kl, vl, t, upcast=False)
    assert torch.equal(kc, kr) and torch.equal(vc, vr), "cache append"
    ref32 = decode_ref32(q, k, v, cache, t)
    assert_2x_rule(o, ref32, lowp, "o", dtype=dtype)
    return o, ref32


@contextlib.contextmanager
def no_host_reads():
    """Inside: every way a tensor's value reaches the host (item, tolist, cpu, numpy, bool/float/int) raises, so
    a loop that must not sync can be checked on the CPU."""
    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, host_read)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
