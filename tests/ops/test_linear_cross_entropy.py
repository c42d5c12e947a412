"""Chunked linear cross-entropy and its in-place cross-entropy-gradient kernel, against the pure-torch references
(the 2x rule, forward and both gradients), on the triton and the torch backends.

The Triton kernel runs on the CPU under TRITON_INTERPRET=1 (set by conftest): vocabularies stay small (V = 517,
1000), and small blocks (block_v = 128) force the multi-block loop and a partial last block.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from wmfast.kernels import cross_entropy as K
from wmfast.kernels._launch import triton_interpret

from tests.ops.conftest import DEVICE
from wmfast.ops import linear_cross_entropy
from wmfast.testing import assert_2x_rule

bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
needs_interpreter = pytest.mark.skipif(not triton_interpret(), reason="checks the interpreter-mode registration "
                                       "(custom_op) on CPU tensors; the gpu-marked tests cover the triton_op")
compiled_kernels = pytest.mark.skipif(
    triton_interpret(), reason="tests the compiled kernel and the triton_op registration (TRITON_INTERPRET unset)")
IGNORE = K.IGNORE_INDEX


@pytest.fixture(params=["triton", "torch"])
def backend(request, force_backend, on_device):
    """Each test that takes it runs on both backends, tensors on DEVICE."""
    force_backend(request.param)
    return request.param


def _small_blocks(monkeypatch):
    """Several blocks per row with a partial last one (V=517 -> 5 blocks of 128), 8-row tiles."""
    real = K._cross_entropy_grad
    monkeypatch.setattr(K, "_cross_entropy_grad", lambda *a, **k: real(*a, **{"block_v": 128, **k}))
    monkeypatch.setattr(K, "_TILE_INTERPRET", 1024)


def _targets(logits32: torch.Tensor, n_ignored: int) -> torch.Tensor:
    """Random targets, every third one the row's argmax (so `correct` has both values), n_ignored rows ignored."""
    N, V = logits32.shape
    y = torch.randint(0, V, (N,))
    y[::3] = logits32[::3].argmax(-1)
    y[torch.randperm(N)[:n_ignored]] = IGNORE
    return y


# ------------------------------------------------------------------------------------------ the kernel alone
def _kernel_logits(n, V, dtype):
    z = torch.randn(n, V) * 3
    # a three-way tie for the maximum, in one lane of a 128-wide block (7, 135) and across lanes (300): the first
    # index wins, as torch.argmax
    z[1, 7] = z[1, 135] = z[1, 300] = z[1].max() + 1
    return z.to(dtype)


@pytest.mark.parametrize("dtype", [bf, fp16, fp32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("V, small_blocks", [pytest.param(517, True, id="V517-blocks128"),
                                             pytest.param(1000, False, id="V1000-one-block")])
@pytest.mark.parametrize("scale", [1.0, 1 / 37], ids=["scale1", "scale1/37"])
def test_kernel_writes_the_gradient_over_the_logits(on_device, monkeypatch, dtype, V, small_blocks, scale):
    if small_blocks:
        _small_blocks(monkeypatch)
    n = 37
    z = _kernel_logits(n, V, dtype)
    y = _targets(z.float(), n_ignored=3)
    y[1] = 7
    g32, loss32, correct32 = K.cross_entropy_grad_ref(z, y, scale=scale, upcast=True)
    g_lp, loss_lp, _ = K.cross_entropy_grad_ref(z, y, scale=scale, upcast=False)
    buf = z.clone()
    loss, correct = K.cross_entropy_grad_op(buf, y, scale, IGNORE, True)
    assert buf.dtype == dtype and loss.dtype == fp32 and correct.dtype == torch.bool
    assert_2x_rule(buf, g32, g_lp, name="gradient", dtype=dtype)
    assert_2x_rule(loss, loss32, loss_lp, name="loss", dtype=dtype)
    assert torch.equal(correct, correct32) and correct[1] and correct.any() and not correct.all()
    ignored = y == IGNORE
    assert torch.equal(buf[ignored], torch.zeros_like(buf[ignored])) and torch.equal(loss[ignored], loss[ignored] * 0)


def test_kernel_without_gradient_leaves_the_logits(on_device):
    z = _kernel_logits(9, 517, bf)
    y = _targets(z.float(), 2)
    buf = z.clone()
    loss, correct = K.cross_entropy_grad_op(buf, y, 1.0, IGNORE, False)
    _, loss32, correct32 = K.cross_entropy_grad_ref(z, y)
    assert torch.equal(buf, z) and torch.equal(correct, correct32)
    torch.testing.assert_close(loss, loss32)


def test_kernel_poisons_an_unchecked_out_of_range_target_with_nan(on_device):
    """What a target outside [0, V) gives where the public op cannot check it (under torch.compile): NaN, not a
    read outside the row."""
    z = torch.randn(4, 50)
    loss, correct = K.cross_entropy_grad_op(z, torch.tensor([50, -1, IGNORE, 3]), 1.0, IGNORE, True)
    assert loss[:2].isnan().all() and loss[2] == 0 and loss[3].isfinite() and not correct[:3].any()


@needs_interpreter
@pytest.mark.parametrize("write_grad", [True, False], ids=["grad", "no-grad"])
def test_opcheck(write_grad):
    z = torch.randn(6, 517, dtype=bf)
    y = torch.tensor([0, 516, IGNORE, 3, 200, 1])
    torch.library.opcheck(K.cross_entropy_grad_op, (z, y, 0.5, IGNORE, write_grad))


# ------------------------------------------------------------------------------- the public op (2x rule)
def _ref(h, w, y, upcast: bool):
    """Plain PyTorch: F.cross_entropy of the full logits, in fp32 (upcast) or in h's dtype. The gradients are
    those of loss * n_valid (a per-row gradient of order 1, so the tolerance floor does not swallow them)."""
    h, w = (t.detach().float() if upcast else t.detach() for t in (h, w))
    h.requires_grad_(), w.requires_grad_()
    logits = h @ w.t()
    loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
    token = F.cross_entropy(logits.float(), y, ignore_index=IGNORE, reduction="none")
    gh, gw = torch.autograd.grad(loss * (y != IGNORE).sum(), (h, w))
    return loss, token.detach(), logits.detach().float(), gh, gw


def check_2x(h, w, y, chunk, dtype, leaf_h=None):
    """linear_cross_entropy(h, w, y) against the fp32 reference, by the 2x rule (plain PyTorch in `dtype` sets
    the bound). leaf_h: the tensor h is a view of (its gradient is checked), else h itself."""
    leaf_h = h if leaf_h is None else leaf_h
    loss, token, correct = linear_cross_entropy(h, w, y, chunk_size=chunk)
    assert loss.dtype == token.dtype == fp32 and correct.dtype == torch.bool
    gh, gw = torch.autograd.grad(loss * (y != IGNORE).sum(), (leaf_h, w))
    r_loss, r_token, r_logits, r_gh, r_gw = _ref(h, w, y, upcast=True)
    l_loss, l_token, _, l_gh, l_gw = _ref(h, w, y, upcast=False)
    assert_2x_rule(loss, r_loss, l_loss, name="loss", dtype=dtype)
    assert_2x_rule(token, r_token, l_token, name="token_loss", dtype=dtype)
    if leaf_h is not h:  # the reference's gradient of the view, scattered like autograd does into its base
        r_gh, l_gh = (torch.autograd.grad(h, leaf_h, g.to(h.dtype))[0] for g in (r_gh, l_gh))
    assert gh.dtype == leaf_h.dtype and gw.dtype == w.dtype
    assert_2x_rule(gh, r_gh, l_gh, name="grad h", dtype=dtype)
    assert_2x_rule(gw, r_gw, l_gw, name="grad weight", dtype=dtype)
    # correct = (argmax == target), compared where the fp32 top two logits are apart by more than rounding
    top2 = r_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > (1e-3 if dtype == fp32 else 0.1)
    want = (r_logits.argmax(-1) == y) & (y != IGNORE)
    assert clear.sum() >= len(y) // 4 and torch.equal(correct[clear], want[clear])
    assert want.any() and not correct[y == IGNORE].any() and (token[y == IGNORE] == 0).all()


CASES = [  # N, D, V, chunk, dtype, ignored rows
    pytest.param(61, 24, 517, 16, bf, 5, id="bf16-V517-N61-chunk16"),
    pytest.param(61, 24, 1000, 4096, bf, 0, id="bf16-V1000-one-chunk"),
    pytest.param(50, 16, 517, 23, fp32, 4, id="fp32-V517-chunk23"),
    pytest.param(33, 40, 1000, 32, fp16, 3, id="fp16-V1000-N33-chunk32"),
]


@pytest.mark.parametrize("N, D, V, chunk, dtype, n_ignored", CASES)
def test_2x_rule(backend, monkeypatch, N, D, V, chunk, dtype, n_ignored):
    _small_blocks(monkeypatch)
    h = torch.randn(N, D).to(dtype).requires_grad_()
    w = (torch.randn(V, D) * 0.3).to(dtype).requires_grad_()
    y = _targets((h.float() @ w.float().t()).detach(), n_ignored)
    check_2x(h, w, y, chunk, dtype)


@pytest.mark.parametrize("layout", ["column-stride-2", "row-padded", "transposed"])
def test_strided_h_is_read_in_place(backend, layout):
    """h may be any view: a non-unit last-dimension stride, rows padded inside a wider tensor, a transpose.
    The op hands it to torch's matmul as is (no copy of the whole h); its gradient reaches the base."""
    N, D, V = 45, 24, 517
    base = {"column-stride-2": torch.randn(N, 2 * D), "row-padded": torch.randn(N, D + 8),
            "transposed": torch.randn(D, N)}[layout].to(bf).requires_grad_()
    h = {"column-stride-2": lambda b: b[:, ::2], "row-padded": lambda b: b[:, :D],
         "transposed": lambda b: b.t()}[layout](base)
    assert not h.is_contiguous()
    w = (torch.randn(V, D) * 0.3).to(bf).requires_grad_()
    y = _targets((h.float() @ w.float().t()).detach(), 2)
    check_2x(h, w, y, 16, bf, leaf_h=base)


def test_autocast_bf16_with_fp32_parameters(backend):
    """The model's case: fp32 h and tied embedding under bf16 autocast; logits, softmax gradient and matmuls in
    bf16, weight gradient returned in fp32."""
    N, D, V = 40, 24, 517
    h = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.3).requires_grad_()
    y = _targets((h @ w.t()).detach(), 3)
    with torch.autocast(DEVICE, dtype=bf):
        loss, token, _ = linear_cross_entropy(h, w, y, chunk_size=16)
    gh, gw = torch.autograd.grad(loss * (y != IGNORE).sum(), (h, w))
    assert gh.dtype == gw.dtype == fp32
    r_loss, r_token, _, r_gh, r_gw = _ref(h, w, y, upcast=True)
    l_loss, l_token, _, l_gh, l_gw = _ref(h.to(bf), w.to(bf), y, upcast=False)
    for a, r, lp, name in ((loss, r_loss, l_loss, "loss"), (token, r_token, l_token, "token_loss"),
                           (gh, r_gh, l_gh, "grad h"), (gw, r_gw, l_gw, "grad weight")):
        assert_2x_rule(a, r, lp, name=name, dtype=bf)


def test_all_rows_ignored_give_nan_loss_and_zero_gradients(backend):
    """As torch's F.cross_entropy: 0 / 0 for the mean, no gradient."""
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    loss, token, correct = linear_cross_entropy(h, w, torch.full((5,), IGNORE), chunk_size=2)
    loss.backward()
    assert loss.isnan() and (token == 0).all() and not correct.any()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_backends_agree(force_backend, on_device):
    h, w = torch.randn(29, 16, dtype=bf), torch.randn(517, 16, dtype=bf) * 0.3
    y = _targets((h.float() @ w.float().t()), 4)
    out = {}
    for name in ("triton", "torch"):
        force_backend(name)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, token, correct = linear_cross_entropy(hh, ww, y, chunk_size=8)
        out[name] = (loss, token, correct, *torch.autograd.grad(loss, (hh, ww)))
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------------------- memory
def _peak_bytes(n, V, D, backend, monkeypatch):
    import gc

    from wmfast import ops
    from wmfast.bench.memory import LiveBytesTracker

    if triton_interpret():  # the interpreter (Triton 3.9) leaves its arguments in a reference cycle until the next
        real = K.launcher  # collection, so a chunk's logits would outlive their `del`; a compiled launch keeps none

        def collected(kernel):
            def grid_call(grid):
                return lambda *args, **kwargs: (real(kernel)[grid](*args, **kwargs), gc.collect())

            return type("Launch", (), {"__getitem__": lambda self, grid: grid_call(grid)})()

        monkeypatch.setattr(K, "launcher", collected)

    h = torch.randn(2 * n, D, dtype=bf, requires_grad=True)
    w = torch.randn(V, D, dtype=bf, requires_grad=True)
    y = torch.randint(0, V, (2 * n,))
    with ops.use_backend(backend), LiveBytesTracker() as tracker:
        linear_cross_entropy(h, w, y, chunk_size=n)
    return tracker.peak


def test_triton_path_allocates_no_fp32_logits(on_device, monkeypatch):
    """Two chunks of [n, V] = [128, 2000] bf16 logits, D = 8 (the per-chunk [n, V] tensors dominate): the
    triton path's peak extra bytes stay under the 1 MB an fp32 copy of one chunk's logits would need, while the
    torch path holds one (plus the bf16 logits and gradient)."""
    n, V, D = 128, 2000, 8
    fp32_chunk = n * V * 4
    triton_peak, torch_peak = (_peak_bytes(n, V, D, b, monkeypatch) for b in ("triton", "torch"))
    assert triton_peak < fp32_chunk < torch_peak, (triton_peak, torch_peak, fp32_chunk)
    # what remains: the chunk's bf16 logits (512 kB) and the [V, D] / [N, D] gradients and accumulators
    assert triton_peak < n * V * 2 + 12 * V * D + 8 * n * D, triton_peak


# ------------------------------------------------------------------------------------------- validation
def _bad_inputs():
    h, w, y = torch.randn(6, 8), torch.randn(50, 8), torch.randint(0, 50, (6,))
    cases = {  # id: (h, w, targets, kwargs, message fragment)
        "target-too-big": (h, w, torch.tensor([0, 1, 50, 2, 3, 4]), {}, r"targets\[2\] = 50 is outside \[0, V=50\)"),
        "target-negative": (h, w, torch.tensor([0, IGNORE, -1, 2, 3, 4]), {}, r"targets\[2\] = -1 .*ignore_index=-100"),
        "ignore-index-other": (h, w, torch.tensor([0, 1, IGNORE, 2, 3, 4]), {"ignore_index": -1},
                               r"targets\[2\] = -100 .*ignore_index=-1"),
        "h-1d": (h[0], w, y, {}, r"h \(8,\), weight \(50, 8\), targets \(6,\): expected \[N, D\], \[V, D\], \[N\]"),
        "D-mismatch": (h, w[:, :7], y, {}, r"weight \(50, 7\)"),
        "targets-shape": (h, w, y[:5], {}, r"targets \(5,\)"),
        "targets-float": (h, w, y.float(), {}, "targets must be int32 or int64"),
        "h-int": (h.long(), w.long(), y, {}, "h must be float32"),
        "dtype-mismatch": (h.to(bf), w, y, {}, "h dtype torch.bfloat16 != weight dtype torch.float32"),
        "empty": (h[:0], w, y[:0], {}, "must not be empty"),
        "chunk-zero": (h, w, y, {"chunk_size": 0}, "chunk_size must be a positive int"),
        "weight-not-tensor": (h, 1.0, y, {}, "weight must be a tensor"),
    }
    return [pytest.param(*v, id=k) for k, v in cases.items()]


@pytest.mark.parametrize("h, w, y, kwargs, match", _bad_inputs())
def test_bad_input_raises_before_launch(force_backend, monkeypatch, h, w, y, kwargs, match):
    force_backend("triton")

    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(K, "_cross_entropy_grad", no_launch)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, y, **kwargs)


def test_int32_targets_and_ignore_index_inside_the_vocabulary(backend):
    h, w = torch.randn(7, 8), torch.randn(20, 8)
    y = torch.tensor([0, 3, 3, 19, 5, 3, 1], dtype=torch.int32)
    loss, token, _ = linear_cross_entropy(h, w, y, ignore_index=3)
    logits = h @ w.t()
    torch.testing.assert_close(loss, F.cross_entropy(logits, y.long(), ignore_index=3))
    torch.testing.assert_close(token, F.cross_entropy(logits, y.long(), ignore_index=3, reduction="none"))


# ------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("name", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_compile_fullgraph(force_backend, name):
    """fullgraph=True fails on any graph break: the chunk loop, the dispatch and the mutating op all trace.
    aot_eager: Inductor adds nothing for an opaque op on the CPU and costs time."""
    force_backend(name)
    torch._dynamo.reset()
    h = torch.randn(21, 16, dtype=bf, requires_grad=True)
    w = (torch.randn(517, 16) * 0.3).to(bf).requires_grad_()
    y = _targets((h.float() @ w.float().t()).detach(), 2)

    def f(h, w, y):
        loss, token, correct = linear_cross_entropy(h, w, y, chunk_size=8)
        return loss, token, correct

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w, y)
    grads = torch.autograd.grad(got[0], (h, w))
    want = f(h, w, y)
    grads_e = torch.autograd.grad(want[0], (h, w))
    for a, e in zip((*got, *grads), (*want, *grads_e)):
        torch.testing.assert_close(a, e)


# -------------------------------------------------------------------- the GPU path, with and without a GPU
def test_gpu_path_fake_pass_and_sm90_compile_without_gpu(sm90_compile_check):
    """tests/ops/cross_entropy_compile_check.py in a subprocess without TRITON_INTERPRET: the triton_op's fake
    pass gives the outputs' shapes and dtypes, and each recorded launch (V=64000 bf16 / fp32 with the gradient,
    bf16 without; V=517 fp16) compiles for sm_90a without register spills, with vector accesses at the real
    width."""
    result = sm90_compile_check("cross_entropy_compile_check.py", "--compile")
    want = []
    for n in (4096, 4096, 37, 4096):
        want += [[[n], "torch.float32", "cuda"], [[n], "torch.bool", "cuda"]]
    assert result["outputs"] == want
    assert len(result["compiled"]) == 4
    assert not [c for c in result["compiled"] if c["spill_bytes"]], result["compiled"]
    real = [c for c in result["compiled"] if c["consts"]["BLOCK_V"] == K.GPU_BLOCK_V]
    assert len(real) == 3 and all(c["num_warps"] == K.GPU_NUM_WARPS and c["vector_accesses"] > 0 for c in real)


@pytest.mark.gpu
@compiled_kernels
def test_gpu_real_shape_and_compiled(triton_backend):
    """The ST-Transformer head at one micro-batch (N=3072, D=512, V=64000, bf16, chunk 1024) against fp32, and
    torch.compile(fullgraph=True) with Inductor tracing the triton_op."""
    N, D, V = 3072, 512, 64000
    h = torch.randn(N, D, device="cuda", dtype=bf, requires_grad=True)
    w = (torch.randn(V, D, device="cuda") * 0.05).to(bf).requires_grad_()
    y = _targets((h.float() @ w.float().t()).detach(), N // 7)
    check_2x(h, w, y, 1024, bf)
    torch.library.opcheck(K.cross_entropy_grad_op, (torch.randn(64, V, device="cuda", dtype=bf), y[:64], 1.0,
                                                    IGNORE, True))
    torch._dynamo.reset()
    got = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=1024), fullgraph=True)(h, w, y)
    want = linear_cross_entropy(h, w, y, chunk_size=1024)
    torch.testing.assert_close(got[1], want[1], atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ benchmark
def test_bench_script_quick(tmp_path):
    """benchmarks/bench_cross_entropy.py --quick on the CPU: every provider writes its rows (fwd and fwd+bwd),
    with a peak memory."""
    import csv
    import pathlib

    from wmfast.bench.discovery import load_bench_script

    bench = load_bench_script(pathlib.Path(__file__).parents[2] / "benchmarks" / "bench_cross_entropy.py")
    assert bench.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    with open(tmp_path / "bench_cross_entropy.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["op"].startswith("ceiling:")]
    got = {(r["op"], r["provider"], r["mode"]) for r in rows}
    kernel = ("wmfast-triton",) if triton_interpret() else ()  # (a GPU session's compiled kernels skip CPU rows)
    head = {("linear_cross_entropy", p, m) for p in (*kernel, "torch-chunked", "torch") for m in ("fwd", "fwd+bwd")}
    assert head | {("cross_entropy_grad", p, "fwd") for p in (*kernel, "torch")} == got
    assert all(float(r["median_ms"]) > 0 and r["peak_mem_mb"] for r in rows)
