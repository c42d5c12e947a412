"""Greedy head: argmax over the vocabulary of h @ weight.T without the [N, V] logits (greedy decoding's output head).

Reading order (STYLE.md): reference, jit kernels, launcher, torch.library registration. The public, validated
functional API is `wmfast.ops.greedy_head` (wmfast/ops/greedy_head.py); the op here assumes valid input.

Semantics, per row n of h [N, D] against the tied embedding weight [V, D] (same dtype, unit stride over D):
    logits[v] = sum_d h[n, d] * weight[v, d]        accumulated in fp32 from inputs in h.dtype
    index[n]  = argmax_v logits[v]                  int64, the FIRST maximal v on ties, as torch.argmax
    value[n]  = logits[index[n]]                    fp32
NaN counts as larger than everything (torch.argmax returns the first NaN's index): a NaN in weight rows selects
the first such row, a NaN in a row of h (all its logits NaN) selects index 0. A row whose logits are all -inf
gives index 0. fp32 inputs: tl.dot's input_precision is "ieee" when torch's fp32 matmul precision is "highest"
(the default: an fp32 F.linear) and "tf32" when TF32 is allowed (`_launch.fp32_dot_precision`), read at launch
time (under torch.compile: when traced). bf16/fp16: the tensor-core dot. Inference only: no autograd formula (wmfast.ops.greedy_head refuses
inputs that require grad while grad mode is on).

Kernel design: grid (cdiv(N, BLOCK_N), SPLITS). Program (i, s) owns rows [i * BLOCK_N, (i + 1) * BLOCK_N) and a
contiguous run of vocabulary tiles (BLOCK_V wide); per tile it accumulates the [BLOCK_N, BLOCK_V] logits over D in
BLOCK_K steps with tl.dot, then folds the tile into a running (max, first index) per row in fp32 registers, and
finally writes one partial (max, index) per row and split. A second small kernel reduces the SPLITS partials of
each row with the same first-max / NaN rule (a lower split holds lower vocabulary indices, so ties go to it).
Splitting the vocabulary keeps the GPU busy when N is small (B = 1: N = 1024 rows are only 8 row blocks); with
as many row blocks as the GPU has program slots, SPLITS = 1 and the first kernel writes the outputs directly.
Row block is the fastest grid axis, so the row blocks working on one vocabulary range run together and share its
weight tiles through L2. Memory: the outputs and two [N, SPLITS] partial buffers (fp32, int64), nothing else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from wmfast.kernels._launch import fp32_dot_precision, launcher, register, triton_interpret

MAX_V = 2**31 - 2**20  # column indices run in int32 (a tile's, up to 2**20 wide, included); pointers in int64

# ---------------------------------------------------------------------------------------------------------------
# 1. Reference (the specification)
# ---------------------------------------------------------------------------------------------------------------


def _combine(best_v, best_i, v, i):
    """Running (max, first index): take (v, i) where it is larger, or NaN over a non-NaN (earlier chunks keep ties)."""
    take = (v > best_v) | (v.isnan() & ~best_v.isnan())
    return torch.where(take, v, best_v), torch.where(take, i, best_i)


def greedy_head_ref(h, weight, *, upcast=True, block_elements=2**22):
    """Reference: (index int64 [N], value fp32 [N]) = first argmax and max of the logits h @ weight.T per row.

    h [N, D], weight [V, D]. upcast=True: logits in fp32 from fp32-cast inputs (the specification); upcast=False:
    F.linear in h.dtype (what plain PyTorch's `(h @ weight.T).argmax(-1)` does; in bf16/fp16 the logits are
    rounded to h.dtype before the comparison, so logits that differ in fp32 can tie there). The logits are made
    chunk by chunk (vocabulary chunks outside, row chunks inside; a running combine keeps the earlier index on ties
    and prefers NaN, as torch.argmax), so that no temporary holds more than `block_elements` elements: a logits
    chunk, or an fp32 copy of a weight or h chunk."""
    N, D = h.shape
    V = weight.shape[0]
    dt = torch.float32 if upcast else h.dtype
    v_chunk = max(1, min(V, block_elements // D))
    n_chunk = max(1, min(N, block_elements // v_chunk, block_elements // D))
    best_v = torch.full((N,), float("-inf"), dtype=torch.float32, device=h.device)
    best_i = torch.zeros(N, dtype=torch.int64, device=h.device)
    for v0 in range(0, V, v_chunk):
        w = weight[v0: v0 + v_chunk].to(dt)
        for n0 in range(0, N, n_chunk):
            logits = F.linear(h[n0: n0 + n_chunk].to(dt), w)  # [n, v]
            value, index = torch.max(logits, dim=1)  # first maximum on ties, NaN first (as torch.argmax)
            del logits
            best_v[n0: n0 + n_chunk], best_i[n0: n0 + n_chunk] = _combine(
                best_v[n0: n0 + n_chunk], best_i[n0: n0 + n_chunk], value.float(), index + v0)
    return best_i, best_v


# ---------------------------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _first_max(vals, pos, valid):
    """Per row of vals [R, C] (fp32): (max, first position) as torch.argmax: NaN above everything, the smallest
    int32 position `pos` [1, C] among equal maxima, entries where `valid` is False ignored. (int32 positions, not
    int64 indices: a [128, 128] int64 tile would cost 64 more registers a thread.)"""
    nan = (vals != vals) & valid  # noqa: PLR0124 - NaN alone is unequal to itself
    any_nan = tl.max(nan.to(tl.int32), axis=1) > 0
    key = tl.where(valid, tl.where(nan, float("inf"), vals), float("-inf"))
    best = tl.max(key, axis=1)
    cand = tl.where(any_nan[:, None], nan, valid & (key == best[:, None]))
    first = tl.min(tl.where(cand, pos, 2147483647), axis=1)
    return tl.where(any_nan, float("nan"), best), first


@triton.jit
def _greedy_head_kernel(
    H, W, PMAX, PIDX,  # h [N, D], weight [V, D] (unit stride over D); partials [N, SPLITS] fp32 / int64
    N, V, D, stride_h, stride_w, TILES_PER_SPLIT,
    PRECISION: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    h_rows = H + rows.to(tl.int64)[:, None] * stride_h  # [BLOCK_N, 1] row pointers
    lanes_v = tl.arange(0, BLOCK_V)
    lanes_k = tl.arange(0, BLOCK_K)
    t0 = split * TILES_PER_SPLIT
    t1 = tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(V, BLOCK_V))
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max (NaN once a NaN is seen)
    arg = tl.zeros([BLOCK_N], tl.int64) + t0 * BLOCK_V  # its first index (all -inf: the split's first column)
    for t in range(t0, t1):
        cols = t * BLOCK_V + lanes_v
        cmask = cols < V
        cols64 = cols.to(tl.int64)
        w_cols = W + cols64[None, :] * stride_w  # [1, BLOCK_V] column pointers of weight.T
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            ks = k + lanes_k
            if EVEN_K:
                a = tl.load(h_rows + ks[None, :], mask=rmask[:, None], other=0.0)
                b = tl.load(w_cols + ks[:, None], mask=cmask[None, :], other=0.0)
            else:
                kmask = ks < D
                a = tl.load(h_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_cols + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
            if DOT_FP32:  # (the interpreter's dot reads bf16 operands as raw integers; the cast is exact)
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tile_max, first = _first_max(acc, lanes_v[None, :], cmask[None, :])
        tile_arg = (t * BLOCK_V + first).to(tl.int64)  # < V <= MAX_V: no int32 overflow
        # a later tile replaces the running max only when strictly larger (ties keep the earlier, lower index),
        # or when it brings the first NaN
        take = (tile_max > m) | ((tile_max != tile_max) & (m == m))  # noqa: PLR0124
        m = tl.where(take, tile_max, m)
        arg = tl.where(take, tile_arg, arg)
    out = rows.to(tl.int64) * tl.num_programs(1) + split
    tl.store(PMAX + out, m, mask=rmask)
    tl.store(PIDX + out, arg, mask=rmask)


@triton.jit
def _greedy_head_reduce_kernel(PMAX, PIDX, VALUE, INDEX, N, SPLITS,
                               BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    mask = rmask[:, None] & (sp < SPLITS)[None, :]
    offs = rows64[:, None] * SPLITS + sp[None, :]
    m = tl.load(PMAX + offs, mask=mask, other=float("-inf"))
    i = tl.load(PIDX + offs, mask=mask, other=0)
    value, first = _first_max(m, sp[None, :], mask)  # equal maxima: the lowest split, which has the lower index
    index = tl.sum(tl.where(sp[None, :] == first[:, None], i, 0), axis=1)
    tl.store(VALUE + rows64, value, mask=rmask)
    tl.store(INDEX + rows64, index, mask=rmask)


# ---------------------------------------------------------------------------------------------------------------
# 3. Launcher
# ---------------------------------------------------------------------------------------------------------------

# GPU tiles (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) by dot precision, compiled for sm_90a at N = 1024,
# V = 64000, D = 512 (tests/ops/greedy_head_compile_check.py --sweep, Triton 3.9, ptxas -v). Tensor-core dots
# (bf16/fp16, tf32): 128 x 128 x 64 (32 in fp32), 8 warps, 3 stages: wgmma, 174 registers (173 tf32), no spills,
# 96 KiB of shared memory: one program an SM (Triton's Hopper matmul shape; the per-tile argmax costs ~45 registers
# over the bare matmul's 126). Alternatives: 8 warps at 128 x 256 or 4 warps at 128 x 128: 255 registers; 4 warps
# at 64 x 128: 177. Exact fp32 ("ieee": FMA, no tensor cores): 64 x 128 x 32, 8 warps: 128 registers, no spills;
# 128 x 128 spills (72 bytes), 64 x 64 at 4 warps takes 168 registers. Chosen without a GPU: not timed yet.
GPU_TILES = {"mma": (128, 128, 64, 8, 3), "tf32": (128, 128, 32, 8, 3), "ieee": (64, 128, 32, 8, 3)}
PROGRAMS_PER_SM = 4  # vocabulary splits make ~4 programs an SM: 4 short waves even out the tail of the last one
# Under the interpreter every program and tile is a Python-level step over numpy (each call of the jit helper costs
# ~10 ms of patching): the largest tiles Triton allows (2**20 elements), one split. N=1024, V=64000, D=16 on a
# shared 2-core CPU: 3.5 s, against 5.4 s at 256 x 2048 and 7.9 s at 128 x 2048.
_INTERPRET_BLOCK_N, _INTERPRET_BLOCK_V = 256, 4096


def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 follows torch's matmul precision (checked at each launch); 16-bit: mma."""
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


def _tiles(N: int, V: int, D: int, dtype: torch.dtype, precision: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages), each block shrunk to the problem (tl.dot needs >= 16)."""
    bn, bv, bk, warps, stages = GPU_TILES["mma" if dtype != torch.float32 else precision]
    if triton_interpret():
        bn, bv = _INTERPRET_BLOCK_N, _INTERPRET_BLOCK_V

    def fit(block: int, n: int) -> int:
        return max(16, min(block, triton.next_power_of_2(n)))

    return fit(bn, N), fit(bv, V), fit(bk, D), warps, stages


def _splits(row_blocks: int, tiles: int, device: torch.device) -> int:
    """Vocabulary splits: enough programs for PROGRAMS_PER_SM an SM, 1 when the row blocks fill the GPU alone."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: splitting only adds the reduction
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(tiles, triton.cdiv(PROGRAMS_PER_SM * sms, row_blocks)))


def _greedy_head(h: torch.Tensor, weight: torch.Tensor, *, splits: int | None = None, block_n: int | None = None,
                 block_v: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index int64 [N], value fp32 [N]) for h [N, D] (unit stride over D) and weight [V, D] (unit stride over D).
    The keyword arguments override the defaults (tests, sweeps); `splits` is clamped to the number of tiles."""
    N, D = h.shape
    V = weight.shape[0]
    if h.stride(1) != 1 or weight.stride(1) != 1 or V > MAX_V:
        raise ValueError(f"greedy_head: h {tuple(h.shape)} strides {h.stride()}, weight {tuple(weight.shape)} strides "
                         f"{weight.stride()}: need unit stride over D and V <= {MAX_V}")
    precision = _dot_precision(h.dtype)
    bn, bv, bk, warps, stages = _tiles(N, V, D, h.dtype, precision)
    bn, bv, bk = block_n or bn, block_v or bv, block_k or bk
    row_blocks, tiles = triton.cdiv(N, bn), triton.cdiv(V, bv)
    splits = max(1, min(tiles, splits or _splits(row_blocks, tiles, h.device)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty split
    pmax = torch.empty((N, splits), dtype=torch.float32, device=h.device)
    pidx = torch.empty((N, splits), dtype=torch.int64, device=h.device)
    launcher(_greedy_head_kernel)[(row_blocks, splits)](
        h, weight, pmax, pidx, N, V, D, h.stride(0), weight.stride(0), tiles_per_split,
        PRECISION=precision, EVEN_K=D % bk == 0,
        DOT_FP32=triton_interpret() and h.dtype == torch.bfloat16, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
        num_warps=num_warps or warps, num_stages=num_stages or stages)
    if splits == 1:
        return pidx.view(N), pmax.view(N)
    index = torch.empty(N, dtype=torch.int64, device=h.device)
    value = torch.empty(N, dtype=torch.float32, device=h.device)
    block_s = triton.next_power_of_2(splits)
    block_r = max(1, min(triton.next_power_of_2(N), 2048 // block_s))
    launcher(_greedy_head_reduce_kernel)[(triton.cdiv(N, block_r),)](
        pmax, pidx, value, index, N, splits, BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4)
    return index, value


# ---------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (kernels/_launch.py: triton_op on GPU, custom_op + fake under the interpreter)
# ---------------------------------------------------------------------------------------------------------------


def _gh(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _greedy_head(h, weight)


def _gh_fake(h, weight):
    N = h.shape[0]
    return h.new_empty(N, dtype=torch.int64), h.new_empty(N, dtype=torch.float32)


# (index, value) = greedy_head_op(h [N, D], weight [V, D]). No autograd formula: inference only.
greedy_head_op = register("wmfast::greedy_head", _gh, _gh_fake)
