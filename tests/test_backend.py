"""Backend dispatch of the AdaLN ops (wmfast.backend.select_backend as the public ops use it)."""
from __future__ import annotations

import logging

import pytest
import torch

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
