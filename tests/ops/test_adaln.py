"""Fused AdaLN-Zero ops against the pure-torch references (the 2x rule, forward and every gradient).

The Triton kernels run on the CPU under TRITON_INTERPRET=1 (set by conftest): shapes stay tiny, large D with
small L. Every case builds the modulation as strided views of one [B, 6, D], [B, F, 6, D] or [B, L, 6, D] tensor
(the way models chunk it), so the kernels' stride handling is always exercised.
"""
from __future__ import annotations

import pytest
import torch
from wmfast.kernels import adaln as K
from wmfast.kernels._launch import triton_interpret

from wmfast import ops
from wmfast.testing import assert_2x_rule

OPS = ("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate")


# Where the Triton kernels run in this session (the `triton_backend` fixture of tests/ops/conftest.py forces the
# Triton backend and makes DEVICE the default device).
DEVICE = "cpu" if triton_interpret() or not torch.cuda.is_available() else "cuda"


def make_mod(B, L, D, layout, dtype, frame_len=None, scale=0.5):
    """A leaf modulation tensor and its (shift, scale, gate) views, in one layout:
    sample2 [B, D] views of [B, 6, D]; sample3 [B, 1, D] views of [B, 1, 6, D]; frame [B, F, D] views of
    [B, F, 6, D]; token [B, L, D] views of [B, L, 6, D] (the diffusers per-token layout)."""
    rows = {"sample2": None, "sample3": 1, "frame": L // (frame_len or 1), "token": L}[layout]
    shape = (B, 6, D) if rows is None else (B, rows, 6, D)
    mod = (torch.randn(shape) * scale).to(dtype).requires_grad_()
    dim = 1 if rows is None else 2
    shift, sc, gate = (mod.select(dim, i) for i in (0, 1, 2))
    return mod, (shift, sc, gate)


def call(op, res, x, shift, sc, gate, frame_len, *, upcast=None, eps=1e-6):
    """Run `op` (public API when upcast is None, else the reference) and return its outputs as a tuple."""
    if upcast is None:
        fn = getattr(ops, op)
        kw = {}
    else:
        fn = getattr(K, op + "_ref")
        kw = {"upcast": upcast}
    if op == "layernorm_modulate":
        return (fn(x, shift, sc, eps=eps, frame_len=frame_len, **kw),)
    if op == "gated_residual":
        return (fn(res, x, gate, frame_len=frame_len, **kw),)
    return tuple(fn(res, x, gate, shift, sc, eps=eps, frame_len=frame_len, **kw))


def run(op, res, x, mod, views, frame_len, cots, upcast=None):
    """Outputs and the gradients (residual, x, shift, scale, gate) of sum(out * cotangent)."""
    for t in (res, x, mod):
        t.grad = None
    outs = call(op, res, x, *views, frame_len, upcast=upcast)
    sum(((o.float() * c).sum() for o, c in zip(outs, cots)), torch.zeros(())).backward()
    dmod = mod.grad.movedim(-2, 0)  # [6, B, (rows,) D]
    grads = {"d_residual": res.grad, "d_x": x.grad, "d_shift": dmod[0], "d_scale": dmod[1], "d_gate": dmod[2]}
    used = {"layernorm_modulate": ("d_x", "d_shift", "d_scale"), "gated_residual": ("d_residual", "d_x", "d_gate")}
    keep = used.get(op, tuple(grads))
    return outs, {k: grads[k] for k in keep}


def check_2x(op, B, L, D, dtype, layout, mod_dtype, frame_len, nan=False):
    x = torch.randn(B, L, D).to(dtype)
    res = torch.randn(B, L, D).to(dtype)
    if nan:
        x[0, L // 2, D // 3] = float("nan")
    mod, _ = make_mod(B, L, D, layout, mod_dtype, frame_len)
    n_out = 2 if op == "gated_residual_layernorm_modulate" else 1
    cots = [torch.randn(B, L, D) for _ in range(n_out)]

    def leaves(dt, mdt):
        r = res.detach().to(dt).requires_grad_()
        xx = x.detach().to(dt).requires_grad_()
        m = mod.detach().to(mdt).requires_grad_()
        dim = 1 if m.dim() == 3 else 2
        return r, xx, m, tuple(m.select(dim, i) for i in (0, 1, 2))

    r, xx, m, v = leaves(dtype, mod_dtype)
    outs, grads = run(op, r, xx, m, v, frame_len, cots)
    r, xx, m, v = leaves(torch.float32, torch.float32)
    outs32, grads32 = run(op, r, xx, m, v, frame_len, cots, upcast=True)
    r, xx, m, v = leaves(dtype, dtype)  # what plain PyTorch does in the low precision
    outs_lp, grads_lp = run(op, r, xx, m, v, frame_len, cots, upcast=False)
    for i, (a, e, lp) in enumerate(zip(outs, outs32, outs_lp)):
        assert a.dtype == dtype
        assert_2x_rule(a, e, lp, name=f"{op} output {i}", dtype=dtype)
    for k in grads:
        assert grads[k].dtype == (mod_dtype if k in ("d_shift", "d_scale", "d_gate") else dtype), k
        assert_2x_rule(grads[k], grads32[k], grads_lp[k], name=f"{op} {k}", dtype=dtype)


bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
CASES = [  # B, L, D, dtype, layout, modulation dtype, frame_len
    pytest.param(3, 7, 61, bf, "sample2", bf, None, id="D61-bf16-sample-B3-L7"),
    pytest.param(1, 9, 61, fp16, "sample3", fp16, None, id="D61-fp16-sample3-B1-L9"),
    pytest.param(3, 7, 61, fp32, "token", fp32, None, id="D61-fp32-token-B3-L7"),
    pytest.param(3, 12, 512, bf, "frame", fp32, 4, id="D512-bf16-frame-fp32mod-B3-L12"),
    pytest.param(1, 37, 1000, bf, "sample2", fp32, None, id="D1000-bf16-sample-fp32mod-B1-L37"),
    pytest.param(3, 6, 1000, fp32, "frame", fp32, 2, id="D1000-fp32-frame-B3-L6"),
    pytest.param(1, 5, 1000, fp16, "token", fp32, None, id="D1000-fp16-token-fp32mod-B1-L5"),
    pytest.param(1, 24, 3072, bf, "sample2", fp32, None, id="D3072-bf16-sample-fp32mod-B1-L24"),
    pytest.param(1, 4, 3072, bf, "frame", bf, 2, id="D3072-bf16-frame-B1-L4"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B, L, D, dtype, layout, mod_dtype, frame_len", CASES)
def test_2x_rule(triton_backend, op, B, L, D, dtype, layout, mod_dtype, frame_len):
    check_2x(op, B, L, D, dtype, layout, mod_dtype, frame_len)


@pytest.mark.parametrize("op", OPS)
def test_small_tiles_loop_and_partials(triton_backend, monkeypatch, op):
    """Tiny tiles force several tiles per backward program and several partials per modulation row."""
    monkeypatch.setattr(K, "_TILE", 128)
    check_2x(op, 3, 20, 61, bf, "frame", fp32, 10)
    check_2x(op, 1, 33, 61, fp32, "sample2", fp32, None)


@pytest.mark.parametrize("op", OPS)
def test_mixed_layouts(triton_backend, op):
    """shift per-frame, scale per-sample ([B, 1, D]), gate per-token, each a strided view, fp32 with bf16 x."""
    B, L, D, fl = 2, 6, 61, 3
    x, res = torch.randn(B, L, D, dtype=bf), torch.randn(B, L, D, dtype=bf)
    shift = torch.randn(B, L // fl, 2, D)[:, :, 1]
    scale = torch.randn(B, 1, 3, D)[:, :, 2]
    gate = torch.randn(B, L, 2, D)[:, :, 0]
    for t in (x, res, shift, scale, gate):
        t.requires_grad_()
    outs = call(op, res, x, shift, scale, gate, fl)
    refs = call(op, res, x, shift, scale, gate, fl, upcast=True)
    lows = call(op, res, x, shift.to(bf), scale.to(bf), gate.to(bf), fl, upcast=False)
    for a, e, lp in zip(outs, refs, lows):
        assert_2x_rule(a, e, lp, name=op)
    cots = [torch.randn(B, L, D) for _ in outs]
    inputs = (res, x, shift, scale, gate)
    ga = torch.autograd.grad(outs, inputs, [c.to(bf) for c in cots], allow_unused=True)
    ge = torch.autograd.grad(refs, inputs, [c.to(bf) for c in cots], allow_unused=True)
    for name, a, e in zip(("residual", "x", "shift", "scale", "gate"), ga, ge):
        assert (a is None) == (e is None), name
        if a is not None:
            assert a.shape == e.shape and a.dtype == e.dtype, name
            torch.testing.assert_close(a.float(), e.float(), atol=5e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("op", OPS)
def test_batch_broadcast_modulation(triton_backend, op):
    """Stride-0 batch views: a batch-1 modulation expanded to B (Wan's batch-1 conditioning) and a constant gate
    `ones(1, D).expand(B, -1)`; the modulation's gradient sums over the batch through autograd's expand."""
    B, L, D, fl = 3, 6, 61, 2
    x, res = torch.randn(B, L, D, requires_grad=True), torch.randn(B, L, D, requires_grad=True)
    base = torch.randn(1, L // fl, 6, D, requires_grad=True)
    mod = base.expand(B, -1, -1, -1)
    shift, scale = mod[:, :, 0], mod[:, :, 1]
    gate = torch.ones(1, D).expand(B, -1)
    outs = call(op, res, x, shift, scale, gate, fl)
    refs = call(op, res, x, shift, scale, gate, fl, upcast=True)
    cots = [torch.randn(B, L, D) for _ in outs]
    inputs = (x, base) if op == "layernorm_modulate" else (res, x) if op == "gated_residual" else (res, x, base)
    for a, e in zip(outs, refs):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    for a, e in zip(torch.autograd.grad(outs, inputs, cots), torch.autograd.grad(refs, inputs, cots)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_nan_parity(triton_backend, op):
    check_2x(op, 2, 6, 61, fp32, "frame", fp32, 3, nan=True)


@pytest.mark.parametrize("op", OPS)
def test_backward_deterministic(triton_backend, monkeypatch, op):
    monkeypatch.setattr(K, "_TILE", 256)  # several partials per row, so the stage-2 order matters
    B, L, D = 2, 16, 61
    x, res = torch.randn(B, L, D, dtype=bf), torch.randn(B, L, D, dtype=bf)
    mod, views = make_mod(B, L, D, "sample2", fp32)
    cots = [torch.randn(B, L, D) for _ in range(2)]
    first = run(op, res.requires_grad_(), x.requires_grad_(), mod, views, None, cots)[1]
    second = run(op, res, x, mod, views, None, cots)[1]
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_modulation_views_not_copied(triton_backend):
    """The public op hands the strided views themselves to the kernel op (no .contiguous())."""
    seen = []
    real = K.layernorm_modulate_op

    def spy(x, shift, scale, eps, frame_len):
        seen.append((shift.data_ptr(), shift.stride(), scale.data_ptr(), scale.stride()))
        return real(x, shift, scale, eps, frame_len)

    x = torch.randn(2, 4, 61)
    mod = torch.randn(2, 6, 61)
    shift, scale = mod.unbind(1)[:2]
    try:
        K.layernorm_modulate_op = spy
        ops.layernorm_modulate(x, shift, scale)
    finally:
        K.layernorm_modulate_op = real
    assert seen == [(mod.data_ptr(), (6 * 61, 1), mod.data_ptr() + 61 * 4, (6 * 61, 1))]


def test_frame_len_integer_types(triton_backend):
    import numpy as np

    x, mod = torch.randn(1, 4, 8), torch.randn(1, 2, 6, 8)
    want = ops.layernorm_modulate(x, mod[:, :, 0], mod[:, :, 1], frame_len=2)
    for fl in (np.int64(2), torch.tensor(2)):
        assert torch.equal(ops.layernorm_modulate(x, mod[:, :, 0], mod[:, :, 1], frame_len=fl), want)


def test_torch_backend_matches_reference(force_backend):
    force_backend("torch")
    x, res = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    _, (sh, sc, g) = make_mod(2, 6, 32, "frame", fp32, 3)
    y, out = ops.gated_residual_layernorm_modulate(res, x, g, sh, sc, frame_len=3)
    ry, rout = K.gated_residual_layernorm_modulate_ref(res, x, g, sh, sc, frame_len=3)
    assert torch.equal(y, ry) and torch.equal(out, rout)



# ---- GPU: the compiled kernels (`python -m pytest -m gpu tests/ops/test_adaln.py` on a GPU machine) ----
compiled_kernels = pytest.mark.skipif(
    triton_interpret(),
    reason="tests the compiled kernels and the triton_op registration (TRITON_INTERPRET must be unset)")


def _gpu_case(op, B, L, D, layout, frame_len):
    x = torch.randn(B, L, D, device="cuda", dtype=bf)
    res = torch.randn(B, L, D, device="cuda", dtype=bf)
    mod, _ = make_mod(B, L, D, layout, fp32, frame_len)
    mod = mod.detach().cuda()
    return x, res, mod


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B, L, D, layout, frame_len", [
    pytest.param(2, 1536, 3072, "frame", 256, id="wan-per-frame"),
    pytest.param(1, 1536, 3072, "token", None, id="wan-per-token"),
    pytest.param(4, 5120, 512, "sample2", None, id="st-per-sample"),
    pytest.param(3, 999, 1000, "frame", 333, id="odd"),
])
def test_gpu_2x_rule_real_shapes(triton_backend, op, B, L, D, layout, frame_len):
    check_2x(op, B, L, D, bf, layout, fp32, frame_len)


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("op", OPS)
def test_gpu_deterministic_and_compiled(triton_backend, op):
    """Two backward runs bit-identical at a real size; torch.compile(fullgraph=True) with Inductor traces the
    triton_op (no graph break) and matches eager."""
    x, res, mod = _gpu_case(op, 2, 1536, 3072, "frame", 256)
    x.requires_grad_(), res.requires_grad_(), mod.requires_grad_()
    cots = [torch.randn_like(x, dtype=fp32) for _ in range(2)]
    views = mod.unbind(2)[:3]
    first = run(op, res, x, mod, views, 256, cots)[1]
    second = run(op, res, x, mod, views, 256, cots)[1]
    for k in first:
        assert torch.equal(first[k], second[k]), k

    def f(res, x, mod):
        return call(op, res, x, *mod.unbind(2)[:3], 256)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(res, x, mod)
    for a, e in zip(got, f(res, x, mod)):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=1e-2)
