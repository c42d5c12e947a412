"""LayerNorm ops (layer_norm, residual_layer_norm, qk_layer_norm) against the pure-torch references: the 2x rule,
forward and every gradient, odd shapes and strided inputs; deterministic backward; opcheck; torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from wmfast.kernels import layernorm as K

from tests.ops.conftest import DEVICE
from wmfast.ops import layer_norm, qk_layer_norm, residual_layer_norm, use_backend
from wmfast.testing import assert_2x_rule

bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def _leaves(tensors, dt, param_dt=None):
    """Fresh leaves: activations in dt, parameters (the last ones, named p*) in param_dt or dt."""
    return {k: v.detach().to(param_dt if (k.startswith("p") and param_dt) else dt).requires_grad_()
            for k, v in tensors.items()}


def _grads(outs, leaves, cots):
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cots))
    loss.backward()
    return outs, {k: v.grad for k, v in leaves.items()}


def _manual(op, t, upcast):
    """The op spelled out in plain torch on leaves `t` (upcast: fp32 math; else the leaves' dtype)."""
    dt = fp32 if upcast else t["x"].dtype
    if op == "layer_norm":
        return (F.layer_norm(t["x"].to(dt), t["x"].shape[-1:], t["pw"].to(dt), t["pb"].to(dt)).to(t["x"].dtype),)
    if op == "residual_layer_norm":
        out = (t["r"].to(dt) + t["x"].to(dt)).to(t["x"].dtype)
        y = F.layer_norm(out.to(dt), out.shape[-1:], t["pw"].to(dt), t["pb"].to(dt)).to(t["x"].dtype)
        return y, out
    H = t["x"].shape[-1] // (3 * t["pqw"].shape[0])
    v = t["x"].unflatten(-1, (3, H, -1))
    q = F.layer_norm(v[..., 0, :, :].to(dt), t["pqw"].shape, t["pqw"].to(dt), t["pqb"].to(dt))
    k = F.layer_norm(v[..., 1, :, :].to(dt), t["pkw"].shape, t["pkw"].to(dt), t["pkb"].to(dt))
    return q.to(t["x"].dtype), k.to(t["x"].dtype)


def _wmfast(op, t):
    if op == "layer_norm":
        return layer_norm(t["x"], t["pw"], t["pb"])
    if op == "residual_layer_norm":
        return residual_layer_norm(t["r"], t["x"], t["pw"], t["pb"])
    H = t["x"].shape[-1] // (3 * t["pqw"].shape[0])
    return qk_layer_norm(t["x"], t["pqw"], t["pqb"], t["pkw"], t["pkb"], num_heads=H)


def _inputs(op, shape, dtype, strided):
    D = shape[-1]
    if op == "qk_layer_norm":
        H, Dh = 3, D
        x = torch.randn(*shape[:-1], 3 * H * Dh + (5 if strided else 0))
        x = x[..., : 3 * H * Dh] if strided else x
        p = {f"p{n}": torch.randn(Dh) * (0.5 if n.endswith("b") else 1) + (1 if n.endswith("w") else 0)
             for n in ("qw", "qb", "kw", "kb")}
        return {"x": x * 2 + 0.5, **p}
    big = torch.randn(*shape[:-1], 2 * D) if strided else torch.randn(*shape)
    x = big[..., ::2] if strided else big  # strided: every other column, the last dim not contiguous
    t = {"x": x * 3 + 1, "pw": torch.randn(D) + 1, "pb": torch.randn(D) * 0.5}
    if op == "residual_layer_norm":
        t = {"r": torch.randn(*shape) * 2, **t}
    return t


CASES = [
    pytest.param((3, 7, 61), bf, False, id="D61-bf16"),
    pytest.param((2, 5, 9, 61), fp16, True, id="D61-fp16-strided"),
    pytest.param((1, 37, 1000), bf, False, id="D1000-bf16-B1"),
    pytest.param((4, 50, 64), fp32, False, id="D64-fp32-many-rows"),
    pytest.param((2, 3, 40, 512), bf, True, id="D512-bf16-strided"),
]


@pytest.mark.parametrize("op", ["layer_norm", "residual_layer_norm", "qk_layer_norm"])
@pytest.mark.parametrize("shape, dtype, strided", CASES)
def test_2x_rule(triton_backend, op, shape, dtype, strided):
    if op == "qk_layer_norm":
        shape = (*shape[:-1], 16 if shape[-1] > 100 else shape[-1])  # Dh: 61, 64 or 16
    base = _inputs(op, shape, dtype, strided)
    n_out = 1 if op == "layer_norm" else 2
    with torch.no_grad():
        ref_out = _manual(op, _leaves(base, fp32), True)
    cots = [torch.randn_like(o.float()) for o in ref_out][:n_out]
    leaves = _leaves(base, dtype, fp32)
    outs, grads = _grads(_wmfast(op, leaves), leaves, cots)
    leaves32 = _leaves(base, fp32)
    outs32, grads32 = _grads(_manual(op, leaves32, True), leaves32, cots)
    leaves_lp = _leaves(base, dtype)
    outs_lp, grads_lp = _grads(_manual(op, leaves_lp, False), leaves_lp, cots)
    for i, (a, e, lp) in enumerate(zip(outs, outs32, outs_lp)):
        assert a.dtype == dtype and a.shape == e.shape
        assert_2x_rule(a, e, lp, name=f"{op} output {i}", dtype=dtype)
    for k in grads:
        assert grads[k].dtype == (fp32 if k.startswith("p") else dtype), k
        assert_2x_rule(grads[k], grads32[k], grads_lp[k], name=f"{op} d_{k}", dtype=dtype)


def test_residual_out_is_the_rounded_sum_and_y_normalises_it(triton_backend):
    r, x = torch.randn(2, 9, 61).to(bf), torch.randn(2, 9, 61).to(bf)
    w, b = torch.randn(61), torch.randn(61)
    y, out = residual_layer_norm(r, x, w, b)
    exact = (r.float() + x.float()).to(bf)
    if DEVICE == "cuda":
        assert torch.equal(out, exact)
    else:  # the interpreter casts fp32 -> bf16 by truncation (a GPU rounds to nearest even): within one ulp
        ulp = torch.finfo(bf).eps * exact.float().abs().clamp_min(1e-30)
        assert ((out.float() - exact.float()).abs() <= ulp).all()
    torch.testing.assert_close(y, layer_norm(out, w, b), atol=0, rtol=0)


def test_backward_deterministic_and_loops(triton_backend):
    # M = 900 rows of D = 64 (BLOCK_M 64): 15 row blocks over at most 4 programs on the CPU, so each program loops
    x = torch.randn(900, 64, requires_grad=True)
    r = torch.randn(900, 64, requires_grad=True)
    w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    dy, dout = torch.randn(900, 64), torch.randn(900, 64)
    runs = []
    for _ in range(2):
        y, out = residual_layer_norm(r, x, w, b)
        runs.append(torch.autograd.grad((y, out), (x, r, w, b), (dy, dout)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    with use_backend("torch"):
        y, out = residual_layer_norm(r, x, w, b)
        ref = torch.autograd.grad((y, out), (x, r, w, b), (dy, dout))
    for a, e in zip(runs[0], ref):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_qk_views_share_one_tensor_and_v_untouched(triton_backend):
    qkv = torch.randn(2, 3, 5, 3 * 4 * 16)
    ones, zeros = torch.ones(16), torch.zeros(16)
    q, k = qk_layer_norm(qkv, ones, zeros, ones, zeros, num_heads=4)
    assert q.shape == k.shape == (2, 3, 5, 4, 16) and q.stride(-1) == 1
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    torch.testing.assert_close(k, F.layer_norm(qkv.unflatten(-1, (3, 4, 16))[..., 1, :, :], (16,)), atol=1e-5,
                               rtol=1e-5)


def test_qk_grad_reaches_only_q_and_k_columns(triton_backend):
    qkv = torch.randn(2, 7, 3 * 2 * 16, requires_grad=True)
    p = [torch.ones(16, requires_grad=True) for _ in range(4)]
    q, k = qk_layer_norm(qkv, *p, num_heads=2)
    (q.square().sum() + k.sum()).backward()
    assert torch.all(qkv.grad[..., 64:] == 0) and qkv.grad[..., :32].abs().sum() > 0
    assert p[3].grad is not None and torch.all(p[3].grad == 28)  # d(sum k)/d(k bias) = tokens x heads = 2 * 7 * 2


@pytest.mark.parametrize("call, match", [
    (lambda: layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8)), "weight must be a \\[8\\]"),
    (lambda: layer_norm(torch.randn(2, 8).long(), torch.ones(8), torch.zeros(8)), "x dtype"),
    (lambda: layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), eps=-1.0), "eps"),
    (lambda: residual_layer_norm(torch.randn(2, 9), torch.randn(2, 8), torch.ones(8), torch.zeros(8)), "residual"),
    (lambda: qk_layer_norm(torch.randn(2, 50), *[torch.ones(8)] * 4, num_heads=2), "not 3 \\* num_heads"),
    (lambda: qk_layer_norm(torch.randn(2, 48), *[torch.ones(8)] * 4, num_heads=0), "num_heads"),
    (lambda: layer_norm("x", torch.ones(8), torch.zeros(8)), "x must be a tensor"),
])
def test_bad_input_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _opcheck_args():
    x = torch.randn(6, 3, 61)[:, :, :61]
    r = torch.randn(6, 3, 61)
    qk = torch.randn(5, 3, 2, 4, 16)[:, :, :, :].reshape(15, 2 * 4, 16)  # contiguous [M, 2H, Dh]
    w1, b1 = torch.randn(1, 61), torch.randn(1, 61)
    w2, b2 = torch.randn(2, 16), torch.randn(2, 16)
    return {
        "layer_norm": (K.layer_norm_op, (x, w1, b1, 1e-5)),
        "layer_norm_grouped": (K.layer_norm_op, (qk, w2, b2, 1e-5)),
        "residual_layer_norm": (K.residual_layer_norm_op, (r, x, w1, b1, 1e-5)),
        "layer_norm_bwd": (K.layer_norm_bwd_op, (torch.randn(6, 3, 61), torch.randn(6, 3, 61), x, w1, 1e-5)),
        "layer_norm_bwd_no_dout": (K.layer_norm_bwd_op, (torch.randn(15, 8, 16), None, qk, w2, 1e-5)),
    }


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's opcheck; the GPU runs test_gpu_real_shapes")
@pytest.mark.parametrize("name", list(_opcheck_args()))
def test_opcheck(triton_backend, name):
    op, args = _opcheck_args()[name]
    if "bwd" not in name:
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def test_compiled_fullgraph_matches_eager(triton_backend):
    r, x = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 6, 32, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)

    def f(r, x, w, b):
        y, out = residual_layer_norm(r, x, w, b)
        return (layer_norm(y, w, b) * out).sum()

    eager = torch.autograd.grad(f(r, x, w, b), (r, x, w, b))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(r, x, w, b), (r, x, w, b))
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op, shape", [("residual_layer_norm", (8, 5, 1024, 512)),
                                       ("qk_layer_norm", (8, 5, 1024, 64))])
def test_gpu_real_shapes(triton_backend, op, shape):
    base = _inputs(op, shape, bf, False)
    base = {k: v.cuda() for k, v in base.items()}
    n_out = 1 if op == "layer_norm" else 2
    leaves32 = _leaves(base, fp32)
    outs32 = _manual(op, leaves32, True)
    cots = [torch.randn_like(o.float()) for o in outs32][:n_out]
    outs32, grads32 = _grads(outs32, leaves32, cots)
    leaves = _leaves(base, bf, fp32)
    outs, grads = _grads(_wmfast(op, leaves), leaves, cots)
    leaves_lp = _leaves(base, bf)
    outs_lp, grads_lp = _grads(_manual(op, leaves_lp, False), leaves_lp, cots)
    for i, (a, e, lp) in enumerate(zip(outs, outs32, outs_lp)):
        assert_2x_rule(a, e, lp, name=f"{op} output {i}", dtype=bf)
    for k in grads:
        assert_2x_rule(grads[k], grads32[k], grads_lp[k], name=f"{op} d_{k}", dtype=bf)


def test_gpu_path_fake_pass_and_sm90_compile_without_gpu(sm90_compile_check):
    """tests/ops/layernorm_compile_check.py in a subprocess without TRITON_INTERPRET: the triton_ops' fake pass gives
    the outputs' shapes and dtypes at the model's shapes, and every launch compiles for sm_90a without register
    spills, with vector global accesses."""
    result = sm90_compile_check("layernorm_compile_check.py")
    want = []
    for shape, g in (([40960, 1, 512], 1), ([40960, 16, 64], 2), ([64, 1, 8192], 1)):
        want += [[shape, "torch.bfloat16", "cuda"], [shape, "torch.bfloat16", "cuda"], [[g, shape[-1]], "torch.float32",
                                                                                          "cuda"]]
    assert result["outputs"] == want
    assert len(result["compiled"]) == 6
    assert not [c for c in result["compiled"] if c["spill_bytes"]], result["compiled"]
    assert all(c["vector_accesses"] > 0 for c in result["compiled"])
