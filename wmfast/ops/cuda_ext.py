"""The CUDA C++ extension (csrc/): loading, its limits, fake (meta) kernels, autograd, and the raw functions.

The binding (csrc/binding.cpp) registers these ops under `torch.ops.wmfast_cuda` (the Triton ops own the
`wmfast` namespace):

    layernorm_modulate_fwd(x, shift, scale, eps) -> (y, mean, rstd)
    layernorm_modulate_bwd(dy, x, shift, scale, mean, rstd) -> (dx, dshift, dscale)
    gated_residual_layernorm_modulate_fwd(residual, x, gate, shift, scale, eps) -> (y, out, mean, rstd)
    gated_residual_layernorm_modulate_bwd(dy, dout?, residual, x, gate, shift, scale, mean, rstd)
        -> (dresidual, dx, dgate, dshift, dscale)
    temporal_decode_step(q, k, v, k_cache!, v_cache!, t) -> o
    limits() -> (names, values)      the kernels' limits, from the headers' constants

Modulation tensors reach the kernels as [B, M, D] views with explicit strides (M = 1 per-sample, F per-frame,
L per-token); the functions below accept the same shapes as `wmfast.ops` and do the view. They run the CUDA
kernels and nothing else: which backend runs a call is `wmfast.ops.dispatch`'s decision, which reads
`limits()` through `unsupported_reasons`. This module adds fake implementations (so
torch.compile(fullgraph=True) traces the ops) and autograd for the AdaLN forwards. The extension is
`wmfast._C` (built by setup.py), or, with WMFAST_CUDA_JIT=1, a JIT build of csrc/ through
torch.utils.cpp_extension.load (development: edit a .cu, re-run, only changed files recompile).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from wmfast.ops import cuda_build

NAMESPACE = "wmfast_cuda"

# What the binding accepts (to_dtype in csrc/binding.cpp).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _jit_build():
    """Build csrc/ with torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import load

    root = cuda_build.csrc_root()
    note = cuda_build.host_compiler()
    if note:
        print(note)
    cu, binding = cuda_build.cuda_sources(root)
    args = cuda_build.extension_args(root)
    load(name="wmfast_cuda_jit", sources=cu + [binding], extra_cflags=args["extra_compile_args"]["cxx"],
         extra_cuda_cflags=args["extra_compile_args"]["nvcc"], extra_include_paths=args["include_dirs"],
         is_python_module=False, verbose=os.environ.get("WMFAST_CUDA_JIT_VERBOSE", "0") == "1")


@functools.cache
def load() -> tuple[bool, str]:
    """(loaded, reason): import wmfast._C (or JIT-build csrc/ when WMFAST_CUDA_JIT=1) and register the Python
    side of its ops. Never raises: the reason says what is missing."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    try:
        import wmfast._C  # noqa: F401  (registers torch.ops.wmfast_cuda)
        how = "wmfast._C"
    except ImportError as e:
        if os.environ.get("WMFAST_CUDA_JIT", "0") != "1":
            return False, (f"wmfast._C not built ({e}); reinstall on a CUDA machine with "
                           "`pip install --no-build-isolation -e .`, or set WMFAST_CUDA_JIT=1 to JIT-build csrc/")
        try:
            _jit_build()
        except Exception as jit_error:  # noqa: BLE001 - any build failure leaves the backend unusable
            return False, f"WMFAST_CUDA_JIT=1 but the JIT build of csrc/ failed: {jit_error}"
        how = "JIT build of csrc/"
    register_python_side(NAMESPACE)
    return True, f"{how} loaded"


@functools.cache
def available() -> tuple[bool, str]:
    """(usable, reason) for the extension on this machine; loading it also registers its fake/autograd functions."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (the extension needs a CUDA build of torch)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return load()


# ------------------------------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class Limits:
    """The kernels' limits (csrc/adaln/adaln.h, csrc/temporal_attention/temporal_decode.h)."""

    adaln_max_d_fwd: int
    adaln_max_d_bwd: int
    adaln_max_d_bwd_unaligned: int  # the scalar path, when D * element size is not a multiple of 16 bytes
    decode_head_dims: tuple[int, ...]

    @classmethod
    def from_pairs(cls, names, values) -> Limits:
        """From the (names, values) the binding's `limits` op returns (a name may repeat: a list)."""
        got: dict[str, list[int]] = {}
        for name, value in zip(names, values):
            got.setdefault(name, []).append(int(value))
        return cls(adaln_max_d_fwd=got["adaln_max_d_fwd"][0], adaln_max_d_bwd=got["adaln_max_d_bwd"][0],
                   adaln_max_d_bwd_unaligned=got["adaln_max_d_bwd_unaligned"][0],
                   decode_head_dims=tuple(got["decode_head_dim"]))


@functools.cache
def limits(ns: str | None = None) -> Limits:
    """The limits the loaded extension (namespace `ns`, default NAMESPACE) was built with."""
    names, values = getattr(torch.ops, ns or NAMESPACE).limits()
    return Limits.from_pairs(names, values)


def _adaln_vec(dtype: torch.dtype) -> int:
    return 16 // dtype.itemsize


def adaln_reasons(D: int, dtype: torch.dtype, backward: bool, lim: Limits) -> list[str]:
    """Why the AdaLN kernels cannot take rows of width D in `dtype` (forward, and backward when `backward`)."""
    if dtype not in DTYPES:
        return [f"dtype {dtype} not supported"]
    if D > lim.adaln_max_d_fwd:
        return [f"D = {D} > {lim.adaln_max_d_fwd}"]
    if backward:
        limit = lim.adaln_max_d_bwd if D % _adaln_vec(dtype) == 0 else lim.adaln_max_d_bwd_unaligned
        if D > limit:
            return [f"backward needs D <= {limit}, got D = {D}"]
    return []


def decode_reasons(Dh: int, dtype: torch.dtype, lim: Limits) -> list[str]:
    """Why the decode kernel cannot take head dim Dh in `dtype`."""
    if dtype not in DTYPES:
        return [f"dtype {dtype} not supported"]
    if Dh not in lim.decode_head_dims:
        return [f"head dim {Dh} not in {lim.decode_head_dims}"]
    return []


# ---------------------------------------------------------------------------------------------- fake + autograd
@functools.cache
def register_python_side(ns: str = NAMESPACE) -> None:
    """Fake (meta) implementations and autograd for the ops of namespace `ns` (the tests also run this on
    a CPU stand-in namespace with the same schemas, so the wiring is checked without a GPU)."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::layernorm_modulate_fwd")
    def _ln_fwd_fake(x, shift, scale, eps):
        B, L, D = x.shape
        return x.new_empty(B, L, D), x.new_empty(B, L, dtype=torch.float32), x.new_empty(B, L, dtype=torch.float32)

    @torch.library.register_fake(f"{ns}::layernorm_modulate_bwd")
    def _ln_bwd_fake(dy, x, shift, scale, mean, rstd):
        return x.new_empty(x.shape), shift.new_empty(shift.shape), scale.new_empty(scale.shape)

    @torch.library.register_fake(f"{ns}::gated_residual_layernorm_modulate_fwd")
    def _grln_fwd_fake(residual, x, gate, shift, scale, eps):
        B, L, D = x.shape
        stats = (x.new_empty(B, L, dtype=torch.float32), x.new_empty(B, L, dtype=torch.float32))
        return (x.new_empty(B, L, D), x.new_empty(B, L, D)) + stats

    @torch.library.register_fake(f"{ns}::gated_residual_layernorm_modulate_bwd")
    def _grln_bwd_fake(dy, dout, residual, x, gate, shift, scale, mean, rstd):
        return (x.new_empty(x.shape), x.new_empty(x.shape), gate.new_empty(gate.shape), shift.new_empty(shift.shape),
                scale.new_empty(scale.shape))

    @torch.library.register_fake(f"{ns}::temporal_decode_step")
    def _decode_fake(q, k, v, k_cache, v_cache, t):
        return q.new_empty(q.shape)

    def ln_setup(ctx, inputs, output):
        x, shift, scale, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, shift, scale, mean, rstd)

    def ln_backward(ctx, dy, _dmean, _drstd):
        x, shift, scale, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy
        dx, dshift, dscale = ops.layernorm_modulate_bwd(dy.contiguous(), x, shift, scale, mean, rstd)
        return dx, dshift, dscale, None

    def grln_setup(ctx, inputs, output):
        residual, x, gate, shift, scale, _ = inputs
        _, _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(residual, x, gate, shift, scale, mean, rstd)

    def grln_backward(ctx, dy, dout, _dmean, _drstd):
        residual, x, gate, shift, scale, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy
        dout = None if dout is None else dout.contiguous()
        grads = ops.gated_residual_layernorm_modulate_bwd(dy.contiguous(), dout, residual, x, gate, shift, scale,
                                                          mean, rstd)
        return (*grads, None)

    torch.library.register_autograd(f"{ns}::layernorm_modulate_fwd", ln_backward, setup_context=ln_setup)
    torch.library.register_autograd(f"{ns}::gated_residual_layernorm_modulate_fwd", grln_backward,
                                    setup_context=grln_setup)


# ------------------------------------------------------------------------------------------------ raw functions
def _mod3(name: str, mod: torch.Tensor, x: torch.Tensor, frame_len: int | None) -> torch.Tensor:
    """A [B, M, D] view of a modulation tensor ([B, D], [B, 1, D], [B, F, D] with frame_len, [B, L, D])."""
    B, L, D = x.shape
    if mod.dim() == 2:
        mod = mod.unsqueeze(1)
    if mod.dim() != 3 or mod.shape[0] != B or mod.shape[2] != D:
        raise ValueError(f"{name}: expected [B, D] or [B, M, D] with B={B}, D={D}; got {tuple(mod.shape)}")
    M = mod.shape[1]
    if M not in (1, L) and (frame_len is None or M * frame_len != L):
        raise ValueError(f"{name}: {M} modulation rows for L={L} tokens needs frame_len with M * frame_len == L "
                         f"(frame_len={frame_len})")
    return mod


def _mods(x, named, frame_len):
    mods = [_mod3(n, m, x, frame_len) for n, m in named]
    dtypes = {m.dtype for m in mods}
    if len(dtypes) > 1 or not dtypes <= {x.dtype, torch.float32}:
        # The kernels read one modulation dtype, x's or fp32; mixed inputs are promoted (a copy, rare).
        mods = [m.float() for m in mods]
    return mods


def _act(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _ops():
    return getattr(torch.ops, NAMESPACE)


def layernorm_modulate(x, shift, scale, *, eps=1e-6, frame_len=None):
    """y = LayerNorm(x) * (1 + scale) + shift on the CUDA kernel. x: [B, L, D]; shift/scale: [B, D],
    [B, 1, D], [B, F, D] (with frame_len) or [B, L, D], any strides. Differentiable."""
    shift3, scale3 = _mods(x, (("shift", shift), ("scale", scale)), frame_len)
    y, _, _ = _ops().layernorm_modulate_fwd(_act(x), shift3, scale3, float(eps))
    return y


def gated_residual_layernorm_modulate(residual, x, gate, shift, scale, *, eps=1e-6, frame_len=None):
    """(y, out): out = residual + gate * x, y = layernorm_modulate(out, shift, scale) from the fp32 out, on the
    CUDA kernel. Shapes as in layernorm_modulate; residual like x. Differentiable."""
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        # The kernel reads residual in x's dtype; a silent cast would hide the caller's mismatch (and copy).
        raise ValueError(f"residual dtype {residual.dtype} must be x's dtype {x.dtype}")
    gate3, shift3, scale3 = _mods(x, (("gate", gate), ("shift", shift), ("scale", scale)), frame_len)
    y, out, _, _ = _ops().gated_residual_layernorm_modulate_fwd(_act(residual), _act(x), gate3, shift3, scale3,
                                                                float(eps))
    return y, out


def temporal_decode_step(q, k, v, k_cache, v_cache, t: int):
    """Write k, v ([B, 1, S, H, Dh]) at position t of k_cache, v_cache ([B, S, H, T_max, Dh], in place) and
    return the new frame's attention over positions <= t, [B, 1, S, H, Dh]."""
    return _ops().temporal_decode_step(q, k, v, k_cache, v_cache, int(t))
