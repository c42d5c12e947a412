"""Public factorized attention ops on [B, T, S, H, Dh] tensors (validation + backend dispatch).

- spatial_attention: bidirectional within each frame; flash-attn when importable (CUDA, fp16/bf16), else
  PyTorch SDPA. Both read [B*T, S, H, Dh] views of the inputs (no copies beyond what the backend needs).
- temporal_attention: over T at each (b, s, h); the Triton kernel of wmfast.kernels.temporal_attention
  ("triton") or the pure-torch reference ("torch").
- temporal_decode_step: the cached decode step; "cuda" (wmfast.ops.cuda_ext, when built), "triton" or "torch".

Backends are chosen by wmfast.ops.dispatch; `use_backend("torch"|"triton"|"cuda")` or WMFAST_BACKEND forces one
(for spatial attention, "torch" forces SDPA). See docs/attention.md.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from wmfast.kernels.temporal_attention import (
    MAX_DECODE_T,
    MAX_T,
    temporal_attention_op,
    temporal_attention_ref,
    temporal_decode_op,
    temporal_decode_ref,
)
from wmfast.kernels.tuning import decode_shape_key
from wmfast.ops import cuda_ext
from wmfast.ops.common import DTYPE_NAMES, DTYPES
from wmfast.ops.common import describe as _shape
from wmfast.ops.dispatch import OpInputs, forced_backend, traceable_backend


def _check_same(op: str, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], ndim: int, layout: str):
    """ValueError naming the argument unless all tensors are `ndim`-D, same shape/dtype/device, Dh contiguous."""
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor) or x.dim() != ndim:
            got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{op}: {name} must be a {ndim}-D tensor {layout}, got {got}")
        if x.dtype not in DTYPES:
            raise ValueError(f"{op}: {name} dtype {x.dtype} not supported ({DTYPE_NAMES})")
        if x.shape[-1] > 0 and x.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a contiguous head dim (stride(-1) == 1), got {_shape(x)}")
    first, x0 = names[0], tensors[0]
    for name, x in zip(names[1:], tensors[1:]):
        if x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"{op}: {name} {_shape(x)} does not match {first} {_shape(x0)}")


def _check_qkv(op: str, q, k, v, max_t: int | None = None) -> None:
    _check_same(op, ("q", "k", "v"), (q, k, v), 5, "[B, T, S, H, Dh]")
    if max_t is not None and q.shape[1] > max_t:
        raise ValueError(f"{op}: T = {q.shape[1]} frames (q {tuple(q.shape)}) exceeds the kernel's limit of "
                         f"{max_t}: all T keys of a row are held in registers")


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - absent or built against another torch: SDPA serves instead
        return None
    return flash_attn_func


def _use_flash_attn(q) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and forced_backend() != "torch" and _flash_attn_func() is not None)


def spatial_attention(q, k, v):
    """Bidirectional attention within each frame. q, k, v: [B, T, S, H, Dh] -> [B, T, S, H, Dh].

    flash-attn (`flash_attn_func` on [B*T, S, H, Dh] views) when importable for CUDA fp16/bf16 tensors;
    otherwise SDPA on [B*T, H, S, Dh] transposed views, where PyTorch picks its flash, memory-efficient or
    cuDNN kernel on GPU (all read strided inputs with a contiguous head dim) and the math kernel on CPU."""
    _check_qkv("spatial_attention", q, k, v)
    B, T, S, H, Dh = q.shape
    if _use_flash_attn(q):
        o = _flash_attn_func()(*(x.reshape(B * T, S, H, Dh) for x in (q, k, v)))  # [B*T, S, H, Dh]
        return o.reshape(B, T, S, H, Dh)
    q2, k2, v2 = (x.reshape(B * T, S, H, Dh).transpose(1, 2) for x in (q, k, v))  # views: [B*T, H, S, Dh]
    o = F.scaled_dot_product_attention(q2, k2, v2)  # [B*T, H, S, Dh]
    return o.transpose(1, 2).reshape(B, T, S, H, Dh)


def temporal_attention(q, k, v, *, causal=True):
    """Attention over T at each (b, s, h). q, k, v: [B, T, S, H, Dh] -> [B, T, S, H, Dh], T <= 16.

    Any strides with a contiguous head dim (e.g. views of a fused qkv [B, T, S, 3, H, Dh]); softmax scale
    Dh**-0.5; causal: frame t attends to frames <= t. Differentiable on every backend."""
    _check_qkv("temporal_attention", q, k, v, MAX_T)
    backend = traceable_backend("temporal_attention", OpInputs.of(q))
    if backend == "triton":
        return temporal_attention_op(q, k, v, bool(causal))
    return temporal_attention_ref(q, k, v, causal=causal)


def _check_decode(q, k, v, k_cache, v_cache, t) -> None:
    op = "temporal_decode_step"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[1] != 1:
            raise ValueError(f"{op}: {name} must hold one frame [B, 1, S, H, Dh], got {tuple(x.shape)}")
    _check_qkv(op, q, k, v)
    _check_same(op, ("k_cache", "v_cache"), (k_cache, v_cache), 5, "[B, S, H, T_max, Dh]")
    B, _, S, H, Dh = q.shape
    Bc, Sc, Hc, T_max, Dc = k_cache.shape
    if (Bc, Sc, Hc, Dc) != (B, S, H, Dh) or k_cache.dtype != q.dtype or k_cache.device != q.device:
        raise ValueError(f"{op}: k_cache {_shape(k_cache)} must be [B, S, H, T_max, Dh] = [{B}, {S}, {H}, T_max, "
                         f"{Dh}] with q's dtype and device (q {_shape(q)})")
    if T_max > MAX_DECODE_T:
        raise ValueError(f"{op}: k_cache holds T_max = {T_max} positions (shape {tuple(k_cache.shape)}), more "
                         f"than the decode kernel's {MAX_DECODE_T}")
    if isinstance(t, torch.Tensor) or not isinstance(t, int) or isinstance(t, bool):
        raise ValueError(  # noqa: TRY004 - the project's contract: every bad argument is a ValueError
            f"{op}: t must be a Python int (a tensor index would force a host sync), got {type(t)}")
    if not 0 <= t < T_max:
        raise ValueError(f"{op}: t = {t} is outside the cache: k_cache {tuple(k_cache.shape)} has positions "
                         f"0..{T_max - 1}")


def _decode_shape_key(q, k_cache) -> str:
    """The decode step's shape class for the backend table / first-use timing, e.g.
    "B=1,S=1024,H=8,T_max=16,Dh=64,bf16"."""
    B, _, S, H, Dh = q.shape
    return decode_shape_key(B, S, H, k_cache.shape[3], Dh, q.dtype)


def _decode_backend(q, k, v, k_cache, v_cache, t) -> str:
    """The backend for this decode step: on CUDA tensors with both kernels usable, the measured-table entry or
    the faster one by first-use timing (per shape class), as for the AdaLN ops."""
    runners = None
    if not torch.compiler.is_compiling():  # no timing while tracing
        args = (q, k, v, k_cache, v_cache, t)

        def timed(fn):
            def run():
                with torch.no_grad():  # rewrites slot t of the caches with the same k, v: harmless
                    return fn(*args)

            return run

        runners = {"cuda": timed(cuda_ext.temporal_decode_step), "triton": timed(temporal_decode_op)}
    return traceable_backend("temporal_decode_step", OpInputs.of(q), shape_key=_decode_shape_key(q, k_cache),
                             runners=runners)


def temporal_decode_step(q, k, v, k_cache, v_cache, t: int):
    """Cached decode step: write k, v ([B, 1, S, H, Dh]) at position t of k_cache, v_cache
    ([B, S, H, T_max, Dh], updated in place) and attend the new frame's q over positions <= t.
    Returns [B, 1, S, H, Dh]. t is a Python int (no host sync). Inference only (no autograd)."""
    _check_decode(q, k, v, k_cache, v_cache, t)
    run = {"cuda": cuda_ext.temporal_decode_step, "triton": temporal_decode_op, "torch": temporal_decode_ref}
    return run[_decode_backend(q, k, v, k_cache, v_cache, t)](q, k, v, k_cache, v_cache, t)
