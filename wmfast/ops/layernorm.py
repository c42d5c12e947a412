"""Public LayerNorm ops with affine parameters: validate, pick a backend (`wmfast.ops.dispatch`), run it.

- layer_norm(x, weight, bias): LayerNorm over the last dim of x [..., D].
- residual_layer_norm(residual, x, weight, bias) -> (y, out): out = residual + x (rounded to x.dtype, the
  residual stream), y = LayerNorm(out): the pre-norm transformer's "add, then normalise" in one pass.
- qk_layer_norm(qkv, q_norm, k_norm, num_heads) -> (q, k): QK-norm over the head dim of the q and k columns of
  one qkv projection [..., 3 * H * Dh], read in place, both in one launch; q, k are [..., H, Dh] views.

Backends: "triton" (wmfast.kernels.layernorm, registered with torch.library: fp32 statistics, results in x's
dtype, so a bf16 residual stream never round-trips through fp32 memory) and "torch" (the references, which
torch.compile traces natively). Every bad input raises ValueError naming the argument, before any launch.
"""
from __future__ import annotations

import torch

from wmfast.kernels import layernorm as _k
from wmfast.ops.common import check_eps, check_rows, check_vector
from wmfast.ops.common import shape as _shape
from wmfast.ops.dispatch import OpInputs, traceable_backend


def _backend(op: str, x, tensors, width: int | None = None) -> str:
    """The backend for normalising rows of `width` (default x's last dim) elements of x."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return traceable_backend(op, OpInputs(x.device, x.dtype, (width or x.shape[-1],), grad))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> a [M, 1, D] view when the layout allows (else a copy), contiguous over D."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, 1, t.shape[-1])


def layer_norm(x, weight, bias, *, eps: float = 1e-5):
    """y = LayerNorm(x) * weight + bias over the last dim, fp32 statistics, y in x.dtype.

    x: [..., D] (float32/float16/bfloat16, any strides; a non-contiguous last dim is copied). weight, bias: [D].
    Returns y: x.shape, contiguous. Differentiable in x, weight and bias."""
    check_rows("x", x)
    check_eps(eps)
    D = x.shape[-1]
    check_vector("weight", weight, D, x)
    check_vector("bias", bias, D, x)
    rows, w, b = _rows(x), weight.view(1, D), bias.view(1, D)
    if _backend("layer_norm", x, (x, weight, bias)) == "triton":
        y = _k.layer_norm_op(rows, w, b, float(eps))
    else:
        y = _k.layer_norm_ref(rows, w, b, eps=eps)
    return y.view(x.shape)


def residual_layer_norm(residual, x, weight, bias, *, eps: float = 1e-5):
    """(y, out): out = residual + x rounded to x.dtype (the residual stream), y = LayerNorm(out) * weight + bias.

    residual, x: [..., D], same shape, dtype and device. weight, bias: [D]. Returns y, out: x.shape, x.dtype,
    contiguous. Differentiable in all four tensors; the backward keeps only `out` (and the weight)."""
    check_rows("x", x)
    check_rows("residual", residual, like=x)
    check_eps(eps)
    D = x.shape[-1]
    check_vector("weight", weight, D, x)
    check_vector("bias", bias, D, x)
    r, rows, w, b = _rows(residual), _rows(x), weight.view(1, D), bias.view(1, D)
    if _backend("residual_layer_norm", x, (residual, x, weight, bias)) == "triton":
        y, out = _k.residual_layer_norm_op(r, rows, w, b, float(eps))
    else:
        y, out = _k.residual_layer_norm_ref(r, rows, w, b, eps=eps)
    return y.view(x.shape), out.view(x.shape)


def qk_layer_norm(qkv, q_weight, q_bias, k_weight, k_bias, *, num_heads: int, eps: float = 1e-5):
    """QK-norm: LayerNorm over the head dim of the q and k parts of a fused qkv projection, in one launch.

    qkv: [..., 3 * H * Dh] laid out (q, k, v) x H heads x Dh (a Linear's output), contiguous over the last dim.
    q_weight, q_bias, k_weight, k_bias: [Dh] (the weights are shared by the heads). Returns (q, k), each
    [..., H, Dh] in qkv.dtype: strided views of one new [..., 2, H, Dh] tensor (the head dim contiguous).
    v is qkv's own view `qkv.unflatten(-1, (3, H, Dh))[..., 2, :, :]`. Differentiable in every tensor."""
    check_rows("qkv", qkv)
    check_eps(eps)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    width = qkv.shape[-1]
    if width % (3 * num_heads):
        raise ValueError(f"qkv last dim {width} (shape {_shape(qkv)}) is not 3 * num_heads={num_heads} * Dh")
    H, Dh = num_heads, width // (3 * num_heads)
    for name, p in (("q_weight", q_weight), ("q_bias", q_bias), ("k_weight", k_weight), ("k_bias", k_bias)):
        check_vector(name, p, Dh, qkv)
    lead = qkv.shape[:-1]
    flat = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    rows = flat.reshape(-1, 3, H, Dh)[:, :2].flatten(1, 2)  # [M, 2H, Dh] view: rows 3D apart, heads Dh apart
    w, b = torch.stack((q_weight, k_weight)), torch.stack((q_bias, k_bias))  # [2, Dh]: group 0 = q, 1 = k
    if _backend("layer_norm", qkv, (qkv, q_weight, q_bias, k_weight, k_bias), width=Dh) == "triton":
        y = _k.layer_norm_op(rows, w, b, float(eps))
    else:
        y = _k.layer_norm_ref(rows, w, b, eps=eps)
    y = y.view(*lead, 2, H, Dh)
    return y[..., 0, :, :], y[..., 1, :, :]
