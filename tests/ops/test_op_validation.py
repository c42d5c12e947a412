"""What every op promises alike, on every backend (the torch references and the Triton kernels): a malformed
argument is a ValueError naming it before anything runs (boolean flags, eps, aliased caches, a zero head dim,
more rows than the kernels' int32 row index, float64), the ensemble statistics stay exact under a large common
offset, a LayerNorm row whose fp32 variance overflows is NaN, and a fallback to the references is one INFO line
per device type (each op's reason at DEBUG level)."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from wmfast.kernels._launch import triton_interpret

from tests.ops.conftest import DEVICE
from wmfast import ops
from wmfast.ops import common
from wmfast.ops.dispatch import select_backend
from wmfast.testing import assert_2x_rule

# the backends that run in this session: the torch references, and Triton on DEVICE (the interpreter on the CPU)
RUNNABLE = ("torch", "triton") if DEVICE != "cpu" or triton_interpret() else ("torch",)
needs_interpreter = pytest.mark.skipif(not triton_interpret(), reason="needs TRITON_INTERPRET=1")


@pytest.fixture(params=RUNNABLE)
def backend(request, force_backend):
    force_backend(request.param)
    return request.param


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# ------------------------------------------------------------------------------------------------ boolean flags
@pytest.mark.parametrize("value", ["no", "", 1, 0, None, torch.tensor(True)], ids=repr)
def test_a_flag_must_be_a_bool(backend, value):
    q = _randn(1, 3, 2, 2, 8)
    with pytest.raises(ValueError, match=r"temporal_attention: causal must be a bool \(True or False\), got"):
        ops.temporal_attention(q, q, q, causal=value)
    h, w, t = _randn(4, 8), _randn(5, 8), torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="linear_cross_entropy: check_targets must be a bool"):
        ops.linear_cross_entropy(h, w, t, check_targets=value)


def test_causal_false_is_not_causal(backend):
    q, k, v = (_randn(1, 3, 2, 2, 8) for _ in range(3))
    assert not torch.equal(ops.temporal_attention(q, k, v, causal=False), ops.temporal_attention(q, k, v))


# ----------------------------------------------------------------------------------------------------------- eps
def _eps_calls():
    x, r, m, w, b = _randn(2, 4, 8), _randn(2, 4, 8), _randn(2, 8), _randn(8), _randn(8)
    qkv, hw = _randn(3, 2 * 3 * 4), _randn(4)
    lin = _randn(2 * 3 * 4, 8)
    return {
        "layer_norm": lambda eps: ops.layer_norm(x, w, b, eps=eps),
        "residual_layer_norm": lambda eps: ops.residual_layer_norm(r, x, w, b, eps=eps),
        "qk_layer_norm": lambda eps: ops.qk_layer_norm(qkv, hw, hw, hw, hw, num_heads=2, eps=eps),
        "layernorm_modulate": lambda eps: ops.layernorm_modulate(x, m, m, eps=eps),
        "gated_residual_layernorm_modulate": lambda eps: ops.gated_residual_layernorm_modulate(r, x, m, m, m, eps=eps),
        "norm_linear": lambda eps: ops.norm_linear(x, lin, None, w, b, eps=eps),
        "norm_linear-qk_eps": lambda eps: ops.norm_linear(x, lin, None, w, b, qk_norm=(hw,) * 4, num_heads=2,
                                                          qk_eps=eps),
    }


@pytest.mark.parametrize("eps", [math.inf, -math.inf, math.nan, 0.0, 0, -1e-5, True, "1e-5", None], ids=repr)
@pytest.mark.parametrize("op", list(_eps_calls()))
def test_eps_must_be_finite_and_positive(backend, op, eps):
    name = "qk_eps" if op.endswith("qk_eps") else "eps"
    with torch.no_grad(), pytest.raises(ValueError, match=rf"^{name} must be a finite float > 0, got"):
        _eps_calls()[op](eps)


# ------------------------------------------------------------------------------------------------------ aliasing
def _decode_inputs(T_max=4, Dh=8):
    q, k, v = (_randn(2, 1, 3, 2, Dh) for _ in range(3))
    return q, k, v, T_max


@pytest.mark.parametrize("caches", ["same-tensor", "same-memory", "overlapping-views"])
def test_decode_caches_sharing_memory_are_refused(backend, caches):
    q, k, v, T = _decode_inputs()
    big = _randn(2, 3, 2, T + 1, 8)
    kc, vc = {"same-tensor": (big[..., :T, :],) * 2, "same-memory": (big[..., :T, :], big[..., :T, :]),
              "overlapping-views": (big[..., :T, :], big[..., 1:, :])}[caches]
    what = "are the same tensor" if kc is vc else "overlap in memory"
    with pytest.raises(ValueError, match=f"temporal_decode_step: k_cache and v_cache {what}"):
        ops.temporal_decode_step(q, k, v, kc, vc, 1)


def test_interleaved_views_of_one_kv_buffer_are_separate_caches(backend):
    """k and v as the [:, :, :, 0] and [:, :, :, 1] views of one [B, S, H, 2, T, Dh] buffer share a storage but no
    element: accepted, and the same result as two buffers."""
    q, k, v, T = _decode_inputs()
    kv = _randn(2, 3, 2, 2, T, 8)
    kc, vc = kv[:, :, :, 0].clone(), kv[:, :, :, 1].clone()
    o = ops.temporal_decode_step(q, k, v, kv[:, :, :, 0], kv[:, :, :, 1], 2)
    torch.testing.assert_close(o, ops.temporal_decode_step(q, k, v, kc, vc, 2))
    assert torch.equal(kv[:, :, :, 0], kc) and torch.equal(kv[:, :, :, 1], vc)


def test_overlap_is_exact_for_strided_views():
    base = torch.zeros(64)
    assert not common.overlapping(base[0::2], base[1::2])  # interleaved
    assert common.overlapping(base[0::2], base[4::3])  # meet at 4
    assert not common.overlapping(base[:32], base[32:]) and common.overlapping(base[:33], base[32:])
    assert common.overlapping(base.view(torch.int16)[1::2], base[:1])  # the high half of element 0
    assert not common.overlapping(base.view(torch.uint8)[3:4], base[1:2])
    assert not common.overlapping(base, torch.zeros(64))
    meta = torch.empty(4, device="meta")
    assert common.overlapping(meta, meta) and not common.overlapping(meta, torch.empty(4, device="meta"))


# ------------------------------------------------------------------------------------------------ zero head dim
@pytest.mark.parametrize("op", ["temporal_attention", "spatial_attention", "temporal_decode_step"])
def test_zero_head_dim_is_refused_naming_the_tensor(backend, op):
    q = _randn(1, 1 if op == "temporal_decode_step" else 3, 2, 2, 0)
    args = (q, q, q, _randn(1, 2, 2, 4, 0), _randn(1, 2, 2, 4, 0), 0) if op == "temporal_decode_step" else (q, q, q)
    with pytest.raises(ValueError, match=rf"{op}: q has a zero-width head dim \(Dh = 0\)"):
        getattr(ops, op)(*args)


# ------------------------------------------------------------------------------------------ rows past int32 index
ROWS = 2**31  # one more than a program's int32 row index reaches


def _meta(*shape):
    return torch.empty(*shape, device="meta")


@pytest.mark.parametrize("call, match", [
    pytest.param(lambda: ops.layer_norm(_meta(ROWS, 8), _meta(8), _meta(8)), r"x \(2147483648, 8\) has 2147483648 rows",
                 id="layer_norm"),
    pytest.param(lambda: ops.residual_layer_norm(_meta(2, ROWS // 2, 8), _meta(2, ROWS // 2, 8), _meta(8), _meta(8)),
                 "x .* has 2147483648 rows", id="residual_layer_norm"),
    pytest.param(lambda: ops.qk_layer_norm(_meta(ROWS, 24), *(_meta(4),) * 4, num_heads=2), "qkv .* 2147483648 rows",
                 id="qk_layer_norm"),
    pytest.param(lambda: ops.layernorm_modulate(_meta(1, ROWS, 8), _meta(1, 8), _meta(1, 8)),
                 r"x \(1, 2147483648, 8\) has 2147483648 rows", id="layernorm_modulate"),
    pytest.param(lambda: ops.gated_residual(_meta(4, ROWS // 4, 8), _meta(4, ROWS // 4, 8), _meta(4, 8)),
                 "x .* has 2147483648 rows", id="gated_residual"),
    pytest.param(lambda: ops.norm_linear(_meta(ROWS, 8), _meta(4, 8), None, _meta(8), _meta(8)),
                 "x .* has 2147483648 rows", id="norm_linear"),
    pytest.param(lambda: ops.temporal_attention(*(_meta(2, 3, ROWS // 8, 4, 8),) * 3),
                 r"temporal_attention: q .* has 2147483648 \(b, s, h\) rows", id="temporal_attention"),
    pytest.param(lambda: ops.greedy_head(_meta(ROWS, 8), _meta(16, 8)), "greedy_head: h .* 2147483648 rows",
                 id="greedy_head"),
])
def test_more_rows_than_the_int32_row_index_is_refused_before_allocating(backend, call, match):
    """Meta tensors: the check reads the shape only (a real tensor of 2**31 rows would not fit the test machine,
    and an op that missed the check would allocate its output)."""
    with torch.no_grad(), pytest.raises(ValueError, match=match + r".*int32: at most 2\*\*31 - 1"):
        call()


def test_row_count_check_reads_the_shape_of_a_broadcast_view():
    x = torch.empty(1, 8).expand(ROWS, 8)  # 32 bytes of memory, 2**31 rows
    with pytest.raises(ValueError, match=r"x \(2147483648, 8\) has 2147483648 rows"):
        common.check_rows("x", x)
    common.check_row_count("x", torch.empty(1, 8).expand(ROWS - 1, 8))  # the largest row count passes


# ------------------------------------------------------------------------------------- ensemble dtype and offset
@pytest.mark.parametrize("name", ["x", "v", "context"])
def test_ensemble_ops_refuse_float64_like_every_op(backend, name):
    args = {"x": _randn(2, 3, 4, 5, 6), "v": _randn(2, 3, 4, 5, 6), "context": _randn(1, 3, 1, 5, 6)}
    args[name] = args[name].double()
    with pytest.raises(ValueError, match=rf"ensemble_euler_step: {name} dtype torch.float64 not supported"):
        ops.ensemble_euler_step(args["x"], args["v"], -0.1, args["context"])
    with pytest.raises(ValueError, match=r"ensemble_mean_var: x dtype torch.float64 not supported \(float32"):
        ops.ensemble_mean_var(_randn(3, 4).double())


@pytest.mark.parametrize("offset, spread", [(1e4, 1e-2), (1e8, 1e2), (-3e5, 1.0)], ids=str)
def test_ensemble_variance_is_exact_under_a_large_common_offset(backend, offset, spread):
    """fp32 members with an offset far above their spread: Welford on the deviations from member 0 keeps the
    variance to ~1e-7 relative (plain fp32 Welford lost 6-12% at 1e4 + 1e-2 * randn); the mean to an ulp."""
    x = (offset + spread * torch.randn(9, 3, 41, device=DEVICE, dtype=torch.float64)).float()
    mean, var = ops.ensemble_mean_var(x)
    true_mean, true_var = x.double().mean(0), x.double().var(0, correction=0)
    assert ((var.double() - true_var).abs() / true_var).max() < 1e-5
    assert ((mean.double() - true_mean).abs()).max() <= abs(offset) * 2**-23


# ------------------------------------------------------------------------------- LayerNorm rows that overflow
def _overflow_calls(rows: torch.Tensor):
    """(name, call, inputs) of every LayerNorm-based op on [2, 3, 8] inputs whose rows `rows` are scaled by 1e20:
    each returns its outputs as a tuple."""
    x, r, m, w, b = _randn(2, 3, 8), _randn(2, 3, 8), _randn(2, 8), _randn(8), _randn(8)
    x[rows] *= 1e20
    hw, lin, hw16, lin16 = _randn(4), _randn(24, 8), _randn(16), _randn(96, 8)  # qk_norm: the kernel tiles Dh 16
    qkv = torch.cat([x, x, x], -1)  # [2, 3, 24]: heads of width 4
    return [
        ("layer_norm", lambda: (ops.layer_norm(x, w, b),)),
        ("residual_layer_norm", lambda: ops.residual_layer_norm(r, x, w, b)),
        ("qk_layer_norm", lambda: ops.qk_layer_norm(qkv, hw, hw, hw, hw, num_heads=2)),
        ("layernorm_modulate", lambda: (ops.layernorm_modulate(x, m, m),)),
        ("gated_residual_layernorm_modulate", lambda: ops.gated_residual_layernorm_modulate(r, x, m, m, m)),
        ("norm_linear", lambda: ops.norm_linear(x, lin, None, w, b)),
        ("norm_linear-qk", lambda: ops.norm_linear(x, lin16, None, w, b, qk_norm=(hw16,) * 4, num_heads=2)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_rows_whose_variance_overflows_are_nan_on_every_backend(force_backend, index):
    rows = torch.zeros(2, 3, dtype=torch.bool, device=DEVICE)
    rows[0, 1] = rows[1, 2] = True
    name, _ = _overflow_calls(rows)[index]
    results = {}
    for backend in RUNNABLE:
        force_backend(backend)
        torch.manual_seed(1)
        results[backend] = _overflow_calls(rows)[index][1]()
    ref = results["torch"]
    y = ref[0] if name != "qk_layer_norm" else torch.cat(ref, -1)
    nan_rows = y.isnan().flatten(2).all(-1) if name == "qk_layer_norm" else y.isnan().all(-1)
    assert torch.equal(nan_rows, rows), f"{name}: the rows with |x| = 1e20 (and only they) are NaN"
    for got in results.values():
        for a, e in zip(got, ref):
            assert_2x_rule(a, e, e, name=name, dtype=torch.float32)  # NaN positions equal, the rest close


def test_overflowing_rows_have_nan_gradients_on_every_backend(force_backend):
    grads = {}
    for backend in RUNNABLE:
        force_backend(backend)
        torch.manual_seed(1)
        x, w, b = _randn(4, 8), _randn(8), _randn(8)
        x[1] *= 1e20
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        grads[backend] = torch.autograd.grad(ops.layer_norm(x, w, b).sum(), (x, w, b))
    dx, dw, db = grads["torch"]
    assert dx[1].isnan().all() and dx[[0, 2, 3]].isfinite().all() and dw.isnan().all() and db.isfinite().all()
    for got in grads.values():
        for a, e in zip(got, grads["torch"]):
            assert_2x_rule(a, e, e, name="layer_norm grad", dtype=torch.float32)


# -------------------------------------------------------------------------------------------------- fallback log
def _wmfast_records(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name.startswith("wmfast") and r.levelno == level]


def test_cpu_fallback_is_one_info_line_and_a_debug_line_per_op(monkeypatch, caplog):
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    common.log_once.cache_clear()
    x, m, w, b = torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(8), torch.randn(8)
    q = torch.randn(1, 3, 2, 2, 8)
    with caplog.at_level(logging.DEBUG, logger="wmfast"):
        for _ in range(2):  # a second training step adds nothing
            ops.layernorm_modulate(x, m, m)
            y, _ = ops.gated_residual_layernorm_modulate(x, x, m, m, m)
            ops.gated_residual(x, y, m)
            ops.layer_norm(x, w, b)
            ops.temporal_attention(q, q, q)
            ops.norm_linear(x.requires_grad_(), torch.randn(6, 8), None, w, b)
    info = _wmfast_records(caplog, logging.INFO)
    assert info == [("wmfast: no fused kernels for cpu tensors (CPU tensors need TRITON_INTERPRET=1 (set before "
                     "importing triton)): ops run their torch references; each op and why at DEBUG level "
                     "(`wmfast -v ...`)")]
    debug = _wmfast_records(caplog, logging.DEBUG)
    assert sorted(line.split(" on cpu")[0] for line in debug) == [
        "wmfast: gated_residual", "wmfast: gated_residual_layernorm_modulate", "wmfast: layer_norm",
        "wmfast: layernorm_modulate", "wmfast: norm_linear", "wmfast: temporal_attention"]
    assert all(line.endswith("; using the torch reference") for line in debug)


@needs_interpreter
def test_an_op_of_its_own_falling_back_names_itself_in_the_info_line(caplog):
    common.log_once.cache_clear()
    x, w, b = torch.randn(2, 8, requires_grad=True), torch.randn(8), torch.randn(8)
    with caplog.at_level(logging.DEBUG, logger="wmfast"):
        ops.norm_linear(x, torch.randn(6, 8), None, w, b)
    assert _wmfast_records(caplog, logging.INFO) == [
        ("wmfast: some ops on cpu tensors run their torch references (first: norm_linear: a gradient is needed and "
         "the Triton kernel is forward-only); each op and why at DEBUG level (`wmfast -v ...`)")]


def test_queries_log_nothing_and_wmfast_env_still_reports(monkeypatch, caplog):
    from wmfast import env

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    common.log_once.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="wmfast"):
        assert select_backend("layernorm_modulate", torch.device("cpu"), quiet=True) == "torch"
        assert env.selected_backends()["cpu"] == "torch"
    assert not [r for r in caplog.records if r.name.startswith("wmfast")]
