"""Cross-entropy gradient written over the logits in place: the per-chunk core of wmfast.ops.linear_cross_entropy.

Reading order (STYLE.md): reference, jit kernel, launcher, torch.library registration. The public, validated
functional API is `wmfast.ops.linear_cross_entropy` (wmfast/ops/linear_cross_entropy.py); the op here assumes
valid input.

For one chunk of logits z [n, V] (bf16/fp16/fp32, unit stride along V) and targets [n], per row:
    loss    = logsumexp(z) - z[target]                       fp32
    correct = argmax(z) == target                            the first maximum on ties, as torch.argmax
    grad    = (softmax(z) - onehot(target)) * scale          d loss / d z, in z's dtype, written over z
A row whose target is `ignore_index` has loss 0, correct False and a zero gradient (torch's cross_entropy).

The kernel (one program per row, the design of Liger-Kernel's fused linear cross-entropy): pass 1 streams the
row in BLOCK_V blocks keeping, per lane, an online maximum and sum of exponentials and the index of the lane's
first maximum (fp32 in registers; one reduction across lanes at the end instead of one per block); pass 2
streams it again and overwrites it with the gradient. No [n, V] temporary exists: a plain implementation's fp32
upcast, fp32 softmax and its cast back (the reference below; wmfast's chunk loop before this kernel held all
three beside the logits) become one in-place pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from wmfast.kernels._launch import launcher, register, triton_interpret

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default

# ---------------------------------------------------------------------------------------------------------------
# 1. Reference (the specification)
# ---------------------------------------------------------------------------------------------------------------


def cross_entropy_grad_ref(logits, targets, *, scale: float = 1.0, ignore_index: int = IGNORE_INDEX,
                           upcast: bool = True):
    """Reference: (grad [n, V] in logits.dtype, loss [n] fp32, correct [n] bool); `logits` is left unchanged.

    upcast=True computes in fp32 (the specification), upcast=False in logits.dtype (what plain PyTorch does in
    low precision). Also the torch backend of linear_cross_entropy, chunk by chunk: besides the logits it holds
    an fp32 [n, V] copy (the softmax is taken in place on it when it is a copy) and the gradient in
    logits.dtype."""
    n, V = logits.shape
    ignored = targets == ignore_index
    valid = ~ignored & (targets >= 0) & (targets < V)  # a target outside [0, V): NaN loss, zero gradient (kernel)
    t = targets.masked_fill(~valid, 0)
    z = logits.float() if upcast else logits
    lse = z.logsumexp(-1)
    loss = (lse - z.gather(1, t[:, None])[:, 0]).float().masked_fill(~valid, float("nan")).masked_fill(ignored, 0.0)
    correct = (z.argmax(-1) == targets) & valid
    # an ignored row's shift of +inf makes its softmax row exp(-inf) = 0 without an extra pass over [n, V]
    shift = lse.masked_fill(~valid, float("inf"))[:, None]
    p = (z.sub_(shift) if z is not logits else z - shift).exp_()
    p[torch.arange(n, device=logits.device), t] -= valid.to(p.dtype)
    if scale != 1.0:
        p.mul_(scale)
    return p.to(logits.dtype), loss, correct


# ---------------------------------------------------------------------------------------------------------------
# 2. Triton kernel
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_grad_kernel(
    LOGITS, stride_row,  # [n, V], unit stride along V: read twice, overwritten with the gradient in pass 2
    TARGETS, LOSS, CORRECT,  # [n] int32/int64; [n] fp32; [n] bool
    n_rows, V, scale, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program i owns rows [i * BLOCK_N, (i + 1) * BLOCK_N) (one row on a GPU, where a row is 64000 wide; a few
    under the interpreter): pass 1 (online max / sum-exp / argmax per lane), the loss, pass 2 (the gradient)."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < n_rows
    base = LOGITS + rows * stride_row  # [BLOCK_N] row pointers
    target = tl.load(TARGETS + rows, mask=rmask, other=ignore_index).to(tl.int32)
    valid = (target != ignore_index) & (target >= 0) & (target < V)
    lanes = tl.arange(0, BLOCK_V)
    # Per-lane state. The finite floor (not -inf) keeps a masked lane's update NaN-free: |(-inf) - floor| = inf,
    # so it adds exp(-inf) = 0; a lane that only ever saw masked columns has s = 0 and weighs 0 at the end.
    m = tl.full([BLOCK_N, BLOCK_V], -3.0e38, tl.float32)  # running maximum of the lane
    s = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)  # sum of exp(z - m) over the lane's columns
    arg = tl.full([BLOCK_N, BLOCK_V], 2147483647, tl.int32)  # column of the lane's first maximum
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        mask = rmask[:, None] & (cols < V)[None, :]
        z = tl.load(base[:, None] + cols[None, :], mask=mask, other=-float("inf")).to(tl.float32)
        # One exp per element: of exp(m_old - m_new) and exp(z - m_new) one is exp(0) = 1, the other exp(-|z - m|)
        e = tl.exp(-tl.abs(z - m))
        up = z > m  # strict: a later equal value keeps the earlier (first) index
        s = tl.where(up, s * e + 1.0, s + e)
        arg = tl.where(up, cols[None, :], arg)
        m = tl.where(up, z, m)
    row_max = tl.max(m, axis=1)
    total = tl.sum(s * tl.exp(m - row_max[:, None]), axis=1)
    lse = tl.where(rmask, row_max + tl.log(tl.where(rmask, total, 1.0)), 0.0)  # (rows past the end: finite)
    argmax = tl.min(tl.where(m == row_max[:, None], arg, 2147483647), axis=1)
    z_target = tl.load(base + tl.where(valid, target, 0), mask=rmask, other=0.0).to(tl.float32)  # before pass 2
    # an ignored row costs 0; a target outside [0, V) that is not ignore_index (the public op raises before
    # any launch, but under torch.compile it cannot check without a sync) poisons the loss with NaN
    loss = tl.where(valid, lse - z_target, tl.where(target == ignore_index, 0.0, float("nan")))
    tl.store(LOSS + rows, loss, mask=rmask)
    tl.store(CORRECT + rows, valid & (argmax == target), mask=rmask)
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            mask = rmask[:, None] & (cols < V)[None, :]
            ptrs = base[:, None] + cols[None, :]
            z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)) * scale
            tl.store(ptrs, tl.where(valid[:, None], g, 0.0).to(LOGITS.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# 3. Launcher
# ---------------------------------------------------------------------------------------------------------------

# GPU: one row per program in 4096-column blocks, 16 warps (8 elements per thread: one 128-bit access per thread
# per block in bf16). Compiled for sm_90a at V=64000 bf16 (tests/ops/cross_entropy_compile_check.py --sweep,
# Triton 3.9, ptxas -v; no spills anywhere), registers by (BLOCK_V, warps): (4096, 16) 40, (4096, 8) 76,
# (2048, 4) 72, (8192, 16) 81, (4096, 4) 146, (8192, 8) 147, (16384, 16) 128, (16384, 8) 255. Pass 1 keeps 3
# fp32/int32 values per element (max, sum, index), so registers grow with the elements per thread. At 40 registers
# three 16-warp programs fit an SM (48 resident warps to hide the memory latency of a streaming kernel) against
# 24 warps at (4096, 8) and 28 at (2048, 4). Chosen without a GPU: not timed yet
# (benchmarks/bench_cross_entropy.py times the op against the torch path).
GPU_BLOCK_V, GPU_NUM_WARPS = 4096, 16
# Under the interpreter every program and block is a Python-level step: tiles of 16384 elements, several rows
# each (64 rows of V=1000: 0.6 s one row per program, 0.09 s in 16-row tiles; shared 2-core CPU).
_TILE_INTERPRET = 16384


def _cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float, ignore_index: int,
                        write_grad: bool, block_v: int | None = None, num_warps: int | None = None):
    """Launch the kernel over the rows of `logits` [n, V] (overwritten with the gradient when write_grad);
    returns (loss [n] fp32, correct [n] bool). block_v / num_warps override the defaults (for sweeps, tests)."""
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"cross_entropy_grad: logits must have unit stride along V, got strides {logits.stride()}")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    correct = torch.empty(n, dtype=torch.bool, device=logits.device)
    if n == 0:
        return loss, correct
    if triton_interpret():
        block_v = block_v or min(_TILE_INTERPRET, triton.next_power_of_2(V))
        block_n = max(1, min(_TILE_INTERPRET // block_v, triton.next_power_of_2(n)))
    else:  # one row per program: a 64000-wide row is 16 blocks per pass already
        block_v, block_n = block_v or min(GPU_BLOCK_V, triton.next_power_of_2(V)), 1
    launcher(_cross_entropy_grad_kernel)[(triton.cdiv(n, block_n),)](
        logits, logits.stride(0), targets, loss, correct, n, V, float(scale), int(ignore_index),
        WRITE_GRAD=write_grad, BLOCK_N=block_n, BLOCK_V=block_v,
        num_warps=num_warps or max(1, min(GPU_NUM_WARPS, block_v // 256)),
    )
    return loss, correct


# ---------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (kernels/_launch.py: triton_op on GPU, custom_op + fake under the interpreter)
# ---------------------------------------------------------------------------------------------------------------


def _ce_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float, ignore_index: int,
             write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _cross_entropy_grad(logits, targets, scale, ignore_index, write_grad)


def _ce_grad_fake(logits, targets, scale, ignore_index, write_grad):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.bool)


# (loss, correct) = cross_entropy_grad_op(logits, targets, scale, ignore_index, write_grad); logits [n, V] is
# overwritten with (softmax - onehot) * scale when write_grad (declared mutated either way: the schema is static).
# No autograd formula: it is the gradient, used inside linear_cross_entropy's autograd.Function.
cross_entropy_grad_op = register("wmfast::cross_entropy_grad", _ce_grad, _ce_grad_fake, mutates_args=("logits",))
