"""Fused AdaLN-Zero modulation: LayerNorm + modulate, gated residual, and both fused (forward + backward).

Reading order (STYLE.md): references, jit kernels, launchers, torch.library registration.
The public, validated functional API is `wmfast.ops` (wmfast/ops/adaln.py); the ops here assume valid input.

Semantics (fp32 math, result cast to x.dtype):
    y   = LayerNorm(x; no affine, eps) * (1 + scale) + shift
    out = residual + gate * x
A row whose fp32 variance overflows is NaN in y (kernels/layernorm.py: row_rstd, normalize_ref).
Modulation tensors (shift, scale, gate) are per-sample [B, D] or [B, 1, D], per-frame [B, F, D] with
`frame_len` (token l uses row l // frame_len, F * frame_len == L), or per-token [B, L, D]. The kernels read
every tensor through its strides (a `mod.unbind(1)` view of [B, 6, D] or [B, F, 6, D] is never copied), and
the modulation may be fp32 while x is bf16/fp16.

Backward: one fused kernel per op recomputes the row statistics (the row is in registers anyway, so saving
mean/rstd would only add memory traffic), writes dx (and d_residual), and reduces d(shift), d(scale), d(gate)
over the tokens that share a modulation row. The reduction is deterministic and in fp32: each program owns a
fixed chunk of rows inside one (sample, frame) group and writes one partial row; a second kernel sums the
partials in a fixed order (no atomics, so two backward runs are bit-identical).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from wmfast.kernels._launch import launch_params, launcher, register, triton_interpret
from wmfast.kernels.layernorm import normalize_ref, row_rstd
from wmfast.kernels.tuning import adaln_key

# ---------------------------------------------------------------------------------------------------------------
# 1. References (the specification)
# ---------------------------------------------------------------------------------------------------------------


def expand_modulation(mod: torch.Tensor, L: int, frame_len: int | None) -> torch.Tensor:
    """A [B, L or 1, D] view/copy of a modulation tensor, for the references only (kernels never expand)."""
    if mod.dim() == 2:
        return mod[:, None, :]
    if mod.shape[1] == 1 or mod.shape[1] == L:
        return mod
    return mod.repeat_interleave(frame_len, dim=1)


def layernorm_modulate_ref(x, shift, scale, *, eps=1e-6, frame_len=None, upcast=True):
    """Reference: LayerNorm(x) * (1 + scale) + shift. upcast=True computes in fp32 (the specification),
    upcast=False in x.dtype (what plain PyTorch does in low precision)."""
    L = x.shape[1]
    dt = torch.float32 if upcast else x.dtype
    shift = expand_modulation(shift, L, frame_len).to(dt)
    scale = expand_modulation(scale, L, frame_len).to(dt)
    y = normalize_ref(x.to(dt), eps) * (1 + scale) + shift
    return y.to(x.dtype)


def gated_residual_ref(residual, x, gate, *, frame_len=None, upcast=True):
    """Reference: residual + gate * x."""
    dt = torch.float32 if upcast else x.dtype
    gate = expand_modulation(gate, x.shape[1], frame_len).to(dt)
    return (residual.to(dt) + gate * x.to(dt)).to(x.dtype)


def gated_residual_layernorm_modulate_ref(residual, x, gate, shift, scale, *, eps=1e-6, frame_len=None,
                                          upcast=True):
    """Reference: out = residual + gate * x; y = layernorm_modulate(out, shift, scale). Returns (y, out).

    With upcast=True, y is computed from the fp32 `out` (before its cast), as a fused kernel does."""
    dt = torch.float32 if upcast else x.dtype
    L = x.shape[1]
    gate = expand_modulation(gate, L, frame_len).to(dt)
    out = residual.to(dt) + gate * x.to(dt)
    shift = expand_modulation(shift, L, frame_len).to(dt)
    scale = expand_modulation(scale, L, frame_len).to(dt)
    y = normalize_ref(out, eps) * (1 + scale) + shift
    return y.to(x.dtype), out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _adaln_fwd_kernel(
    X, sxb, sxl, sxd,
    RES, srb, srl, srd,
    GATE, sgb, sgf, sgd, g_div,
    SHIFT, ssb, ssf, ssd, s_div,
    SCALE, scb, scf, scd, c_div,
    Y, OUT,  # contiguous [B, L, D], x.dtype
    n_rows, L, D, eps,
    HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_D] tile of flattened (b, l) rows; a row's modulation row is (b, l // div)."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64: keep the row statistics in fp32
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < D)
    b = rows // L
    l = rows % L
    x = tl.load(X + (b * sxb + l * sxl)[:, None] + cols[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    out_offs = (rows * D)[:, None] + cols[None, :]
    if HAS_RES:
        r = tl.load(RES + (b * srb + l * srl)[:, None] + cols[None, :] * srd, mask=mask, other=0.0)
        g = tl.load(GATE + (b * sgb + (l // g_div) * sgf)[:, None] + cols[None, :] * sgd, mask=mask, other=0.0)
        h = r.to(tl.float32) + g.to(tl.float32) * x
        tl.store(OUT + out_offs, h.to(OUT.dtype.element_ty), mask=mask)
    else:
        h = x
    if HAS_NORM:
        mean = tl.sum(h, axis=1) / D
        hc = tl.where(mask, h - mean[:, None], 0.0)
        rstd = row_rstd(tl.sum(hc * hc, axis=1) / D, eps)
        sh = tl.load(SHIFT + (b * ssb + (l // s_div) * ssf)[:, None] + cols[None, :] * ssd, mask=mask, other=0.0)
        sc = tl.load(SCALE + (b * scb + (l // c_div) * scf)[:, None] + cols[None, :] * scd, mask=mask, other=0.0)
        y = hc * rstd[:, None] * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
        tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    DY, sdyb, sdyl, sdyd,
    DOUT, sdob, sdol, sdod,
    X, sxb, sxl, sxd,
    RES, srb, srl, srd,
    GATE, sgb, sgf, sgd, g_div,
    SCALE, scb, scf, scd, c_div,
    DX, DRES,  # contiguous [B, L, D]
    DGATE, dgb, dgr,  # per-token: the gradient [B, L, D]; else fp32 partials [B, NG * NC, D]
    DSHIFT, dsb, dsr,
    DSCALE, dcb, dcr,
    L, D, G, NC, rows_per_prog, eps,
    HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr,
    GATE_TOKEN: tl.constexpr, SHIFT_TOKEN: tl.constexpr, SCALE_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, g, c) owns rows [c * rows_per_prog, (c + 1) * rows_per_prog) of group g (G tokens sharing a
    modulation row) of sample b, walks them in BLOCK_M-row tiles and writes one fp32 partial row per reduced
    modulation gradient (in a fixed order: deterministic)."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64; an fp64 rstd would promote the sums
    pid = tl.program_id(0)
    NG = L // G
    b = (pid // (NG * NC)).to(tl.int64)
    g = (pid // NC) % NG
    c = pid % NC
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, rows_per_prog, BLOCK_M):
        k = c * rows_per_prog + i + tl.arange(0, BLOCK_M)  # index inside the group
        rmask = k < G
        mask = rmask[:, None] & cmask[None, :]
        l = (g * G + k).to(tl.int64)
        x = tl.load(X + (b * sxb + l * sxl)[:, None] + cols[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(RES + (b * srb + l * srl)[:, None] + cols[None, :] * srd, mask=mask, other=0.0)
            gt = tl.load(GATE + (b * sgb + (l // g_div) * sgf)[:, None] + cols[None, :] * sgd, mask=mask,
                         other=0.0).to(tl.float32)
            h = r.to(tl.float32) + gt * x
        else:
            h = x
        dh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if HAS_NORM:
            dy = tl.load(DY + (b * sdyb + l * sdyl)[:, None] + cols[None, :] * sdyd, mask=mask,
                         other=0.0).to(tl.float32)
            sc = tl.load(SCALE + (b * scb + (l // c_div) * scf)[:, None] + cols[None, :] * scd, mask=mask,
                         other=0.0).to(tl.float32)
            mean = tl.sum(h, axis=1) / D
            hc = tl.where(mask, h - mean[:, None], 0.0)
            rstd = row_rstd(tl.sum(hc * hc, axis=1) / D, eps)
            xhat = hc * rstd[:, None]
            wdy = dy * (1.0 + sc)
            c1 = tl.sum(xhat * wdy, axis=1) / D
            c2 = tl.sum(wdy, axis=1) / D
            dh = tl.where(mask, (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], 0.0)
            dscale_rows = dy * xhat
            if SHIFT_TOKEN:
                tl.store(DSHIFT + (b * dsb + l * dsr)[:, None] + cols[None, :], dy, mask=mask)
            else:
                acc_shift += tl.sum(dy, axis=0)
            if SCALE_TOKEN:
                tl.store(DSCALE + (b * dcb + l * dcr)[:, None] + cols[None, :], dscale_rows, mask=mask)
            else:
                acc_scale += tl.sum(dscale_rows, axis=0)
        out_offs = (b * L * D + l * D)[:, None] + cols[None, :]
        if HAS_RES:
            dh += tl.load(DOUT + (b * sdob + l * sdol)[:, None] + cols[None, :] * sdod, mask=mask,
                          other=0.0).to(tl.float32)
            if HAS_NORM:  # without the norm, d_residual is d_out itself (returned without a kernel)
                tl.store(DRES + out_offs, dh.to(DRES.dtype.element_ty), mask=mask)
            dgate_rows = dh * x
            if GATE_TOKEN:
                tl.store(DGATE + (b * dgb + l * dgr)[:, None] + cols[None, :], dgate_rows, mask=mask)
            else:
                acc_gate += tl.sum(dgate_rows, axis=0)
            dx = dh * gt
        else:
            dx = dh
        tl.store(DX + out_offs, dx.to(DX.dtype.element_ty), mask=mask)
    part = pid % (NG * NC)  # = g * NC + c
    if HAS_RES and not GATE_TOKEN:
        tl.store(DGATE + b * dgb + part * dgr + cols, acc_gate, mask=cmask)
    if HAS_NORM and not SHIFT_TOKEN:
        tl.store(DSHIFT + b * dsb + part * dsr + cols, acc_shift, mask=cmask)
    if HAS_NORM and not SCALE_TOKEN:
        tl.store(DSCALE + b * dcb + part * dcr + cols, acc_scale, mask=cmask)


@triton.jit
def _reduce_partials_kernel(P, OUT, sob, sor, R, NP, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[b, r, :] = sum_p P[b, r * NP + p, :] in a fixed order (stage 2 of the deterministic reduction).
    P: contiguous fp32 [B, R * NP, D]; OUT is written in its own dtype through strides (sob, sor, 1)."""
    pid = tl.program_id(0)
    b = (pid // R).to(tl.int64)
    r = pid % R
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = P + (b * R * NP + r * NP) * D
    for p0 in range(0, NP, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        tile = tl.load(base + (p * D)[:, None] + cols[None, :], mask=(p < NP)[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + b * sob + r * sor + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------------------------
# 3. Launchers
# ---------------------------------------------------------------------------------------------------------------

# One row must fit in a tile (registers on GPU); wider rows would need a looped two-pass kernel. Compiled for
# sm_90a (tests/ops/adaln_compile_check.py's method) the fused backward spills nothing at D=8192 (127 registers,
# 16 warps) but 792 bytes at D=16384, so wider rows go to the reference (Wan2.2-5B: 3072, Wan 14B: 5120).
MAX_D = 8192

# Tile size (elements) per program. GPU: 4096 elements, i.e. one D=3072 row with 8 warps as flash-attention's
# LayerNorm runs it (one row per program, warps = BLOCK_N // 256 capped at 8); smaller D packs several rows per
# program (8 for D=512) so a program still moves ~4096 elements. Chosen without a GPU: not tuned yet
# (benchmarks/bench_adaln.py sweeps tile x warps).
# Under the interpreter every program is a Python-level loop, so bigger tiles cut the overhead: the fused
# forward + backward at B=2, L=64, D=512 took 0.58 s with 16384 vs 1.0 s with 4096 (2-core CPU, shared).
GPU_TILE = 4096
_TILE = 16384 if triton_interpret() else GPU_TILE
# Backward: programs per launch the row chunks aim for (a few waves of SMs on GPU); under the interpreter a few,
# so that the stage-2 reduction still sums more than one partial per modulation row.
_BWD_PROGRAMS_INTERPRET = 4

SAMPLE, FRAME, TOKEN = 0, 1, 2


def _mod_layout(mod: torch.Tensor, L: int, frame_len: int):
    """(stride_b, stride_row, stride_d, row divisor, kind) with which the kernels address a modulation tensor:
    token l of sample b reads row (l // divisor) of sample b."""
    if mod.dim() == 2:
        return mod.stride(0), 0, mod.stride(1), 1, SAMPLE
    n = mod.shape[1]
    if n == 1:
        return mod.stride(0), 0, mod.stride(2), 1, SAMPLE
    if n == L:
        return mod.stride(0), mod.stride(1), mod.stride(2), 1, TOKEN
    return mod.stride(0), mod.stride(1), mod.stride(2), frame_len, FRAME


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _num_warps(block_m: int, block_d: int, elems_per_thread: int = 16, max_warps: int = 8) -> int:
    """Warps for a [block_m, block_d] tile. Forward: 16 elements per thread, at most 8 warps (flash-attention's
    LayerNorm). Backward: 8 elements per thread, up to 16 warps: compiled for sm_90a (Triton 3.9, ptxas -v, no
    GPU needed) the fused backward at D=3072 needs 191 registers with 8 warps (one 8-warp block per SM) and 113
    with 16 (one 16-warp block: twice the warps in flight to hide memory latency), no spills either way."""
    return max(1, min(max_warps, block_m * block_d // (32 * elems_per_thread)))


def default_launch(kernel: str, D: int) -> dict:
    """The hand-set launch configuration on a GPU for rows of width D (enough rows to fill a whole tile): what
    runs where the measured table has no entry."""
    block_d = triton.next_power_of_2(D)
    block_m = max(1, GPU_TILE // block_d)
    warps = _num_warps(block_m, block_d) if kernel == "adaln_fwd" else _num_warps(block_m, block_d, 8, 16)
    return {"tile": GPU_TILE, "num_warps": warps}


def _launch_params(kernel: str, D: int, x: torch.Tensor, tile, num_warps):
    """(tile, num_warps): the caller's, else the measured table of this GPU (wmfast.kernels.tuning), else
    (None, None): the hand-set _TILE and _num_warps."""
    p = launch_params(kernel, adaln_key(D, x.dtype), x.device, tile=tile, num_warps=num_warps)
    return p["tile"], p["num_warps"]


def _adaln_fwd(x, residual, gate, shift, scale, eps: float, frame_len: int, has_res: bool, has_norm: bool,
               tile: int | None = None, num_warps: int | None = None):
    """Launch the forward kernel; returns (y or None, out or None). tile / num_warps override the defaults
    (the benchmark's sweep uses them)."""
    B, L, D = x.shape
    tile, num_warps = _launch_params("adaln_fwd", D, x, tile, num_warps)
    y = torch.empty((B, L, D), dtype=x.dtype, device=x.device) if has_norm else None
    out = torch.empty((B, L, D), dtype=x.dtype, device=x.device) if has_res else None
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min((tile or _TILE) // block_d, triton.next_power_of_2(B * L)))
    dummy = x  # unused pointer arguments (their branches are compiled out)
    g_lay = _mod_layout(gate, L, frame_len)[:4] if has_res else (0, 0, 0, 1)
    s_lay = _mod_layout(shift, L, frame_len)[:4] if has_norm else (0, 0, 0, 1)
    c_lay = _mod_layout(scale, L, frame_len)[:4] if has_norm else (0, 0, 0, 1)
    grid = (triton.cdiv(B * L, block_m),)
    launcher(_adaln_fwd_kernel)[grid](
        x, *_strides3(x),
        residual if has_res else dummy, *(_strides3(residual) if has_res else (0, 0, 0)),
        gate if has_res else dummy, *g_lay,
        shift if has_norm else dummy, *s_lay,
        scale if has_norm else dummy, *c_lay,
        y if has_norm else dummy, out if has_res else dummy,
        B * L, L, D, eps,
        HAS_RES=has_res, HAS_NORM=has_norm, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps or _num_warps(block_m, block_d),
    )
    return y, out


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_chunks(x: torch.Tensor, B: int, NG: int, G: int, block_m: int) -> tuple[int, int]:
    """(NC, rows_per_prog): how the G rows of a group are split among programs. More programs fill the GPU;
    fewer write fewer partials. Aim at ~2 waves of SMs (flash-attention's LayerNorm uses 1 program per SM)."""
    target = _BWD_PROGRAMS_INTERPRET if x.device.type != "cuda" else 2 * _sm_count(x.device.index or 0)
    nc = max(1, min(triton.cdiv(G, block_m), triton.cdiv(target, B * NG)))
    rows_per_prog = triton.cdiv(triton.cdiv(G, nc), block_m) * block_m
    return triton.cdiv(G, rows_per_prog), rows_per_prog


def _grad_buffer(mod, kind, B, L, NG, NC, D):
    """Where the backward kernel writes d(mod): the gradient itself for per-token modulation, else fp32
    partials [B, NG * NC, D]. Returns (buffer, stride_b, stride_row)."""
    if kind == TOKEN:
        buf = torch.empty((B, L, D), dtype=mod.dtype, device=mod.device)
        return buf, L * D, D
    buf = torch.empty((B, NG * NC, D), dtype=torch.float32, device=mod.device)
    return buf, NG * NC * D, D


def _finish_grad(mod, kind, buf, B, NG, NC, D):
    """Stage 2: sum the partials into a gradient of the modulation's own shape and dtype."""
    if kind == TOKEN:
        return buf.view(mod.shape)
    grad = torch.empty(mod.shape, dtype=mod.dtype, device=mod.device)
    R = NG if kind == FRAME else 1
    NP = NG * NC // R
    g3 = grad.view(B, -1, D)
    block_d = min(triton.next_power_of_2(D), 1024)
    block_p = max(1, min(triton.next_power_of_2(NP), _TILE // block_d))
    launcher(_reduce_partials_kernel)[(B * R, triton.cdiv(D, block_d))](
        buf, g3, g3.stride(0), g3.stride(1) if R > 1 else 0, R, NP, D, BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=_num_warps(block_p, block_d),
    )
    return grad


def _adaln_bwd(dy, dout, x, residual, gate, shift, scale, eps: float, frame_len: int, has_res: bool,
               has_norm: bool, tile: int | None = None, num_warps: int | None = None):
    """Launch the fused backward; returns (dx, dres or None, dgate or None, dshift or None, dscale or None).
    tile / num_warps override the defaults (the benchmark's sweep uses them)."""
    B, L, D = x.shape
    tile, num_warps = _launch_params("adaln_bwd", D, x, tile, num_warps)
    mods = {"gate": gate if has_res else None, "shift": shift if has_norm else None,
            "scale": scale if has_norm else None}
    kinds = {k: _mod_layout(m, L, frame_len)[4] for k, m in mods.items() if m is not None}
    G = frame_len if FRAME in kinds.values() else L  # tokens per group: every reduced row lies in one group
    NG = L // G
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min((tile or _TILE) // block_d, triton.next_power_of_2(G)))
    NC, rows_per_prog = _bwd_chunks(x, B, NG, G, block_m)
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    dres = torch.empty((B, L, D), dtype=x.dtype, device=x.device) if has_res and has_norm else None
    bufs = {k: _grad_buffer(m, kinds[k], B, L, NG, NC, D) if m is not None else (x, 0, 0) for k, m in mods.items()}
    dummy = x
    g_lay = _mod_layout(gate, L, frame_len)[:4] if has_res else (0, 0, 0, 1)
    c_lay = _mod_layout(scale, L, frame_len)[:4] if has_norm else (0, 0, 0, 1)
    launcher(_adaln_bwd_kernel)[(B * NG * NC,)](
        dy if has_norm else dummy, *(_strides3(dy) if has_norm else (0, 0, 0)),
        dout if has_res else dummy, *(_strides3(dout) if has_res else (0, 0, 0)),
        x, *_strides3(x),
        residual if has_res else dummy, *(_strides3(residual) if has_res else (0, 0, 0)),
        gate if has_res else dummy, *g_lay,
        scale if has_norm else dummy, *c_lay,
        dx, dres if dres is not None else dummy,
        *bufs["gate"], *bufs["shift"], *bufs["scale"],
        L, D, G, NC, rows_per_prog, eps,
        HAS_RES=has_res, HAS_NORM=has_norm, GATE_TOKEN=kinds.get("gate") == TOKEN,
        SHIFT_TOKEN=kinds.get("shift") == TOKEN, SCALE_TOKEN=kinds.get("scale") == TOKEN,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps or _num_warps(block_m, block_d, 8, 16),
    )
    grads = {k: _finish_grad(m, kinds[k], bufs[k][0], B, NG, NC, D) if m is not None else None
             for k, m in mods.items()}
    return dx, dres, grads["gate"], grads["shift"], grads["scale"]


# ---------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (kernels/_launch.py: triton_op on GPU, custom_op + fake under the interpreter)
# ---------------------------------------------------------------------------------------------------------------


def _register(name: str, fn, fake):
    return register(f"wmfast::{name}", fn, fake)


def _like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---- forward ops ----


def _lnm_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, frame_len: int) -> torch.Tensor:
    return _adaln_fwd(x, None, None, shift, scale, eps, frame_len, has_res=False, has_norm=True)[0]


def _lnm_fwd_fake(x, shift, scale, eps, frame_len):
    return _like(x)


def _gr_fwd(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, frame_len: int) -> torch.Tensor:
    return _adaln_fwd(x, residual, gate, None, None, 0.0, frame_len, has_res=True, has_norm=False)[1]


def _gr_fwd_fake(residual, x, gate, frame_len):
    return _like(x)


def _grlnm_fwd(residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
               scale: torch.Tensor, eps: float, frame_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _adaln_fwd(x, residual, gate, shift, scale, eps, frame_len, has_res=True, has_norm=True)


def _grlnm_fwd_fake(residual, x, gate, shift, scale, eps, frame_len):
    return _like(x), _like(x)


layernorm_modulate_op = _register("layernorm_modulate", _lnm_fwd, _lnm_fwd_fake)
gated_residual_op = _register("gated_residual", _gr_fwd, _gr_fwd_fake)
gated_residual_layernorm_modulate_op = _register("gated_residual_layernorm_modulate", _grlnm_fwd, _grlnm_fwd_fake)


# ---- backward ops ----


def _lnm_bwd(dy: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             frame_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, _, _, dshift, dscale = _adaln_bwd(dy, None, x, None, None, shift, scale, eps, frame_len,
                                          has_res=False, has_norm=True)
    return dx, dshift, dscale


def _lnm_bwd_fake(dy, x, shift, scale, eps, frame_len):
    return _like(x), _like(shift), _like(scale)


def _gr_bwd(dout: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
            frame_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    dx, _, dgate, _, _ = _adaln_bwd(None, dout, x, x, gate, None, None, 0.0, frame_len, has_res=True,
                                    has_norm=False)
    return dx, dgate


def _gr_bwd_fake(dout, x, gate, frame_len):
    return _like(x), _like(gate)


def _grlnm_bwd(dy: torch.Tensor, dout: torch.Tensor, residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
               shift: torch.Tensor, scale: torch.Tensor, eps: float, frame_len: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dres, dgate, dshift, dscale = _adaln_bwd(dy, dout, x, residual, gate, shift, scale, eps, frame_len,
                                                 has_res=True, has_norm=True)
    return dres, dx, dgate, dshift, dscale


def _grlnm_bwd_fake(dy, dout, residual, x, gate, shift, scale, eps, frame_len):
    return _like(x), _like(x), _like(gate), _like(shift), _like(scale)


layernorm_modulate_bwd_op = _register("layernorm_modulate_bwd", _lnm_bwd, _lnm_bwd_fake)
gated_residual_bwd_op = _register("gated_residual_bwd", _gr_bwd, _gr_bwd_fake)
gated_residual_layernorm_modulate_bwd_op = _register("gated_residual_layernorm_modulate_bwd", _grlnm_bwd,
                                                     _grlnm_bwd_fake)


# ---- autograd ----
# The gradients of the modulation come back in its own shape and dtype (contiguous); autograd scatters them into
# the parent of a strided view (e.g. the [B, 6, D] tensor that was unbound).


def _lnm_setup(ctx, inputs, output):
    x, shift, scale, eps, frame_len = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps, ctx.frame_len = eps, frame_len


def _lnm_backward(ctx, dy):
    x, shift, scale = ctx.saved_tensors
    dx, dshift, dscale = layernorm_modulate_bwd_op(dy, x, shift, scale, ctx.eps, ctx.frame_len)
    return dx, dshift, dscale, None, None


def _gr_setup(ctx, inputs, output):
    _residual, x, gate, frame_len = inputs
    ctx.save_for_backward(x, gate)
    ctx.frame_len = frame_len


def _gr_backward(ctx, dout):
    x, gate = ctx.saved_tensors
    dx, dgate = gated_residual_bwd_op(dout, x, gate, ctx.frame_len)
    return dout, dx, dgate, None  # d(residual) = d(out)


def _grlnm_setup(ctx, inputs, output):
    residual, x, gate, shift, scale, eps, frame_len = inputs
    ctx.save_for_backward(residual, x, gate, shift, scale)
    ctx.eps, ctx.frame_len = eps, frame_len


def _grlnm_backward(ctx, dy, dout):
    residual, x, gate, shift, scale = ctx.saved_tensors
    dres, dx, dgate, dshift, dscale = gated_residual_layernorm_modulate_bwd_op(
        dy, dout, residual, x, gate, shift, scale, ctx.eps, ctx.frame_len)
    return dres, dx, dgate, dshift, dscale, None, None


layernorm_modulate_op.register_autograd(_lnm_backward, setup_context=_lnm_setup)
gated_residual_op.register_autograd(_gr_backward, setup_context=_gr_setup)
gated_residual_layernorm_modulate_op.register_autograd(_grlnm_backward, setup_context=_grlnm_setup)
