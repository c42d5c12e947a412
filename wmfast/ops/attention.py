"""Public factorized attention ops on [B, T, S, H, Dh] tensors (validation + backend dispatch).

- spatial_attention: bidirectional within each frame, on [B*T, S, H, Dh] views of the inputs (no copies beyond
  what the backend needs). On CUDA the fastest of SDPA's cuDNN, flash and memory-efficient kernels and
  flash-attn (when importable) for the shape class: the measured table's entry, else timed once at first use;
  on the CPU, SDPA with PyTorch's own pick.
- temporal_attention: over T at each (b, s, h); the Triton kernel of wmfast.kernels.temporal_attention
  ("triton") or the pure-torch reference ("torch").
- temporal_decode_step: the cached decode step; "cuda" (wmfast.ops.cuda_ext, when built), "triton" or "torch".

Backends are chosen by wmfast.ops.dispatch; `use_backend("torch"|"triton"|"cuda")` or WMFAST_BACKEND forces one
(for spatial attention, "torch" leaves the kernel to SDPA's own pick). See docs/attention.md.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wmfast.kernels import tuning
from wmfast.kernels.temporal_attention import (
    MAX_DECODE_T,
    MAX_T,
    temporal_attention_op,
    temporal_attention_ref,
    temporal_decode_op,
    temporal_decode_ref,
)
from wmfast.kernels.tuning import decode_shape_key, spatial_shape_key
from wmfast.ops import cuda_ext, dispatch
from wmfast.ops.common import DTYPE_NAMES, DTYPES, check_disjoint, check_flag, check_row_count, log_once, logger
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
        if x.shape[-1] == 0:
            raise ValueError(f"{op}: {name} has a zero-width head dim (Dh = 0), got {_shape(x)}")
        if x.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a contiguous head dim (stride(-1) == 1), got {_shape(x)}")
    first, x0 = names[0], tensors[0]
    for name, x in zip(names[1:], tensors[1:]):
        if x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"{op}: {name} {_shape(x)} does not match {first} {_shape(x0)}")


def _check_qkv(op: str, q, k, v, max_t: int | None = None) -> None:
    """q, k, v alike (see _check_same); for the temporal kernels (max_t given, or the decode step's T = 1), at most
    max_t frames and MAX_ROWS (b, s, h) rows."""
    _check_same(op, ("q", "k", "v"), (q, k, v), 5, "[B, T, S, H, Dh]")
    if max_t is None:
        return
    if q.shape[1] > max_t:
        raise ValueError(f"{op}: T = {q.shape[1]} frames (q {tuple(q.shape)}) exceeds the kernel's limit of "
                         f"{max_t}: all T keys of a row are held in registers")
    B, _, S, H, _ = q.shape
    check_row_count(f"{op}: q", q, B * S * H, "(b, s, h) rows")


@functools.cache
def _flash_attn_func():
    """flash-attn's `flash_attn_func`, or None: absent, built against another torch, or older than 2.7, whose
    forward is not a registered torch op (torch.ops.flash_attn._flash_attn_forward): selective activation
    checkpointing could not keep its output (it would be recomputed in the backward) and torch.compile would
    break the graph there."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - absent or built against another torch: SDPA serves instead
        return None
    if not hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
        log_once("wmfast: flash-attn older than 2.7 (no torch.ops.flash_attn op): spatial attention uses SDPA")
        return None
    return flash_attn_func


# ---------------------------------------------------------------------------------------- spatial attention
# Spatial attention's kernels, by the names of the measured table and the benchmark rows. "sdpa" is SDPA with
# PyTorch's own pick (the CPU, use_backend("torch"), and the fallback); the others pin one kernel.
SDPA_KERNELS = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
SPATIAL_BACKENDS = ("flash-attn", *SDPA_KERNELS, "sdpa")
_SPATIAL_TIMED: dict[tuple[str | None, str], str] = {}  # (gpu, shape key) -> fastest backend, from first use


def _spatial_candidates(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, ...]:
    """The kernels first-use timing chooses among: on CUDA the three SDPA kernels, and flash-attn first when it
    is importable for fp16/bf16 with Dh <= 256; elsewhere only "sdpa"."""
    if device.type != "cuda":
        return ("sdpa",)
    flash = dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and _flash_attn_func() is not None
    return ("flash-attn",) * flash + tuple(SDPA_KERNELS)


def _spatial_default(candidates: tuple[str, ...]) -> str:
    """Without a measurement: flash-attn when it is a candidate, else SDPA's own pick (the behaviour before
    measured choices, and what a shape no kernel was timed on gets)."""
    return "flash-attn" if "flash-attn" in candidates else "sdpa"


def _spatial_run(backend: str, q, k, v):
    """q, k, v [B, T, S, H, Dh] -> [B, T, S, H, Dh] on one backend, through [B*T, S, H, Dh] views."""
    B, T, S, H, Dh = q.shape
    if backend == "flash-attn":
        o = _flash_attn_func()(*(x.reshape(B * T, S, H, Dh) for x in (q, k, v)))  # [B*T, S, H, Dh]
        return o.reshape(B, T, S, H, Dh)
    q2, k2, v2 = (x.reshape(B * T, S, H, Dh).transpose(1, 2) for x in (q, k, v))  # views: [B*T, H, S, Dh]
    if backend == "sdpa":
        o = F.scaled_dot_product_attention(q2, k2, v2)  # [B*T, H, S, Dh]
    else:
        with sdpa_kernel(SDPA_KERNELS[backend]):
            o = F.scaled_dot_product_attention(q2, k2, v2)
    return o.transpose(1, 2).reshape(B, T, S, H, Dh)


def _time_spatial(runners: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(median ms per backend, why each backend that raised was skipped). The runners are
    `dispatch.timing_runners`', which keep their backward out of an enclosing activation checkpoint."""
    times, failed = {}, {}
    for name, run in runners.items():
        try:
            times.update(dispatch.time_backends({name: run}))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run this shape ("No available kernel")
            first_line = (str(e).strip().splitlines() or [""])[0]
            failed[name] = f"{type(e).__name__}: {first_line[:120]}"
    return times, failed


def select_spatial_backend(device: torch.device, shape_key: str, candidates: tuple[str, ...],
                           runners: dict | None = None) -> str:
    """The backend for one spatial-attention shape class, in order: the measured table's entry for exactly this
    key (a kernel's support depends on the shape, so another shape's choice is not reused), the choice first-use
    timing cached in this process, a timing now (forward, + backward when grad is needed; a backend that raises is
    skipped; not while torch.compile traces, a CUDA graph captures or a dispatch mode records), else
    `_spatial_default`. Logged once per shape class."""
    if len(candidates) == 1:
        return candidates[0]
    gpu = tuning.device_gpu(device)
    measured = tuning.measured_backend(gpu, "spatial_attention", shape_key, exact=True) if gpu else None
    if measured in candidates:
        log_once(f"wmfast: spatial_attention {shape_key} on {gpu}: {measured} (measured table)")
        return measured
    cached = _SPATIAL_TIMED.get((gpu, shape_key))
    if cached is not None:
        return cached
    if runners is None or not dispatch.timing_allowed():
        return _spatial_default(candidates)
    times, failed = _time_spatial({name: runners[name] for name in candidates})
    best = min(times, key=times.get) if times else _spatial_default(candidates)
    _SPATIAL_TIMED[(gpu, shape_key)] = best
    timed = ", ".join(f"{n} {t:.3f} ms" for n, t in times.items())
    skipped = "".join(f"; {n} skipped ({why})" for n, why in failed.items())
    logger.info("wmfast: spatial_attention %s on %s: timed %s%s -> %s", shape_key, gpu, timed or "nothing",
                skipped, best)
    return best


@torch.compiler.assume_constant_result
def _spatial_traced_choice(device: torch.device, dtype: torch.dtype, head_dim: int, shape_key: str) -> str:
    # evaluated once while torch.compile traces and baked into the graph: the table or an eager first use's cached
    # choice for this exact shape class, else SDPA's own pick (no timing; an unknown shape key is "")
    candidates = _spatial_candidates(device, dtype, head_dim)
    if not shape_key or len(candidates) == 1:
        return _spatial_default(candidates)
    return select_spatial_backend(device, shape_key, candidates)


def _spatial_backend(q, k, v) -> str:
    """The backend automatic dispatch runs this call on (use_backend("torch") or WMFAST_BACKEND=torch: "sdpa")."""
    if forced_backend() == "torch":
        return "sdpa"
    B, T, S, H, Dh = q.shape
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if torch.compiler.is_compiling():
        static = all(isinstance(d, int) for d in (B, T, S, H, Dh))  # a dynamic dimension: no shape class
        key = spatial_shape_key(B * T, H, S, Dh, q.dtype, grad) if static else ""
        return _spatial_traced_choice(q.device, q.dtype, int(Dh), key)
    candidates = _spatial_candidates(q.device, q.dtype, Dh)
    if len(candidates) == 1:
        return candidates[0]

    def factory(q, k, v):
        return {name: functools.partial(_spatial_run, name, q, k, v) for name in candidates}

    runners = dispatch.timing_runners(factory, (q, k, v), grad, candidates)
    return select_spatial_backend(q.device, spatial_shape_key(B * T, H, S, Dh, q.dtype, grad), candidates, runners)


def spatial_attention(q, k, v, *, backend: str | None = None):
    """Bidirectional attention within each frame. q, k, v: [B, T, S, H, Dh] -> [B, T, S, H, Dh].

    Runs on [B*T, S, H, Dh] views of the inputs (SDPA reads them as [B*T, H, S, Dh] transposed views: every
    kernel accepts strided inputs with a contiguous head dim). `backend` (one of SPATIAL_BACKENDS) pins a kernel:
    "flash-attn" (`flash_attn_func`), "sdpa-cudnn", "sdpa-flash", "sdpa-efficient" (SDPA under `sdpa_kernel`;
    RuntimeError where that kernel cannot run the inputs) or "sdpa" (PyTorch's own pick). None: on CUDA the
    fastest for this shape class (`select_spatial_backend`: the measured table, else a one-time timing at first
    use); on the CPU, or under use_backend("torch"), "sdpa"."""
    _check_qkv("spatial_attention", q, k, v)
    if backend is None:
        backend = _spatial_backend(q, k, v)
    elif backend not in SPATIAL_BACKENDS:
        raise ValueError(f"spatial_attention: backend={backend!r}, expected one of {', '.join(SPATIAL_BACKENDS)}")
    elif backend == "flash-attn" and "flash-attn" not in _spatial_candidates(q.device, q.dtype, q.shape[-1]):
        raise ValueError(f"spatial_attention: backend='flash-attn' needs flash_attn importable and CUDA fp16/bf16 "
                         f"inputs with Dh <= 256, got {_shape(q)}")
    return _spatial_run(backend, q, k, v)


def temporal_attention(q, k, v, *, causal=True):
    """Attention over T at each (b, s, h). q, k, v: [B, T, S, H, Dh] -> [B, T, S, H, Dh], T <= 16.

    Any strides with a contiguous head dim (e.g. views of a fused qkv [B, T, S, 3, H, Dh]); softmax scale
    Dh**-0.5; causal: frame t attends to frames <= t. Differentiable on every backend."""
    _check_qkv("temporal_attention", q, k, v, MAX_T)
    causal = check_flag("temporal_attention: causal", causal)
    backend = traceable_backend("temporal_attention", OpInputs.of(q))
    if backend == "triton":
        return temporal_attention_op(q, k, v, causal)
    return temporal_attention_ref(q, k, v, causal=causal)


def _check_decode(q, k, v, k_cache, v_cache, t) -> None:
    op = "temporal_decode_step"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[1] != 1:
            raise ValueError(f"{op}: {name} must hold one frame [B, 1, S, H, Dh], got {tuple(x.shape)}")
    _check_qkv(op, q, k, v, max_t=1)
    _check_same(op, ("k_cache", "v_cache"), (k_cache, v_cache), 5, "[B, S, H, T_max, Dh]")
    check_disjoint(op, ("k_cache", k_cache), ("v_cache", v_cache))  # both are written in place
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
    Returns [B, 1, S, H, Dh]. t is a Python int (no host sync). Inference only (no autograd). The caches must be
    separate memory (views of one buffer that share no element are fine): ValueError otherwise."""
    _check_decode(q, k, v, k_cache, v_cache, t)
    run = {"cuda": cuda_ext.temporal_decode_step, "triton": temporal_decode_op, "torch": temporal_decode_ref}
    return run[_decode_backend(q, k, v, k_cache, v_cache, t)](q, k, v, k_cache, v_cache, t)
