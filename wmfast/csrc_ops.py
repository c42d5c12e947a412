"""Python side of the CUDA C++ extension (csrc/): loading, fake (meta) kernels, autograd, public functions.

The binding (csrc/binding.cpp) registers these ops under `torch.ops.wmfast_cuda` (the Triton ops own the
`wmfast` namespace):

    layernorm_modulate_fwd(x, shift, scale, eps) -> (y, mean, rstd)
    layernorm_modulate_bwd(dy, x, shift, scale, mean, rstd) -> (dx, dshift, dscale)
    gated_residual_layernorm_modulate_fwd(residual, x, gate, shift, scale, eps) -> (y, out, mean, rstd)
    gated_residual_layernorm_modulate_bwd(dy, dout?, residual, x, gate, shift, scale, mean, rstd)
        -> (dresidual, dx, dgate, dshift, dscale)
    temporal_decode_step(q, k, v, k_cache!, v_cache!, t) -> o

Modulation tensors reach the kernels as [B, M, D] views with explicit strides (M = 1 per-sample, F per-frame,
L per-token); the public functions below accept the same shapes as `wmfast.ops` and do the view. This module
adds fake implementations (so torch.compile(fullgraph=True) traces the ops) and autograd for the AdaLN
forwards. The extension is `wmfast._C` (built by setup.py), or, with WMFAST_CUDA_JIT=1, a JIT build of csrc/
through torch.utils.cpp_extension.load (development: edit a .cu, re-run, only changed files recompile).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger("wmfast")

NAMESPACE = "wmfast_cuda"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the kernels take (csrc/adaln/adaln.h, csrc/temporal_attention/temporal_decode.h).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ADALN_MAX_D_FWD = 8192
ADALN_MAX_D_BWD = 4096
ADALN_MAX_D_BWD_UNALIGNED = 2048
DECODE_HEAD_DIMS = (32, 64, 128)


def build_module():
    """The checkout's wmfast_build.py (the build logic setup.py uses), loaded by path: it is not installed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("wmfast_build", os.path.join(REPO, "wmfast_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_build():
    """Build csrc/ with torch.utils.cpp_extension.load (cached under TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import load

    build = build_module()
    note = build.host_compiler()
    if note:
        print(note)
    cu, binding = build.cuda_sources(REPO)
    args = build.extension_args(REPO)
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


# ------------------------------------------------------------------------------------------------- support checks
def _adaln_vec(dtype: torch.dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def supports_adaln(x: torch.Tensor, *mods: torch.Tensor, backward: bool | None = None) -> tuple[bool, str]:
    """(ok, reason) for running the CUDA AdaLN kernels on these tensors. `backward=None`: the backward is
    needed when any input requires grad."""
    if x.device.type != "cuda":
        return False, f"CUDA kernels need CUDA tensors, got {x.device}"
    if x.dtype not in DTYPES:
        return False, f"dtype {x.dtype} not supported"
    if x.dim() != 3:
        return False, f"x must be [B, L, D], got {tuple(x.shape)}"
    D = x.shape[-1]
    if D > ADALN_MAX_D_FWD:
        return False, f"D = {D} > {ADALN_MAX_D_FWD}"
    if backward is None:
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *mods))
    if backward:
        limit = ADALN_MAX_D_BWD if D % _adaln_vec(x.dtype) == 0 else ADALN_MAX_D_BWD_UNALIGNED
        if D > limit:
            return False, f"backward needs D <= {limit}, got D = {D}"
    return True, "ok"


def supports_temporal_decode(q: torch.Tensor) -> tuple[bool, str]:
    if q.device.type != "cuda":
        return False, f"CUDA kernels need CUDA tensors, got {q.device}"
    if q.dtype not in DTYPES:
        return False, f"dtype {q.dtype} not supported"
    if q.shape[-1] not in DECODE_HEAD_DIMS:
        return False, f"head dim {q.shape[-1]} not in {DECODE_HEAD_DIMS}"
    return True, "ok"


# --------------------------------------------------------------------------------------------- public functions
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


@functools.cache
def _log_fallback(message: str) -> None:
    logger.info(message)


def _fallback_adaln(D: int):
    """The Triton kernels when usable (CUDA tensors here) and the row fits them (D <= MAX_D: wider rows spill,
    kernels/adaln.py), else the torch references."""
    from wmfast.backend import triton_available
    from wmfast.kernels import adaln as k

    if triton_available()[0] and D <= k.MAX_D:
        return k.layernorm_modulate_op, k.gated_residual_layernorm_modulate_op, "triton"
    if D > k.MAX_D:
        return None, None, f"the torch reference (D = {D} > the Triton kernels' MAX_D = {k.MAX_D})"
    return None, None, "torch"


def layernorm_modulate(x, shift, scale, *, eps=1e-6, frame_len=None):
    """y = LayerNorm(x) * (1 + scale) + shift on the CUDA kernel. x: [B, L, D]; shift/scale: [B, D],
    [B, 1, D], [B, F, D] (with frame_len) or [B, L, D], any strides. Differentiable. Shapes the kernel does
    not take (supports_adaln) go to Triton, else the reference, with one log line."""
    ok, why = supports_adaln(x, shift, scale)
    if not ok:
        op, _, name = _fallback_adaln(x.shape[-1])
        _log_fallback(f"wmfast: layernorm_modulate: CUDA kernel skipped ({why}); using {name}")
        if op is not None:
            return op(x, shift, scale, float(eps), frame_len or 0)
        from wmfast.kernels.adaln import layernorm_modulate_ref

        return layernorm_modulate_ref(x, shift, scale, eps=eps, frame_len=frame_len)
    shift3, scale3 = _mods(x, (("shift", shift), ("scale", scale)), frame_len)
    y, _, _ = getattr(torch.ops, NAMESPACE).layernorm_modulate_fwd(_act(x), shift3, scale3, float(eps))
    return y


def gated_residual_layernorm_modulate(residual, x, gate, shift, scale, *, eps=1e-6, frame_len=None):
    """(y, out): out = residual + gate * x, y = layernorm_modulate(out, shift, scale) from the fp32 out, on the
    CUDA kernel. Shapes as in layernorm_modulate; residual like x. Differentiable."""
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        # The kernel reads residual in x's dtype; a silent cast would hide the caller's mismatch (and copy).
        raise ValueError(f"residual dtype {residual.dtype} must be x's dtype {x.dtype}")
    ok, why = supports_adaln(x, residual, gate, shift, scale)
    if not ok:
        _, op, name = _fallback_adaln(x.shape[-1])
        _log_fallback(f"wmfast: gated_residual_layernorm_modulate: CUDA kernel skipped ({why}); using {name}")
        if op is not None:
            return op(residual, x, gate, shift, scale, float(eps), frame_len or 0)
        from wmfast.kernels.adaln import gated_residual_layernorm_modulate_ref

        return gated_residual_layernorm_modulate_ref(residual, x, gate, shift, scale, eps=eps, frame_len=frame_len)
    gate3, shift3, scale3 = _mods(x, (("gate", gate), ("shift", shift), ("scale", scale)), frame_len)
    y, out, _, _ = getattr(torch.ops, NAMESPACE).gated_residual_layernorm_modulate_fwd(
        _act(residual), _act(x), gate3, shift3, scale3, float(eps))
    return y, out


def temporal_decode_step(q, k, v, k_cache, v_cache, t: int):
    """Write k, v ([B, 1, S, H, Dh]) at position t of k_cache, v_cache ([B, S, H, T_max, Dh], in place) and
    return the new frame's attention over positions <= t, [B, 1, S, H, Dh]. Head dims 32, 64, 128."""
    ok, why = supports_temporal_decode(q)
    if not ok:
        from wmfast.backend import triton_available

        if triton_available()[0]:
            from wmfast.kernels.temporal_attention import temporal_decode_op as op
        else:
            from wmfast.kernels.temporal_attention import temporal_decode_ref as op
        _log_fallback(f"wmfast: temporal_decode_step: CUDA kernel skipped ({why}); using {op.__name__}")
        return op(q, k, v, k_cache, v_cache, t)
    return getattr(torch.ops, NAMESPACE).temporal_decode_step(q, k, v, k_cache, v_cache, int(t))
