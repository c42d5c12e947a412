"""norm_linear ((residual add) + LayerNorm + linear + GELU / QK-norm epilogue) against the pure-torch reference: the 2x
rule for y and out, odd shapes and strided inputs; the grad-enabled fallback; validation; opcheck; torch.compile;
the compile check at the model's shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from wmfast.kernels import norm_linear as K

from tests.ops.conftest import DEVICE
from wmfast.ops import layer_norm, norm_linear, qk_layer_norm, residual_layer_norm, use_backend
from wmfast.testing import assert_2x_rule

bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def _inputs(lead, D, N, dtype, *, residual=True, bias=True, qk=None, strided=None):
    """x, weight, bias, ln_weight, ln_bias and the keyword arguments of norm_linear, on DEVICE. strided="rows": x and
    residual are column slices of wider tensors (row stride > D); "last": x's last dim is not contiguous."""
    def act(scale, shift):
        if strided == "rows":
            return (torch.randn(*lead, D + 7) * scale + shift)[..., 3:3 + D]
        if strided == "last":
            return (torch.randn(*lead, 2 * D) * scale + shift)[..., ::2]
        return torch.randn(*lead, D) * scale + shift

    x = act(3, 1).to(dtype)
    kw = {"residual": act(2, 0).to(dtype) if residual else None}
    if qk is not None:
        H, Dh = qk
        kw["qk_norm"] = tuple(torch.randn(Dh) * 0.5 + (1 if i % 2 == 0 else 0) for i in range(4))
        kw["num_heads"] = H
    weight = (torch.randn(N, D) / D ** 0.5).to(dtype)
    b = (torch.randn(N) * 0.5).to(dtype) if bias else None
    return (x, weight, b, torch.randn(D) * 0.5 + 1, torch.randn(D) * 0.5), kw


def _fp32(args, kw):
    """The fp32 reference's inputs: every tensor as fp32, unrounded."""
    def f(t):
        return t.float() if isinstance(t, torch.Tensor) else t

    kw32 = {k: (tuple(map(f, v)) if isinstance(v, tuple) else f(v)) for k, v in kw.items()}
    return tuple(map(f, args)), kw32


CASES = [  # (lead dims, D, N, dtype, residual, bias, activation, qk (H, Dh), strided)
    pytest.param((37,), 61, 80, bf, True, True, None, None, None, id="D61-M37-bf16-residual"),
    pytest.param((3, 7), 61, 130, fp32, True, True, "gelu_tanh", None, None, id="D61-fp32-residual-gelu-N130"),
    pytest.param((1,), 100, 96, bf, False, False, "gelu_tanh", None, None, id="D100-M1-bf16-gelu-no-bias"),
    pytest.param((1, 2, 3, 5), 64, 96, bf, True, True, None, (2, 16), None, id="BTSD-bf16-residual-qk-H2-Dh16"),
    pytest.param((37,), 64, 288, fp32, False, True, None, (3, 32), None, id="D64-M37-fp32-qk-H3-Dh32"),
    pytest.param((3, 5, 7), 100, 70, fp16, True, True, None, None, "rows", id="D100-M105-fp16-strided-rows-residual"),
    pytest.param((2, 9), 61, 50, bf, False, True, "gelu_tanh", None, "last", id="D61-bf16-strided-last-dim-gelu"),
    pytest.param((2, 2, 9), 48, 288, bf, True, False, None, (3, 32), "rows", id="D48-bf16-strided-qk-no-bias"),
    pytest.param((2, 65), 64, 192, bf, True, True, None, (4, 16), None, id="D64-M130-bf16-residual-qk-H4-Dh16"),
]


def _three_ways(args, kw):
    """(the op on the current backend, the torch backend in the same dtype, the fp32 reference): the 2x rule's
    three results."""
    kernel = norm_linear(*args, **kw)
    with use_backend("torch"):
        lowp = norm_linear(*args, **kw)
    args32, kw32 = _fp32(args, kw)
    return kernel, lowp, K.norm_linear_ref(*args32, **kw32)


@pytest.mark.parametrize("lead, D, N, dtype, residual, bias, activation, qk, strided", CASES)
def test_2x_rule(triton_backend, lead, D, N, dtype, residual, bias, activation, qk, strided):
    args, kw = _inputs(lead, D, N, dtype, residual=residual, bias=bias, qk=qk, strided=strided)
    kw["activation"] = activation
    (y, out), (y_lp, out_lp), (y32, out32) = _three_ways(args, kw)
    assert y.shape == (*lead, N) and y.dtype == dtype and y.is_contiguous()
    assert out.shape == (*lead, D) and out.dtype == dtype
    if not residual:
        assert out is args[0]  # the stream is x itself, no copy
    assert_2x_rule(y, y32, y_lp, name="y", dtype=dtype)
    assert_2x_rule(out, out32, out_lp, name="out", dtype=dtype)


@pytest.mark.parametrize("activation, qk", [pytest.param(None, None, id="plain"),
                                            pytest.param("gelu_tanh", None, id="gelu"),
                                            pytest.param(None, (2, 32), id="qk-H2-Dh32")])
def test_fp32_highest_precision_equals_torch_fp32(triton_backend, activation, qk):
    assert torch.get_float32_matmul_precision() == "highest"
    args, kw = _inputs((3, 11), 72, 192, fp32, qk=qk)
    y, out = norm_linear(*args, **kw, activation=activation)
    with use_backend("torch"):
        y_ref, out_ref = norm_linear(*args, **kw, activation=activation)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)


def test_fp32_precision_follows_torch_setting():
    assert K._dot_precision(fp32) == "ieee" and K._dot_precision(bf) == "ieee"
    torch.set_float32_matmul_precision("high")
    try:
        assert K._dot_precision(fp32) == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_matches_the_unfused_ops_of_the_model(triton_backend):
    """The eager block: residual_layer_norm, then a bf16 linear, then qk_layer_norm on the rounded projection."""
    args, kw = _inputs((2, 17), 64, 3 * 2 * 32, bf, qk=(2, 32))
    x, w, b, lw, lb = args
    y, out = norm_linear(*args, **kw)
    n, out_ref = residual_layer_norm(x, kw["residual"], lw, lb)
    qkv = F.linear(n, w, b)
    q, k = qk_layer_norm(qkv, *kw["qk_norm"], num_heads=2)
    assert torch.equal(out, out_ref)
    y = y.unflatten(-1, (3, 2, 32))
    for got, want in ((y[..., 0, :, :], q), (y[..., 1, :, :], k), (y[..., 2, :, :], qkv.unflatten(-1, (3, 2, 32))[
            ..., 2, :, :])):
        assert_2x_rule(got, want.float(), want, dtype=bf)


def test_weight_view_and_layer_norm_only_rows(triton_backend):
    """A transposed weight view is copied; without residual the LayerNorm is layer_norm's."""
    (x, w, b, lw, lb), _ = _inputs((5, 3), 40, 24, fp32, residual=False)
    y, out = norm_linear(x, w.t().contiguous().t(), b, lw, lb)
    assert out is x
    torch.testing.assert_close(y, F.linear(layer_norm(x, lw, lb), w, b), atol=1e-5, rtol=1e-5)


def test_grad_enabled_runs_the_differentiable_reference(triton_backend):
    args, kw = _inputs((2, 5), 32, 48, fp32)
    leaves = [a.clone().requires_grad_() for a in args]
    res = kw["residual"].clone().requires_grad_()
    y, out = norm_linear(*leaves, residual=res, activation="gelu_tanh")  # triton forced, but a gradient is needed
    assert y.grad_fn is not None and out.grad_fn is not None
    grads = torch.autograd.grad((y.sum() + out.square().sum()), (*leaves, res))
    ref_leaves = [a.clone().requires_grad_() for a in args]
    ref_res = kw["residual"].clone().requires_grad_()
    y_r, out_r = K.norm_linear_ref(*ref_leaves, residual=ref_res, activation="gelu_tanh", upcast=False)
    assert torch.equal(y, y_r)
    for g, e in zip(grads, torch.autograd.grad((y_r.sum() + out_r.square().sum()), (*ref_leaves, ref_res))):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
    with torch.no_grad():  # inference with parameters that require grad: the kernel, no graph
        y_k, _ = norm_linear(*leaves, residual=res, activation="gelu_tanh")
    assert y_k.grad_fn is None
    torch.testing.assert_close(y_k, y_r.detach(), atol=1e-5, rtol=1e-5)


def test_head_dim_the_kernel_cannot_tile_falls_back_to_torch(triton_backend):
    args, kw = _inputs((9,), 32, 3 * 2 * 24, fp32, qk=(2, 24))  # Dh = 24: not a power of two
    y, _ = norm_linear(*args, **kw)
    with use_backend("torch"):
        y_ref, _ = norm_linear(*args, **kw)
    assert torch.equal(y, y_ref)


def _bad(**change):
    x, w, b, lw, lb = torch.randn(2, 8), torch.randn(12, 8), torch.randn(12), torch.ones(8), torch.zeros(8)
    kw = {"residual": None, "activation": None, "qk_norm": None, "num_heads": None, "eps": 1e-5}
    named = {"x": x, "weight": w, "bias": b, "ln_weight": lw, "ln_bias": lb, **kw, **change}
    args = [named.pop(k) for k in ("x", "weight", "bias", "ln_weight", "ln_bias")]
    return lambda: norm_linear(*args, **named)


QK2 = tuple(torch.ones(2) for _ in range(4))  # Dh = 12 / (3 * 2) = 2


@pytest.mark.parametrize("call, match", [
    pytest.param(_bad(x="x"), "x must be a tensor", id="x-not-a-tensor"),
    pytest.param(_bad(x=torch.randn(2, 8).long()), "x dtype", id="x-dtype"),
    pytest.param(_bad(x=torch.randn(0, 8)), "non-empty", id="x-empty"),
    pytest.param(_bad(weight=torch.randn(12, 7)), r"weight must be a \[N, 8\]", id="weight-D"),
    pytest.param(_bad(weight=torch.randn(12, 8).double()), "weight: torch.float64", id="weight-dtype"),
    pytest.param(_bad(weight=torch.randn(12, 8).half()), "expected x's torch.float32", id="weight-not-x-dtype"),
    pytest.param(_bad(bias=torch.randn(11)), r"bias must be None or a \[12\]", id="bias-N"),
    pytest.param(_bad(bias=torch.randn(12).bfloat16()), "bias: torch.bfloat16", id="bias-dtype"),
    pytest.param(_bad(ln_weight=torch.ones(7)), r"ln_weight must be a \[8\]", id="ln-weight-D"),
    pytest.param(_bad(ln_bias=torch.ones(8).long()), "ln_bias: torch.int64", id="ln-bias-dtype"),
    pytest.param(_bad(residual=torch.randn(2, 9)), "residual", id="residual-shape"),
    pytest.param(_bad(residual=torch.randn(2, 8).half()), "residual", id="residual-dtype"),
    pytest.param(_bad(eps=-1.0), "eps", id="eps"),
    pytest.param(_bad(activation="gelu"), "activation must be None or 'gelu_tanh'", id="activation"),
    pytest.param(_bad(qk_norm=QK2), "needs num_heads", id="qk-without-num-heads"),
    pytest.param(_bad(num_heads=2), "only used with qk_norm", id="num-heads-without-qk"),
    pytest.param(_bad(qk_norm=QK2, num_heads=5), r"N=12 .* not 3 \* num_heads=5", id="qk-N-not-3HDh"),
    pytest.param(_bad(qk_norm=QK2[:3], num_heads=2), "qk_norm must be a tuple", id="qk-three-tensors"),
    pytest.param(_bad(qk_norm=(*QK2[:3], torch.ones(3)), num_heads=2), r"qk_norm k_bias must be a \[2\]",
                 id="qk-k-bias-Dh"),
    pytest.param(_bad(qk_norm=QK2, num_heads=2, activation="gelu_tanh"), "exclude each other", id="qk-and-gelu"),
])
def test_bad_input_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _opcheck_args():
    x, r = torch.randn(20, 48)[:, :40], torch.randn(20, 40)
    w, b, lw, lb = torch.randn(96, 40) / 40 ** 0.5, torch.randn(96), torch.randn(40), torch.randn(40)
    qk = [torch.randn(16) for _ in range(4)]
    return {
        "plain": (K.norm_linear_op, (x, w, b, lw, lb, 1e-5, "none", None, None, None, None, 0, 1e-5)),
        "gelu-no-bias": (K.norm_linear_op, (x, w, None, lw, lb, 1e-5, "gelu_tanh", None, None, None, None, 0, 1e-5)),
        "residual-qk": (K.residual_norm_linear_op, (r, x, w, b, lw, lb, 1e-5, "none", *qk, 2, 1e-5)),
    }


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's opcheck; the GPU runs test_gpu_real_shapes")
@pytest.mark.parametrize("name", list(_opcheck_args()))
def test_opcheck(triton_backend, name):
    op, args = _opcheck_args()[name]
    torch.library.opcheck(op, args)


def test_compiled_fullgraph_matches_eager(triton_backend):
    args, kw = _inputs((2, 6), 32, 96, fp32, qk=(2, 16))
    x, w, b, lw, lb = args

    def block(x, r, w, b, lw, lb, qk):
        y, out = norm_linear(x, w, b, lw, lb, residual=r, qk_norm=qk, num_heads=2)
        h, _ = norm_linear(out, w[:64], b[:64], lw, lb, activation="gelu_tanh")
        return y, h

    eager = block(x, kw["residual"], w, b, lw, lb, kw["qk_norm"])
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, kw["residual"], w, b, lw, lb, kw["qk_norm"])
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M, N, qk, activation", [pytest.param(1024, 1536, (8, 64), None, id="decode-qkv-qk"),
                                                  pytest.param(3 * 4096, 2048, None, "gelu_tanh", id="fc1-gelu")])
def test_gpu_real_shapes(triton_backend, M, N, qk, activation):
    args, kw = _inputs((M,), 512, N, bf, qk=qk)
    kw["activation"] = activation
    (y, out), (y_lp, out_lp), (y32, out32) = _three_ways(args, kw)
    assert torch.equal(out, out_lp)
    assert_2x_rule(y, y32, y_lp, name="y", dtype=bf)
    assert_2x_rule(out, out32, out_lp, name="out", dtype=bf)


def test_gpu_path_fake_pass_and_sm90_compile_without_gpu(sm90_compile_check):
    """tests/ops/norm_linear_compile_check.py in a subprocess without TRITON_INTERPRET: the triton_ops' fake pass
    gives the outputs' shapes and dtypes at the model's shapes, and every launch compiles for sm_90a without
    register spills."""
    result = sm90_compile_check("norm_linear_compile_check.py")
    want = []
    for dt in ("torch.bfloat16", "torch.float32"):
        for M in (1024, 131072):
            want += [[[M, n], dt, "cuda"] for n in (1536, 1536, 512, 2048, 512)]
    want += [[[131072, 1536], "torch.float32", "cuda"], [[131072, 2048], "torch.float32", "cuda"]]
    assert result["outputs"] == want
    # bf16: qkv without / with residual and fc1 at both tile sizes; fp32: one tile for both M, plus TF32
    assert len(result["compiled"]) == 11
    assert not [c for c in result["compiled"] if c["spill_bytes"]], result["compiled"]
    assert all(c["vector_accesses"] > 0 for c in result["compiled"])
    assert {c["consts"]["DOT_PRECISION"] for c in result["compiled"] if c["dtype"] == "torch.float32"} == {"ieee",
                                                                                                           "tf32"}
