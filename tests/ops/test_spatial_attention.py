"""Spatial attention (wmfast.ops.spatial_attention): the kernels against the fp32 reference by the 2x rule, input
validation, and the choice of kernel on CUDA (the measured table, first-use timing, its cache, no timing under
torch.compile), exercised on the CPU with stand-in timings and with SDPA's CPU kernels standing in for the GPU's."""
import logging

import pytest
import torch
from wmfast.kernels import tuning
from wmfast.kernels.tuning import spatial_shape_key

from tests.ops.test_attention import make_qkv
from wmfast.ops import attention as attn
from wmfast.ops import dispatch, spatial_attention, use_backend
from wmfast.testing import assert_2x_rule


def spatial_ref(q, k, v, upcast=True):
    dt = torch.float32 if upcast else q.dtype
    s = torch.einsum("btshd,btuhd->bthsu", q.to(dt), k.to(dt)) * q.shape[-1] ** -0.5  # [B, T, H, S, S]
    return torch.einsum("bthsu,btuhd->btshd", s.softmax(-1), v.to(dt)).to(q.dtype)


def check_spatial(q, k, v, dtype, **kw):
    """Forward and dq, dk, dv of spatial_attention(**kw) against the fp32 reference by the 2x rule."""
    o = spatial_attention(q, k, v, **kw)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o32 = spatial_ref(q32, k32, v32)
    g32 = torch.autograd.grad(o32, (q32, k32, v32), do.float())
    olp = spatial_ref(q, k, v, upcast=False)
    glp = torch.autograd.grad(olp, (q, k, v), do)
    assert_2x_rule(o, o32, olp, "o", dtype)
    for name, a, r, lp in zip(("dq", "dk", "dv"), g, g32, glp):
        assert_2x_rule(a, r, lp, name, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_spatial_matches_reference(dtype):
    (q, k, v), _ = make_qkv(2, 3, 33, 2, 16, dtype, "packed")
    check_spatial(q, k, v, dtype)


def test_spatial_bad_inputs():
    q = torch.randn(1, 3, 4, 2, 8)
    with pytest.raises(ValueError, match="k"):
        spatial_attention(q, q[:, :, :3], q)
    with pytest.raises(ValueError, match="backend='sdpa-fast'.*sdpa-cudnn"):
        spatial_attention(q, q, q, backend="sdpa-fast")
    with pytest.raises(ValueError, match="flash-attn.*CUDA"):
        spatial_attention(q, q, q, backend="flash-attn")  # CPU tensors


# ------------------------------------------------------------------------------------------- the choice
TIMES = {"sdpa-cudnn": 0.5, "sdpa-flash": 2.0, "sdpa-efficient": 1.0}  # stand-in median ms


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA branch on CPU tensors: three candidate kernels, a GPU name, no table, timing allowed, an empty
    cache, and time_backends replaced by one call of each runner (a runner that raises, raises) returning TIMES.
    Yields the list of (backend, runner result) the stand-in timed."""
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    monkeypatch.setattr(attn, "_spatial_candidates", lambda device, dtype, head_dim: tuple(TIMES))
    monkeypatch.setattr(tuning, "device_gpu", lambda device: "Test GPU")
    monkeypatch.setattr(tuning, "load_table", lambda gpu: {})
    monkeypatch.setattr(dispatch, "timing_allowed", lambda: True)
    monkeypatch.setattr(attn, "_SPATIAL_TIMED", {})
    timed = []

    def time_backends(runners, reps=10):
        out = {}
        for name, run in runners.items():
            timed.append((name, run()))
            out[name] = TIMES[name]
        return out

    monkeypatch.setattr(dispatch, "time_backends", time_backends)
    yield timed


def _runners(calls, raising=()):
    def make(name):
        def run():
            calls.append(name)
            if name in raising:
                raise RuntimeError(f"No available kernel ({name})")
            return name

        return run

    return {name: make(name) for name in TIMES}


def test_fastest_timed_backend_wins_and_is_cached(fake_cuda, caplog):
    cpu, key, calls = torch.device("cpu"), "BT=32+,H=8,S=1024,Dh=64,bf16,grad", []
    with caplog.at_level(logging.INFO, logger="wmfast"):
        assert attn.select_spatial_backend(cpu, key, tuple(TIMES), _runners(calls)) == "sdpa-cudnn"
    assert sorted(calls) == sorted(TIMES)
    assert len(caplog.records) == 1 and "sdpa-cudnn 0.500 ms" in caplog.text and key in caplog.text
    # the second call of the shape class reads the cache: nothing runs, nothing is logged
    calls.clear()
    assert attn.select_spatial_backend(cpu, key, tuple(TIMES), _runners(calls)) == "sdpa-cudnn"
    assert calls == [] and len(caplog.records) == 1
    # another shape class (here: no backward) is timed on its own
    assert attn.select_spatial_backend(cpu, key.removesuffix(",grad"), tuple(TIMES), _runners(calls)) == "sdpa-cudnn"
    assert len(calls) == 3


def test_a_backend_that_raises_is_skipped(fake_cuda, caplog):
    calls = []
    with caplog.at_level(logging.INFO, logger="wmfast"):
        choice = attn.select_spatial_backend(torch.device("cpu"), "k", tuple(TIMES), _runners(calls, {"sdpa-cudnn"}))
    assert choice == "sdpa-efficient"  # the fastest of those that ran
    assert "sdpa-cudnn skipped (RuntimeError: No available kernel (sdpa-cudnn))" in caplog.text
    everything_fails = attn.select_spatial_backend(torch.device("cpu"), "k2", tuple(TIMES),
                                                   _runners(calls, set(TIMES)))
    assert everything_fails == "sdpa"  # SDPA's own pick


def test_the_measured_table_takes_precedence(fake_cuda, monkeypatch):
    key, calls = "BT=32+,H=8,S=1024,Dh=64,bf16,grad", []
    table = {"backend": {"spatial_attention": {key: "sdpa-flash", "*": "sdpa-efficient"}}}
    monkeypatch.setattr(tuning, "load_table", lambda gpu: table)
    assert attn.select_spatial_backend(torch.device("cpu"), key, tuple(TIMES), _runners(calls)) == "sdpa-flash"
    assert calls == []
    # "*" is not applied to another shape (a kernel's support depends on it): that shape is timed
    assert attn.select_spatial_backend(torch.device("cpu"), "other", tuple(TIMES), _runners(calls)) == "sdpa-cudnn"
    # an entry that is not a candidate here (flash-attn not importable) is ignored
    table["backend"]["spatial_attention"]["third"] = "flash-attn"
    assert attn.select_spatial_backend(torch.device("cpu"), "third", tuple(TIMES), _runners(calls)) == "sdpa-cudnn"


def test_no_timing_when_not_allowed_or_forced_torch(fake_cuda, monkeypatch):
    (q, k, v), _ = make_qkv(1, 2, 8, 2, 16, torch.float32, "contiguous")
    with use_backend("torch"):
        assert attn._spatial_backend(q, k, v) == "sdpa"
    monkeypatch.setattr(dispatch, "timing_allowed", lambda: False)  # e.g. under a dispatch mode
    assert attn._spatial_backend(q, k, v) == "sdpa" and not attn._SPATIAL_TIMED
    assert fake_cuda == []


def test_first_use_times_real_kernels_forward_and_backward(fake_cuda):
    """The op end to end: SDPA's CPU flash kernel stands in for the GPU's; the memory-efficient and cuDNN kernels
    have no CPU implementation and raise, so they are skipped. With grad, the timed runners run the backward."""
    (q, k, v), _ = make_qkv(2, 3, 33, 2, 16, torch.float32, "packed")
    check_spatial(q, k, v, torch.float32)
    key = spatial_shape_key(6, 2, 33, 16, torch.float32, grad=True)
    assert attn._SPATIAL_TIMED == {("Test GPU", key): "sdpa-flash"}
    assert [name for name, _ in fake_cuda] == ["sdpa-flash"]  # the others raised before a result
    assert isinstance(fake_cuda[0][1], tuple) and len(fake_cuda[0][1]) == 3  # dq, dk, dv of the timed copies
    with torch.no_grad():
        spatial_attention(q, k, v)
    assert ("Test GPU", key.removesuffix(",grad")) in attn._SPATIAL_TIMED and fake_cuda[-1][1].dim() == 5


def test_first_use_timing_inside_activation_checkpointing(fake_cuda):
    """Timing in the forward of a non-reentrant checkpoint must not reach the checkpoint's saved-tensor hooks (it
    would recompute the block mid-forward and fail the backward's saved-tensor count check)."""
    from torch.utils.checkpoint import checkpoint

    (q, k, v), leaves = make_qkv(1, 2, 16, 2, 16, torch.float32, "packed")
    out = checkpoint(lambda a, b, c: spatial_attention(a, b, c).sin(), q, k, v, use_reentrant=False)
    (g,) = torch.autograd.grad(out.sum(), leaves)
    assert fake_cuda  # it timed
    (g_ref,) = torch.autograd.grad(spatial_ref(q, k, v).sin().sum(), leaves)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cached", [None, "sdpa-flash"], ids=["nothing-cached", "cached"])
def test_compiled_path_does_no_timing(fake_cuda, monkeypatch, cached):
    """Under torch.compile the choice is baked in at trace time: an eager first use's cached choice or the table for
    the exact shape class, else SDPA's own pick; never a timing."""
    torch._dynamo.reset()
    (q, k, v), _ = make_qkv(1, 2, 16, 2, 16, torch.float32, "packed")
    key = spatial_shape_key(2, 2, 16, 16, torch.float32, grad=True)
    if cached:
        attn._SPATIAL_TIMED[("Test GPU", key)] = cached
    ran, real_run = [], attn._spatial_run
    monkeypatch.setattr(attn, "_spatial_run", lambda name, *a: ran.append(name) or real_run(name, *a))
    f = torch.compile(lambda a, b, c: spatial_attention(a, b, c) * 2, fullgraph=True, backend="aot_eager")
    out = f(q, k, v)
    out.sum().backward()
    assert fake_cuda == [] and ran == [cached or "sdpa"]
    torch.testing.assert_close(out, 2 * spatial_ref(q, k, v))
    torch._dynamo.reset()


def _row(provider, mode, ms, spread=0.02):
    """A results.csv row as benchmarks/bench_st_attention.py writes it for spatial attention."""
    return {"op": "spatial_attention", "shape": "B=8 T=5 S=1024 H=8 Dh=64 bfloat16", "provider": provider,
            "mode": mode, "median_ms": str(ms), "p20_ms": str(ms * (1 - spread)), "p80_ms": str(ms * (1 + spread)),
            "gpu_name": "Test GPU"}


def test_lease_rows_become_the_table_entry_the_op_uses(fake_cuda, monkeypatch):
    """bench rows -> wmfast.bench.adopt.choose (the lease's launch_configs.json) -> the choice, with no timing.
    A winner within the noise of the runner-up is not adopted (first-use timing decides there)."""
    from wmfast.bench.adopt import choose

    rows = [_row("sdpa-cudnn", "full", 1.0), _row("sdpa-flash", "full", 1.3), _row("sdpa-efficient", "full", 1.6),
            _row("sdpa", "full", 1.0),  # SDPA's own pick: reference only, never an entry
            _row("sdpa-cudnn", "fwd", 0.40), _row("sdpa-flash", "fwd", 0.405), _row("sdpa-efficient", "bwd", 0.1)]
    table = choose(rows)
    grad_key = spatial_shape_key(40, 8, 1024, 64, torch.bfloat16, grad=True)
    assert table["backend"]["spatial_attention"] == {grad_key: "sdpa-cudnn", "*": "sdpa-cudnn"}
    monkeypatch.setattr(tuning, "load_table", lambda gpu: table)
    calls = []
    cpu = torch.device("cpu")
    assert attn.select_spatial_backend(cpu, grad_key, tuple(TIMES), _runners(calls)) == "sdpa-cudnn" and not calls
    attn.select_spatial_backend(cpu, grad_key.removesuffix(",grad"), tuple(TIMES), _runners(calls))
    assert len(calls) == 3  # the forward-only key was within the noise: not in the table, so timed


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_usable_backend_gpu(dtype):
    """Each kernel spatial attention may choose, pinned, against the fp32 reference by the 2x rule (forward and
    every gradient); a kernel that cannot run the shape (or flash-attn, when not installed) is reported and
    skipped. S = 100 is not a multiple of any kernel's block."""
    ran, skipped = [], {}
    for backend in attn.SPATIAL_BACKENDS:
        (q, k, v), _ = make_qkv(2, 3, 100, 4, 64, dtype, "packed", device="cuda")
        try:
            with torch.no_grad():
                spatial_attention(q, k, v, backend=backend)
        except (RuntimeError, ValueError) as e:
            skipped[backend] = str(e).splitlines()[0][:200]
            continue
        check_spatial(q, k, v, dtype, backend=backend)
        ran.append(backend)
    print(f"spatial attention kernels checked: {ran}; skipped: {skipped}")
    assert "sdpa" in ran and len(ran) >= 2, skipped


@pytest.mark.gpu
def test_automatic_choice_gpu(monkeypatch):
    monkeypatch.setattr(attn, "_SPATIAL_TIMED", {})
    (q, k, v), _ = make_qkv(2, 3, 100, 4, 64, torch.bfloat16, "packed", device="cuda")
    check_spatial(q, k, v, torch.bfloat16)
    candidates = attn._spatial_candidates(q.device, q.dtype, 64)
    key = spatial_shape_key(6, 4, 100, 64, torch.bfloat16, grad=True)
    measured = tuning.measured_backend(tuning.device_gpu(q.device), "spatial_attention", key, exact=True)
    assert measured in candidates or attn._SPATIAL_TIMED[(tuning.device_gpu(q.device), key)] in candidates
