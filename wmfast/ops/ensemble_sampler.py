"""Public sampler ops for batched ensemble denoising (validation + backend dispatch; forward only).

Backends: "triton" (wmfast.kernels.ensemble_sampler) and "torch" (the references), chosen by wmfast.ops.dispatch;
`use_backend(...)` or WMFAST_BACKEND forces one.
"""
from __future__ import annotations

import torch

from wmfast.kernels.ensemble_sampler import (
    ensemble_euler_step_ref,
    ensemble_euler_step_triton,
    ensemble_mean_var_ref,
    ensemble_mean_var_triton,
)
from wmfast.ops.common import check_dtype
from wmfast.ops.common import shape as _shape
from wmfast.ops.dispatch import OpInputs, traceable_backend


def _check_step_args(x, v, dt, context) -> torch.Tensor:
    """Raise ValueError naming the bad argument; return dt as a 0-d fp32 tensor on x.device."""
    for name, t in (("x", x), ("v", v), ("context", context)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"ensemble_euler_step: {name} must be a tensor, got {type(t).__name__}")  # noqa: TRY004
        if not t.is_floating_point():
            raise ValueError(f"ensemble_euler_step: {name} must be floating point, got {t.dtype}")
        check_dtype(f"ensemble_euler_step: {name}", t)
        if t.device != x.device:
            raise ValueError(f"ensemble_euler_step: {name} is on {t.device} but x is on {x.device}")
    if x.dim() != 5:
        raise ValueError(f"ensemble_euler_step: x must be [N, C, F, H, W], got shape {_shape(x)}")
    if v.shape != x.shape:
        raise ValueError(f"ensemble_euler_step: v shape {_shape(v)} != x shape {_shape(x)}")
    N, C, F, H, W = x.shape
    if context.dim() != 5 or context.shape[0] not in (1, N) or context.shape[1] != C \
            or context.shape[3:] != x.shape[3:] or context.shape[2] > F:
        raise ValueError(f"ensemble_euler_step: context must be [1 or N, C, Fc <= F, H, W] = [1 or {N}, {C}, "
                         f"<= {F}, {H}, {W}], got shape {_shape(context)}")
    if isinstance(dt, torch.Tensor):
        if dt.numel() != 1:
            raise ValueError(f"ensemble_euler_step: dt must hold one value, got shape {_shape(dt)}")
        if dt.device != x.device:
            raise ValueError(f"ensemble_euler_step: dt is on {dt.device} but x is on {x.device}")
        return dt.reshape(()).float()
    if not isinstance(dt, (int, float)):
        raise ValueError(f"ensemble_euler_step: dt must be a float or a one-element tensor, "  # noqa: TRY004
                         f"got {type(dt).__name__}")
    # A host float becomes a device scalar (one small H2D copy); the sampler passes device tensors instead.
    return torch.tensor(float(dt), device=x.device, dtype=torch.float32)


def ensemble_euler_step(x: torch.Tensor, v: torch.Tensor, dt, context: torch.Tensor) -> torch.Tensor:
    """One flow-matching Euler step over an ensemble, with the clean context re-imposed, in one pass.

    x, v: [N, C, F, H, W] latents of the N members and their predicted velocity; dt = sigma_next - sigma
    (float or one-element tensor on x's device: a device tensor keeps the step loop free of host syncs);
    context: [1, C, Fc, H, W] (broadcast to every member without a copy) or [N, C, Fc, H, W], Fc <= F.
    x, v and context are float32, float16 or bfloat16 (float64 is refused, as by every op).
    Returns y: [N, C, F, H, W] in x.dtype, y[:, :, :Fc] = context, y[:, :, Fc:] = x + dt * v (fp32 math)."""
    dt = _check_step_args(x, v, dt, context)
    if traceable_backend("ensemble_euler_step", OpInputs.of(x)) == "triton":
        return ensemble_euler_step_triton(x, v, dt, context)
    return ensemble_euler_step_ref(x, v, dt, context)


def ensemble_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble mean and population variance (correction 0) over the member dimension, in one pass.

    x: [N, ...] (float32/float16/bfloat16) -> (mean [...], var [...]) in x.dtype, accumulated in fp32 (Welford on
    the deviations from member 0: exact-scale variances under a large common offset)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"ensemble_mean_var: x must be a floating-point tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    check_dtype("ensemble_mean_var: x", x)
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"ensemble_mean_var: x must be [N >= 1, ...], got shape {_shape(x)}")
    if traceable_backend("ensemble_mean_var", OpInputs.of(x)) == "triton":
        return ensemble_mean_var_triton(x)
    return ensemble_mean_var_ref(x)
