"""Fused sampler ops for batched ensemble denoising (forward only: sampling never differentiates).

Reading order (STYLE.md): references, jit kernels, launchers, torch.library registration.

1. `ensemble_euler_step`: one flow-matching Euler step over the whole ensemble and, in the same pass, the
   clean context latents re-imposed on the first `Fc` latent frames of every member:
       y[n, c, f] = context[n or 0, c, f]          for f <  Fc  (context: batch 1 broadcast, or batch N)
       y[n, c, f] = x[n, c, f] + dt * v[n, c, f]   for f >= Fc  (fp32 math, cast to x.dtype)
   with dt = sigma_next - sigma (< 0: flow matching integrates from noise, sigma = 1, to data, sigma = 0).
   Unfused, this is `x + dt * v` over all frames then a `copy_` of the context into the first Fc frames: two
   launches, and the context frames are read (x, v), written, then overwritten. Fused, context rows never
   read x or v (masked loads): x and v are read only where the update applies, y written once. The gain is modest
   and honest: one launch and ~Fc/F of the traffic (2 of 7 latent frames with the default schedule); the
   update is memory-bound and small next to the DiT forward, which is what the batching amortises.
2. `ensemble_mean_var`: the ensemble mean and population variance (correction 0: N = 1 gives 0) over the
   leading member dimension in one pass (fp32 Welford on the deviations from member 0, in registers), instead
   of a mean pass and a var pass.
   Used on latents (latent-space averaging) and on decoded pixels (pixel-space averaging and the spread map).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from wmfast.kernels._launch import launcher, register

# ---------------------------------------------------------------------------------------------------------
# 1. pure-torch references (the specification)
# ---------------------------------------------------------------------------------------------------------


def ensemble_euler_step_ref(x, v, dt, context, *, upcast=True):
    """Reference. x, v: [N, C, F, H, W]; dt: 0-d tensor or float; context: [1 or N, C, Fc, H, W], Fc <= F.
    upcast=True computes in fp32 (the specification); upcast=False in x.dtype (plain PyTorch in low precision)."""
    dt_ = torch.float32 if upcast else x.dtype
    dt = torch.as_tensor(dt, device=x.device).to(dt_)
    y = (x.to(dt_) + dt * v.to(dt_)).to(x.dtype)
    Fc = context.shape[2]
    y[:, :, :Fc] = context.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1)
    return y


def ensemble_mean_var_ref(x, *, upcast=True):
    """Reference. x: [N, ...] -> (mean [...], var [...]), population variance over dim 0, cast to x.dtype.

    Computed on the deviations from member 0 (mean = x[0] + mean(d), var = var(d), d = x - x[0]), as the kernel:
    d is exact or nearly so, and small next to a large common offset (latents, pixels in [0, 255]), so neither
    statistic rounds at the offset's scale."""
    dt_ = torch.float32 if upcast else x.dtype
    xf = x.to(dt_)
    d = xf - xf[:1]
    return (xf[0] + d.mean(0)).to(x.dtype), d.var(0, correction=0).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# 2. jit kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _ensemble_euler_step_fwd_kernel(
    X, V, CTX, DT, Y,
    C, F, FC, R, S,
    sxn, sxc, sxf, sxs,
    svn, svc, svf, svs,
    scn, scc, scf, scs,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per BLOCK_R rows (a row = one (member n, channel c, latent frame f)) x BLOCK_S of the H*W
    # positions. Several rows per program keep programs large when H*W is small (and the interpreter fast).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    f = rows % F
    c = (rows // F) % C
    n = rows // (C * F)
    inside = (rows < R)[:, None] & (offs < S)[None, :]
    is_ctx = (f < FC)[:, None]
    # Masked loads fetch nothing: context rows read only the (possibly batch-1, stride-0) context, the
    # other rows only x and v.
    ctx = tl.load(CTX + (n * scn + c * scc + f * scf)[:, None] + offs[None, :] * scs, mask=inside & is_ctx)
    x = tl.load(X + (n * sxn + c * sxc + f * sxf)[:, None] + offs[None, :] * sxs, mask=inside & ~is_ctx)
    v = tl.load(V + (n * svn + c * svc + f * svf)[:, None] + offs[None, :] * svs, mask=inside & ~is_ctx)
    dt = tl.load(DT).to(tl.float32)
    y = tl.where(is_ctx, ctx.to(tl.float32), x.to(tl.float32) + dt * v.to(tl.float32))
    tl.store(Y + rows[:, None] * S + offs[None, :], y.to(Y.dtype.element_ty), mask=inside)  # Y: contiguous


@triton.jit
def _ensemble_mean_var_fwd_kernel(X, MEAN, VAR, N, M, sxn, BLOCK: tl.constexpr):
    # One program per BLOCK of the M per-member elements; the N members are streamed through registers.
    # Welford (no cancellation of sum(x^2) - sum(x)^2) on d = x - x0, the deviations from member 0: d is exact
    # when x is within a factor 2 of x0, and its running mean stays at the scale of the spread. Welford on x
    # itself rounds the running mean at the scale of the offset: 6-12% error on the variance of
    # 1e4 + 1e-2 * randn (fp32 ulp at 1e4: 1e-3), ~1e-7 on d.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    x0 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float32)  # of d; member 0 (d = 0) is counted
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.full([BLOCK], 1.0, dtype=tl.float32)
    x_ptrs = X + offs + sxn
    for _ in range(1, N):
        d = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) - x0
        count += 1.0
        delta = d - mean
        mean += delta / count
        m2 += delta * (d - mean)
        x_ptrs += sxn
    tl.store(MEAN + offs, (x0 + mean).to(MEAN.dtype.element_ty), mask=mask)
    tl.store(VAR + offs, (m2 / count).to(VAR.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# 3. launchers (inputs validated by wmfast.ops.ensemble_sampler; these only adapt strides)
# ---------------------------------------------------------------------------------------------------------


def _spatial_stride(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, stride of the merged H*W axis). H and W merge without a copy when stride_h == W * stride_w
    (true for contiguous tensors and for slices along N, C or F); otherwise the launcher copies."""
    if t.shape[3] > 1 and t.shape[4] > 1 and t.stride(3) != t.shape[4] * t.stride(4):
        t = t.contiguous()
    return t, t.stride(4) if t.shape[4] > 1 else t.stride(3)


def _ensemble_euler_step_fwd(x, v, dt, context):
    N, C, F, H, W = x.shape
    S = H * W
    x, sxs = _spatial_stride(x)
    v, svs = _spatial_stride(v)
    context, scs = _spatial_stride(context)
    y = torch.empty((N, C, F, H, W), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    scn = context.stride(0) if context.shape[0] == N else 0  # batch-1 context: broadcast with stride 0
    R = N * C * F
    BLOCK_S = min(1024, triton.next_power_of_2(S))
    BLOCK_R = min(triton.next_power_of_2(R), max(1, 2048 // BLOCK_S))
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(S, BLOCK_S))
    launcher(_ensemble_euler_step_fwd_kernel)[grid](
        x, v, context, dt, y,
        C, F, context.shape[2], R, S,
        x.stride(0), x.stride(1), x.stride(2), sxs,
        v.stride(0), v.stride(1), v.stride(2), svs,
        scn, context.stride(1), context.stride(2), scs,
        BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S,
    )
    return y


def _ensemble_mean_var_fwd(x):
    N = x.shape[0]
    x2 = x.reshape(N, -1)  # a view whenever the per-member part is contiguous (e.g. x = batch[::2])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[1]
    mean = torch.empty(x.shape[1:], device=x.device, dtype=x.dtype)
    var = torch.empty(x.shape[1:], device=x.device, dtype=x.dtype)
    if M == 0:
        return mean, var
    BLOCK = min(1024, triton.next_power_of_2(M))
    launcher(_ensemble_mean_var_fwd_kernel)[(triton.cdiv(M, BLOCK),)](
        x2, mean, var, N, M, x2.stride(0), BLOCK=BLOCK)
    return mean, var


# ---------------------------------------------------------------------------------------------------------
# 4. torch.library registration (kernels/_launch.py): torch.compile(fullgraph=True) traces the kernels, CUDA
#    graphs capture them
# ---------------------------------------------------------------------------------------------------------


def _ensemble_euler_step_fake(x, v, dt, context):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _ensemble_mean_var_fake(x):
    return (torch.empty(x.shape[1:], device=x.device, dtype=x.dtype),
            torch.empty(x.shape[1:], device=x.device, dtype=x.dtype))


def _euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return _ensemble_euler_step_fwd(x, v, dt, context)


def _mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _ensemble_mean_var_fwd(x)


ensemble_euler_step_triton = register("wmfast::ensemble_euler_step", _euler_step, _ensemble_euler_step_fake)
ensemble_mean_var_triton = register("wmfast::ensemble_mean_var", _mean_var, _ensemble_mean_var_fake)
