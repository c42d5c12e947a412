"""The AdaLN ops' registration: torch.library opcheck of every op (interpreter and GPU), torch.compile with
fullgraph=True, input validation before any launch, the GPU path's fake pass and sm_90a compile without a GPU,
and the benchmark's Wan-block providers."""
from __future__ import annotations

import pytest
import torch
from wmfast.kernels import adaln as K
from wmfast.kernels._launch import triton_interpret

from wmfast import ops

bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
needs_interpreter = pytest.mark.skipif(not triton_interpret(), reason="checks the interpreter-mode registration "
                                       "(custom_op) on CPU tensors; the gpu-marked tests cover the triton_ops")
compiled_kernels = pytest.mark.skipif(
    triton_interpret(),
    reason="tests the compiled kernels and the triton_op registration (TRITON_INTERPRET must be unset)")


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


def _compiled_matches_eager():
    x, res = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 6, 32, requires_grad=True)
    mod = torch.randn(2, 3, 6, 32, requires_grad=True)

    def f(res, x, mod):
        shift, scale, gate = mod.unbind(2)[:3]
        outs = ops.gated_residual_layernorm_modulate(res, x, gate, shift, scale, eps=1e-6, frame_len=2)
        return sum((o * (i + 1)).square().sum() for i, o in enumerate(outs))

    return f, (res, x, mod)


@pytest.mark.parametrize("backend, compiler", [
    ("torch", "inductor"), pytest.param("triton", "aot_eager", marks=needs_interpreter)])
def test_compile_fullgraph(force_backend, backend, compiler):
    """fullgraph=True fails on any graph break. The torch backend goes through Inductor; the Triton backend's
    interpreted kernels go through aot_eager (Inductor adds nothing for an opaque op on the CPU and costs time)."""
    force_backend(backend)
    torch._dynamo.reset()
    f, args = _compiled_matches_eager()
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
        "eps-negative": ("layernorm_modulate", (x, m, m), {"eps": -1.0}, "eps must be a finite float > 0"),
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

    from wmfast.bench.discovery import load_bench_script

    bench = load_bench_script(pathlib.Path(__file__).parents[2] / "benchmarks" / "bench_adaln.py")
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


def test_gpu_path_fake_pass_and_sm90_compile_without_gpu(sm90_compile_check):
    """The GPU path, checked where no GPU can run it (tests/ops/adaln_compile_check.py, in a subprocess without
    TRITON_INTERPRET): the triton_ops' fake pass (what torch.compile runs) gives the right output shapes and
    dtypes, and every kernel launch it records (Wan2.2, ST-Transformer and odd shapes) compiles, specialised as
    Triton's JIT would, to an sm_90a cubin without register spills."""
    result = sm90_compile_check("adaln_compile_check.py", "--compile")
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
