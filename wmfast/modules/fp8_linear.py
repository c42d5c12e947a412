"""fp8 (e4m3) linear layers for inference: `Fp8Linear`, `quantize_linears`, `fp8_support`.

Hand-written, not imported: torchao (whose Float8Linear has this recipe) is not a dependency of wmfast, and the
GEMM it would call is `torch._scaled_mm`, which this file calls directly.

The recipe (row-wise scaling, both operands e4m3, fp32 accumulation):

    weight [N, K]  s_w[n] = amax|W[n, :]| / 448   W_q = e4m3(W / s_w)    once, at conversion
    input  [M, K]  s_x[m] = amax|x[m, :]| / 448   x_q = e4m3(x / s_x)    every call (per token)
    y [M, N]       = s_w * (s_x * (x_q @ W_q^T)) + b                     accumulated in fp32, returned in bf16 by the
                                                                          GEMM, then cast to the input dtype

On a GPU that has fp8 tensor cores (`fp8_support(device) is None`) the GEMM and its epilogue (scales, bias) run
in `torch._scaled_mm` (`fp8_mm`); elsewhere `fp8_mm_ref` runs the same arithmetic in fp32 (exact products of the
e4m3 values, then the scales and the bias in the kernel's order), so CPU tests check the quantization the GPU path
uses. `_scaled_mm` needs K and N to be multiples of 16: a layer with another shape always takes the fp32 path
(none of Wan2.2-5B's block GEMMs: D = 3072, FFN 14336).

Speed (H200, torch 2.11, M = 3584 tokens, bf16 in/out, ms; K x N = 3072x3072 / 3072x14336 / 14336x3072):
bf16 nn.Linear 0.099 / 0.448 / 0.478; the fp8 GEMM alone 0.063 / 0.275 / 0.280; Fp8Linear eager 0.150 / 0.364 /
0.620, of which the activation quantization (several eager kernels) is 0.088 / 0.090 / 0.339; Fp8Linear under
torch.compile (quantization fused, same bits) 0.081 / 0.286 / 0.327. So compile the model (or fuse the quantizer)
for a speed-up; eager, the gain is the halved weight memory.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

FP8 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale (its codes are all 0), never a division by zero
_SUPPORT: dict[torch.device, str | None] = {}  # fp8_support per device (queried once; forward asks every call)


def fp8_support(device) -> str | None:
    """None when fp8 GEMMs (`torch._scaled_mm`, row-wise scales) can run on `device`, else the reason in one line."""
    device = torch.device(device)
    if FP8 is None or not hasattr(torch, "_scaled_mm"):
        return f"fp8 GEMMs need torch.float8_e4m3fn and torch._scaled_mm; torch {torch.__version__} lacks them"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"fp8 GEMMs need a CUDA GPU of compute capability 8.9+ (Ada/Hopper); {device} has none"
    if torch.version.hip:
        return "fp8 GEMMs are wired for NVIDIA GPUs only (ROCm's MI300 uses float8_e4m3fnuz)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (f"fp8 GEMMs need a CUDA GPU of compute capability 8.9+ (Ada/Hopper); {name} ({device}) is "
                f"{major}.{minor}")
    return None


def _fast_path_ok(device: torch.device) -> bool:
    if device not in _SUPPORT:
        _SUPPORT[device] = fp8_support(device)
    return _SUPPORT[device] is None


def quantize_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] (any float dtype, any strides) -> (q [R, C] float8_e4m3fn, row-major; scale [R, 1] fp32) with
    t ~= q.float() * scale, scale = amax|t[r, :]| / 448 (the row's largest magnitude maps to e4m3's largest).

    Rounding is to nearest: |q * scale - t| <= 2**-4 |t| (normal range) + 2**-10 * scale (subnormal spacing 2**-9)."""
    # Few passes, since in eager each op is one: a max-norm reduction (no |t| temporary), t / scale in fp32 (a bf16
    # t promotes; no fp32 copy of t first), the cast. No clamp to +-448: with scale = fl(amax / 448) the quotient is
    # at most 448 (1 + 2**-22), which rounds to 448 (only from 464 up would e4m3fn give NaN).
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)   # [R, 1]
    scale = amax.clamp_(min=_AMAX_FLOOR) / E4M3_MAX
    q = (t / scale).to(FP8).contiguous()  # row-major codes for _scaled_mm's mat1, whatever t's strides
    return q, scale


def fp8_mm_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The reference (the emulated path): x_q [M, K] e4m3, x_scale [M, 1] fp32, w_q [N, K] e4m3, w_scale [1, N]
    fp32, bias [N] or None -> [M, N] out_dtype. The e4m3 codes are exact in fp32 and so are their products; the
    scales and the bias are applied after the sum, in fp32, as the kernel's epilogue does (in fp64 throughout when
    out_dtype is float64: the tests' exact reference)."""
    dt = torch.float64 if out_dtype == torch.float64 else torch.float32
    acc = x_q.to(dt) @ w_q.to(dt).t()                                       # [M, N]
    y = w_scale.to(dt) * (x_scale.to(dt) * acc)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(out_dtype)


def fp8_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """The fp8 tensor-core GEMM, same arguments as fp8_mm_ref -> [M, N] bf16.

    The one call both torch 2.11 and 2.13 accept for row-wise scaling: mat1 [M, K] row-major, mat2 [K, N]
    column-major (the weight's transposed view), scale_a [M, 1] and scale_b [1, N] fp32 and contiguous, K and N
    multiples of 16, out_dtype bf16 (row-wise scaling's original output dtype), bias bf16 (with a bias the output
    must be bf16 or fp16 and the bias of the same dtype). use_fast_accum stays False: fp32 accumulation."""
    b = bias.to(torch.bfloat16) if bias is not None else None
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, bias=b, out_dtype=torch.bfloat16)


class Fp8Linear(nn.Module):
    """nn.Linear with an e4m3 weight and per-output-channel fp32 scales; activations quantized per token on the
    fly. Inference only (no gradients). Build with `Fp8Linear.from_linear(linear)`.

    Parameters: weight_fp8 [N, K] e4m3 and weight_scale [1, N] fp32 (requires_grad=False), bias [N] (the Linear's
    own Parameter, shared, dtype kept). There is deliberately no `weight`: code that reads `layer.weight` expecting a dense
    matrix (peft moves new adapters to `base_layer.weight.dtype`) must not get the fp8 codes.

    Module.to(dtype) / .float() / .half() leave weight_fp8 and weight_scale as they are (and cast the bias);
    devices move as usual."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight_fp8.dim() != 2 or weight_fp8.dtype != FP8:
            raise ValueError(f"weight_fp8: expected [N, K] float8_e4m3fn, got {tuple(weight_fp8.shape)} "
                             f"{weight_fp8.dtype}")
        self.out_features, self.in_features = weight_fp8.shape
        if weight_scale.numel() != self.out_features:
            raise ValueError(f"weight_scale: expected {self.out_features} scales, got {tuple(weight_scale.shape)}")
        self.weight_fp8 = nn.Parameter(weight_fp8, requires_grad=False)
        scale = weight_scale.detach().to(torch.float32).reshape(1, -1).contiguous()
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        # _scaled_mm's shape rule; otherwise every call takes the fp32 path
        self.scaled_mm_shape_ok = self.in_features % 16 == 0 and self.out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize `linear`'s weight (row-wise, amax / 448); the bias Parameter is shared, not copied."""
        with torch.no_grad():
            w_q, w_scale = quantize_rowwise(linear.weight.detach())
        _fast_path_ok(linear.weight.device)  # asked here, eagerly: not first inside a compiled (traced) forward
        return cls(w_q, w_scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear: input {tuple(x.shape)} has last dim {x.shape[-1]}, expected "
                             f"{self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                                # [M, K], a view where strides allow
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        x_q, x_scale = quantize_rowwise(x2)                                 # [M, K] e4m3 row-major, [M, 1] fp32
        if x.is_cuda and self.scaled_mm_shape_ok and _fast_path_ok(x.device):
            y = fp8_mm(x_q, x_scale, self.weight_fp8, self.weight_scale, self.bias).to(x.dtype)
        else:
            y = fp8_mm_ref(x_q, x_scale, self.weight_fp8, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor, fp8 included: keep the codes and the scales in their dtype
        # (moved to the new device only), so that a later model.float() cannot turn them into a dense weight.
        fixed = {id(self.weight_fp8), id(self.weight_scale)}

        def keep_dtype(t):
            out = fn(t)
            return t.to(out.device) if id(t) in fixed and out.dtype != t.dtype else out

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8=e4m3 row-wise, scaled_mm_shape_ok={self.scaled_mm_shape_ok}")


def _linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, layer) of every plain nn.Linear under `module`. Inside a peft adapter
    layer (a module with a `base_layer`) only the base layer is visited: the adapter's own Linears (LoRA A/B)
    stay in full precision. Subclasses of nn.Linear are left alone: some read `.weight` directly
    (MultiheadAttention's out_proj)."""
    wraps = isinstance(getattr(module, "base_layer", None), nn.Module)
    for attr, child in module.named_children():
        if wraps and attr != "base_layer":
            continue
        name = prefix + attr
        if type(child) is nn.Linear:
            yield name, module, attr, child
        else:
            yield from _linears(child, name + ".")


def quantize_linears(module: nn.Module, include: Callable[[str, nn.Linear], bool]) -> list[str]:
    """Replace, in place, every plain nn.Linear under `module` for which include(qualified name, layer) is true by
    its Fp8Linear; returns the qualified names replaced (relative to `module`, e.g. `blocks.0.attn1.to_q` or, under
    a peft LoRA layer, `blocks.0.attn1.to_q.base_layer`). Idempotent: an Fp8Linear is not replaced again, so a
    second call returns []. A Linear registered under two names becomes one shared Fp8Linear."""
    done: dict[int, Fp8Linear] = {}
    replaced = []
    for name, parent, attr, linear in list(_linears(module)):
        if not include(name, linear):
            continue
        if id(linear) not in done:
            done[id(linear)] = Fp8Linear.from_linear(linear)
        setattr(parent, attr, done[id(linear)])
        replaced.append(name)
    return replaced
