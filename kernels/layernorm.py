"""LayerNorm with affine parameters, optionally fused with the residual add before it (forward and backward).

Reading order (STYLE.md): references, jit kernels, launchers, torch.library registration.
The public, validated functional API is `wmfast.ops` (wmfast/ops/layernorm.py); the ops here assume valid input.

Semantics (fp32 math, results in x.dtype):
    out = round(residual + x)                       (residual_layer_norm only; rounded to x.dtype)
    y   = (n - mean(n)) / sqrt(var(n) + eps) * weight[g] + bias[g],   n = out (or x)
The LayerNorm normalises the *rounded* `out`, the tensor the residual stream keeps, so the forward, the backward
(which recomputes the statistics from `out`) and an unfused model in x.dtype all see the same numbers.
A row whose fp32 sum of squared deviations overflows (|x| >~ 1e19) is NaN in y and in its gradients
(`row_rstd`, `overflow_nan`): 1 / sqrt(inf) = 0 would otherwise hide the overflow behind y = bias, and
F.layer_norm itself gives NaN or 0 there depending on its internal summation. The AdaLN and norm_linear kernels
and references share both helpers.

Rows. x is a [M, I, D] view (any strides over M and I, contiguous over D): M outer rows of I inner rows each,
normalised over D. The I inner rows are split into G equal groups with their own weight/bias rows
(weight [G, D]): G = 1 is the plain LayerNorm of a [M, 1, D] tensor; the transformer's QK-norm is the
[tokens, 2H, Dh] view of the q and k columns of one qkv projection with weight = stack(q_norm, k_norm), so one
launch normalises both, reading them in place.

Backward: one kernel recomputes mean and rstd from the saved input (the row is in registers anyway; saving
them would only add traffic and memory), writes dx (plus the gradient flowing into `out` from the residual
stream) and reduces d(weight), d(bias) deterministically: each program owns a fixed run of rows of one inner
index and writes one fp32 partial row; the partials are then summed by torch in a fixed order (no atomics, so
two backward runs are bit-identical).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from wmfast.kernels._launch import launcher, register, triton_interpret

MAX_D = 8192  # one row in registers (BLOCK_D = next power of two)

# ---------------------------------------------------------------------------------------------------------------
# 1. References (the specification)
# ---------------------------------------------------------------------------------------------------------------


def _group_params(p: torch.Tensor, inner: int, dt) -> torch.Tensor:
    """weight/bias [G, D] -> [I, D] in dtype dt (inner row i uses group i // (I // G))."""
    return p.to(dt).repeat_interleave(inner // p.shape[0], dim=0)


def overflow_nan(rstd: torch.Tensor) -> torch.Tensor:
    """[..., 1]: NaN on the rows whose 1 / sqrt(var + eps) is 0 or NaN (the variance overflowed: what the kernels'
    row_rstd turns into NaN), 1 elsewhere. No gradient flows into it; multiplying a normalised row by it is exact
    (x 1) or makes the row and its gradients NaN."""
    return torch.where(rstd.detach() > 0, 1.0, float("nan"))


def normalize_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """F.layer_norm over the last dim (no affine) in x's dtype, NaN on the rows whose variance overflows. The
    row statistics come with the normalisation (aten's native_layer_norm returns rstd), so the check costs one
    multiply, not another pass of reductions over x."""
    y, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
    return y * overflow_nan(rstd).to(y.dtype)


def layer_norm_ref(x, weight, bias, *, eps=1e-5, upcast=True):
    """Reference: y = LayerNorm(x) * weight[g] + bias[g] over the last dim of x [M, I, D]; weight, bias [G, D]."""
    dt = torch.float32 if upcast else x.dtype
    w, b = _group_params(weight, x.shape[1], dt), _group_params(bias, x.shape[1], dt)
    return (normalize_ref(x.to(dt), eps) * w + b).to(x.dtype)


def residual_layer_norm_ref(residual, x, weight, bias, *, eps=1e-5, upcast=True):
    """Reference: out = round(residual + x) to x.dtype; y = layer_norm_ref(out). Returns (y, out)."""
    dt = torch.float32 if upcast else x.dtype
    out = (residual.to(dt) + x.to(dt)).to(x.dtype)
    return layer_norm_ref(out, weight, bias, eps=eps, upcast=upcast), out


# ---------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def row_rstd(var, eps):
    """1 / sqrt(var + eps) of fp32 row variances, NaN where a variance overflowed (or is NaN): see overflow_nan."""
    return tl.where(var < float("inf"), 1.0 / tl.sqrt(var + eps), float("nan"))


@triton.jit
def _layer_norm_fwd_kernel(X, R, W, B, Y, OUT, M, D, IPG, sxm, sxi, srm, sri, sym, syi, eps,
                           HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < M)[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * sxm + i * sxi + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows64 * srm + i * sri + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = (x + r).to(OUT.dtype.element_ty)
        tl.store(OUT + rows64 * sym + i * syi + cols[None, :], out, mask=mask)  # OUT has Y's layout
        x = out.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = row_rstd(tl.sum(xc * xc, axis=1) / D, eps)
    g = i // IPG
    w = tl.load(W + g * D + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + g * D + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64 * sym + i * syi + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(DY, DOUT, X, W, DX, DW, DB, M, D, IPG, ROWS_PER_PROG, sdym, sdyi, sdom, sdoi,
                           sxm, sxi, sdxm, sdxi, spp, spi, eps,
                           HAS_DOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + (i // IPG) * D + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS_PER_PROG, BLOCK_M):
        rows = pid * ROWS_PER_PROG + start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * sxm + i * sxi + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = row_rstd(tl.sum(xc * xc, axis=1) / D, eps)
        xhat = xc * rstd[:, None]
        dy = tl.load(DY + rows64 * sdym + i * sdyi + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DOUT:
            dx += tl.load(DOUT + rows64 * sdom + i * sdoi + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * sdxm + i * sdxi + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * spp + i * spi + cols, dw, mask=cmask)
    tl.store(DB + pid * spp + i * spi + cols, db, mask=cmask)


# ---------------------------------------------------------------------------------------------------------------
# 3. Launchers
# ---------------------------------------------------------------------------------------------------------------


def _tile(M: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): on a GPU up to 64 rows and ~4K elements a tile (at D = 512 eight rows, at the
    head dim 64 of QK-norm sixty-four: 16 fp32 values a thread at 8 warps; at D = 8192 one 8K-element row, 32 a
    thread, compiled for sm_90a without spills: tests/ops/layernorm_compile_check.py). Under the interpreter,
    whose cost is per program rather than per element, up to 64K elements a tile."""
    block_d = triton.next_power_of_2(D)
    if triton_interpret():
        return max(1, min(triton.next_power_of_2(M), 65536 // block_d)), block_d, 4
    block_m = max(1, min(64, 4096 // block_d))
    return block_m, block_d, 4 if block_m * block_d <= 2048 else 8


def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(M: int, inner: int, block_m: int, device: torch.device) -> int:
    """Programs along M for the backward: about four waves of the GPU over (programs x I); each program then
    loops over its rows, so the partial-gradient buffer stays [programs, I, D] however large M is."""
    blocks = triton.cdiv(M, block_m)
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 1  # the interpreter: one long program per inner row
    return max(1, min(blocks, triton.cdiv(target, inner)))


def _layer_norm_fwd(x, residual, weight, bias, eps: float):
    M, inner, D = x.shape
    y = torch.empty((M, inner, D), dtype=x.dtype, device=x.device)
    out = torch.empty_like(y) if residual is not None else None
    block_m, block_d, warps = _tile(M, D)
    r = residual if residual is not None else x
    grid = (triton.cdiv(M, block_m), inner)
    launcher(_layer_norm_fwd_kernel)[grid](
        x, r, weight, bias, y, out if out is not None else y, M, D, inner // weight.shape[0],
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), y.stride(0), y.stride(1), eps,
        HAS_RES=residual is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return y, out


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _layer_norm_bwd(dy, dout, xin, weight, eps: float):
    M, inner, D = xin.shape
    dy = _last_contiguous(dy)
    dout = _last_contiguous(dout) if dout is not None else None
    dx = torch.empty((M, inner, D), dtype=xin.dtype, device=xin.device)
    block_m, block_d, warps = _tile(M, D)
    programs = _bwd_programs(M, inner, block_m, xin.device)
    rows_per_prog = triton.cdiv(triton.cdiv(M, block_m), programs) * block_m
    programs = triton.cdiv(M, rows_per_prog)
    dw = torch.empty((programs, inner, D), dtype=torch.float32, device=xin.device)
    db = torch.empty_like(dw)
    d_o = dout if dout is not None else dy
    launcher(_layer_norm_bwd_kernel)[(programs, inner)](
        dy, d_o, xin, weight, dx, dw, db, M, D, inner // weight.shape[0], rows_per_prog,
        dy.stride(0), dy.stride(1), d_o.stride(0), d_o.stride(1), xin.stride(0), xin.stride(1),
        dx.stride(0), dx.stride(1), dw.stride(0), dw.stride(1), eps,
        HAS_DOUT=dout is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    G = weight.shape[0]
    dw = dw.sum(0).view(G, inner // G, D).sum(1)
    db = db.sum(0).view(G, inner // G, D).sum(1)
    return dx, dw.to(weight.dtype), db.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (kernels/_launch.py: triton_op on GPU, custom_op + fake under the interpreter)
# ---------------------------------------------------------------------------------------------------------------


def _fwd_fake_y(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _fwd_fake_res(residual, x, weight, bias, eps):
    return _fwd_fake_y(x, weight, bias, eps), _fwd_fake_y(x, weight, bias, eps)


def _bwd_fake(dy, dout, xin, weight, eps):
    return (torch.empty(xin.shape, dtype=xin.dtype, device=xin.device), torch.empty_like(weight),
            torch.empty_like(weight))


def _ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return _layer_norm_fwd(x, None, weight, bias, eps)[0]


def _res_ln(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _layer_norm_fwd(x, residual, weight, bias, eps)


def _ln_bwd(dy: torch.Tensor, dout: torch.Tensor | None, xin: torch.Tensor, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _layer_norm_bwd(dy, dout, xin, weight, eps)


layer_norm_op = register("wmfast::layer_norm", _ln, _fwd_fake_y)
residual_layer_norm_op = register("wmfast::residual_layer_norm", _res_ln, _fwd_fake_res)
layer_norm_bwd_op = register("wmfast::layer_norm_bwd", _ln_bwd, _bwd_fake)


def _ln_setup(ctx, inputs, output):
    x, weight, _bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _ln_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd_op(dy, None, x, weight, ctx.eps)
    return dx, dw, db, None


def _res_ln_setup(ctx, inputs, output):
    _residual, _x, weight, _bias, eps = inputs
    ctx.save_for_backward(output[1], weight)  # the LayerNorm's input is `out`, the rounded sum
    ctx.eps = eps


def _res_ln_backward(ctx, dy, dout):
    out, weight = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd_op(dy, dout, out, weight, ctx.eps)
    return dx, dx, dw, db, None  # d(residual) = d(x): out = residual + x


layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup)
residual_layer_norm_op.register_autograd(_res_ln_backward, setup_context=_res_ln_setup)
