"""Public AdaLN-Zero ops: validate, pick a backend (`wmfast.ops.dispatch`), run it.

Backends: "triton" (the fused kernels of `wmfast.kernels.adaln`, registered with torch.library), "cuda" (the
CUDA C++ extension through `wmfast.ops.cuda_ext`, same names and semantics; layernorm_modulate and
gated_residual_layernorm_modulate) and "torch" (the fp32 references, which torch.compile traces natively).

Shapes: x, residual [B, L, D]; each of shift, scale, gate one of
    per-sample [B, D] or [B, 1, D];  per-frame [B, F, D] with frame_len (F * frame_len == L);  per-token [B, L, D].
Modulation may be a strided view (e.g. `mod.unbind(1)` of [B, 6, D] or [B, F, 6, D]) and fp32 while x is
bf16/fp16; the kernels read it through its strides and never copy it.

Every bad input raises ValueError (not TypeError, even for a non-tensor) naming the argument and the shapes,
before any kernel launch: one exception type for callers to catch.
"""
from __future__ import annotations

import operator

import torch

from wmfast.kernels import adaln as _k
from wmfast.kernels.tuning import adaln_shape_key
from wmfast.ops import cuda_ext
from wmfast.ops.common import DTYPES, check_eps, check_row_count
from wmfast.ops.common import shape as _shape
from wmfast.ops.dispatch import OpInputs, timing_runners, traceable_backend


def _check_x(name: str, x, like=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")  # noqa: TRY004
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, L, D], got shape {_shape(x)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {_shape(x)}")
    check_row_count(name, x)
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"{name} shape {_shape(x)} != x shape {_shape(like)}")
        if x.dtype != like.dtype:
            raise ValueError(f"{name} dtype {x.dtype} != x dtype {like.dtype}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device}, x on {like.device}")


def _check_frame_len(frame_len, x) -> int | None:
    """frame_len as a Python int (numpy / 0-d integer tensors accepted), or None."""
    if frame_len is None:
        return None
    try:
        value = None if isinstance(frame_len, bool) else operator.index(frame_len)
    except TypeError:
        value = None
    if value is None or value <= 0:
        raise ValueError(f"frame_len must be a positive int, got {frame_len!r}")
    frame_len = value
    L = x.shape[1]
    if L % frame_len != 0:
        raise ValueError(f"L={L} (x shape {_shape(x)}) is not a multiple of frame_len={frame_len}")
    return frame_len


def _check_mod(name: str, mod, x, frame_len) -> None:
    """Per-sample [B, D] / [B, 1, D], per-frame [B, F, D] (needs frame_len, F * frame_len == L), per-token [B, L, D]."""
    B, L, D = x.shape
    if not isinstance(mod, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(mod).__name__}")  # noqa: TRY004
    if mod.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{name} dtype {mod.dtype} must be x's dtype {x.dtype} or float32")
    if mod.device != x.device:
        raise ValueError(f"{name} is on {mod.device}, x on {x.device}")
    if mod.dim() not in (2, 3) or mod.shape[0] != B or mod.shape[-1] != D:
        raise ValueError(f"{name} shape {_shape(mod)} must be [B, D], [B, 1, D], [B, F, D] or [B, L, D] "
                         f"with B={B}, D={D} (x shape {_shape(x)})")
    if mod.dim() == 2 or mod.shape[1] in (1, L):
        return
    n = mod.shape[1]
    if frame_len is None:
        raise ValueError(f"{name} shape {_shape(mod)} is per-frame (F={n}, neither 1 nor L={L}): "
                         f"frame_len is required")
    if n * frame_len != L:
        raise ValueError(f"{name} shape {_shape(mod)}: F={n} frames * frame_len={frame_len} != L={L} "
                         f"(x shape {_shape(x)})")



def _shape_key(x, mods, grad: bool = False) -> str:
    """The shape class for the backend table / first-use timing, e.g. "B=1,L=1536,D=3072,bf16,per-frame";
    ",grad" is appended when the call needs a backward (the choice is then timed forward + backward)."""
    B, L, D = x.shape
    kinds = []
    for m in mods:
        n = 1 if m.dim() == 2 else m.shape[1]
        kind = "per-sample" if n == 1 else "per-token" if n == L else "per-frame"
        if kind not in kinds:
            kinds.append(kind)
    return adaln_shape_key(B, L, D, x.dtype, kinds, grad)


def _run(op: str, x, mods, impls, tensors):
    """Run `op` on the backend dispatch picks. `impls(*tensors)` -> backend -> zero-argument call of the op on
    those tensors: the same table runs the call and, on CUDA tensors with no measured table entry, the one-time
    timing of the usable kernels (on detached copies). `tensors` (the op's inputs, in the order `impls` takes
    them) say whether a backward is needed, which the backend must support and which is then timed too."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    inputs, key = OpInputs.of(x, backward=grad), _shape_key(x, mods, grad)
    runners = None if torch.compiler.is_compiling() else timing_runners(impls, tensors, grad)
    backend = traceable_backend(op, inputs, shape_key=key, runners=runners)
    return impls(*tensors)[backend]()


def layernorm_modulate(x, shift, scale, *, eps=1e-6, frame_len=None):
    """y = LayerNorm(x; no affine, eps) * (1 + scale) + shift, in fp32, cast to x.dtype.

    x: [B, L, D] (bf16, fp16, fp32). shift, scale: [B, D], [B, 1, D], [B, F, D] (with frame_len) or [B, L, D],
    x's dtype or fp32, any strides. Returns y: [B, L, D] in x.dtype. Differentiable in x, shift and scale."""
    _check_x("x", x)
    check_eps(eps)
    frame_len = _check_frame_len(frame_len, x)
    _check_mod("shift", shift, x, frame_len)
    _check_mod("scale", scale, x, frame_len)
    return _run("layernorm_modulate", x, (shift, scale), lambda x, shift, scale: {
        "triton": lambda: _k.layernorm_modulate_op(x, shift, scale, float(eps), frame_len or 0),
        "cuda": lambda: cuda_ext.layernorm_modulate(x, shift, scale, eps=eps, frame_len=frame_len),
        "torch": lambda: _k.layernorm_modulate_ref(x, shift, scale, eps=eps, frame_len=frame_len)}, (x, shift, scale))


def gated_residual(residual, x, gate, *, frame_len=None):
    """out = residual + gate * x, in fp32, cast to x.dtype.

    residual, x: [B, L, D] (same shape and dtype). gate: [B, D], [B, 1, D], [B, F, D] (with frame_len) or
    [B, L, D], x's dtype or fp32, any strides. Returns out: [B, L, D]. Differentiable in all three."""
    _check_x("x", x)
    _check_x("residual", residual, like=x)
    frame_len = _check_frame_len(frame_len, x)
    _check_mod("gate", gate, x, frame_len)
    return _run("gated_residual", x, (gate,), lambda residual, x, gate: {
        "triton": lambda: _k.gated_residual_op(residual, x, gate, frame_len or 0),
        "torch": lambda: _k.gated_residual_ref(residual, x, gate, frame_len=frame_len)}, (residual, x, gate))


def gated_residual_layernorm_modulate(residual, x, gate, shift, scale, *, eps=1e-6, frame_len=None):
    """(y, out): out = residual + gate * x and y = LayerNorm(out) * (1 + scale) + shift, in one pass.

    y is normalised from the fp32 `out` (before its cast to x.dtype). residual, x: [B, L, D]; gate, shift,
    scale: [B, D], [B, 1, D], [B, F, D] (with frame_len) or [B, L, D], each x's dtype or fp32, any strides.
    Returns y, out: [B, L, D] in x.dtype. Differentiable in all five tensors."""
    _check_x("x", x)
    _check_x("residual", residual, like=x)
    check_eps(eps)
    frame_len = _check_frame_len(frame_len, x)
    for name, mod in (("gate", gate), ("shift", shift), ("scale", scale)):
        _check_mod(name, mod, x, frame_len)
    op = "gated_residual_layernorm_modulate"
    return _run(op, x, (gate, shift, scale), lambda residual, x, gate, shift, scale: {
        "triton": lambda: _k.gated_residual_layernorm_modulate_op(residual, x, gate, shift, scale, float(eps),
                                                                  frame_len or 0),
        "cuda": lambda: cuda_ext.gated_residual_layernorm_modulate(residual, x, gate, shift, scale, eps=eps,
                                                                   frame_len=frame_len),
        "torch": lambda: _k.gated_residual_layernorm_modulate_ref(residual, x, gate, shift, scale, eps=eps,
                                                                  frame_len=frame_len)},
        (residual, x, gate, shift, scale))
