"""Temporal attention over T at each (b, s, h) of [B, T, S, H, Dh] tensors, and the cached decode step.

Reading order (STYLE.md): references, jit kernels, launchers, torch.library registration.

Why a custom kernel: in an ST-Transformer the temporal sequences are tiny (T <= 16 frames) and there are
many of them (B*S*H ~ 1e5). Flash kernels tile 64-128 positions per sequence, so at T = 5 they compute
mostly padding, and feeding them needs [B, T, S, H, Dh] -> [B*S, H, T, Dh] transposed copies of q, k, v and o
(the 1xgpt way). Here one program owns BLOCK_R consecutive (b, s, h) rows and keeps all T keys and values of
those rows in registers; q, k, v are read in place through their strides (only the head dim must be
contiguous), so views of one fused qkv projection [B, T, S, 3, H, Dh] need no copy. Consecutive rows are
consecutive (s, h) pairs, which for a fixed frame are adjacent Dh-vectors in memory: the loads coalesce.

T is far too small for tensor cores (tl.dot needs >= 16 along every dim), so scores and outputs are
broadcast-multiply-reduce on CUDA cores in fp32: per row 4*T*T*Dh flops against 8*T*Dh bytes (bf16 q, k, v,
o), i.e. T/2 <= 8 flop/byte, under the ~20 flop/byte of an H100's fp32 CUDA cores vs its HBM: memory bound,
which is what reading in place optimises.

The backward recomputes the T x T softmax per row from q and k (all in registers), so the forward saves
nothing but its inputs (no log-sum-exp, no output), and dq, dk, dv come from one pass without atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from wmfast.kernels._launch import launch_params, launcher, triton_interpret
from wmfast.kernels._launch import op as _register
from wmfast.kernels.tuning import decode_key, temporal_key

MAX_T = 16  # the register design keeps all T keys/values of a row in registers; beyond that, use a flash kernel
MAX_DECODE_T = 64  # decode cache length: positions 0..t of the cache are held in registers
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------
# References (the specification)
# ----------------------------------------------------------------------------------------------------------
def temporal_attention_ref(q, k, v, *, causal=True, upcast=True):
    """Reference. q, k, v: [B, T, S, H, Dh] -> o [B, T, S, H, Dh]; softmax scale Dh**-0.5.

    causal: frame t attends to frames <= t."""
    dt = torch.float32 if upcast else q.dtype
    T, Dh = q.shape[1], q.shape[-1]
    scores = torch.einsum("btshd,bushd->bshtu", q.to(dt), k.to(dt)) * Dh ** -0.5  # [B, S, H, T, T]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(dim=-1)
    return torch.einsum("bshtu,bushd->btshd", p, v.to(dt)).to(q.dtype)


def temporal_decode_ref(q, k, v, k_cache, v_cache, t: int, *, upcast=True):
    """Reference decode step. q, k, v: [B, 1, S, H, Dh] (the new frame); k_cache, v_cache:
    [B, S, H, T_max, Dh]. Writes k, v at position t (in place) and returns o [B, 1, S, H, Dh], the new
    frame attending to cached positions 0..t."""
    k_cache[:, :, :, t] = k[:, 0]
    v_cache[:, :, :, t] = v[:, 0]
    dt = torch.float32 if upcast else q.dtype
    Dh = q.shape[-1]
    kc, vc = k_cache[:, :, :, : t + 1].to(dt), v_cache[:, :, :, : t + 1].to(dt)  # [B, S, H, t+1, Dh]
    scores = torch.einsum("bshd,bshud->bshu", q[:, 0].to(dt), kc) * Dh ** -0.5
    o = torch.einsum("bshu,bshud->bshd", scores.softmax(dim=-1), vc)
    return o[:, None].to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _row_offsets(rows, S, H, stride_b, stride_s, stride_h):
    """Element offsets of rows r = (b*S + s)*H + h (h fastest) in a tensor with the given strides; int64
    because views of a packed qkv of a large batch pass 2**31 elements."""
    h = rows % H
    s = (rows // H) % S
    b = rows // (H * S)
    return b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + h.to(tl.int64) * stride_h


@triton.jit
def _softmax_row(q_i, k, i, t_idx, T, scale_log2, CAUSAL: tl.constexpr):
    """p [BLOCK_R, BLOCK_T]: softmax over positions u of (q_i . k_u) * scale, masked to u < T (and u <= i)."""
    s = tl.sum(q_i[:, None, :] * k, axis=2) * scale_log2  # [BLOCK_R, BLOCK_T], log2 domain
    valid = t_idx < T
    if CAUSAL:
        valid = valid & (t_idx <= i)
    s = tl.where(valid[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, axis=1)[:, None])  # position 0 is always valid: the max is finite
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _load_tile(X, rows, t_idx, d_idx, m3, S, H, sxb, sxt, sxs, sxh):
    """The [BLOCK_R, BLOCK_T, BLOCK_D] fp32 tile of rows `rows` over all T of a [B, T, S, H, Dh] tensor."""
    off = _row_offsets(rows, S, H, sxb, sxs, sxh)[:, None, None] + t_idx[None, :, None] * sxt + d_idx[None, None, :]
    return tl.load(X + off, mask=m3, other=0.0).to(tl.float32)


@triton.jit
def _temporal_attention_fwd_kernel(
    Q, K, V, O, R, T, S, H, Dh,
    sqb, sqt, sqs, sqh, skb, skt, sks, skh, svb, svt, svs, svh, sob, sot, sos, soh,
    scale_log2,
    CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale_log2 = tl.cast(scale_log2, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_idx = tl.arange(0, BLOCK_T)
    d_idx = tl.arange(0, BLOCK_D)
    m2 = (rows < R)[:, None] & (d_idx < Dh)[None, :]
    m3 = m2[:, None, :] & (t_idx < T)[None, :, None]
    k = _load_tile(K, rows, t_idx, d_idx, m3, S, H, skb, skt, sks, skh)  # [BLOCK_R, BLOCK_T, BLOCK_D]
    v = _load_tile(V, rows, t_idx, d_idx, m3, S, H, svb, svt, svs, svh)
    q_ptr = Q + _row_offsets(rows, S, H, sqb, sqs, sqh)[:, None] + d_idx[None, :]
    o_ptr = O + _row_offsets(rows, S, H, sob, sos, soh)[:, None] + d_idx[None, :]
    for i in range(T):
        q_i = tl.load(q_ptr + i * sqt, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
        p = _softmax_row(q_i, k, i, t_idx, T, scale_log2, CAUSAL)
        o_i = tl.sum(p[:, :, None] * v, axis=1)  # [BLOCK_R, BLOCK_D]
        tl.store(o_ptr + i * sot, o_i.to(O.dtype.element_ty), mask=m2)


@triton.jit
def _temporal_attention_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, R, T, S, H, Dh,
    sqb, sqt, sqs, sqh, skb, skt, sks, skh, svb, svt, svs, svh, sdb, sdt, sds, sdh,
    sgb, sgt, sgs, sgh,
    scale, scale_log2,
    CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq, dk, dv (same strides sg*) from recomputed probabilities: with P = softmax(q k^T * scale),
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = dS K * scale, dK = dS^T Q * scale.
    The scales are cast to fp32 first: torch.compile (Inductor) passes Python floats as fp64 scalars, which
    would promote dk, a loop-carried fp32 tile, to fp64 (a compile error, seen on an H200)."""
    scale, scale_log2 = tl.cast(scale, tl.float32), tl.cast(scale_log2, tl.float32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_idx = tl.arange(0, BLOCK_T)
    d_idx = tl.arange(0, BLOCK_D)
    m2 = (rows < R)[:, None] & (d_idx < Dh)[None, :]
    m3 = m2[:, None, :] & (t_idx < T)[None, :, None]
    k = _load_tile(K, rows, t_idx, d_idx, m3, S, H, skb, skt, sks, skh)  # [BLOCK_R, BLOCK_T, BLOCK_D]
    v = _load_tile(V, rows, t_idx, d_idx, m3, S, H, svb, svt, svs, svh)
    dk = tl.zeros([BLOCK_R, BLOCK_T, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_R, BLOCK_T, BLOCK_D], dtype=tl.float32)
    g_row = _row_offsets(rows, S, H, sgb, sgs, sgh)
    q_ptr = Q + _row_offsets(rows, S, H, sqb, sqs, sqh)[:, None] + d_idx[None, :]
    do_ptr = DO + _row_offsets(rows, S, H, sdb, sds, sdh)[:, None] + d_idx[None, :]
    dq_ptr = DQ + g_row[:, None] + d_idx[None, :]
    for i in range(T):
        q_i = tl.load(q_ptr + i * sqt, mask=m2, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
        do_i = tl.load(do_ptr + i * sdt, mask=m2, other=0.0).to(tl.float32)
        p = _softmax_row(q_i, k, i, t_idx, T, scale_log2, CAUSAL)  # [BLOCK_R, BLOCK_T]; 0 where masked
        dp = tl.sum(do_i[:, None, :] * v, axis=2)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        dq_i = tl.sum(ds[:, :, None] * k, axis=1) * scale
        tl.store(dq_ptr + i * sgt, dq_i.to(DQ.dtype.element_ty), mask=m2)
        dk += ds[:, :, None] * q_i[:, None, :]
        dv += p[:, :, None] * do_i[:, None, :]
    g_off = g_row[:, None, None] + t_idx[None, :, None] * sgt + d_idx[None, None, :]
    tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=m3)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=m3)


@triton.jit
def _temporal_decode_kernel(
    Q, K, V, KC, VC, O, R, S, H, Dh, t,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
    scb, scs, sch, sct, swb, sws, swh, swt, sob, sos, soh,
    scale_log2,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One decode step: store the new k, v at cache position t and attend q over positions 0..t.

    The new frame's k, v enter the softmax from registers, not re-read from the cache: the store and a
    load of the same address by other threads of the program are not ordered without a barrier."""
    scale_log2 = tl.cast(scale_log2, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_idx = tl.arange(0, BLOCK_T)
    d_idx = tl.arange(0, BLOCK_D)
    m2 = (rows < R)[:, None] & (d_idx < Dh)[None, :]
    q = tl.load(Q + _row_offsets(rows, S, H, sqb, sqs, sqh)[:, None] + d_idx[None, :], mask=m2, other=0.0)
    k_new = tl.load(K + _row_offsets(rows, S, H, skb, sks, skh)[:, None] + d_idx[None, :], mask=m2, other=0.0)
    v_new = tl.load(V + _row_offsets(rows, S, H, svb, svs, svh)[:, None] + d_idx[None, :], mask=m2, other=0.0)
    kc_row = _row_offsets(rows, S, H, scb, scs, sch)
    vc_row = _row_offsets(rows, S, H, swb, sws, swh)
    tl.store(KC + kc_row[:, None] + t * sct + d_idx[None, :], k_new.to(KC.dtype.element_ty), mask=m2)
    tl.store(VC + vc_row[:, None] + t * swt + d_idx[None, :], v_new.to(VC.dtype.element_ty), mask=m2)
    old = m2[:, None, :] & (t_idx < t)[None, :, None]  # only positions < t are read: t+1 of T_max rows
    kc = tl.load(KC + kc_row[:, None, None] + t_idx[None, :, None] * sct + d_idx[None, None, :], mask=old, other=0.0)
    vc = tl.load(VC + vc_row[:, None, None] + t_idx[None, :, None] * swt + d_idx[None, None, :], mask=old, other=0.0)
    is_t = (t_idx == t)[None, :, None]
    kc = tl.where(is_t, k_new.to(tl.float32)[:, None, :], kc.to(tl.float32))  # [BLOCK_R, BLOCK_T, BLOCK_D]
    vc = tl.where(is_t, v_new.to(tl.float32)[:, None, :], vc.to(tl.float32))
    s = tl.sum(q.to(tl.float32)[:, None, :] * kc, axis=2) * scale_log2  # [BLOCK_R, BLOCK_T]
    s = tl.where((t_idx <= t)[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    o = tl.sum(p[:, :, None] * vc, axis=1)
    tl.store(O + _row_offsets(rows, S, H, sob, sos, soh)[:, None] + d_idx[None, :], o.to(O.dtype.element_ty),
             mask=m2)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
GPU_TILE_ELEMENTS = 4096  # elements of one [BLOCK_R, BLOCK_T, BLOCK_D] fp32 tile on a GPU (see block_rows)


def block_rows(block_t: int, block_d: int, tiles: int, block_r: int | None = None, budget: int | None = None) -> int:
    """Rows per program: BLOCK_R * BLOCK_T * BLOCK_D ~ 4096 / tiles elements per [BLOCK_R, BLOCK_T, BLOCK_D] fp32
    tile a program holds (`tiles`: k, v in the forward and decode; k, v, dk, dv in the backward).

    Why 4096: compiled for sm_90 at 4 warps (ptxas -v, no GPU needed) it gives 64-96 registers a thread in the
    forward, 72-124 in the backward, 64-80 in the decode, no spills, at T in {5, 6, 8, 16} and Dh in {32, 64,
    128}; 8192 gives 143-212 (3 resident blocks a SM instead of 5) for the same registers per row. Untimed: no
    GPU in the session that wrote this; benchmarks/bench_st_attention.py sweeps it on a GPU.
    Under the interpreter each program is a Python loop over numpy ops, so fewer, larger programs are faster."""
    if block_r is not None:
        return block_r
    budget = budget or (1 << 15 if triton_interpret() else GPU_TILE_ELEMENTS)
    return max(1, min(256, triton.next_power_of_2(max(1, budget // (tiles * block_t * block_d)))))


def default_launch(kernel: str, T: int, Dh: int) -> dict:
    """The hand-set launch configuration on a GPU, what runs where the measured table has no entry (the sweeps'
    choice is adopted only when it beats this one beyond the noise: wmfast.kernels.tuning)."""
    tiles = 4 if kernel == "temporal_attention_bwd" else 2
    bt, bd = triton.next_power_of_2(T), triton.next_power_of_2(Dh)
    return {"block_r": block_rows(bt, bd, tiles, budget=GPU_TILE_ELEMENTS), "num_warps": 4}


def _launch_params(kernel: str, key: str, device, block_r, num_warps) -> tuple[int | None, int]:
    """(block_r, num_warps): the caller's, else the measured table of this GPU (wmfast.kernels.tuning), else the
    hand-set defaults (block_rows' tile budget, 4 warps)."""
    p = launch_params(kernel, key, device, block_r=block_r, num_warps=num_warps)
    return p["block_r"], p["num_warps"] or 4


def _strides4(x):
    """(b, t, s, h) strides of a [B, T, S, H, Dh] tensor."""
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _temporal_attention_fwd(q, k, v, causal: bool, block_r: int | None = None, num_warps: int | None = None):
    B, T, S, H, Dh = q.shape
    T, Dh = int(T), int(Dh)  # they set constexpr block sizes: specialise (a guard) if torch.compile made them symbolic
    block_r, num_warps = _launch_params("temporal_attention_fwd", temporal_key(T, Dh, q.dtype), q.device, block_r,
                                        num_warps)
    o = torch.empty((B, T, S, H, Dh), dtype=q.dtype, device=q.device)
    if o.numel() == 0:  # a launch with an empty grid is an error on some drivers
        return o
    R, BT, BD = B * S * H, triton.next_power_of_2(T), triton.next_power_of_2(Dh)
    BR = block_rows(BT, BD, 2, block_r)
    launcher(_temporal_attention_fwd_kernel)[(triton.cdiv(R, BR),)](
        q, k, v, o, R, T, S, H, Dh, *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(o),
        Dh ** -0.5 * LOG2E, CAUSAL=causal, BLOCK_R=BR, BLOCK_T=BT, BLOCK_D=BD, num_warps=num_warps)
    return o


def _temporal_attention_bwd(do, q, k, v, causal: bool, block_r: int | None = None, num_warps: int | None = None):
    B, T, S, H, Dh = q.shape
    T, Dh = int(T), int(Dh)
    block_r, num_warps = _launch_params("temporal_attention_bwd", temporal_key(T, Dh, q.dtype), q.device, block_r,
                                        num_warps)
    if do.stride(-1) != 1:  # autograd may hand an expanded/strided gradient; the kernel needs Dh contiguous
        do = do.contiguous()
    dq, dk, dv = (torch.empty((B, T, S, H, Dh), dtype=q.dtype, device=q.device) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    R, BT, BD = B * S * H, triton.next_power_of_2(T), triton.next_power_of_2(Dh)
    BR = block_rows(BT, BD, 4, block_r)
    launcher(_temporal_attention_bwd_kernel)[(triton.cdiv(R, BR),)](
        q, k, v, do, dq, dk, dv, R, T, S, H, Dh,
        *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(do), *_strides4(dq),
        Dh ** -0.5, Dh ** -0.5 * LOG2E, CAUSAL=causal, BLOCK_R=BR, BLOCK_T=BT, BLOCK_D=BD, num_warps=num_warps)
    return dq, dk, dv


def _temporal_decode(q, k, v, k_cache, v_cache, t: int, block_r: int | None = None, num_warps: int | None = None):
    B, _, S, H, Dh = q.shape
    Dh, T_max = int(Dh), int(k_cache.shape[3])
    block_r, num_warps = _launch_params("temporal_decode", decode_key(T_max, Dh, q.dtype), q.device, block_r,
                                        num_warps)
    o = torch.empty((B, 1, S, H, Dh), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    R, BT, BD = B * S * H, triton.next_power_of_2(T_max), triton.next_power_of_2(Dh)
    BR = block_rows(BT, BD, 2, block_r)
    s3 = lambda x: (x.stride(0), x.stride(2), x.stride(3))  # (b, s, h) strides of [B, 1, S, H, Dh]
    launcher(_temporal_decode_kernel)[(triton.cdiv(R, BR),)](
        q, k, v, k_cache, v_cache, o, R, S, H, Dh, t, *s3(q), *s3(k), *s3(v),
        *k_cache.stride()[:4], *v_cache.stride()[:4], *s3(o),
        Dh ** -0.5 * LOG2E, BLOCK_R=BR, BLOCK_T=BT, BLOCK_D=BD, num_warps=num_warps)
    return o


# ----------------------------------------------------------------------------------------------------------
# torch.library registration (kernels/_launch.py): torch.compile(fullgraph=True) traces these without a graph break
# ----------------------------------------------------------------------------------------------------------
def _empty_like_q(q, *_, **__):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@_register("wmfast::temporal_attention", _empty_like_q)
def temporal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Triton temporal attention (inputs validated by wmfast.ops.temporal_attention)."""
    return _temporal_attention_fwd(q, k, v, causal)


def _bwd_fake(do, q, k, v, causal):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


@_register("wmfast::temporal_attention_bwd", _bwd_fake)
def temporal_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of temporal attention, recomputing the probabilities."""
    return _temporal_attention_bwd(do, q, k, v, causal)


def _setup_context(ctx, inputs, output):
    q, k, v, causal = inputs
    ctx.save_for_backward(q, k, v)  # the backward recomputes p from q, k: nothing else is kept
    ctx.causal = causal


def _backward(ctx, do):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = temporal_attention_bwd_op(do, q, k, v, ctx.causal)
    return dq, dk, dv, None


temporal_attention_op.register_autograd(_backward, setup_context=_setup_context)


@_register("wmfast::temporal_decode_step", _empty_like_q, mutates_args=("k_cache", "v_cache"))
def temporal_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, t: int) -> torch.Tensor:
    """Fused cache write at position t + attention over positions <= t (inference only: no autograd)."""
    return _temporal_decode(q, k, v, k_cache, v_cache, t)
