"""Backend dispatch (wmfast.ops.dispatch): each backend's reasons, one error listing them all, forcing with
use_backend (and WMFAST_BACKEND as the default), the measured / timed choice on CUDA tensors, and how the public
AdaLN ops and the decode step use it."""
from __future__ import annotations

import logging

import pytest
import torch
from wmfast.kernels import adaln as k
from wmfast.kernels import tuning
from wmfast.kernels._launch import triton_interpret
from wmfast.kernels.adaln import gated_residual_layernorm_modulate_ref, layernorm_modulate_ref

import wmfast.ops.adaln as adaln_ops
from wmfast import ops
from wmfast.ops import common, cuda_ext, dispatch
from wmfast.ops.dispatch import OpInputs, select_backend, use_backend

needs_interpreter = pytest.mark.skipif(not triton_interpret(), reason="needs TRITON_INTERPRET=1 (set by conftest "
                                                                      "without a GPU)")


def _inputs():
    x = torch.randn(2, 4, 8)
    mod = torch.randn(2, 2, 6, 8)
    return x, mod.unbind(2)


# ------------------------------------------------------------------------------------------------------- forcing
def test_forced_backend_errors(monkeypatch):
    x, (shift, scale, *_) = _inputs()
    monkeypatch.setenv("WMFAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"WMFAST_BACKEND=cuda for layernorm_modulate: cuda cannot run these inputs "
                                         r"\(cuda: needs CUDA tensors, got cpu\); every backend: cuda: needs CUDA"):
        ops.layernorm_modulate(x, shift, scale, frame_len=2)
    monkeypatch.setenv("WMFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="WMFAST_BACKEND='bogus'"):
        ops.layernorm_modulate(x, shift, scale, frame_len=2)


def test_use_backend_is_a_context_manager_and_a_decorator(monkeypatch):
    monkeypatch.setenv("WMFAST_BACKEND", "cuda")  # the user's default: a context overrides it
    cpu = torch.device("cpu")
    with use_backend("torch"):
        assert dispatch.forced_backend() == "torch"
        with use_backend(None):  # the automatic choice, whatever WMFAST_BACKEND says
            assert dispatch.forced_backend() is None
            assert select_backend("layernorm_modulate", cpu) == ("triton" if triton_interpret() else "torch")
        assert select_backend("layernorm_modulate", cpu) == "torch"
    assert dispatch.forced_backend() == "cuda"

    @use_backend("torch")
    def forced():
        return dispatch.forced_backend()

    assert forced() == "torch" and forced() == "torch" and dispatch.forced_backend() == "cuda"
    with pytest.raises(ValueError, match="use_backend\\('gpu'\\)"):
        use_backend("gpu")


def test_use_backend_names_itself_in_the_error():
    x, (shift, scale, *_) = _inputs()
    with use_backend("cuda"), pytest.raises(ValueError, match=r"use_backend\('cuda'\) for layernorm_modulate"):
        ops.layernorm_modulate(x, shift, scale, frame_len=2)


def test_no_usable_backend_is_one_error_listing_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError) as err:
        select_backend("layernorm_modulate", OpInputs(torch.device("cpu"), torch.float32, (2, 4, 8)),
                       order=("cuda", "triton"))
    msg = str(err.value)
    assert "no backend can run layernorm_modulate" in msg
    assert "cuda: needs CUDA tensors, got cpu" in msg and "triton: CPU tensors need TRITON_INTERPRET=1" in msg


def test_forcing_a_backend_without_the_op_leaves_it_to_the_automatic_choice(caplog):
    common.log_once.cache_clear()
    with use_backend("cuda"), caplog.at_level(logging.INFO, logger="wmfast"):
        got = select_backend("gated_residual", torch.device("cpu"))
    assert got == ("triton" if triton_interpret() else "torch")
    assert "use_backend('cuda') but gated_residual has no cuda implementation" in caplog.text


# ---------------------------------------------------------------------------------------- the public ops' choice
def test_cpu_without_interpreter_uses_reference_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    common.log_once.cache_clear()
    x, (shift, scale, *_) = _inputs()
    with caplog.at_level(logging.DEBUG, logger="wmfast"):
        y = ops.layernorm_modulate(x, shift, scale, frame_len=2)
    assert torch.equal(y, adaln_ops._k.layernorm_modulate_ref(x, shift, scale, frame_len=2))
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and "no fused kernels for cpu tensors (CPU tensors need TRITON_INTERPRET=1" in info[0]
    assert "layernorm_modulate on cpu tensors: " in caplog.text and "using the torch reference" in caplog.text


@needs_interpreter
def test_cpu_under_interpreter_selects_triton(monkeypatch):
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    calls = []
    real = adaln_ops._k.layernorm_modulate_op
    monkeypatch.setattr(adaln_ops._k, "layernorm_modulate_op", lambda *a: calls.append(a) or real(*a))
    x, (shift, scale, *_) = _inputs()
    ops.layernorm_modulate(x, shift, scale, frame_len=2)
    assert len(calls) == 1


@pytest.mark.parametrize("op", ["layernorm_modulate", "gated_residual_layernorm_modulate"])
def test_cuda_branch_calls_cuda_ext_with_the_views(monkeypatch, op):
    """The cuda branch hands the same tensors (strided views, no copies) and keywords to wmfast.ops.cuda_ext."""
    seen = {}
    monkeypatch.setattr(adaln_ops, "traceable_backend", lambda *a, **k: "cuda")
    monkeypatch.setattr(cuda_ext, op, lambda *a, **k: seen.update(args=a, kwargs=k) or "sentinel")
    x, (shift, scale, gate, *_) = _inputs()
    if op == "layernorm_modulate":
        out = ops.layernorm_modulate(x, shift, scale, eps=1e-5, frame_len=2)
        expected = (x, shift, scale)
    else:
        res = torch.randn_like(x)
        out = ops.gated_residual_layernorm_modulate(res, x, gate, shift, scale, eps=1e-5, frame_len=2)
        expected = (res, x, gate, shift, scale)
    assert out == "sentinel"
    assert all(a is e for a, e in zip(seen["args"], expected)) and len(seen["args"]) == len(expected)
    assert seen["kwargs"] == {"eps": 1e-5, "frame_len": 2}


def test_shape_key_names_the_layouts():
    x = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    keys = adaln_ops._shape_key(x, (torch.randn(2, 8), torch.randn(2, 3, 8), torch.randn(2, 6, 8)))
    assert keys == "B=2,L=6,D=8,bf16,per-sample+per-frame+per-token"
    assert adaln_ops._shape_key(x, (torch.randn(2, 1, 8),)) == "B=2,L=6,D=8,bf16,per-sample"


@needs_interpreter
def test_too_wide_for_triton_falls_back_or_raises_when_forced(monkeypatch, caplog):
    monkeypatch.setattr(k, "MAX_D", 4)
    x, (shift, scale, *_) = _inputs()  # D = 8 > 4
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    common.log_once.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="wmfast"):
        y = ops.layernorm_modulate(x, shift, scale, frame_len=2)
    assert torch.equal(y, k.layernorm_modulate_ref(x, shift, scale, frame_len=2))
    assert "exceeds the Triton kernels' limit D <= 4; using the torch reference" in caplog.text  # the DEBUG detail
    assert "some ops on cpu tensors run their torch references (first: layernorm_modulate" in caplog.text  # INFO
    with use_backend("triton"), pytest.raises(ValueError, match=r"use_backend\('triton'\) for layernorm_modulate: "
                                                                r"triton cannot run these inputs \(triton: D=8 "
                                                                r"\(x shape \(2, 4, 8\)\) exceeds"):
        ops.layernorm_modulate(x, shift, scale, frame_len=2)


def test_rows_wider_than_triton_max_d_never_reach_the_triton_kernel(monkeypatch, caplog):
    """A row the CUDA kernel does not take (CPU tensors here) and Triton's MAX_D excludes (it would spill) runs the
    reference, for all three AdaLN ops."""
    def refuse(*args):
        raise AssertionError("the Triton kernel must not see D > MAX_D")

    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    monkeypatch.setattr(k, "MAX_D", 16)
    for name in ("layernorm_modulate_op", "gated_residual_op", "gated_residual_layernorm_modulate_op"):
        monkeypatch.setattr(k, name, refuse)
    x, res, gate, shift, scale = (torch.randn(2, 3, 24) for _ in range(5))
    common.log_once.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="wmfast"):
        y = ops.layernorm_modulate(x, shift, scale)
        out1 = ops.gated_residual(res, x, gate)
        y2, out = ops.gated_residual_layernorm_modulate(res, x, gate, shift, scale)
    torch.testing.assert_close(y, layernorm_modulate_ref(x, shift, scale), rtol=0, atol=0)
    torch.testing.assert_close(out1, k.gated_residual_ref(res, x, gate), rtol=0, atol=0)
    torch.testing.assert_close((y2, out), gated_residual_layernorm_modulate_ref(res, x, gate, shift, scale),
                               rtol=0, atol=0)
    if triton_interpret():
        assert "D=24 (x shape (2, 3, 24)) exceeds the Triton kernels' limit D <= 16" in caplog.text


def _record_select(monkeypatch, *modules, choice="torch"):
    calls = []

    def record(op, inputs, **kwargs):
        calls.append((op, kwargs))
        return choice

    for module in modules:
        monkeypatch.setattr(module, "select_backend", record)
    return calls


def test_decode_step_hands_shape_key_and_runners_to_select_backend(monkeypatch):
    """On CUDA tensors the decode step lets dispatch time cuda vs triton per shape class, and while torch.compile
    traces it asks with the same key, so the cached timed choice is reused."""
    from wmfast.ops import attention as attn

    calls = _record_select(monkeypatch, dispatch)
    ran = []
    monkeypatch.setattr(attn, "temporal_decode_op", lambda *a: ran.append(torch.is_grad_enabled()))
    q, k_, v = (torch.randn(2, 1, 3, 4, 32) for _ in range(3))
    kc, vc = torch.zeros(2, 3, 4, 5, 32), torch.zeros(2, 3, 4, 5, 32)
    with pytest.MonkeyPatch.context() as mp:  # the CUDA-tensor path, without a device
        mp.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda")))
        attn._decode_backend(q, k_, v, kc, vc, 2)
    (op, kwargs), = calls
    assert op == "temporal_decode_step" and kwargs["shape_key"] == "B=2,S=3,H=4,T_max=5,Dh=32,fp32"
    assert sorted(kwargs["runners"]) == ["cuda", "triton"]
    kwargs["runners"]["triton"]()
    assert ran == [False]  # timed under no_grad
    monkeypatch.undo()
    calls = _record_select(monkeypatch, dispatch)
    torch._dynamo.reset()
    torch.compile(attn.temporal_decode_step, fullgraph=True, backend="aot_eager")(q, k_, v, kc, vc, 2)
    assert calls and calls[0][1]["shape_key"] == "B=2,S=3,H=4,T_max=5,Dh=32,fp32"
    assert "runners" not in calls[0][1]  # no timing while tracing


@pytest.mark.parametrize("grad", [False, True])
def test_adaln_compiled_choice_uses_the_shape_key_with_grad(monkeypatch, grad):
    """torch.compile asks dispatch with the shape key eager timing caches under (",grad" when a backward is
    needed), so compiled code takes eager's timed choice for the same shape class."""
    calls = _record_select(monkeypatch, dispatch)
    x, shift, scale = (torch.randn(2, 3, 8, requires_grad=grad) for _ in range(3))
    torch._dynamo.reset()
    torch.compile(adaln_ops.layernorm_modulate, fullgraph=True, backend="aot_eager")(x, shift, scale)
    key = "B=2,L=3,D=8,fp32,per-token" + (",grad" if grad else "")
    assert calls and calls[0][1]["shape_key"] == key


def test_compiled_ops_follow_a_changing_batch_and_length():
    """fullgraph compile keeps working when dynamo makes the batch or sequence length dynamic (the backend choice
    baked into the graph depends only on the row width and dtype)."""
    torch._dynamo.reset()
    lm = torch.compile(ops.layernorm_modulate, fullgraph=True, backend="eager")
    grlm = torch.compile(ops.gated_residual_layernorm_modulate, fullgraph=True, backend="eager")
    attn = torch.compile(lambda q: ops.temporal_attention(q, q, q, causal=True), fullgraph=True, backend="eager")
    for B, L in ((4, 8), (3, 8), (2, 6)):
        x, r = torch.randn(B, L, 16), torch.randn(B, L, 16)
        g, shift, scale = (torch.randn(B, 16) for _ in range(3))
        torch.testing.assert_close(lm(x, shift, scale), ops.layernorm_modulate(x, shift, scale))
        for got, want in zip(grlm(r, x, g, shift, scale), ops.gated_residual_layernorm_modulate(r, x, g, shift, scale)):
            torch.testing.assert_close(got, want)
        q = torch.randn(B, 3, L, 2, 8)
        torch.testing.assert_close(attn(q), ops.temporal_attention(q, q, q, causal=True))


def test_adaln_timing_runners_time_the_backward_when_grad_is_needed():
    x, shift, scale = (torch.randn(2, 3, 8, requires_grad=True) for _ in range(3))

    def factory(x, shift, scale):
        return {"triton": lambda: layernorm_modulate_ref(x, shift, scale)}

    grads = dispatch.timing_runners(factory, (x, shift, scale), True)["triton"]()
    assert len(grads) == 3 and all(g is not None for g in grads)
    assert x.grad is None  # torch.autograd.grad: nothing accumulates into the caller's tensors
    out = dispatch.timing_runners(factory, (x, shift, scale), False)["triton"]()
    assert not out.requires_grad  # forward only, under no_grad


def test_adaln_timing_leaves_the_callers_graph_intact():
    """Inputs computed from one another (x from residual, as in a transformer block): the timed backward must
    stop at the op's inputs, or it frees saved tensors of the caller's graph (the Wan block failed so on a GPU)."""
    w = torch.randn(8, 8, requires_grad=True)
    residual = torch.randn(2, 3, 8, requires_grad=True)
    x = (residual @ w).tanh()  # tanh saves its output: a second backward through it would fail
    gate, shift, scale = (torch.randn(2, 8, requires_grad=True) for _ in range(3))

    def factory(residual, x, gate, shift, scale):
        return {"triton": lambda: gated_residual_layernorm_modulate_ref(residual, x, gate, shift, scale)}

    runners = dispatch.timing_runners(factory, (residual, x, gate, shift, scale), True)
    for _ in range(3):
        runners["triton"]()
    y, out = gated_residual_layernorm_modulate_ref(residual, x, gate, shift, scale)
    (y.float().square().mean() + out.float().mean()).backward()  # the caller's backward still runs
    assert w.grad is not None and residual.grad is not None and gate.grad is not None


# ------------------------------------------------------------------------------ the choice on CUDA tensors
@pytest.fixture
def fake_gpu(monkeypatch):
    """select_backend's CUDA-tensor path with both kernel backends 'usable' (no device is touched)."""
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "cuda_ext_available", lambda: (True, "test"))
    monkeypatch.setattr(dispatch, "triton_available", lambda: (True, "test"))
    monkeypatch.setattr(tuning, "device_gpu", lambda device: "Test GPU")
    monkeypatch.setattr(dispatch, "timing_allowed", lambda: True)
    monkeypatch.setattr(tuning, "load_table", lambda gpu: {})
    monkeypatch.setattr(dispatch, "_TIMED", {})
    return torch.device("cuda")


def test_no_table_no_runners_keeps_preference_order(fake_gpu):
    assert select_backend("layernorm_modulate", fake_gpu, order=("cuda", "triton", "torch")) == "cuda"
    assert select_backend("layernorm_modulate", fake_gpu, order=("triton", "cuda", "torch")) == "triton"


def test_ops_without_cuda_kernel_never_pick_cuda(fake_gpu, monkeypatch):
    assert select_backend("gated_residual", fake_gpu, order=("cuda", "triton", "torch")) == "triton"
    monkeypatch.setenv("WMFAST_BACKEND", "cuda")
    assert select_backend("gated_residual", fake_gpu, order=("cuda", "triton", "torch")) == "triton"
    assert select_backend("layernorm_modulate", fake_gpu, order=("cuda", "triton", "torch")) == "cuda"


def test_cuda_limits_come_from_the_extension(fake_gpu, monkeypatch):
    """The cuda backend's limits are the loaded extension's (cuda_ext.limits()), checked per call."""
    lim = cuda_ext.Limits(adaln_max_d_fwd=64, adaln_max_d_bwd=32, adaln_max_d_bwd_unaligned=16, decode_head_dims=(8,))
    monkeypatch.setattr(cuda_ext, "limits", lambda ns=None: lim)
    fits = OpInputs(fake_gpu, torch.float32, (2, 3, 32), backward=True)
    assert select_backend("layernorm_modulate", fits) == "cuda"
    assert select_backend("layernorm_modulate", OpInputs(fake_gpu, torch.float32, (2, 3, 40), True)) == "triton"
    assert select_backend("layernorm_modulate", OpInputs(fake_gpu, torch.float32, (2, 3, 40), False)) == "cuda"
    assert select_backend("temporal_decode_step", OpInputs(fake_gpu, torch.float32, (1, 1, 2, 2, 16))) == "triton"
    with use_backend("cuda"), pytest.raises(ValueError, match=r"backward needs D <= 32, got D = 40"):
        select_backend("layernorm_modulate", OpInputs(fake_gpu, torch.float32, (2, 3, 40), True))


def test_measured_table_decides_per_gpu_and_shape(fake_gpu, monkeypatch):
    table = {"backend": {"layernorm_modulate": {"D=3072": "triton", "*": "cuda"}}}
    monkeypatch.setattr(tuning, "load_table", lambda gpu: table if gpu == "Test GPU" else {})
    sel = select_backend
    assert sel("layernorm_modulate", fake_gpu, order=("cuda", "triton", "torch"), shape_key="D=3072") == "triton"
    assert sel("layernorm_modulate", fake_gpu, order=("triton", "cuda", "torch"), shape_key="D=512") == "cuda"
    monkeypatch.setattr(tuning, "device_gpu", lambda device: "Other GPU")  # no table: the preference order
    assert sel("layernorm_modulate", fake_gpu, order=("cuda", "triton", "torch"), shape_key="D=3072") == "cuda"


def test_first_use_timing_picks_fastest_once(fake_gpu, monkeypatch):
    calls = []

    def fake_time(runners, reps=10):
        calls.append(sorted(runners))
        return {"cuda": 2.0, "triton": 1.0}

    monkeypatch.setattr(dispatch, "time_backends", fake_time)
    runners = {"cuda": lambda: None, "triton": lambda: None}
    for _ in range(3):
        got = select_backend("temporal_decode_step", fake_gpu, shape_key="S=1024,H=8,Dh=64", runners=runners)
        assert got == "triton"
    assert calls == [["cuda", "triton"]]


def test_autotune_off_by_env(monkeypatch):
    monkeypatch.setenv("WMFAST_AUTOTUNE", "0")
    assert not dispatch.timing_allowed()


def test_cpu_tensors_unchanged_without_gpu(monkeypatch):
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    got = select_backend("layernorm_modulate", torch.device("cpu"), order=("cuda", "triton", "torch"))
    assert got == ("triton" if triton_interpret() else "torch")
