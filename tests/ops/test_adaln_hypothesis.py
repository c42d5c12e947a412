"""Property test: random valid shapes, layouts and strides for the fused AdaLN-Zero ops (2x rule, fwd + grads).

Few examples (each runs the interpreted kernels three times); the fixed cases live in test_adaln.py."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="the property tests run on hypothesis, which cannot be imported here")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wmfast.kernels import adaln as K
from wmfast.kernels._launch import triton_interpret

from wmfast import ops
from wmfast.ops import use_backend
from wmfast.testing import assert_2x_rule

# CPU tensors under the interpreter (CI), else the GPU (the compiled kernels). Data is drawn on the CPU.
DEVICE = "cpu" if triton_interpret() or not torch.cuda.is_available() else "cuda"

LAYOUTS = ("sample2", "sample3", "frame", "token")


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    n_frames = draw(st.integers(1, 3))
    frame_len = draw(st.integers(1, 4))
    D = draw(st.integers(1, 70))
    return {
        "B": B, "L": n_frames * frame_len, "D": D, "frame_len": frame_len,
        "dtype": draw(st.sampled_from((torch.float32, torch.bfloat16))),
        "mod_fp32": draw(st.booleans()),
        "layouts": [draw(st.sampled_from(LAYOUTS)) for _ in range(3)],  # gate, shift, scale
        "slots": [draw(st.integers(1, 4)) for _ in range(3)],  # the view is 1 of `slots` interleaved tensors
        "x_pad": draw(st.integers(0, 3)),  # x read from a wider [B, L, D + pad] tensor (row stride != D)
        "x_transposed": draw(st.booleans()),  # x a transposed view ([B, D, L] storage, feature stride L)
        "eps": draw(st.sampled_from((1e-6, 1e-5, 0.1))),
        "op": draw(st.sampled_from(("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate"))),
        "seed": draw(st.integers(0, 2**16)),
    }


def _mod(B, L, D, frame_len, layout, slots, gen):
    rows = {"sample2": None, "sample3": 1, "frame": L // frame_len, "token": L}[layout]
    shape = (B, slots, D) if rows is None else (B, rows, slots, D)
    parent = torch.randn(shape, generator=gen) * 0.5
    pick = int(torch.randint(slots, (1,), generator=gen))
    return parent, (lambda p: p.select(1 if rows is None else 2, pick))


def _run(p, dt, mdt, parents, views, x_wide, res, cots, upcast):
    x = x_wide.detach().to(dt).requires_grad_()
    r = res.detach().to(dt).requires_grad_()
    leaves = [m.detach().to(mdt).requires_grad_() for m in parents]
    gate, shift, scale = (v(m) for v, m in zip(views, leaves))
    xv = x[..., : p["D"]]
    if p["x_transposed"]:  # same values, feature stride L instead of 1
        xv = xv.transpose(1, 2).contiguous().transpose(1, 2)
    fl, eps = p["frame_len"], p["eps"]
    if upcast is None:
        fn, kw = getattr(ops, p["op"]), {}
    else:
        fn, kw = getattr(K, p["op"] + "_ref"), {"upcast": upcast}
    if p["op"] == "layernorm_modulate":
        outs = (fn(xv, shift, scale, eps=eps, frame_len=fl, **kw),)
        inputs = [x, leaves[1], leaves[2]]
    elif p["op"] == "gated_residual":
        outs = (fn(r, xv, gate, frame_len=fl, **kw),)
        inputs = [r, x, leaves[0]]
    else:
        outs = tuple(fn(r, xv, gate, shift, scale, eps=eps, frame_len=fl, **kw))
        inputs = [r, x] + leaves
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cots))
    return outs, torch.autograd.grad(loss, inputs)


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(p=problems())
def test_random_shapes_and_strides(p):
    with use_backend("triton"):
        gen = torch.Generator().manual_seed(p["seed"])
        B, L, D, fl = p["B"], p["L"], p["D"], p["frame_len"]
        made = [_mod(B, L, D, fl, lay, s, gen) for lay, s in zip(p["layouts"], p["slots"])]
        parents, views = [m[0].to(DEVICE) for m in made], [m[1] for m in made]
        x_wide = torch.randn(B, L, D + p["x_pad"], generator=gen).to(DEVICE)
        res = torch.randn(B, L, D, generator=gen).to(DEVICE)
        cots = [torch.randn(B, L, D, generator=gen).to(DEVICE) for _ in range(2)]
        dt = p["dtype"]
        mdt = torch.float32 if p["mod_fp32"] else dt
        outs, grads = _run(p, dt, mdt, parents, views, x_wide, res, cots, None)
        outs32, grads32 = _run(p, torch.float32, torch.float32, parents, views, x_wide, res, cots, True)
        outs_lp, grads_lp = _run(p, dt, dt, parents, views, x_wide, res, cots, False)
    for i, (a, e, lp) in enumerate(zip(outs, outs32, outs_lp)):
        assert_2x_rule(a, e, lp, name=f"{p['op']} output {i}", dtype=dt)
    for i, (a, e, lp) in enumerate(zip(grads, grads32, grads_lp)):
        assert_2x_rule(a, e, lp, name=f"{p['op']} grad {i}", dtype=dt)
