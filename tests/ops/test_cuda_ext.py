"""The CUDA extension's Python side (wmfast.ops.cuda_ext): fake kernels, autograd, modulation layouts,
torch.compile and the limits exported by the binding. Without a GPU (CI) it runs on a CPU stand-in namespace
whose schemas are parsed from binding.cpp and whose implementations mirror the kernels' math; with a GPU (marked
`gpu`): CUDA vs Triton vs the fp32 reference by the 2x rule, every modulation layout, forward and backward,
determinism, opcheck, the decode step, and the limits the built extension reports.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
from wmfast.kernels._launch import triton_interpret
from wmfast.kernels.adaln import gated_residual_layernorm_modulate_ref, layernorm_modulate_ref
from wmfast.kernels.temporal_attention import temporal_decode_ref

from wmfast.ops import cuda_ext
from wmfast.testing import LAYOUTS, assert_2x_rule, check_decode, check_grads, leaves, modulation_layout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------ limits: from the headers
def _header(path: str) -> str:
    with open(os.path.join(REPO, "csrc", path)) as f:
        return f.read()


def header_limits() -> cuda_ext.Limits:
    """The limits as the headers define them (the constants the binding's `limits` op returns)."""
    adaln = _header("adaln/adaln.h")

    def const(name):
        expr = re.search(rf"constexpr int64_t {name} = ([0-9 *]+);", adaln).group(1)
        value = 1
        for factor in expr.split("*"):
            value *= int(factor)
        return value

    dims = re.search(r"kTemporalDecodeHeadDims\[\] = \{([0-9, ]+)\}", _header("temporal_attention/temporal_decode.h"))
    return cuda_ext.Limits(const("kAdaLNMaxDFwd"), const("kAdaLNMaxDBwd"), const("kAdaLNMaxDBwdScalar"),
                           tuple(int(d) for d in dims.group(1).split(",")))


def test_binding_exports_every_header_limit():
    """binding.cpp's `limits` op returns the headers' constants under the names cuda_ext.Limits reads."""
    body = re.search(r"limits\(\) \{(.*?)\n\}", _header("binding.cpp"), flags=re.DOTALL).group(1)
    names = re.search(r"names = \{([^}]*)\}", body).group(1)
    values = re.search(r"values = \{([^}]*)\}", body).group(1)
    assert [n.strip().strip('"') for n in names.split(",")] == ["adaln_max_d_fwd", "adaln_max_d_bwd",
                                                                "adaln_max_d_bwd_unaligned"]
    assert [v.strip() for v in values.split(",")] == ["kAdaLNMaxDFwd", "kAdaLNMaxDBwd", "kAdaLNMaxDBwdScalar"]
    assert "for (int64_t d : kTemporalDecodeHeadDims)" in body and '"decode_head_dim"' in body
    assert header_limits() == cuda_ext.Limits(8192, 4096, 2048, (32, 64, 128))


def test_limits_reach_the_support_checks_from_the_extension(standin):
    lim = cuda_ext.limits(STANDIN)  # through the op, as from the built extension
    assert lim == header_limits()
    assert cuda_ext.adaln_reasons(lim.adaln_max_d_fwd, torch.bfloat16, False, lim) == []
    assert cuda_ext.adaln_reasons(lim.adaln_max_d_fwd + 8, torch.bfloat16, False, lim) == [
        f"D = {lim.adaln_max_d_fwd + 8} > {lim.adaln_max_d_fwd}"]
    assert cuda_ext.adaln_reasons(lim.adaln_max_d_bwd, torch.bfloat16, True, lim) == []
    unaligned = lim.adaln_max_d_bwd_unaligned + 1  # not a multiple of 8 bf16 elements: the scalar path
    assert cuda_ext.adaln_reasons(unaligned, torch.bfloat16, True, lim) == [
        f"backward needs D <= {lim.adaln_max_d_bwd_unaligned}, got D = {unaligned}"]
    assert cuda_ext.adaln_reasons(64, torch.float64, False, lim) == ["dtype torch.float64 not supported"]
    assert cuda_ext.decode_reasons(64, torch.float16, lim) == []
    assert cuda_ext.decode_reasons(48, torch.float16, lim) == ["head dim 48 not in (32, 64, 128)"]


# ------------------------------------------------------------------------------ CPU stand-in for the Python side
STANDIN = "wmfast_cuda_cpu_standin"


def _binding_schemas() -> list[str]:
    """The op schemas exactly as csrc/binding.cpp defines them (adjacent C string literals joined)."""
    with open(os.path.join(REPO, "csrc", "binding.cpp")) as f:
        src = f.read()
    defs = re.findall(r'm\.def\("((?:[^;])*?)"(?:, &[\w:]+)?\);', src, flags=re.DOTALL)
    return [re.sub(r'"\s*"', "", m) for m in defs]


def _expand(m, L):
    return m.float().repeat_interleave(L // m.shape[1], dim=1)


def _reduce(g, m):
    """Sum per-row contributions over the rows sharing a modulation row (what the two-stage reduction does)."""
    B, L, D = g.shape
    return g.view(B, m.shape[1], L // m.shape[1], D).sum(2).to(m.dtype)


def _stats(o, eps):
    mean = o.mean(-1)
    return mean, torch.rsqrt(((o - mean[..., None]) ** 2).mean(-1) + eps)


def _norm_bwd(dy, o, scale, mean, rstd):
    """The kernels' backward math (csrc/adaln/adaln_bwd.cu), in fp32 torch."""
    xhat = (o - mean[..., None]) * rstd[..., None]
    g = dy.float() * (1 + _expand(scale, o.shape[1]))
    c1, c2 = (g * xhat).mean(-1, keepdim=True), g.mean(-1, keepdim=True)
    return rstd[..., None] * (g - c2 - xhat * c1), xhat


def _standin_impls():
    def ln_fwd(x, shift, scale, eps):
        o = x.float()
        mean, rstd = _stats(o, eps)
        y = (o - mean[..., None]) * rstd[..., None] * (1 + _expand(scale, x.shape[1])) + _expand(shift, x.shape[1])
        return y.to(x.dtype), mean, rstd

    def ln_bwd(dy, x, shift, scale, mean, rstd):
        dn, xhat = _norm_bwd(dy, x.float(), scale, mean, rstd)
        return dn.to(x.dtype), _reduce(dy.float(), shift), _reduce(dy.float() * xhat, scale)

    def grln_fwd(residual, x, gate, shift, scale, eps):
        o = residual.float() + _expand(gate, x.shape[1]) * x.float()
        y, mean, rstd = ln_fwd(o, shift, scale, eps)
        return y.to(x.dtype), o.to(x.dtype), mean, rstd

    def grln_bwd(dy, dout, residual, x, gate, shift, scale, mean, rstd):
        o = residual.float() + _expand(gate, x.shape[1]) * x.float()
        dn, xhat = _norm_bwd(dy, o, scale, mean, rstd)
        if dout is not None:
            dn = dn + dout.float()
        return (dn.to(x.dtype), (dn * _expand(gate, x.shape[1])).to(x.dtype), _reduce(dn * x.float(), gate),
                _reduce(dy.float(), shift), _reduce(dy.float() * xhat, scale))

    def decode(q, k, v, k_cache, v_cache, t):
        return temporal_decode_ref(q, k, v, k_cache, v_cache, t).clone()

    def limits():
        lim = header_limits()
        names = ["adaln_max_d_fwd", "adaln_max_d_bwd", "adaln_max_d_bwd_unaligned"]
        values = [lim.adaln_max_d_fwd, lim.adaln_max_d_bwd, lim.adaln_max_d_bwd_unaligned]
        return (names + ["decode_head_dim"] * len(lim.decode_head_dims), values + list(lim.decode_head_dims))

    return {"limits": limits, "layernorm_modulate_fwd": ln_fwd, "layernorm_modulate_bwd": ln_bwd,
            "gated_residual_layernorm_modulate_fwd": grln_fwd, "gated_residual_layernorm_modulate_bwd": grln_bwd,
            "temporal_decode_step": decode}


_LIB = None


@pytest.fixture
def standin(monkeypatch):
    """cuda_ext wired to a CPU namespace with binding.cpp's schemas, so its Python side runs without a GPU."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library(STANDIN, "DEF")
        impls = _standin_impls()
        for schema in _binding_schemas():
            _LIB.define(schema)
            name = schema.split("(")[0]
            _LIB.impl(name, impls[name], "CompositeExplicitAutograd" if name == "limits" else "CPU")
        cuda_ext.register_python_side(STANDIN)
    monkeypatch.setattr(cuda_ext, "NAMESPACE", STANDIN)
    return getattr(torch.ops, STANDIN)


def test_binding_defines_every_op_the_python_side_uses():
    names = {s.split("(")[0] for s in _binding_schemas()}
    assert names == {"layernorm_modulate_fwd", "layernorm_modulate_bwd", "gated_residual_layernorm_modulate_fwd",
                     "gated_residual_layernorm_modulate_bwd", "temporal_decode_step", "limits"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_standin_layernorm_modulate_layouts_fwd_bwd(standin, layout):
    B, L, D, F = 2, 6, 24, 3
    x = torch.randn(B, L, D, dtype=torch.float32)
    (_, shift, scale), frame_len = modulation_layout(layout, B, L, D, F, torch.float32, "cpu")
    xk, sk, ck = leaves([x, shift, scale])
    y = cuda_ext.layernorm_modulate(xk, sk, ck, eps=1e-6, frame_len=frame_len)

    def ref(ins, upcast):
        return (layernorm_modulate_ref(*ins, eps=1e-6, frame_len=frame_len, upcast=upcast),)

    check_grads([y], [xk, sk, ck], ref, [x, shift, scale], torch.float32, ("x", "shift", "scale"))


@pytest.mark.parametrize("layout", ["per-sample", "per-frame", "chunk-views", "per-token", "mixed"])
def test_standin_gated_residual_layernorm_modulate_fwd_bwd(standin, layout):
    B, L, D, F = 2, 6, 24, 2
    x, res = torch.randn(B, L, D), torch.randn(B, L, D)
    (gate, shift, scale), frame_len = modulation_layout(layout, B, L, D, F, torch.float32, "cpu")
    ins = leaves([res, x, gate, shift, scale])
    y, out = cuda_ext.gated_residual_layernorm_modulate(*ins, eps=1e-6, frame_len=frame_len)

    def ref(i, upcast):
        return gated_residual_layernorm_modulate_ref(*i, eps=1e-6, frame_len=frame_len, upcast=upcast)

    check_grads([y, out], ins, ref, [res, x, gate, shift, scale], torch.float32,
                 ("residual", "x", "gate", "shift", "scale"))


def _opcheck_every_op(ns, device, dtype):
    """torch.library.opcheck of all five ops of `ns` (the extension, or the CPU stand-in with its schemas): the
    forward ops with grads on, the backward ops on the statistics their forward returns (with and without
    dout for the gated one), the decode step."""
    B, L, D = 2, 8, 64
    x = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True)
    res = torch.randn_like(x, requires_grad=True)
    mods = [torch.randn(B, 4, D, device=device, requires_grad=True) for _ in range(3)]  # fp32, per-frame
    torch.library.opcheck(ns.layernorm_modulate_fwd, (x, mods[1], mods[2], 1e-6))
    torch.library.opcheck(ns.gated_residual_layernorm_modulate_fwd, (res, x, *mods, 1e-6))
    plain = [t.detach() for t in (res, x, *mods)]
    dy = torch.randn(B, L, D, device=device, dtype=dtype)
    _, mean, rstd = ns.layernorm_modulate_fwd(plain[1], plain[3], plain[4], 1e-6)
    torch.library.opcheck(ns.layernorm_modulate_bwd, (dy, plain[1], plain[3], plain[4], mean, rstd))
    _, _, mean, rstd = ns.gated_residual_layernorm_modulate_fwd(*plain, 1e-6)
    for dout in (None, torch.randn_like(dy)):
        torch.library.opcheck(ns.gated_residual_layernorm_modulate_bwd, (dy, dout, *plain, mean, rstd))
    q, k, v = (torch.randn(2, 1, 5, 3, 64, device=device, dtype=dtype) for _ in range(3))
    kc, vc = (torch.randn(2, 5, 3, 8, 64, device=device, dtype=dtype) for _ in range(2))
    torch.library.opcheck(ns.temporal_decode_step, (q, k, v, kc, vc, 3))


def test_standin_opcheck_and_compile(standin):
    for dtype in (torch.float32, torch.bfloat16):  # the GPU test's very code, on the stand-in
        _opcheck_every_op(standin, "cpu", dtype)
    B, L, D = 2, 4, 8
    x, res = torch.randn(B, L, D, requires_grad=True), torch.randn(B, L, D, requires_grad=True)
    mods = [torch.randn(B, 2, D, requires_grad=True) for _ in range(3)]

    def block(x, res, g, s, c):
        y, out = cuda_ext.gated_residual_layernorm_modulate(res, x, g, s, c, frame_len=2)
        return cuda_ext.layernorm_modulate(y, s, c, frame_len=2) + out

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, res, *mods), block(x, res, *mods))


def test_bad_modulation_layout_is_a_value_error(standin):
    x = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="frame_len"):
        cuda_ext.layernorm_modulate(x, torch.randn(2, 4, 8), torch.randn(2, 4, 8), frame_len=2)
    with pytest.raises(ValueError, match="shift"):
        cuda_ext.layernorm_modulate(x, torch.randn(3, 8), torch.randn(2, 8))


def _cuda_vs_triton(layout, dtype, mod_dtype, D, device):
    """cuda_ext vs the Triton ops, both AdaLN ops, forward and every gradient: the 2x rule against the unrounded
    fp32 reference with Triton's error as the baseline (the CUDA path is no further from the specification
    than twice the Triton path, + atol)."""
    from wmfast.kernels import adaln as k

    B, L, F = 2, 6, 3
    x, res = (torch.randn(B, L, D, device=device).to(dtype) for _ in range(2))
    (gate, shift, scale), fl = modulation_layout(layout, B, L, D, F, dtype, device, mod_dtype)
    cases = [
        ("layernorm_modulate", [x, shift, scale], ("x", "shift", "scale"),
         lambda i: (cuda_ext.layernorm_modulate(*i, frame_len=fl),),
         lambda i: (k.layernorm_modulate_op(*i, 1e-6, fl or 0),),
         lambda i: (layernorm_modulate_ref(*i, frame_len=fl),)),
        ("gated_residual_layernorm_modulate", [res, x, gate, shift, scale], ("residual", "x", "gate", "shift", "scale"),
         lambda i: cuda_ext.gated_residual_layernorm_modulate(*i, frame_len=fl),
         lambda i: k.gated_residual_layernorm_modulate_op(*i, 1e-6, fl or 0),
         lambda i: gated_residual_layernorm_modulate_ref(*i, frame_len=fl))]
    for op, ins, names, cuda_fn, triton_fn, ref_fn in cases:
        ci, ti, ri = leaves(ins), leaves(ins), leaves([t.float() for t in ins])
        co, to, ro = cuda_fn(ci), triton_fn(ti), ref_fn(ri)
        for c, t, r, name in zip(co, to, ro, ("y", "out")):
            assert_2x_rule(c, r, t, name=f"{op} {name}: cuda vs triton", dtype=dtype)
        cot = [torch.randn_like(o) for o in co]
        grads = zip(torch.autograd.grad(co, ci, cot), torch.autograd.grad(to, ti, cot),
                    torch.autograd.grad(ro, ri, [c.float() for c in cot]), names)
        for c, t, r, name in grads:
            assert_2x_rule(c, r, t, name=f"{op} d{name}: cuda vs triton", dtype=dtype)


@pytest.mark.skipif(not triton_interpret(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("layout,dtype,D", [pytest.param("mixed", torch.bfloat16, 24, id="mixed-bf16"),
                                            pytest.param("per-frame", torch.float32, 61, id="per-frame-fp32-D61")])
def test_standin_cuda_vs_triton_runs(standin, layout, dtype, D):
    """The GPU test's comparison code, executed on the CPU stand-in vs the interpreted Triton kernels."""
    _cuda_vs_triton(layout, dtype, torch.float32, D, "cpu")


def test_residual_dtype_mismatch_is_a_value_error(standin):
    x, gate = torch.randn(2, 6, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"residual dtype torch.float64 must be x's dtype torch.float32"):
        cuda_ext.gated_residual_layernorm_modulate(x.double(), x, gate, gate, gate)




# ------------------------------------------------------------------------------------------------------ GPU half
@pytest.fixture(scope="module")
def cuda_ops():
    ok, why = cuda_ext.load()
    if not ok:  # a GPU machine must be able to build csrc/: failing to is a failure, not a skip
        os.environ["WMFAST_CUDA_JIT"] = "1"
        cuda_ext.load.cache_clear()
        ok, why = cuda_ext.load()
    assert ok, why
    return torch.ops.wmfast_cuda


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,mod_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float32, torch.float32)],
                         ids=["bf16", "bf16-fp32mod", "fp16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", [61, 512, 1000, 3072])
def test_gpu_adaln_vs_triton_vs_reference(cuda_ops, layout, dtype, mod_dtype, D):
    B, L, F = 2, 12, 3
    x, res = torch.randn(B, L, D, device="cuda", dtype=dtype), torch.randn(B, L, D, device="cuda", dtype=dtype)
    (gate, shift, scale), frame_len = modulation_layout(layout, B, L, D, F, dtype, "cuda", mod_dtype)
    ins = leaves([x, shift, scale])
    y = cuda_ext.layernorm_modulate(*ins, frame_len=frame_len)
    check_grads([y], ins, lambda i, up: (layernorm_modulate_ref(*i, frame_len=frame_len, upcast=up),),
                 [x, shift, scale], dtype, ("x", "shift", "scale"))
    ins = leaves([res, x, gate, shift, scale])
    yo = cuda_ext.gated_residual_layernorm_modulate(*ins, frame_len=frame_len)
    check_grads(list(yo), ins, lambda i, up: gated_residual_layernorm_modulate_ref(*i, frame_len=frame_len, upcast=up),
                 [res, x, gate, shift, scale], dtype, ("residual", "x", "gate", "shift", "scale"))
    _cuda_vs_triton(layout, dtype, mod_dtype, D, "cuda")  # both ops, forward and gradients


@pytest.mark.gpu
def test_gpu_compile_fullgraph(cuda_ops):
    B, L, D, fl = 2, 8, 256, 4
    x, res = (torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mods = [torch.randn(B, L // fl, D, device="cuda", requires_grad=True) for _ in range(3)]

    def block(x, res, g, s, c):
        y, out = cuda_ext.gated_residual_layernorm_modulate(res, x, g, s, c, frame_len=fl)
        return cuda_ext.layernorm_modulate(y, s, c, frame_len=fl).float().sum() + out.float().sum()

    compiled = torch.compile(block, fullgraph=True)
    eager_grads = torch.autograd.grad(block(x, res, *mods), (x, res, *mods))
    compiled_grads = torch.autograd.grad(compiled(x, res, *mods), (x, res, *mods))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_adaln_backward_is_deterministic(cuda_ops):
    B, L, D = 2, 4096, 3072
    x = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shift, scale = (torch.randn(B, 1, D, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    grads = [torch.autograd.grad(cuda_ext.layernorm_modulate(x, shift, scale), (x, shift, scale), dy)
             for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_opcheck(cuda_ops):
    _opcheck_every_op(cuda_ops, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("Dh", [32, 64, 128])
@pytest.mark.parametrize("t", [0, 6])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_gpu_temporal_decode_vs_triton_vs_reference(cuda_ops, dtype, Dh, t, strided):
    from wmfast.kernels.temporal_attention import temporal_decode_op

    B, S, H, T_max = 2, 37, 3, 8
    if strided:  # q, k, v as views of one fused qkv projection [B, 1, S, H, 3 * Dh]
        qkv = torch.randn(B, 1, S, H, 3 * Dh, device="cuda", dtype=dtype)
        q, k, v = qkv.split(Dh, dim=-1)
    else:
        q, k, v = (torch.randn(B, 1, S, H, Dh, device="cuda", dtype=dtype) for _ in range(3))
    cache = [torch.randn(B, S, H, T_max, Dh, device="cuda", dtype=dtype) for _ in range(2)]
    o, ref32 = check_decode(cuda_ext.temporal_decode_step, q, k, v, cache, t, dtype)
    kt, vt = (c.clone() for c in cache)
    assert_2x_rule(o, ref32, temporal_decode_op(q, k, v, kt, vt, t), "cuda vs triton", dtype=dtype)


@pytest.mark.gpu
def test_gpu_binding_rejects_bad_input(cuda_ops):
    x = torch.randn(2, 4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="shift must be"):
        cuda_ops.layernorm_modulate_fwd(x, torch.randn(2, 3, 8, device="cuda"), torch.randn(2, 1, 8, device="cuda"),
                                        1e-6)
    q = torch.randn(1, 1, 2, 2, 48, device="cuda")
    with pytest.raises(RuntimeError, match="head dim 48"):
        cuda_ops.temporal_decode_step(q, q, q, torch.zeros(1, 2, 2, 4, 48, device="cuda"),
                                      torch.zeros(1, 2, 2, 4, 48, device="cuda"), 0)



@pytest.mark.gpu
def test_gpu_limits_are_the_headers(cuda_ops):
    assert cuda_ext.limits() == header_limits()
