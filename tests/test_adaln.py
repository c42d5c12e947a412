"""Fused AdaLN-Zero ops against the pure-torch references (the 2x rule, forward and every gradient).

The Triton kernels run on the CPU under TRITON_INTERPRET=1 (set by conftest): shapes stay tiny, large D with
small L. Every case builds the modulation as strided views of one [B, 6, D], [B, F, 6, D] or [B, L, 6, D] tensor
(the way models chunk it), so the kernels' stride handling is always exercised.
"""
from __future__ import annotations

import pytest
import torch
from wmfast.kernels import adaln as K

from wmfast import ops
from wmfast.backend import triton_interpret
from wmfast.testing import assert_2x_rule

OPS = ("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate")


# Where the Triton kernels run in this session: CPU tensors under the interpreter (CI), else the GPU (conftest
# leaves TRITON_INTERPRET unset when a GPU is present, so the same tests then run the compiled kernels).
DEVICE = "cpu" if triton_interpret() or not torch.cuda.is_available() else "cuda"
needs_interpreter = pytest.mark.skipif(not triton_interpret(), reason="checks the interpreter-mode registration "
                                       "(custom_op) on CPU tensors; the gpu-marked tests cover the triton_ops")


@pytest.fixture
def triton_backend(monkeypatch):
    """WMFAST_BACKEND=triton, tensors created on DEVICE by default."""
    monkeypatch.setenv("WMFAST_BACKEND", "triton")
    if DEVICE == "cpu":  # (a default-device mode costs every op a Python dispatch: only when needed)
        yield
        return
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


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


def test_torch_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("WMFAST_BACKEND", "torch")
    x, res = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    _, (sh, sc, g) = make_mod(2, 6, 32, "frame", fp32, 3)
    y, out = ops.gated_residual_layernorm_modulate(res, x, g, sh, sc, frame_len=3)
    ry, rout = K.gated_residual_layernorm_modulate_ref(res, x, g, sh, sc, frame_len=3)
    assert torch.equal(y, ry) and torch.equal(out, rout)


def _opcheck_args():
    B, L, D, fl = 2, 4, 61, 2
    x, res = torch.randn(B, L, D), torch.randn(B, L, D)
    mod = torch.randn(B, L // fl, 6, D)
    shift, scale, gate = (mod[:, :, i] for i in range(3))  # strided per-frame views
    tok = torch.randn(B, L, 2, D)[:, :, 1]  # strided per-token view
    dy, dout = torch.randn(B, L, D), torch.randn(B, L, D)
    return {
        "layernorm_modulate": (K.layernorm_modulate_op, (x, shift, tok, 1e-6, fl)),
        "gated_residual": (K.gated_residual_op, (res, x, gate, fl)),
        "gated_residual_layernorm_modulate": (K.gated_residual_layernorm_modulate_op,
                                              (res, x, gate, tok, scale, 1e-6, fl)),
        "layernorm_modulate_bwd": (K.layernorm_modulate_bwd_op, (dy, x, shift, tok, 1e-6, fl)),
        "gated_residual_bwd": (K.gated_residual_bwd_op, (dout, x, tok, fl)),
        "gated_residual_layernorm_modulate_bwd": (K.gated_residual_layernorm_modulate_bwd_op,
                                                  (dy, dout, res, x, gate, shift, scale, 1e-6, fl)),
    }


@needs_interpreter
@pytest.mark.parametrize("name", list(_opcheck_args()))
def test_opcheck(name):
    op, args = _opcheck_args()[name]
    if not name.endswith("_bwd"):  # forward ops: check the autograd registration with grads on
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def _compiled_matches_eager(op):
    x, res = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 6, 32, requires_grad=True)
    mod = torch.randn(2, 3, 6, 32, requires_grad=True)

    def f(res, x, mod):
        shift, scale, gate = mod.unbind(2)[:3]
        outs = call(op, res, x, shift, scale, gate, 2)
        return sum((o * (i + 1)).square().sum() for i, o in enumerate(outs))

    return f, (res, x, mod)


@pytest.mark.parametrize("backend, compiler", [
    ("torch", "inductor"), pytest.param("triton", "aot_eager", marks=needs_interpreter)])
def test_compile_fullgraph(monkeypatch, backend, compiler):
    """fullgraph=True fails on any graph break. The torch backend goes through Inductor; the Triton backend's
    interpreted kernels go through aot_eager (Inductor adds nothing for an opaque op on the CPU and costs time)."""
    monkeypatch.setenv("WMFAST_BACKEND", backend)
    torch._dynamo.reset()
    f, args = _compiled_matches_eager("gated_residual_layernorm_modulate")
    loss = torch.compile(f, fullgraph=True, backend=compiler)(*args)
    grads = torch.autograd.grad(loss, args)
    loss_e = f(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss, loss_e, rtol=1e-4, atol=1e-4)
    for a, e in zip(grads, grads_e):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def _bad_inputs():
    B, L, D = 2, 6, 8
    x = torch.randn(B, L, D)
    m = torch.randn(B, D)
    cases = {  # id: (op, args, kwargs, message fragment)
        "x-2d": ("layernorm_modulate", (x[0], m, m), {}, r"x must be \[B, L, D\].*\(6, 8\)"),
        "x-int": ("layernorm_modulate", (x.long(), m, m), {}, "x must be float32"),
        "x-empty": ("layernorm_modulate", (x[:, :0], m, m), {}, r"x must not be empty.*\(2, 0, 8\)"),
        "shift-D": ("layernorm_modulate", (x, torch.randn(B, D + 1), m), {}, r"shift shape \(2, 9\).*D=8"),
        "scale-B": ("layernorm_modulate", (x, m, torch.randn(B + 1, D)), {}, r"scale shape \(3, 8\).*B=2"),
        "scale-4d": ("layernorm_modulate", (x, m, torch.randn(B, 1, 1, D)), {}, r"scale shape \(2, 1, 1, 8\)"),
        "shift-dtype": ("layernorm_modulate", (x.to(bf), m.to(fp16), m.to(bf)), {}, "shift dtype torch.float16"),
        "shift-bf16-x-fp32": ("layernorm_modulate", (x, m.to(bf), m), {}, "shift dtype torch.bfloat16"),
        "shift-device": ("layernorm_modulate", (x, m.to("meta"), m), {}, "shift is on meta"),
        "frame-missing": ("layernorm_modulate", (x, torch.randn(B, 3, D), m), {},
                          r"shift shape \(2, 3, 8\).*frame_len is required"),
        "frame-count": ("layernorm_modulate", (x, torch.randn(B, 2, D), m), {"frame_len": 2},
                        r"shift shape \(2, 2, 8\): F=2 frames \* frame_len=2 != L=6"),
        "frame-not-divisor": ("layernorm_modulate", (x, m, m), {"frame_len": 4},
                              r"L=6 .* not a multiple of frame_len=4"),
        "frame-zero": ("layernorm_modulate", (x, m, m), {"frame_len": 0}, "frame_len must be a positive int"),
        "frame-float": ("layernorm_modulate", (x, m, m), {"frame_len": 2.0}, "frame_len must be a positive int"),
        "frame-bool": ("layernorm_modulate", (x, m, m), {"frame_len": True}, "frame_len must be a positive int"),
        "eps-negative": ("layernorm_modulate", (x, m, m), {"eps": -1.0}, "eps must be a non-negative"),
        "residual-shape": ("gated_residual", (x[:, :3], x, m), {},
                           r"residual shape \(2, 3, 8\) != x shape \(2, 6, 8\)"),
        "residual-dtype": ("gated_residual", (x.double(), x, m), {}, "residual"),
        "gate-shape": ("gated_residual", (x, x, torch.randn(B, 4, D)), {}, r"gate shape \(2, 4, 8\)"),
        "fused-scale": ("gated_residual_layernorm_modulate", (x, x, m, m, torch.randn(B, D, 1)), {}, r"scale shape"),
        "shift-not-tensor": ("layernorm_modulate", (x, 1.0, m), {}, "shift must be a tensor"),
    }
    return [pytest.param(*v, id=k) for k, v in cases.items()]


@pytest.mark.parametrize("op, args, kwargs, match", _bad_inputs())
def test_bad_input_raises_before_launch(triton_backend, monkeypatch, op, args, kwargs, match):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(K, "_adaln_fwd", no_launch)
    with pytest.raises(ValueError, match=match):
        getattr(ops, op)(*args, **kwargs)


def test_bench_wan_block_providers_compute_the_same(triton_backend):
    """The benchmark's wmfast Wan-block path (per-frame modulation) computes what diffusers' per-token
    expressions compute: the speedups it reports compare equal work."""
    import pathlib

    from wmfast.benchmarking import load_bench_script

    bench = load_bench_script(pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_adaln.py")
    B, L, D, fl = 2, 6, 61, 3
    x, attn_out, ff_out = (torch.randn(B, L, D, dtype=bf) for _ in range(3))
    table = torch.randn(1, 6, D) * 0.1
    temb_frames = torch.randn(B, L // fl, 6, D) * 0.1
    temb_tokens = temb_frames.repeat_interleave(fl, dim=1)
    ref = bench.wan_block_adaln_diffusers(x, attn_out, ff_out, table, temb_tokens)
    for temb, kw in ((temb_frames, {"frame_len": fl}), (temb_tokens, {})):
        got = bench.wan_block_adaln_wmfast(x, attn_out, ff_out, table, temb, **kw)
        for a, e in zip(got, ref):
            torch.testing.assert_close(a.float(), e.float(), atol=5e-2, rtol=2e-2)


# ---- GPU: the compiled kernels (`python -m pytest -m gpu tests/test_adaln.py` on a GPU machine) ----
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


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("name", list(_opcheck_args()))
def test_gpu_opcheck(name):
    torch.set_default_device("cuda")  # builds the strided views on the GPU (.cuda() would make them contiguous)
    try:
        op, args = _opcheck_args()[name]
    finally:
        torch.set_default_device(None)
    if not name.endswith("_bwd"):
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


def test_gpu_path_fake_pass_and_sm90_compile_without_gpu():
    """The GPU path, checked where no GPU can run it (tests/adaln_compile_check.py, in a subprocess without
    TRITON_INTERPRET): the triton_ops' fake pass (what torch.compile runs) gives the right output shapes and
    dtypes, and every kernel launch it records (Wan2.2, ST-Transformer and odd shapes) compiles, specialised as
    Triton's JIT would, to an sm_90a cubin without register spills."""
    import json
    import os
    import subprocess
    import sys

    import triton

    if not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")):
        pytest.skip("this Triton has no NVIDIA backend binaries (ptxas) to compile for sm_90a")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "adaln_compile_check.py")
    proc = subprocess.run([sys.executable, script, "--compile"], capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    bf_, f32 = "torch.bfloat16", "torch.float32"
    want = []
    for B, L, D, F_ in ((2, 12, 61, 3), (2, 1536, 3072, 6), (2, 5120, 512, 5)):
        act, frame = [[B, L, D], bf_, "cuda"], [[B, F_, D], f32, "cuda"]
        tok, sample = [[B, L, D], f32, "cuda"], [[B, D], f32, "cuda"]
        # y, out, d_res, d_x, d_gate, d_tok, d_scale | y2, d_shift, d_scale | out2, d_gate (per-sample)
        want += [act] * 4 + [frame, tok, frame] + [act, frame, frame] + [act, sample]
    assert result["outputs"] == want
    kernels = {c["kernel"] for c in result["compiled"]}
    assert kernels == {"_adaln_fwd_kernel", "_adaln_bwd_kernel", "_reduce_partials_kernel"}, kernels
    spills = [c for c in result["compiled"] if c["spill_bytes"]]
    assert not spills, spills
    # the forward at the real widths (D=3072, 512) moves every row with vector (128-bit) loads and stores
    fwd = [c for c in result["compiled"] if c["kernel"] == "_adaln_fwd_kernel" and c["consts"]["BLOCK_D"] >= 512]
    assert fwd and all(c["scalar_accesses"] == 0 and c["vector_accesses"] > 0 for c in fwd), fwd
