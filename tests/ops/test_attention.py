"""Temporal attention (Triton kernel under the interpreter, and the torch path) against the pure-torch reference:
forward and every gradient by the 2x rule, odd shapes, strided views, validation, opcheck and torch.compile
tracing. Spatial attention is tested in tests/ops/test_spatial_attention.py, the decode step in
tests/ops/test_decode.py."""
import pytest
import torch
import torch.nn.functional as F
from wmfast.kernels.temporal_attention import (
    _temporal_attention_bwd,
    _temporal_attention_fwd,
    temporal_attention_bwd_op,
    temporal_attention_op,
    temporal_attention_ref,
)

from wmfast.ops import temporal_attention
from wmfast.testing import assert_2x_rule


def make_qkv(B, T, S, H, Dh, dtype, layout, device="cpu"):
    """q, k, v leaves-or-views with the strides of `layout`, and the leaf tensors that carry the gradients.

    packed: views of one fused projection [B, T, S, 3, H, Dh] (what a model's qkv Linear gives);
    permuted: stored [B, S, H, T, Dh] and permuted to [B, T, S, H, Dh] (T not the outer dim);
    contiguous: three plain tensors."""
    if layout == "packed":
        leaf = torch.randn(B, T, S, 3, H, Dh, dtype=dtype, device=device, requires_grad=True)
        return leaf.unbind(3), (leaf,)
    if layout == "permuted":
        leaves = [torch.randn(B, S, H, T, Dh, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]
        return [x.permute(0, 3, 1, 2, 4) for x in leaves], leaves
    leaves = [torch.randn(B, T, S, H, Dh, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]
    return leaves, leaves


def check_against_ref(fn, q, k, v, leaves, causal, dtype):
    """Forward and gradients of fn vs the fp32 reference, with the same-dtype torch reference as the 2x baseline."""
    o = fn(q, k, v)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)  # per-tensor grads, also when q, k, v are views of one leaf
    ref32 = temporal_attention_ref(q, k, v, causal=causal, upcast=True)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o32 = temporal_attention_ref(q32, k32, v32, causal=causal, upcast=True)
    g32 = torch.autograd.grad(o32, (q32, k32, v32), do.float())
    olp = temporal_attention_ref(q, k, v, causal=causal, upcast=False)
    glp = torch.autograd.grad(olp, (q, k, v), do)
    assert_2x_rule(o, ref32, olp, "o", dtype)
    for name, a, r, lp in zip(("dq", "dk", "dv"), grads, g32, glp):
        assert_2x_rule(a, r, lp, name, dtype)


CASES = [
    pytest.param(2, T, 7, 2, 16, id=f"T{T}-S7") for T in (1, 2, 5, 7, 16)
] + [
    pytest.param(1, 5, 33, 3, 24, id="T5-S33-B1-H3-Dh24"),  # Dh not a power of two: the head-dim mask
    pytest.param(2, 3, 5, 1, 64, id="T3-S5-H1-Dh64"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,T,S,H,Dh", CASES)
def test_temporal_triton_matches_reference(B, T, S, H, Dh, causal, dtype):
    (q, k, v), leaves = make_qkv(B, T, S, H, Dh, dtype, "packed")
    check_against_ref(lambda a, b, c: temporal_attention_op(a, b, c, causal), q, k, v, leaves, causal, dtype)


@pytest.mark.parametrize("layout", ["packed", "permuted", "contiguous"])
def test_temporal_strided_layouts(layout):
    (q, k, v), leaves = make_qkv(2, 5, 7, 2, 16, torch.float32, layout)
    check_against_ref(lambda a, b, c: temporal_attention_op(a, b, c, True), q, k, v, leaves, True, torch.float32)


def test_temporal_many_programs_and_partial_last_block():
    """Block sizes forced small so rows span several programs, the last one partly masked."""
    (q, k, v), _ = make_qkv(1, 5, 7, 3, 16, torch.float32, "packed")
    q, k, v = (x.detach() for x in (q, k, v))
    o = _temporal_attention_fwd(q, k, v, True, block_r=4)  # 21 rows -> 6 programs
    assert_2x_rule(o, temporal_attention_ref(q, k, v), temporal_attention_ref(q, k, v), "o")
    do = torch.randn_like(o)
    q32, k32, v32 = (x.clone().requires_grad_() for x in (q, k, v))
    g32 = torch.autograd.grad(temporal_attention_ref(q32, k32, v32), (q32, k32, v32), do)
    for name, a, r in zip(("dq", "dk", "dv"), _temporal_attention_bwd(do, q, k, v, True, block_r=8), g32):
        assert_2x_rule(a, r, r, name)


def test_temporal_noncontiguous_grad_output():
    (q, k, v), _ = make_qkv(1, 4, 5, 2, 16, torch.float32, "contiguous")
    o = temporal_attention_op(q, k, v, True)
    o.sum().backward()  # grad_output is an expanded (stride-0) ones tensor
    q32, k32, v32 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    temporal_attention_ref(q32, k32, v32).sum().backward()
    for name, a, r in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), (q32.grad, k32.grad, v32.grad)):
        assert_2x_rule(a, r, r, name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_public_op_dispatch(backend, force_backend):
    force_backend(backend)
    (q, k, v), leaves = make_qkv(1, 5, 7, 2, 16, torch.float32, "packed")
    check_against_ref(lambda a, b, c: temporal_attention(a, b, c, causal=False), q, k, v, leaves, False,
                      torch.float32)


def test_causal_ignores_future_frames():
    """A property, not a comparison: changing frames > t must not change the output at frames <= t."""
    (q, k, v), _ = make_qkv(1, 6, 5, 2, 16, torch.float32, "contiguous")
    q, k, v = (x.detach() for x in (q, k, v))
    o1 = temporal_attention_op(q, k, v, True)
    k2, v2 = k.clone(), v.clone()
    k2[:, 3:] += 10
    v2[:, 3:] -= 10
    o2 = temporal_attention_op(q, k2, v2, True)
    assert torch.equal(o1[:, :3], o2[:, :3]) and not torch.allclose(o1[:, 3:], o2[:, 3:])


BAD = [
    pytest.param(lambda q: (q, q[..., :4], q), "k", id="shape-mismatch"),
    pytest.param(lambda q: (q, q, q.double()), "v", id="dtype"),
    pytest.param(lambda q: (q, q.transpose(3, 4).contiguous().transpose(3, 4), q), "contiguous head dim",
                 id="dh-not-contiguous"),
    pytest.param(lambda q: (q[0], q[0], q[0]), "5-D", id="rank"),
    pytest.param(lambda q: (q.int(), q.int(), q.int()), "dtype", id="int-dtype"),
    pytest.param(lambda q: (torch.randn(1, 17, 2, 2, 8),) * 3, "exceeds", id="T17"),
]


@pytest.mark.parametrize("make,match", BAD)
def test_temporal_bad_inputs_raise_before_launch(make, match):
    q = torch.randn(1, 3, 4, 2, 8)
    with pytest.raises(ValueError, match=match):
        temporal_attention(*make(q))


def test_opcheck_temporal():
    (q, k, v), _ = make_qkv(1, 3, 5, 2, 8, torch.float32, "packed")
    for causal in (True, False):
        torch.library.opcheck(temporal_attention_op, (q, k, v, causal))
    do = torch.randn(1, 3, 5, 2, 8)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    torch.library.opcheck(temporal_attention_bwd_op, (do, qd, kd, vd, True))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_fullgraph_traces(backend, force_backend):
    """fullgraph=True fails on any graph break. aot_eager traces forward and backward graphs without
    Inductor codegen (Inductor cannot compile user Triton kernels for CPU tensors); Inductor is the GPU test."""
    force_backend(backend)
    torch._dynamo.reset()

    def f(q, k, v):
        return temporal_attention(q, k, v, causal=True) * 2

    (q, k, v), leaves = make_qkv(1, 3, 5, 2, 8, torch.float32, "packed")
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    out.sum().backward()
    ref = f(*(x.detach() for x in (q, k, v)))
    torch.testing.assert_close(out, ref)
    assert leaves[0].grad is not None


def test_compile_inductor_torch_path(force_backend):
    force_backend("torch")
    torch._dynamo.reset()
    (q, k, v), _ = make_qkv(1, 3, 5, 2, 8, torch.float32, "packed")
    q, k, v = (x.detach() for x in (q, k, v))
    f = torch.compile(lambda a, b, c: temporal_attention(a, b, c, causal=True), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), temporal_attention_ref(q, k, v))


# ------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the compiled kernel, Inductor, realistic shapes
# ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("T", [1, 5, 16])
@pytest.mark.parametrize("Dh", [32, 64, 128])
def test_temporal_gpu(T, Dh, dtype):
    (q, k, v), leaves = make_qkv(2, T, 257, 4, Dh, dtype, "packed", device="cuda")
    for causal in (True, False):
        fn = lambda a, b, c, causal=causal: temporal_attention_op(a, b, c, causal)
        check_against_ref(fn, q, k, v, leaves, causal, dtype)


@pytest.mark.gpu
def test_compile_inductor_triton_gpu(force_backend):
    force_backend("triton")
    torch._dynamo.reset()
    (q, k, v), _ = make_qkv(2, 5, 64, 4, 64, torch.bfloat16, "packed", device="cuda")
    f = torch.compile(lambda a, b, c: F.gelu(temporal_attention(a, b, c, causal=True)), fullgraph=True)
    out = f(q, k, v)
    out.float().sum().backward()
    ref = F.gelu(temporal_attention_op(*(x.detach() for x in (q, k, v)), True))
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
def test_opcheck_gpu():
    """On a GPU the ops are triton_ops (traced through wrap_triton), not the interpreter's custom_ops."""
    (q, k, v), _ = make_qkv(2, 5, 33, 2, 64, torch.bfloat16, "packed", device="cuda")
    torch.library.opcheck(temporal_attention_op, (q, k, v, True))
    qd, kd, vd = (x.detach() for x in (q, k, v))
    torch.library.opcheck(temporal_attention_bwd_op, (torch.randn_like(qd), qd, kd, vd, False))


_COMPILE_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import wmfast.kernels.temporal_attention as ta

def compile_sm90(kern, ptrs, scale_type="fp32", **constexprs):
    names = [p.name for p in kern.params if p.is_constexpr]
    sig = {p: "constexpr" if p in names else f"*{DT}" if p in ptrs else scale_type if p.startswith("scale") else "i32"
           for p in kern.arg_names}
    cx = {(kern.arg_names.index(k),): v for k, v in constexprs.items()}
    k = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    assert "cubin" in k.asm, list(k.asm)

DT = "bf16"
compile_sm90(ta._temporal_attention_fwd_kernel, "QKVO", CAUSAL=True, BLOCK_R=8, BLOCK_T=8, BLOCK_D=64)
compile_sm90(ta._temporal_attention_fwd_kernel, "QKVO", CAUSAL=False, BLOCK_R=2, BLOCK_T=16, BLOCK_D=128)
compile_sm90(ta._temporal_attention_bwd_kernel, ("Q", "K", "V", "DO", "DQ", "DK", "DV"), CAUSAL=True,
             BLOCK_R=4, BLOCK_T=8, BLOCK_D=64)
# torch.compile (Inductor) passes the Python-float scales as fp64 scalars: the loop-carried fp32 tiles must stay fp32
compile_sm90(ta._temporal_attention_bwd_kernel, ("Q", "K", "V", "DO", "DQ", "DK", "DV"), "fp64", CAUSAL=True,
             BLOCK_R=4, BLOCK_T=8, BLOCK_D=64)
compile_sm90(ta._temporal_attention_fwd_kernel, "QKVO", "fp64", CAUSAL=True, BLOCK_R=8, BLOCK_T=8, BLOCK_D=64)
DT = "fp32"
compile_sm90(ta._temporal_decode_kernel, ("Q", "K", "V", "KC", "VC", "O"), BLOCK_R=4, BLOCK_T=8, BLOCK_D=32)
print("ok")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the Triton compiler rejects: compile every kernel ahead of time for an H100
    (sm_90, through ptxas to a cubin), which needs no GPU. A fresh process: the kernels must not be interpreted."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_empty_batch():
    q = torch.randn(0, 3, 4, 2, 8, requires_grad=True)
    o = temporal_attention_op(q, q, q, True)
    o.sum().backward()
    assert o.shape == q.shape and q.grad.shape == q.shape


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compile_dynamic_shapes(device):
    """Generation without a cache grows T frame by frame: with dynamic shapes the block sizes specialise on T,
    and the backend choice (made while tracing) specialises on Dh, which dynamic=True makes symbolic too."""
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: temporal_attention(a, b, c, causal=True), fullgraph=True, dynamic=True)
    for B, T in ((1, 3), (2, 4), (3, 5)):
        q, k, v = torch.randn(3, B, T, 16, 2, 32, device=device).unbind(0)
        torch.testing.assert_close(f(q, k, v), temporal_attention_ref(q, k, v))
