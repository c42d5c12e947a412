"""fp8 linear layers: the row-wise e4m3 quantizer and Fp8Linear's emulated path against the full-precision Linear
within the error bound e4m3 implies (and shown to be reachable), odd shapes and layouts, quantize_linears under
peft LoRA layers, quantize_dit_fp8 on the tiny Wan model, and, on a GPU, torch._scaled_mm at Wan2.2-5B shapes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wmfast.modules.fp8_linear import (
    E4M3_MAX,
    FP8,
    Fp8Linear,
    fp8_mm,
    fp8_mm_ref,
    fp8_support,
    quantize_linears,
    quantize_rowwise,
)

# e4m3 round-to-nearest, in units of the row scale s: relative error <= 2**-4 in the normal range (3 mantissa bits),
# absolute error <= 2**-10 (half the subnormal spacing 2**-9) below it. So |x_hat - x| <= U |x| + SUB * s.
U, SUB = 2.0**-4, 2.0**-10


def quant_bound(t: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |dequant(quantize_rowwise(t)) - t|, in float64."""
    a = t.double().abs()
    return U * a + SUB * a.amax(dim=1, keepdim=True) / E4M3_MAX


def gemm_bound(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Bound on |fp8 GEMM - exact GEMM| for x2 [M, K], w [N, K]: with dx, dw the quantization bounds,
    |x_hat w_hat - x w| <= dx |w| + |x| dw + dx dw, summed over K; plus fp32 accumulation, K * 2**-24 * sum |x_hat w_hat|."""
    ax, aw = x2.double().abs(), w.double().abs()
    dx, dw = quant_bound(x2), quant_bound(w)
    K = x2.shape[1]
    return dx @ aw.t() + ax @ dw.t() + dx @ dw.t() + K * 2.0**-24 * ((ax + dx) @ (aw + dw).t())


def test_fp8_support_gives_a_one_line_reason_on_the_cpu():
    reason = fp8_support("cpu")
    assert isinstance(reason, str) and "\n" not in reason
    assert "8.9" in reason and "cpu" in reason


def test_quantizer_meets_its_bound_and_the_bound_is_reached():
    rows = torch.randn(64, 256) * torch.logspace(-4, 2, 64)[:, None]    # magnitudes over six decades
    rows[3] = 0.0                                                        # an all-zero row: codes 0, no NaN
    rows[5, 1:] *= 1e-4                                                  # one large value, the rest subnormal
    q, s = quantize_rowwise(rows)
    assert q.dtype == FP8 and q.is_contiguous() and s.shape == (64, 1) and s.dtype == torch.float32
    err = (q.double() * s.double() - rows.double()).abs()
    bound = quant_bound(rows)
    assert not torch.isnan(q.float()).any() and torch.equal(q[3].float(), torch.zeros(256))
    assert (err <= bound * (1 + 1e-6)).all(), f"worst err / bound {(err / bound).max():.3f}"
    assert (err / bound.clamp_min(1e-30)).max() > 0.9  # the constants are the real ones, not padded
    assert q.float().abs().amax(dim=1)[torch.arange(64) != 3].eq(E4M3_MAX).all()  # each row's amax -> 448


def _layer(K, N, bias, dtype=torch.float32):
    return nn.Linear(K, N, bias=bias, dtype=dtype)


CASES = [
    pytest.param((33, 96), 40, True, id="M33-K96-N40"),
    pytest.param((7, 61), 1000, False, id="K61-N1000-nobias"),            # K, N not multiples of 16
    pytest.param((1, 16), 16, True, id="M1-K16-N16"),
    pytest.param((2, 5, 48), 32, True, id="3d-B2-T5"),
    pytest.param((2, 3, 4, 24), 24, False, id="4d-nobias"),
]


@pytest.mark.parametrize("shape, N, bias", CASES)
def test_emulated_linear_is_within_the_fp8_bound_of_the_full_precision_linear(shape, N, bias):
    lin = _layer(shape[-1], N, bias)
    x = torch.randn(shape) * 3
    y, y8 = lin(x), Fp8Linear.from_linear(lin)(x)
    assert y8.shape == y.shape and y8.dtype == y.dtype
    err = (y8.double() - y.double()).abs().reshape(-1, N)
    bound = gemm_bound(x.reshape(-1, shape[-1]), lin.weight.detach())
    assert (err <= bound).all(), f"worst err / bound {(err / bound).max():.3f}"
    assert err.max() > 0  # quantized for real
    rel = ((y8 - y).norm() / y.norm()).item()
    assert rel < 0.06, f"relative Frobenius error {rel:.4f}"  # ~0.035 for Gaussian data (two e4m3 operands)


def test_aligned_rounding_errors_reach_the_gemm_bound():
    """Worst case: all products round the same way. Each row is [448, v, v, ...] * 2**-6 (scale 2**-6, exact) with
    v just below a rounding midpoint (2**e * 1.0624 -> 2**e, relative error ~0.0588 against U = 0.0625)."""
    K, M, N = 256, 4, 3  # large K: the exact amax term (bound > 0, error 0) weighs little
    v = torch.tensor([2.0**7, 2.0**8]).repeat(K // 2)[: K - 1] * 1.0624
    row = torch.cat([torch.tensor([E4M3_MAX]), v]) * 2.0**-6
    lin = _layer(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(row.expand(N, K))
    x = row.expand(M, K).clone()
    err = (Fp8Linear.from_linear(lin)(x).double() - lin(x).double()).abs()
    ratio = (err / gemm_bound(x, lin.weight.detach())).min().item()
    assert 0.8 < ratio <= 1.0, f"err / bound = {ratio:.3f}"


def test_strided_inputs_give_the_contiguous_result_bit_for_bit():
    lin = _layer(48, 32, True)
    f = Fp8Linear.from_linear(lin)
    base = torch.randn(48, 20)
    x_t = base.t()                                         # [20, 48], strides (1, 20): reshape keeps the view
    x_p = torch.randn(2, 48, 6).transpose(1, 2)            # [2, 6, 48], permuted
    x_s = torch.randn(7, 96)[:, ::2]                       # [7, 48], every other column
    for x in (x_t, x_p, x_s):
        assert not x.is_contiguous()
        assert torch.equal(f(x), f(x.contiguous()))


def test_empty_batches():
    f = Fp8Linear.from_linear(_layer(32, 16, True))
    assert f(torch.randn(0, 32)).shape == (0, 16)
    assert f(torch.randn(2, 0, 32)).shape == (2, 0, 16)
    with pytest.raises(ValueError, match="last dim 31"):
        f(torch.randn(3, 31))


def test_bf16_input_and_module_casts_keep_the_codes_and_scales():
    lin = _layer(32, 16, True)
    f = Fp8Linear.from_linear(lin)
    assert f.bias is lin.bias  # shared, not copied
    codes, scales = f.weight_fp8.clone(), f.weight_scale.clone()
    f.to(torch.bfloat16)
    assert f.weight_fp8.dtype == FP8 and f.weight_scale.dtype == torch.float32 and f.bias.dtype == torch.bfloat16
    f.float()
    assert torch.equal(f.weight_fp8.float(), codes.float()) and torch.equal(f.weight_scale, scales)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    assert f.to(torch.bfloat16)(x).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in (f.weight_fp8, f.weight_scale))


def test_scaled_mm_call_matches_the_reference_where_the_cpu_runs_it():
    """The GPU path's exact call, on the CPU where this torch implements row-wise _scaled_mm (2.13 does):
    catches argument, layout and dtype mistakes without a GPU."""
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    lin = _layer(64, 48, True, torch.bfloat16)
    f = Fp8Linear.from_linear(lin)
    x_q, x_s = quantize_rowwise(x)
    try:
        out = fp8_mm(x_q, x_s, f.weight_fp8, f.weight_scale, f.bias)
    except RuntimeError as e:  # only a CPU build without row-wise scaling (torch 2.11) skips; any other error fails
        if "only supports per-tensor scaling for CPU" not in str(e):
            raise
        pytest.skip(f"row-wise torch._scaled_mm does not run on this CPU build: {str(e).splitlines()[0]}")
    ref = fp8_mm_ref(x_q, x_s, f.weight_fp8, f.weight_scale, f.bias, torch.float64)
    assert out.dtype == torch.bfloat16 and out.shape == (40, 48)
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=1e-4 * ref.abs().max().item())


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(32, 32), nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 16))
        self.mha = nn.MultiheadAttention(32, 2)  # out_proj is a Linear subclass read by .weight: left alone

    def forward(self, x):
        return self.out[0](self.q(x) + self.k(x))


def test_quantize_linears_replaces_a_lora_base_layer_keeps_the_adapter_and_is_idempotent():
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q"], init_lora_weights=False), _Attn())
    x = torch.randn(3, 32)
    ref = model(x)
    names = quantize_linears(model, lambda name, layer: True)
    assert names == ["q.base_layer", "k", "out.0"]
    assert type(model.q.base_layer) is Fp8Linear and type(model.k) is Fp8Linear
    assert type(model.q.lora_A["default"]) is nn.Linear and model.q.lora_B["default"].weight.dtype == torch.float32
    assert type(model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    y = model(x)
    assert 0 < ((y - ref).norm() / ref.norm()).item() < 0.06
    assert quantize_linears(model, lambda name, layer: True) == []
    assert torch.equal(model(x), y)
    only = _Attn()
    assert quantize_linears(only, lambda name, layer: name.startswith("out")) == ["out.0"]
    assert type(only.q) is nn.Linear


# ------------------------------------------------------------------------------------------ the Wan world model

def _block_gemm_names(n_blocks=2, suffix=""):
    per_block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    return [f"blocks.{i}.{n}{suffix}" for i in range(n_blocks) for n in per_block]


def _linear_types(transformer):
    return {n: type(m) for n, m in transformer.named_modules() if isinstance(m, (nn.Linear, Fp8Linear))}


@pytest.mark.requires("diffusers")
def test_quantize_dit_fp8_replaces_exactly_the_block_gemms_and_keeps_the_velocity():
    from wmfast.models.wan import build_world_model
    from wmfast.models.wan.fp8 import quantize_dit_fp8

    m = build_world_model("tiny", vae=False).eval()
    m8 = copy.deepcopy(m)
    before = _linear_types(m8.transformer)
    assert quantize_dit_fp8(m8.transformer, emulate=True) == 20
    after = _linear_types(m8.transformer)
    assert sorted(n for n, t in after.items() if t is Fp8Linear) == sorted(_block_gemm_names())
    untouched = [n for n in before if n not in _block_gemm_names()]
    assert any(n.startswith("state_embedder") for n in untouched) and "proj_out" in untouched
    assert all(after[n] is nn.Linear for n in untouched)  # embedders, proj_out, state modules
    assert quantize_dit_fp8(m8.transformer, emulate=True) == 0

    states, lat, t = torch.randn(1, 77, 25), torch.randn(2, 48, 7, 4, 4), torch.full((1, 7), 500.0)
    with torch.no_grad():
        v = m.velocity(lat, t, m.prepare_conditioning(states))
        v8 = m8.velocity(lat, t, m8.prepare_conditioning(states))
        zeroed = copy.deepcopy(m)
        for p in zeroed.transformer.blocks.parameters():
            p.zero_()
        v0 = zeroed.velocity(lat, t, zeroed.prepare_conditioning(states))
    assert v8.shape == v.shape == (2, 48, 7, 4, 4)
    rel = ((v8 - v).norm() / v.norm()).item()
    blocks = ((v0 - v).norm() / v.norm()).item()  # how much the blocks move the velocity at all (~0.4)
    assert 1e-4 < rel < 0.03 and rel < blocks / 10, f"fp8 changes the velocity by {rel:.4f} (blocks: {blocks:.3f})"


@pytest.mark.requires("diffusers")
def test_cached_text_kv_is_recomputed_with_the_fp8_layers():
    from wmfast.models.wan import build_world_model
    from wmfast.models.wan.fp8 import quantize_dit_fp8

    m = build_world_model("tiny", vae=False).eval()
    states = torch.randn(1, 77, 25)
    with torch.no_grad():
        k_before = m.prepare_conditioning(states).text_kv[0][0].clone()
        quantize_dit_fp8(m.transformer, emulate=True)
        k_after = m.prepare_conditioning(states).text_kv[0][0]       # no clear_cache()
        m.clear_cache()
        k_fresh = m.prepare_conditioning(states).text_kv[0][0]
    assert torch.equal(k_after, k_fresh) and not torch.equal(k_after, k_before)


@pytest.mark.requires("diffusers", "peft")
def test_lora_base_layers_are_quantized_and_the_adapters_stay_full_precision():
    from wmfast.models.wan import build_world_model
    from wmfast.models.wan.fp8 import quantize_dit_fp8
    from wmfast.models.wan.lora import add_lora

    m = build_world_model("tiny", vae=False).eval()
    add_lora(m.transformer, rank=4)
    with torch.no_grad():
        for n, p in m.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    m8 = copy.deepcopy(m)
    assert quantize_dit_fp8(m8.transformer, emulate=True) == 20
    types = _linear_types(m8.transformer)
    assert sorted(n for n, t in types.items() if t is Fp8Linear) == sorted(_block_gemm_names(suffix=".base_layer"))
    assert all(t is nn.Linear for n, t in types.items() if ".lora_" in n)
    states, lat, t = torch.randn(1, 77, 25), torch.randn(2, 48, 7, 4, 4), torch.full((1, 7), 500.0)
    with torch.no_grad():
        v = m.velocity(lat, t, m.prepare_conditioning(states))
        v8 = m8.velocity(lat, t, m8.prepare_conditioning(states))
    assert ((v8 - v).norm() / v.norm()).item() < 0.03


@pytest.mark.requires("diffusers")
def test_quantize_dit_fp8_refuses_a_device_without_fp8_gemms():
    from wmfast.models.wan import build_world_model
    from wmfast.models.wan.fp8 import quantize_dit_fp8

    m = build_world_model("tiny", vae=False)
    with pytest.raises(ValueError, match=r"^--fp8: fp8 GEMMs need a CUDA GPU of compute capability 8\.9\+.*cpu"):
        quantize_dit_fp8(m.transformer)
    assert not any(isinstance(x, Fp8Linear) for x in m.modules())


# ------------------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("M, K, N", [(1792 * 2, 3072, 3072), (1792 * 2, 3072, 14336), (1792 * 2, 14336, 3072)],
                         ids=["qkvo", "ffn-up", "ffn-down"])
def test_scaled_mm_matches_the_emulated_path_at_5b_shapes(M, K, N):
    dev = torch.device("cuda")
    if (reason := fp8_support(dev)) is not None:
        pytest.skip(reason)
    lin = nn.Linear(K, N, device=dev, dtype=torch.bfloat16)
    f = Fp8Linear.from_linear(lin)
    assert f.scaled_mm_shape_ok  # so forward takes torch._scaled_mm
    x = torch.randn(2, M // 2, K, device=dev, dtype=torch.bfloat16)
    y = f(x).reshape(M, N)
    x_q, x_s = quantize_rowwise(x.reshape(M, K))
    ref = fp8_mm_ref(x_q, x_s, f.weight_fp8, f.weight_scale, f.bias, torch.float64)
    emulated = fp8_mm_ref(x_q, x_s, f.weight_fp8, f.weight_scale, f.bias, torch.bfloat16)
    # both round an fp32 result to bf16 once (<= 2**-8 relative) after summing K exact products in fp32
    acc = K * 2.0**-24 * ((x_q.float().abs() * x_s) @ (f.weight_fp8.float().abs() * f.weight_scale.t()).t()).double()
    for name, out in (("scaled_mm", y), ("emulated", emulated)):
        err = (out.double() - ref).abs()
        assert (err <= 2.0**-8 * ref.abs() + acc + 1e-30).all(), f"{name}: worst {(err - 2.0**-8 * ref.abs()).max()}"
    assert ((y.float() - emulated.float()).abs() <= 2.0**-7 * emulated.float().abs() + 2 * acc.float()).all()
    rel = ((y.float() - lin(x).reshape(M, N).float()).norm() / lin(x).float().norm()).item()
    assert rel < 0.06, f"fp8 vs bf16 Linear: relative error {rel:.4f}"


@pytest.mark.gpu
@pytest.mark.requires("diffusers")
def test_quantize_dit_fp8_on_the_gpu_keeps_the_velocity():
    from wmfast.models.wan import build_world_model
    from wmfast.models.wan.fp8 import quantize_dit_fp8

    dev = torch.device("cuda")
    if (reason := fp8_support(dev)) is not None:
        pytest.skip(reason)
    m = build_world_model("tiny", vae=False, device=dev).eval()
    m8 = copy.deepcopy(m)
    assert quantize_dit_fp8(m8.transformer) == 20
    states = torch.randn(1, 77, 25, device=dev)
    lat, t = torch.randn(2, 48, 7, 4, 4, device=dev), torch.full((1, 7), 500.0, device=dev)
    with torch.no_grad():
        v = m.velocity(lat, t, m.prepare_conditioning(states))
        v8 = m8.velocity(lat, t, m8.prepare_conditioning(states))
    assert ((v8 - v).norm() / v.norm()).item() < 0.03
