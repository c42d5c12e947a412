"""greedy_head (argmax over a tied embedding without the logits) against torch.argmax of the fp32 logits: odd
shapes, strided inputs, vocabulary splits, exact ties, NaN and inf, the memory bound of both backends,
validation, opcheck, torch.compile, and the sm_90a compile check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from wmfast.kernels import greedy_head as K

from tests.ops.conftest import DEVICE
from wmfast.bench.model_cost import OpCounter
from wmfast.ops import greedy_head, use_backend
from wmfast.testing import assert_2x_rule

bf, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
INF, NAN = float("inf"), float("nan")


def _inputs(lead, D, V, dtype, layout="contiguous"):
    """h [*lead, D] in `layout` (contiguous, a column slice of a wider tensor, or a transposed view), weight [V, D]."""
    if layout == "column-slice":  # unit stride over D, rows 2D + 3 apart: a view the op reads in place
        h = torch.randn(*lead, 2 * D + 3)[..., 3: D + 3]
    elif layout == "transposed":  # stride N over D: the op copies it
        h = torch.randn(*lead[:-1], D, lead[-1]).transpose(-1, -2)
    else:
        h = torch.randn(*lead, D)
    return h.to(dtype), torch.randn(V, D).to(dtype)


def _logits64(h, w):
    return h.double().reshape(-1, h.shape[-1]) @ w.double().T  # exact for bf16/fp16 inputs, ~exact for fp32


def _check(h, w, index, value):
    """fp32: index == torch.argmax of the fp32 logits; bf16/fp16: the chosen logit within fp32 accumulation error of
    the true max (near-ties may flip). value: the 2x rule against the max of torch's logits in h.dtype."""
    lead = h.shape[:-1]
    assert index.shape == value.shape == lead and index.dtype == torch.int64 and value.dtype == fp32
    exact = _logits64(h, w)
    top = exact.max(-1).values
    if h.dtype == fp32:
        assert torch.equal(index.reshape(-1), (h.reshape(-1, h.shape[-1]) @ w.T).argmax(-1))
    else:
        chosen = exact.gather(1, index.reshape(-1, 1))[:, 0]
        assert ((top - chosen) <= 1e-4 * top.abs().clamp_min(1.0)).all(), (top - chosen).max()
    lowp = F.linear(h.reshape(-1, h.shape[-1]), w).max(-1).values
    assert_2x_rule(value.reshape(-1), top.float(), lowp, name="value", dtype=h.dtype)


CASES = [
    pytest.param((37,), 61, 517, fp32, "contiguous", id="N37-D61-V517-fp32"),
    pytest.param((1,), 1000, 1000, fp32, "contiguous", id="N1-D1000-V1000-fp32"),
    pytest.param((2, 3, 5), 61, 1000, bf, "contiguous", id="BTS-D61-V1000-bf16"),
    pytest.param((37,), 1000, 517, bf, "column-slice", id="N37-D1000-V517-bf16-column-slice"),
    pytest.param((2, 19), 64, 517, fp16, "transposed", id="N38-D64-V517-fp16-transposed"),
    pytest.param((4, 9), 61, 517, fp32, "column-slice", id="N36-D61-V517-fp32-column-slice"),
    pytest.param((37,), 16, 1000, fp32, "transposed", id="N37-D16-V1000-fp32-transposed"),
]


@pytest.mark.parametrize("lead, D, V, dtype, layout", CASES)
def test_matches_argmax_of_fp32_logits(triton_backend, lead, D, V, dtype, layout):
    h, w = _inputs(lead, D, V, dtype, layout)
    index, value = greedy_head(h, w)
    _check(h, w, index, value)


@pytest.mark.parametrize("splits, block_v", [pytest.param(2, 128, id="2-splits"), pytest.param(3, 64, id="3-splits"),
                                             pytest.param(9, 16, id="9-splits-uneven"),
                                             pytest.param(1000, 128, id="splits-clamped-to-tiles")])
@pytest.mark.parametrize("dtype", [fp32, bf])
def test_vocabulary_splits_and_partial_reduction(on_device, splits, block_v, dtype):
    h, w = _inputs((37,), 61, 517, dtype)
    one = K._greedy_head(h, w, splits=1, block_v=block_v, block_n=16)
    many = K._greedy_head(h, w, splits=splits, block_v=block_v, block_n=16)
    _check(h, w, *many)
    # every logit is computed by the same tile whatever the split: bit-identical results
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def _tie_inputs(winners, V=300, D=24, N=20):
    """Small integers (every logit exact): h > 0, weight rows in [-3, 3], rows `winners` = 5 everywhere (tied)."""
    h = torch.randint(1, 4, (N, D)).float()
    w = torch.randint(-3, 4, (V, D)).float()
    w[list(winners)] = 5.0
    return h, w


# with splits=3 and 64-wide tiles (5 tiles, 2 a split): (5, 6) share a tile, (130, 5) are tiles 2 and 0 of two
# splits, (299, 250, 131) tiles 4, 3, 2 (the last row of the vocabulary among them)
@pytest.mark.parametrize("winners", [pytest.param((5, 6), id="adjacent"), pytest.param((130, 5), id="far-apart"),
                                     pytest.param((299, 250, 131), id="three-last-row-included")])
@pytest.mark.parametrize("splits", [None, 3])
def test_exact_ties_first_index_wins(on_device, winners, splits):
    h, w = _tie_inputs(winners)
    for dtype in (fp32, bf, fp16):
        hd, wd = h.to(dtype), w.to(dtype)
        index, value = (greedy_head(hd, wd) if splits is None else
                        K._greedy_head(hd, wd, splits=splits, block_v=64, block_n=16))
        assert (index == min(winners)).all(), (dtype, index)
        assert torch.equal(index, (h @ w.T).argmax(-1)) and torch.equal(value, 5 * h.sum(1))


def _special(case):
    h, w = torch.randn(20, 32), torch.randn(300, 32)
    if case == "nan-weight-row":
        w[123, 4] = NAN
    elif case == "nan-weight-rows-two-splits":
        w[[211, 123], 4] = NAN
    elif case == "nan-h-row":
        h[3, 7] = NAN
    elif case == "inf-weight":  # +inf logits where h[:, 3] > 0, -inf where < 0
        w[77, 3] = INF
    elif case == "inf-h-first-inf-wins":
        h[2, 0] = INF
        w[:, 0] = -1.0
        w[[200, 40, 41], 0] = 1.0  # row 2: +inf at 40, 41, 200, -inf elsewhere
    elif case == "all-minus-inf-row":
        h[5] = 0.0
        h[5, 0] = -INF
        w[:, 0] = w[:, 0].abs() + 0.5  # row 5: -inf everywhere -> index 0
    return h, w


SPECIAL = ["nan-weight-row", "nan-weight-rows-two-splits", "nan-h-row", "inf-weight", "inf-h-first-inf-wins",
           "all-minus-inf-row"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf - inf in the interpreter
@pytest.mark.parametrize("splits", [None, 4])
@pytest.mark.parametrize("case", SPECIAL)
def test_nan_and_inf_like_torch_argmax(on_device, case, splits):
    h, w = _special(case)
    logits = h @ w.T
    want = logits.argmax(-1)
    index, value = (greedy_head(h, w) if splits is None else
                    K._greedy_head(h, w, splits=splits, block_v=32, block_n=16))
    assert torch.equal(index, want), (index, want)
    torch.testing.assert_close(value, logits.gather(1, want[:, None])[:, 0], equal_nan=True)
    ref_index, ref_value = K.greedy_head_ref(h, w, block_elements=512)  # the chunked reference: the same rule
    assert torch.equal(ref_index, want)
    torch.testing.assert_close(ref_value, value, equal_nan=True)
    if case == "nan-h-row":
        assert index[3] == 0 and value[3].isnan()


@pytest.mark.parametrize("dtype", [fp32, bf, fp16])
def test_torch_backend_is_plain_pytorch_argmax(dtype):
    """The torch backend: F.linear in h.dtype, chunked (a small budget forces row and vocabulary chunks), gives
    exactly `(h @ w.T).argmax(-1)` of plain PyTorch, ties and all (bf16 logits rounded to bf16 tie often)."""
    h, w = _inputs((3, 13), 40, 517, dtype)
    with use_backend("torch"):
        index, value = greedy_head(h, w)
    logits = h @ w.T
    assert torch.equal(index, logits.argmax(-1))
    # fp32: matmul and F.linear may sum in different orders; bf16/fp16: the values are the rounded logits
    tol = {"atol": 1e-5, "rtol": 1e-6} if dtype == fp32 else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(value, logits.max(-1).values.float(), **tol)
    chunked = K.greedy_head_ref(h.reshape(-1, 40), w, upcast=False, block_elements=1200)
    assert torch.equal(chunked[0], index.reshape(-1))
    torch.testing.assert_close(chunked[1], value.reshape(-1), **tol)
    exact_index, _ = K.greedy_head_ref(h.reshape(-1, 40), w, block_elements=1200)  # upcast: the spec
    assert torch.equal(exact_index, (h.float() @ w.float().T).reshape(-1, 517).argmax(-1))


def test_torch_reference_stays_within_its_block_budget():
    """At the model's N = 1024, V = 64000 (D = 16 to stay fast) no temporary exceeds 2**22 elements (16 MiB in
    fp32), where the logits would be 250 MiB."""
    h, w = torch.randn(1024, 16), torch.randn(64000, 16)
    with use_backend("torch"), OpCounter() as ops:
        index, value = greedy_head(h, w)
    assert ops.largest[0] <= 2**22 * 4, ops.largest
    with OpCounter() as ops:
        small = K.greedy_head_ref(h, w, block_elements=2**18)
    assert ops.largest[0] <= 2**18 * 4, ops.largest
    assert torch.equal(small[0], index)
    torch.testing.assert_close(small[1], value)


class _Allocations(OpCounter):
    """OpCounter whose `largest` leaves out the storages of `existing` tensors: the interpreter views each kernel
    argument on the host with aten.set_ onto the argument's own storage (no allocation, but a new tensor)."""

    def __init__(self, *existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def _seen(self, func, out, input_keys):
        super()._seen(func, out, input_keys | self.existing)


def test_triton_path_allocates_only_the_partials(on_device):
    """The launcher at N = 1024, V = 64000 (D = 16) with 4 vocabulary splits: the largest new tensor is the int64
    partial-index buffer [1024, 4] (32 KiB), where the fp32 logits would be 250 MiB. (The launcher is called
    directly: inside the registered op a dispatch mode sees only the op's outputs. The interpreter's numpy
    temporaries are invisible to torch; on a GPU the kernels allocate nothing.)"""
    h, w = torch.randn(1024, 16), torch.randn(64000, 16)
    with _Allocations(h, w) as ops:
        index, value = K._greedy_head(h, w, splits=4)
    assert ops.largest[0] <= 1024 * 4 * 8, ops.largest
    ref_index, ref_value = K.greedy_head_ref(h, w)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(value, ref_value, atol=1e-5, rtol=1e-5)


def test_fp32_dot_precision_follows_torch_setting():
    default = torch.get_float32_matmul_precision()
    try:
        assert K._dot_precision(fp32) == ("ieee" if default == "highest" else "tf32")
        torch.set_float32_matmul_precision("high")
        assert K._dot_precision(fp32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert K._dot_precision(fp32) == "ieee" and K._dot_precision(bf) == "tf32"
    finally:
        torch.set_float32_matmul_precision(default)


@pytest.mark.parametrize("call, match", [
    (lambda: greedy_head(torch.randn(4, 8), torch.randn(8)), "weight \\(8,\\): expected"),
    (lambda: greedy_head(torch.tensor(1.0), torch.randn(5, 8)), "h \\(\\), weight"),
    (lambda: greedy_head(torch.randn(4, 8), torch.randn(5, 7)), "h \\(4, 8\\) has D=8 but weight \\(5, 7\\)"),
    (lambda: greedy_head(torch.randn(0, 8), torch.randn(5, 8)), "empty input: h \\(0, 8\\)"),
    (lambda: greedy_head(torch.randn(4, 8), torch.randn(0, 8)), "empty input"),
    (lambda: greedy_head(torch.randn(4, 8).long(), torch.randn(5, 8).long()), "h dtype torch.int64"),
    (lambda: greedy_head(torch.randn(4, 8), torch.randn(5, 8).to(bf)), "weight dtype torch.bfloat16"),
    (lambda: greedy_head(torch.randn(4, 8), torch.randn(5, 8, device="meta")), "weight on meta"),
    (lambda: greedy_head("h", torch.randn(5, 8)), "h must be a tensor"),
    (lambda: greedy_head(torch.randn(4, 8), torch.randn(5, 8, requires_grad=True)), "inference only"),
])
def test_bad_input_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_no_grad_inputs_that_require_grad_are_fine(triton_backend):
    w = torch.randn(100, 16, requires_grad=True)  # a model's parameter, decoding under no_grad
    with torch.no_grad():
        index, value = greedy_head(torch.randn(3, 16), w)
    assert not value.requires_grad and index.shape == (3,)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's opcheck; the GPU runs test_gpu_real_shapes")
@pytest.mark.parametrize("dtype", [fp32, bf])
def test_opcheck(triton_backend, dtype):
    h, w = _inputs((37,), 61, 517, dtype, "column-slice")
    torch.library.opcheck(K.greedy_head_op, (h.reshape(-1, 61), w))


def test_compiled_fullgraph_matches_eager(triton_backend):
    h, w = torch.randn(2, 9, 32), torch.randn(300, 32)

    def f(h, w):
        index, value = greedy_head(h * 2.0, w)
        return index + 1, value.sum()

    with torch.no_grad():
        eager = f(h, w)
        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w)
    assert torch.equal(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("N", [1024, 8192])
@pytest.mark.parametrize("dtype", [bf, fp32])
def test_gpu_real_shapes(triton_backend, N, dtype):
    h, w = torch.randn(N, 512, device="cuda").to(dtype), torch.randn(64000, 512, device="cuda").to(dtype)
    index, value = greedy_head(h, w)
    exact = h.float() @ w.float().T
    top = exact.max(-1).values
    chosen = exact.gather(1, index[:, None])[:, 0]
    assert ((top - chosen) <= 1e-3 * top.abs().clamp_min(1.0)).all()
    torch.testing.assert_close(value, top, atol=1e-3, rtol=1e-4)


def test_gpu_path_fake_pass_and_sm90_compile_without_gpu(sm90_compile_check):
    """tests/ops/greedy_head_compile_check.py in a subprocess without TRITON_INTERPRET: the triton_op's fake pass at
    the model's shapes (N = 1024: 63 vocabulary splits and the reduction; N = 131072: one split) and every launch
    compiled for sm_90a without register spills, the bf16 and tf32 dots on the tensor cores (wgmma)."""
    result = sm90_compile_check("greedy_head_compile_check.py")
    want = []
    for N in (1024, 131072, 1024, 131072, 1024):
        want += [[[N], "torch.int64", "cuda"], [[N], "torch.float32", "cuda"]]
    assert result["outputs"] == want
    main = {(c["dtype"], c["precision"]): c for c in result["compiled"] if c["kernel"] == "_greedy_head_kernel"}
    assert set(main) == {("torch.bfloat16", "tf32"), ("torch.float32", "ieee"), ("torch.float32", "tf32")}
    assert main["torch.bfloat16", "tf32"]["grids"] == [[8, 63], [1024, 1]]
    assert main["torch.bfloat16", "tf32"]["wgmma"] > 0 and main["torch.float32", "tf32"]["wgmma"] > 0
    assert any(c["kernel"] == "_greedy_head_reduce_kernel" for c in result["compiled"])
    assert not [c for c in result["compiled"] if c["spill_bytes"]], result["compiled"]
    assert all(c["shared_bytes"] <= 227 * 1024 for c in result["compiled"])  # sm_90's limit a program
