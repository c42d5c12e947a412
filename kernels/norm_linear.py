"""LayerNorm-prologue GEMM: (residual add) + LayerNorm + linear + epilogue (bias, GELU-tanh or per-head QK-norm), one
launch. Inference only (no backward): the public op (wmfast/ops/norm_linear.py) runs the differentiable reference
when a gradient is needed.

Reading order (STYLE.md): reference, jit kernel, launcher, torch.library registration.
The public, validated functional API is `wmfast.ops.norm_linear`; the ops here assume valid input.

Semantics (the pre-norm transformer block's eager code, so decoding with the kernel picks the same tokens):
    out = round(x + residual)                            (only with a residual; the stream the caller keeps)
    n   = round(LayerNorm(out) * ln_weight + ln_bias)    (fp32 statistics, rounded to x.dtype like layer_norm)
    y   = n @ weight^T + bias                            (fp32 accumulation)
    y   = gelu_tanh(y)                                   (activation="gelu_tanh"; fp32, then rounded)
    y   = LayerNorm_Dh(round(y)) per head of q and k     (qk_norm: y is a (q, k, v) x H x Dh projection)
round(.) is the cast to x.dtype.

Kernel. One program owns a [BLOCK_M, BLOCK_N] tile of y. Pass 1 reads its BLOCK_M rows of x (+ residual) in
BLOCK_K chunks and merges per-chunk mean and squared deviations (Chan et al.), which is as stable as the two-pass
variance of F.layer_norm; the programs of the first N tile also write `out`. Pass 2 reads the rows again (from
L2: the N tiles of one row block run next to each other, see the grid), normalises them into the dot's A operand
and multiplies with the weight tile. Recomputing the statistics per N tile costs D extra reads a row from L2
and saves a launch plus the round trip of the normalised rows through memory. With qk_norm the N tile is one
head (BLOCK_N = Dh), so the epilogue normalises the tile's columns row by row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from wmfast.kernels._launch import fp32_dot_precision, launcher, register, triton_interpret
from wmfast.kernels.layernorm import layer_norm_ref, residual_layer_norm_ref, row_rstd

ACTIVATIONS = ("none", "gelu_tanh")
QK_HEAD_DIMS = (16, 32, 64, 128)  # BLOCK_N = Dh: a power of two the dot accepts, whose row fits one tile

# ---------------------------------------------------------------------------------------------------------------
# 1. Reference (the specification)
# ---------------------------------------------------------------------------------------------------------------


def _head_norm(y, qk_norm, num_heads: int, qk_eps: float):
    """LayerNorm over each Dh-wide head of the q and k columns of y [M, 3 * H * Dh] (v untouched), in y's dtype
    with fp32 statistics (layer_norm_ref: the model's qk_layer_norm)."""
    q_w, q_b, k_w, k_b = qk_norm
    M, Dh = y.shape[0], q_w.shape[0]
    heads = y.view(M, 3, num_heads, Dh)
    qk = layer_norm_ref(heads[:, :2].reshape(M, 2 * num_heads, Dh), torch.stack((q_w, k_w)),
                        torch.stack((q_b, k_b)), eps=qk_eps)
    return torch.cat((qk.view(M, 2, num_heads, Dh), heads[:, 2:]), dim=1).view(M, -1)


def norm_linear_ref(x, weight, bias, ln_weight, ln_bias, *, residual=None, eps=1e-5, activation=None, qk_norm=None,
                    num_heads=None, qk_eps=1e-5, upcast=True):
    """Reference: (y, out) as in the module docstring, for x [..., D] (y [..., N]).

    upcast=True: the linear and GELU in fp32 (y rounded to x.dtype at the end, and before the head norm, as the
    model rounds its qkv projection); upcast=False: F.linear in x.dtype, as the eager model runs it. The LayerNorms
    keep fp32 statistics either way (the model's layer_norm / qk_layer_norm)."""
    D, lead = x.shape[-1], x.shape[:-1]
    rows = x.reshape(-1, 1, D)
    w1, b1 = ln_weight.view(1, D), ln_bias.view(1, D)
    if residual is not None:
        n, out = residual_layer_norm_ref(residual.reshape(-1, 1, D), rows, w1, b1, eps=eps)
        out = out.view(x.shape)
    else:
        n, out = layer_norm_ref(rows, w1, b1, eps=eps), x
    dt = torch.float32 if upcast else x.dtype
    y = F.linear(n.view(-1, D).to(dt), weight.to(dt), bias.to(dt) if bias is not None else None)
    if activation == "gelu_tanh":
        y = F.gelu(y.float(), approximate="tanh")
    y = y.to(x.dtype)
    if qk_norm is not None:
        y = _head_norm(y, qk_norm, num_heads, qk_eps)
    return y.view(*lead, weight.shape[0]), out


# ---------------------------------------------------------------------------------------------------------------
# 2. Triton kernel
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _norm_linear_fwd_kernel(X, R, W, BIAS, LNW, LNB, QW, QB, KW, KB, Y, OUT, M, N, D, H, sxm, srm, swn, eps, qk_eps,
                            HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                            QK_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # N tiles fastest: the programs that read the same rows of x run together, so pass 2 and the other N tiles
    # find them in L2 (with M outermost a wave would stream different rows and re-read x from HBM per N tile)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)[:, None]
    dt = X.dtype.element_ty

    # pass 1: mean and squared deviations of out = round(x + residual), merged chunk by chunk
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols < D)[None, :]
        v = tl.load(X + rows64 * sxm + cols[None, :], mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + rows64 * srm + cols[None, :], mask=mask, other=0.0)
            v = (v.to(tl.float32) + r.to(tl.float32)).to(dt)
            if pid_n == 0:
                tl.store(OUT + rows64 * D + cols[None, :], v, mask=mask)
        v = v.to(tl.float32)
        n_c = tl.minimum(D - k0, BLOCK_K).to(tl.float32)
        n_ab = k0 + n_c
        c_mean = tl.sum(v, axis=1) / n_c
        dev = tl.where(mask, v - c_mean[:, None], 0.0)
        delta = c_mean - mean
        mean += delta * (n_c / n_ab)
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (k0 * n_c / n_ab)
    rstd = row_rstd(m2 / D, eps)  # NaN where the variance overflowed, as the reference

    # pass 2: A = round(LayerNorm(out) * ln_weight + ln_bias) chunk by chunk, times the weight tile
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        v = tl.load(X + rows64 * sxm + cols[None, :], mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + rows64 * srm + cols[None, :], mask=mask, other=0.0)
            v = (v.to(tl.float32) + r.to(tl.float32)).to(dt)
        lw = tl.load(LNW + cols, mask=cmask, other=0.0).to(tl.float32)
        lb = tl.load(LNB + cols, mask=cmask, other=0.0).to(tl.float32)
        a = ((v.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :]).to(dt)
        # the [BLOCK_K, BLOCK_N] tile of weight^T, read from the [N, D] weight (contiguous along K)
        w = tl.load(W + offs_n[None, :].to(tl.int64) * swn + cols[:, None], mask=cmask[:, None] & nmask[None, :],
                    other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    # epilogue
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if GELU:  # gelu_tanh(y) = 0.5 y (1 + tanh(u)) = y * sigmoid(2u), u = sqrt(2 / pi) (y + 0.044715 y^3)
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    if QK_NORM:  # noqa: SIM102 - a constexpr (compiled out) kept apart from the run-time test
        if pid_n < 2 * H:  # a q or k head (the tile is exactly one head: BLOCK_N = Dh = N / (3 H))
            hcols = tl.arange(0, BLOCK_N)
            if pid_n < H:
                hw = tl.load(QW + hcols).to(tl.float32)
                hb = tl.load(QB + hcols).to(tl.float32)
            else:
                hw = tl.load(KW + hcols).to(tl.float32)
                hb = tl.load(KB + hcols).to(tl.float32)
            yr = acc.to(dt).to(tl.float32)  # normalise the rounded projection, as the model does
            hc = yr - (tl.sum(yr, axis=1) / BLOCK_N)[:, None]
            hrstd = row_rstd(tl.sum(hc * hc, axis=1) / BLOCK_N, qk_eps)
            acc = hc * hrstd[:, None] * hw[None, :] + hb[None, :]
    tl.store(Y + rows64 * N + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


# ---------------------------------------------------------------------------------------------------------------
# 3. Launcher
# ---------------------------------------------------------------------------------------------------------------


def _tile(M: int, N: int, D: int, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N = Dh with qk_norm.

    16-bit GPU tiles: 128 rows with 8 warps once there are enough rows (M >= 8192: at M = 131072, N = 1536,
    12288 programs), else 64 rows with 4 warps, so that decoding one sample (M = 1024) still gives 256-384
    programs for the 132 SMs; BLOCK_N 128, BLOCK_K 64. A thread holds its share of the fp32 accumulator and of
    the normalised A chunk, BLOCK_M * (BLOCK_N + BLOCK_K) / threads values: 64-96 at these tiles, compiled for
    sm_90a in 136-183 registers without spills (tests/ops/norm_linear_compile_check.py; 128 x 64 at 4 warps, 128
    values a thread, took 254). fp32 (exact FMA products, no tensor cores, under "highest"): 64 x 64 x 32 tiles,
    4 warps, 164-168 registers (124-137 with TF32); 64 x 128 and 128 x 64 spilled 8-24 bytes. Interpreter: 64-wide
    K chunks (D = 100 in the tests runs the chunk merge) and tiles up to 256 x 128: its cost is per program and
    per op, not per element (a tiny model's rollout took 5x longer with 64 x 64 tiles)."""
    if triton_interpret():
        block_n = head_dim or max(16, min(128, triton.next_power_of_2(N)))
        return max(16, min(256, triton.next_power_of_2(M))), block_n, 64, 4, 1
    if dtype == torch.float32:
        return 64, head_dim or max(16, min(64, triton.next_power_of_2(N))), 32, 4, 3
    block_n = head_dim or max(16, min(128, triton.next_power_of_2(N)))
    block_m = 128 if M >= 8192 else 64
    return block_m, block_n, 64, 8 if block_m == 128 else 4, 3


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact products ("ieee") under torch's default "highest" matmul precision (what fp32 F.linear
    does), TF32 when the user allowed it; 16-bit inputs: the argument is ignored."""
    return fp32_dot_precision() if dtype == torch.float32 else "ieee"


def _norm_linear_fwd(x, residual, weight, bias, ln_weight, ln_bias, eps, activation, q_weight, q_bias, k_weight,
                     k_bias, num_heads, qk_eps):
    """x, residual: [M, D] (contiguous over D); weight [N, D] (contiguous over D). Returns y [M, N] and, with a
    residual, out [M, D] (else None)."""
    M, D = x.shape
    N = weight.shape[0]
    qk = q_weight is not None
    head_dim = N // (3 * num_heads) if qk else 0
    block_m, block_n, block_k, warps, stages = _tile(M, N, D, x.dtype, head_dim)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    out = torch.empty((M, D), dtype=x.dtype, device=x.device) if residual is not None else None
    r = residual if residual is not None else x
    qkp = (q_weight, q_bias, k_weight, k_bias) if qk else (ln_weight,) * 4
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    launcher(_norm_linear_fwd_kernel)[grid](
        x, r, weight, bias if bias is not None else weight, ln_weight, ln_bias, *qkp, y,
        out if out is not None else y, M, N, D, num_heads if qk else 1, x.stride(0), r.stride(0), weight.stride(0),
        eps, qk_eps, HAS_RES=residual is not None, HAS_BIAS=bias is not None, GELU=activation == "gelu_tanh",
        QK_NORM=qk, DOT_PRECISION=_dot_precision(x.dtype),
        # the interpreter multiplies bf16 tiles as their raw 16-bit integers (numpy has no bfloat16): fp32
        # operands there, which hold bf16 values and their products exactly
        DOT_FP32=triton_interpret() and x.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y, out


# ---------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (kernels/_launch.py: triton_op on GPU, custom_op + fake under the interpreter)
# ---------------------------------------------------------------------------------------------------------------


def _fake(x, weight, *args):
    return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


def _fake_res(residual, x, weight, *args):
    return _fake(x, weight), torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _nl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor,
        ln_bias: torch.Tensor, eps: float, activation: str, q_weight: torch.Tensor | None,
        q_bias: torch.Tensor | None, k_weight: torch.Tensor | None, k_bias: torch.Tensor | None, num_heads: int,
        qk_eps: float) -> torch.Tensor:
    return _norm_linear_fwd(x, None, weight, bias, ln_weight, ln_bias, eps, activation, q_weight, q_bias,
                            k_weight, k_bias, num_heads, qk_eps)[0]


def _res_nl(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, activation: str,
            q_weight: torch.Tensor | None, q_bias: torch.Tensor | None, k_weight: torch.Tensor | None,
            k_bias: torch.Tensor | None, num_heads: int, qk_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_linear_fwd(x, residual, weight, bias, ln_weight, ln_bias, eps, activation, q_weight, q_bias,
                            k_weight, k_bias, num_heads, qk_eps)


# two ops: without a residual `out` is x itself, which an op may not return (outputs never alias inputs)
norm_linear_op = register("wmfast::norm_linear", _nl, _fake)
residual_norm_linear_op = register("wmfast::residual_norm_linear", _res_nl, _fake_res)
