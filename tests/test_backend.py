"""Backend dispatch of the AdaLN ops and the decode step (wmfast.backend.select_backend as the public ops use it)."""
from __future__ import annotations

import logging

import pytest
import torch
from wmfast.kernels import adaln as k
from wmfast.kernels.adaln import gated_residual_layernorm_modulate_ref, layernorm_modulate_ref

import wmfast.ops.adaln as adaln_ops
from wmfast import backend, ops


def _inputs():
    x = torch.randn(2, 4, 8)
    mod = torch.randn(2, 2, 6, 8)
    return x, mod.unbind(2)


def test_forced_backend_errors(monkeypatch):
    x, (shift, scale, *_) = _inputs()
    monkeypatch.setenv("WMFAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="WMFAST_BACKEND=cuda for layernorm_modulate needs CUDA tensors"):
        ops.layernorm_modulate(x, shift, scale, frame_len=2)
    monkeypatch.setenv("WMFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="WMFAST_BACKEND='bogus'"):
        ops.layernorm_modulate(x, shift, scale, frame_len=2)


def test_cpu_without_interpreter_uses_reference_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend._log_once.cache_clear()
    x, (shift, scale, *_) = _inputs()
    with caplog.at_level(logging.INFO, logger="wmfast"):
        y = ops.layernorm_modulate(x, shift, scale, frame_len=2)
    assert torch.equal(y, adaln_ops._k.layernorm_modulate_ref(x, shift, scale, frame_len=2))
    assert "using the torch reference" in caplog.text


@pytest.mark.skipif(not backend.triton_interpret(), reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
def test_cpu_under_interpreter_selects_triton(monkeypatch):
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    calls = []
    real = adaln_ops._k.layernorm_modulate_op
    monkeypatch.setattr(adaln_ops._k, "layernorm_modulate_op", lambda *a: calls.append(a) or real(*a))
    x, (shift, scale, *_) = _inputs()
    ops.layernorm_modulate(x, shift, scale, frame_len=2)
    assert len(calls) == 1


@pytest.mark.parametrize("op", ["layernorm_modulate", "gated_residual_layernorm_modulate"])
def test_cuda_branch_calls_csrc_ops_with_the_views(monkeypatch, op):
    """The cuda branch hands the same tensors (strided views, no copies) and keywords to wmfast.csrc_ops."""
    from wmfast import csrc_ops

    seen = {}
    monkeypatch.setattr(adaln_ops, "_pick_backend", lambda *a: "cuda")
    monkeypatch.setattr(csrc_ops, op, lambda *a, **k: seen.update(args=a, kwargs=k) or "sentinel")
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


def test_too_wide_for_triton_falls_back_or_raises_when_forced(monkeypatch, caplog):
    from wmfast.kernels import adaln as K

    monkeypatch.setattr(K, "MAX_D", 4)
    monkeypatch.setattr(adaln_ops, "_pick_backend", lambda *a: "triton")  # as on a GPU or under the interpreter
    x, (shift, scale, *_) = _inputs()  # D = 8 > 4
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    adaln_ops._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="wmfast"):
        y = ops.layernorm_modulate(x, shift, scale, frame_len=2)
    assert torch.equal(y, K.layernorm_modulate_ref(x, shift, scale, frame_len=2))
    assert "exceeds the Triton kernels' limit D <= 4; using the torch reference" in caplog.text
    monkeypatch.setenv("WMFAST_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"WMFAST_BACKEND=triton: D=8 \(x shape \(2, 4, 8\)\) exceeds"):
        ops.layernorm_modulate(x, shift, scale, frame_len=2)


def test_timing_runner_for_triton_runs_the_reference_for_too_wide_rows(monkeypatch):
    """First-use timing must time what choosing "triton" runs: the reference when D > MAX_D."""

    def refuse(*args):
        raise AssertionError("the Triton kernel must not see D > MAX_D")

    ran = []

    def pick(op, x, mods, runners, tensors, *args, **kwargs):
        ran.append(runners(*tensors)["triton"]())
        return "torch"

    monkeypatch.setattr(k, "MAX_D", 16)
    for name in ("layernorm_modulate_op", "gated_residual_op", "gated_residual_layernorm_modulate_op"):
        monkeypatch.setattr(k, name, refuse)
    monkeypatch.setattr(adaln_ops, "_pick_backend", pick)
    x, res, gate, shift, scale = (torch.randn(2, 3, 24) for _ in range(5))
    adaln_ops.layernorm_modulate(x, shift, scale)
    adaln_ops.gated_residual(res, x, gate)
    adaln_ops.gated_residual_layernorm_modulate(res, x, gate, shift, scale)
    torch.testing.assert_close(ran[0], layernorm_modulate_ref(x, shift, scale), rtol=0, atol=0)
    torch.testing.assert_close(ran[2], gated_residual_layernorm_modulate_ref(res, x, gate, shift, scale),
                               rtol=0, atol=0)
    assert len(ran) == 3


def _record_select(monkeypatch, module, choice="torch"):
    calls = []

    def record(op, device, supported, **kwargs):
        calls.append((op, kwargs))
        return choice

    monkeypatch.setattr(module, "select_backend", record)
    return calls


def test_decode_step_hands_shape_key_and_runners_to_select_backend(monkeypatch):
    """On CUDA tensors the decode step lets select_backend time cuda vs triton per shape class (issue 8), and
    while torch.compile traces it asks with the same key, so the cached timed choice is reused."""
    from wmfast.ops import attention as attn

    calls = _record_select(monkeypatch, attn)
    ran = []
    monkeypatch.setattr(attn, "temporal_decode_op", lambda *a: ran.append(torch.is_grad_enabled()))
    q, k, v = (torch.randn(2, 1, 3, 4, 32) for _ in range(3))
    kc, vc = torch.zeros(2, 3, 4, 5, 32), torch.zeros(2, 3, 4, 5, 32)
    with pytest.MonkeyPatch.context() as mp:  # the CUDA-tensor path, without a device
        mp.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda")))
        attn._decode_backend(q, k, v, kc, vc, 2)
    (op, kwargs), = calls
    assert op == "temporal_decode_step" and kwargs["shape_key"] == "B=2,S=3,H=4,T_max=5,Dh=32,fp32"
    assert sorted(kwargs["runners"]) == ["cuda", "triton"]
    kwargs["runners"]["triton"]()
    assert ran == [False]  # timed under no_grad
    monkeypatch.undo()
    calls = _record_select(monkeypatch, attn)
    torch._dynamo.reset()
    torch.compile(attn.temporal_decode_step, fullgraph=True, backend="aot_eager")(q, k, v, kc, vc, 2)
    assert calls and calls[0][1] == {"shape_key": "B=2,S=3,H=4,T_max=5,Dh=32,fp32"}


@pytest.mark.parametrize("grad", [False, True])
def test_adaln_compiled_choice_uses_the_shape_key_with_grad(monkeypatch, grad):
    """torch.compile asks select_backend with the shape key eager timing caches under (",grad" when a backward
    is needed), so compiled code takes eager's timed choice for the same shape class."""
    calls = _record_select(monkeypatch, adaln_ops)
    x, shift, scale = (torch.randn(2, 3, 8, requires_grad=grad) for _ in range(3))
    torch._dynamo.reset()
    torch.compile(adaln_ops.layernorm_modulate, fullgraph=True, backend="aot_eager")(x, shift, scale)
    key = "B=2,L=3,D=8,fp32,per-token" + (",grad" if grad else "")
    assert calls and calls[0][1] == {"shape_key": key}


def test_adaln_timing_runners_time_the_backward_when_grad_is_needed():
    x, shift, scale = (torch.randn(2, 3, 8, requires_grad=True) for _ in range(3))

    def factory(x, shift, scale):
        return {"triton": lambda: layernorm_modulate_ref(x, shift, scale)}

    grads = adaln_ops._timing_runners(factory, (x, shift, scale), True)["triton"]()
    assert len(grads) == 3 and all(g is not None for g in grads)
    assert x.grad is None  # torch.autograd.grad: nothing accumulates into the caller's tensors
    out = adaln_ops._timing_runners(factory, (x, shift, scale), False)["triton"]()
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

    runners = adaln_ops._timing_runners(factory, (residual, x, gate, shift, scale), True)
    for _ in range(3):
        runners["triton"]()
    y, out = gated_residual_layernorm_modulate_ref(residual, x, gate, shift, scale)
    (y.float().square().mean() + out.float().mean()).backward()  # the caller's backward still runs
    assert w.grad is not None and residual.grad is not None and gate.grad is not None
