"""The cached temporal decode step: frame-by-frame decoding equals causal temporal attention over the frames so
far, the cache holds exactly the written keys/values, one fused launch per step, validation, opcheck."""
import pytest
import torch
from wmfast.kernels.temporal_attention import temporal_attention_ref, temporal_decode_op, temporal_decode_ref

from wmfast.ops import temporal_decode_step
from wmfast.testing import assert_2x_rule


def decode_all_frames(step, q, k, v, T_max):
    """Runs `step` frame by frame over [B, T, S, H, Dh] q/k/v; returns outputs [B, T, S, H, Dh] and the caches."""
    B, T, S, H, Dh = q.shape
    k_cache = torch.full((B, S, H, T_max, Dh), float("nan"), dtype=q.dtype)  # never-written slots stay NaN
    v_cache = torch.full_like(k_cache, float("nan"))
    outs = [step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], k_cache, v_cache, t) for t in range(T)]
    return torch.cat(outs, dim=1), k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Dh", [32, 64, 128])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_matches_causal_attention(backend, Dh, dtype, force_backend):
    force_backend(backend)
    B, T, S, H, T_max = 2, 5, 3, 2, 6  # T_max > T: the unwritten slot must not be read
    qkv = torch.randn(B, T, S, 3, H, Dh, dtype=dtype)  # strided q/k/v views of one projection
    q, k, v = qkv.unbind(3)
    o, k_cache, v_cache = decode_all_frames(temporal_decode_step, q, k, v, T_max)
    ref32 = temporal_attention_ref(q, k, v, causal=True, upcast=True)
    reflp = temporal_attention_ref(q, k, v, causal=True, upcast=False)
    assert_2x_rule(o, ref32, reflp, "o", dtype)
    assert torch.equal(k_cache[:, :, :, :T], k.permute(0, 2, 3, 1, 4))
    assert torch.equal(v_cache[:, :, :, :T], v.permute(0, 2, 3, 1, 4))
    assert k_cache[:, :, :, T:].isnan().all() and v_cache[:, :, :, T:].isnan().all()


def test_decode_triton_matches_decode_reference_at_every_t():
    B, S, H, T_max, Dh = 1, 5, 2, 7, 16
    k_cache, v_cache = torch.randn(2, B, S, H, T_max, Dh).unbind(0)  # stale values past t must be ignored
    for t in range(T_max):
        q, k, v = torch.randn(3, B, 1, S, H, Dh).unbind(0)
        kc, vc = k_cache.clone(), v_cache.clone()
        o = temporal_decode_op(q, k, v, k_cache, v_cache, t)
        r = temporal_decode_ref(q, k, v, kc, vc, t)
        assert_2x_rule(o, r, r, f"o(t={t})")
        assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


def test_decode_one_launch_per_step(monkeypatch):
    import wmfast.kernels.temporal_attention as ta

    launches = []
    real = ta.launcher
    monkeypatch.setattr(ta, "launcher", lambda kernel: launches.append(kernel) or real(kernel))
    q, k, v = torch.randn(3, 1, 1, 2, 2, 8).unbind(0)
    temporal_decode_op(q, k, v, torch.zeros(1, 2, 2, 4, 8), torch.zeros(1, 2, 2, 4, 8), 2)
    assert launches == [ta._temporal_decode_kernel]


BAD = [
    pytest.param({"t": 4}, "outside the cache", id="t-past-end"),
    pytest.param({"t": -1}, "outside the cache", id="t-negative"),
    pytest.param({"t": torch.tensor(1)}, "Python int", id="t-tensor"),
    pytest.param({"k_cache": torch.zeros(1, 2, 2, 4, 16)}, "k_cache", id="cache-dh"),
    pytest.param({"k_cache": torch.zeros(1, 2, 2, 4, 8, dtype=torch.bfloat16)}, "k_cache", id="cache-dtype"),
    pytest.param({"q": torch.zeros(1, 2, 2, 2, 8)}, "one frame", id="two-frames"),
    pytest.param({"v": torch.zeros(1, 1, 3, 2, 8)}, "v", id="v-shape"),
    pytest.param({"k_cache": torch.zeros(1, 2, 2, 8, 4).transpose(3, 4)}, "contiguous head dim", id="cache-strides"),
    pytest.param({"k_cache": torch.zeros(1, 2, 2, 65, 8), "v_cache": torch.zeros(1, 2, 2, 65, 8)}, "T_max", id="long"),
]


@pytest.mark.parametrize("override,match", BAD)
def test_decode_bad_inputs(override, match):
    args = {"q": torch.zeros(1, 1, 2, 2, 8), "k": torch.zeros(1, 1, 2, 2, 8), "v": torch.zeros(1, 1, 2, 2, 8),
            "k_cache": torch.zeros(1, 2, 2, 4, 8), "v_cache": torch.zeros(1, 2, 2, 4, 8), "t": 1}
    args.update(override)
    with pytest.raises(ValueError, match=match):
        temporal_decode_step(**args)


def test_decode_opcheck():
    q, k, v = torch.randn(3, 1, 1, 3, 2, 8).unbind(0)
    torch.library.opcheck(temporal_decode_op, (q, k, v, torch.randn(1, 3, 2, 4, 8), torch.randn(1, 3, 2, 4, 8), 1))


def test_decode_compiles_fullgraph(force_backend):
    force_backend("triton")
    torch._dynamo.reset()
    q, k, v = torch.randn(3, 1, 1, 3, 2, 8).unbind(0)
    kc, vc = torch.zeros(1, 3, 2, 4, 8), torch.zeros(1, 3, 2, 4, 8)
    step = torch.compile(temporal_decode_step, fullgraph=True, backend="aot_eager")
    o = step(q, k, v, kc, vc, 0)
    torch.testing.assert_close(o, v)  # one position: attention returns v
    torch.testing.assert_close(kc[:, :, :, 0], k[:, 0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Dh", [32, 64, 128])
def test_decode_gpu(Dh, dtype):
    B, T, S, H = 4, 6, 256, 8
    q, k, v = torch.randn(3, B, T, S, H, Dh, dtype=dtype, device="cuda").unbind(0)
    kc = torch.zeros(B, S, H, 8, Dh, dtype=dtype, device="cuda")
    vc = torch.zeros_like(kc)
    o = torch.cat([temporal_decode_op(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], kc, vc, t) for t in range(T)], 1)
    assert_2x_rule(o, temporal_attention_ref(q, k, v), temporal_attention_ref(q, k, v, upcast=False), "o", dtype)


@pytest.mark.gpu
def test_decode_opcheck_and_compile_gpu():
    q, k, v = torch.randn(3, 2, 1, 33, 4, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    kc, vc = torch.zeros(2, 2, 33, 4, 6, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    torch.library.opcheck(temporal_decode_op, (q, k, v, kc, vc, 2))
    torch._dynamo.reset()
    step = torch.compile(temporal_decode_op, fullgraph=True)
    o = step(q, k, v, kc.clone(), vc.clone(), 3)
    torch.testing.assert_close(o, temporal_decode_ref(q, k, v, kc.clone(), vc.clone(), 3))
