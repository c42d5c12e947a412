"""Public norm_linear op: (residual add) + LayerNorm + linear + epilogue in one launch, for inference.

norm_linear(x, weight, bias, ln_weight, ln_bias, *, residual, eps, activation, qk_norm, num_heads, qk_eps)
    -> (y, out): out = x + residual rounded to x.dtype (the residual stream; x itself without a residual),
    y = linear(LayerNorm(out)) with either GELU(tanh) or a per-head QK-norm of a qkv projection as epilogue.

Backends: "triton" (wmfast.kernels.norm_linear, forward only) and "torch" (the reference with the linear in x's
dtype, the numbers the eager model computes). A call that needs a gradient runs the torch reference, which is
differentiable, whatever backend is forced; so does a qk_norm head dim the kernel's tile cannot take. Every bad
input raises ValueError naming the argument, before any launch.
"""
from __future__ import annotations

import torch

from wmfast.kernels import norm_linear as _k
from wmfast.ops.common import check_eps, check_rows, check_vector
from wmfast.ops.common import shape as _shape
from wmfast.ops.dispatch import OpInputs, note_fallback, traceable_backend

_QK_NAMES = ("q_weight", "q_bias", "k_weight", "k_bias")


def _check_linear(x, weight, bias) -> None:
    D = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != D or weight.shape[0] == 0:
        raise ValueError(f"weight must be a [N, {D}] tensor (D of x {_shape(x)}), got {_shape(weight)}")
    N = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (N,)):
        raise ValueError(f"bias must be None or a [{N}] tensor (N of weight {_shape(weight)}), got {_shape(bias)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            raise ValueError(f"{name}: {p.dtype} on {p.device}; expected x's {x.dtype} on {x.device}")


def _check_qk(qk_norm, num_heads, N: int, x, activation) -> int:
    """The head dim Dh of a valid qk_norm (0 without one)."""
    if qk_norm is None:
        if num_heads is not None:
            raise ValueError(f"num_heads={num_heads!r} is only used with qk_norm, which is None")
        return 0
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"qk_norm needs num_heads, a positive int; got {num_heads!r}")
    if activation is not None:
        raise ValueError(f"activation={activation!r} and qk_norm exclude each other (qk_norm is for a qkv projection)")
    if not isinstance(qk_norm, (tuple, list)) or len(qk_norm) != 4:
        raise ValueError(f"qk_norm must be a tuple (q_weight, q_bias, k_weight, k_bias), got {qk_norm!r:.80}")
    if N % (3 * num_heads):
        raise ValueError(f"qk_norm: N={N} (weight rows) is not 3 * num_heads={num_heads} * Dh")
    Dh = N // (3 * num_heads)
    for name, p in zip(_QK_NAMES, qk_norm):
        check_vector(f"qk_norm {name}", p, Dh, x, f"Dh = N / (3 * num_heads) = {N} / {3 * num_heads}")
    return Dh


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> a [M, D] view when the layout allows (else a copy), contiguous over D."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _note(device: torch.device, why: str) -> None:
    if not torch.compiler.is_compiling():  # (logging would break a fullgraph trace)
        note_fallback("norm_linear", device, why)


def _backend(x, tensors, head_dim: int) -> str:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        _note(x.device, "a gradient is needed and the Triton kernel is forward-only")
        return "torch"
    backend = traceable_backend("norm_linear", OpInputs(x.device, x.dtype, (x.shape[-1],), False))
    if backend == "triton" and head_dim and head_dim not in _k.QK_HEAD_DIMS:
        _note(x.device, f"qk_norm head dim {head_dim} is not one of {_k.QK_HEAD_DIMS} (the kernel's N tile is one "
                        "head)")
        return "torch"
    return backend


def norm_linear(x, weight, bias, ln_weight, ln_bias, *, residual=None, eps: float = 1e-5, activation=None,
                qk_norm=None, num_heads=None, qk_eps: float = 1e-5):
    """(y, out) = linear(LayerNorm(x [+ residual])) with an optional epilogue, in one launch (inference).

    x: [..., D] (float32/float16/bfloat16; contiguous over D, any strides over the leading dims, else copied).
    residual: None or x's shape, dtype and device. weight: [N, D], bias: None or [N], both in x.dtype.
    ln_weight, ln_bias: [D]. eps: the LayerNorm's epsilon.
    out = round(x + residual) to x.dtype (fp32 add), or x itself (no copy) without a residual.
    y = round(LayerNorm(out) * ln_weight + ln_bias) @ weight^T + bias, fp32 statistics and accumulation
    (fp32 inputs: exact products under torch's default "highest" fp32 matmul precision, else TF32), then:
    - activation "gelu_tanh": GELU with the tanh approximation, in fp32 (None: no activation);
    - qk_norm (q_weight, q_bias, k_weight, k_bias), each [Dh], with num_heads H and N == 3 * H * Dh: y is a qkv
      projection laid out (q, k, v) x H x Dh; each head of q and k is LayerNormed over its Dh columns
      (qk_eps, fp32 statistics; the kernel takes Dh in 16, 32, 64, 128), v is left as projected.
    Returns y: [..., N] contiguous in x.dtype, and out. Forward-only kernel: when grad is enabled and any input
    requires grad, the torch reference runs instead (differentiable)."""
    check_rows("x", x)
    if residual is not None:
        check_rows("residual", residual, like=x)
    check_eps(eps)
    check_eps(qk_eps, "qk_eps")
    D = x.shape[-1]
    _check_linear(x, weight, bias)
    N = weight.shape[0]
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_vector(name, p, D, x)
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    head_dim = _check_qk(qk_norm, num_heads, N, x, activation)
    qk = tuple(qk_norm) if qk_norm is not None else None
    tensors = [t for t in (x, residual, weight, bias, ln_weight, ln_bias, *(qk or ())) if t is not None]
    if _backend(x, tensors, head_dim) != "triton":
        return _k.norm_linear_ref(x, weight, bias, ln_weight, ln_bias, residual=residual, eps=eps,
                                  activation=activation, qk_norm=qk, num_heads=num_heads, qk_eps=qk_eps, upcast=False)
    rows = _rows(x)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    params = [p.contiguous() if p is not None else None for p in (bias, ln_weight, ln_bias, *(qk or (None,) * 4))]
    rest = (float(eps), activation or "none", *params[3:], num_heads or 0, float(qk_eps))
    if residual is None:
        y = _k.norm_linear_op(rows, w, *params[:3], *rest)
        return y.view(*x.shape[:-1], N), x
    y, out = _k.residual_norm_linear_op(_rows(residual), rows, w, *params[:3], *rest)
    return y.view(*x.shape[:-1], N), out.view(x.shape)
