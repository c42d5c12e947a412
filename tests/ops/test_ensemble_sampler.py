"""The fused sampler ops (ensemble Euler step + context re-imposition; ensemble mean/variance) against their
pure-torch references by the 2x rule, on odd shapes, broadcast and strided inputs (Triton interpreter on CPU)."""
import pytest
import torch
from wmfast.kernels.ensemble_sampler import ensemble_euler_step_ref, ensemble_mean_var_ref

from wmfast import ops
from wmfast.testing import assert_2x_rule

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]

# (N, C, F, H, W, Fc, context batch): odd H*W (not a multiple of the block), B = 1, no context, all context.
STEP_CASES = [
    pytest.param((3, 4, 5, 5, 7, 2, 1), id="N3-ctx-broadcast-odd-hw"),
    pytest.param((1, 3, 4, 6, 6, 1, 1), id="N1"),
    pytest.param((2, 2, 3, 3, 5, 2, 2), id="ctx-per-member"),
    pytest.param((2, 3, 3, 4, 4, 0, 1), id="no-context"),
    pytest.param((2, 2, 3, 2, 3, 3, 1), id="all-context"),
]


def _step_inputs(shape, dtype):
    N, C, F, H, W, Fc, Nc = shape
    x = torch.randn(N, C, F, H, W).to(dtype)
    v = torch.randn(N, C, F, H, W).to(dtype)
    context = torch.randn(Nc, C, Fc, H, W).to(dtype)
    return x, v, torch.tensor(-0.137), context


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STEP_CASES)
def test_euler_step_matches_reference(shape, dtype):
    x, v, dt, context = _step_inputs(shape, dtype)
    y = ops.ensemble_euler_step(x, v, dt, context)
    ref = ensemble_euler_step_ref(x.float(), v.float(), dt, context.float())
    lowp = ensemble_euler_step_ref(x, v, dt, context, upcast=False)
    assert_2x_rule(y, ref, lowp, "ensemble_euler_step", dtype)
    Fc = context.shape[2]
    # The context frames are copied exactly (no arithmetic touches them), for every member.
    assert torch.equal(y[:, :, :Fc], context.expand(x.shape[0], -1, -1, -1, -1))


@pytest.mark.parametrize("layout", ["member-slice", "hw-transposed", "float-dt"])
def test_euler_step_strided_inputs(layout):
    x_big, v, dt, context = _step_inputs((6, 3, 4, 5, 5, 2, 1), torch.float32)
    if layout == "member-slice":
        x = x_big[::2]  # strided along N: the kernel reads it through its strides, no copy
        v = v[::2]
        context = torch.randn(1, 6, 2, 5, 5)[:, ::2]  # strided along C
    elif layout == "hw-transposed":
        x, v = x_big.transpose(3, 4), v.transpose(3, 4)  # H and W do not merge: the launcher copies
        context = context.transpose(3, 4)
    else:
        x, dt = x_big, -0.25
    y = ops.ensemble_euler_step(x, v, dt, context)
    ref = ensemble_euler_step_ref(x, v, dt, context)
    assert_2x_rule(y, ref, ref, "ensemble_euler_step (strided)", torch.float32)


MEAN_CASES = [
    pytest.param((1, 3, 5), id="N1-var-zero"),
    pytest.param((5, 3, 7, 11), id="N5-odd"),
    pytest.param((16, 2, 1, 3, 4, 4), id="N16-latents"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MEAN_CASES)
def test_mean_var_matches_reference(shape, dtype):
    # An offset mean (latents and pixels are not centred) is where a sum-of-squares variance would fail.
    x = (torch.randn(shape) * 0.5 + 3.0).to(dtype)
    mean, var = ops.ensemble_mean_var(x)
    ref_m, ref_v = ensemble_mean_var_ref(x.float())
    low_m, low_v = ensemble_mean_var_ref(x, upcast=False)
    assert_2x_rule(mean, ref_m, low_m, "ensemble mean", dtype)
    assert_2x_rule(var, ref_v, low_v, "ensemble var", dtype)
    if shape[0] == 1:
        assert torch.equal(mean, x[0]) and torch.count_nonzero(var) == 0


def test_mean_var_strided_members():
    x = torch.randn(8, 3, 5, 6)[1::3]  # members strided in the batch
    mean, var = ops.ensemble_mean_var(x)
    ref_m, ref_v = ensemble_mean_var_ref(x)
    assert_2x_rule(mean, ref_m, ref_m, "mean (strided)", torch.float32)
    assert_2x_rule(var, ref_v, ref_v, "var (strided)", torch.float32)


def test_torch_backend_matches(force_backend):
    x, v, dt, context = _step_inputs((2, 2, 3, 3, 3, 1, 1), torch.float32)
    y_triton = ops.ensemble_euler_step(x, v, dt, context)
    force_backend("torch")
    torch.testing.assert_close(ops.ensemble_euler_step(x, v, dt, context), y_triton)
    torch.testing.assert_close(ops.ensemble_mean_var(x)[1], ensemble_mean_var_ref(x)[1])


def test_opcheck_and_compile_fullgraph():
    x, v, dt, context = _step_inputs((2, 2, 3, 3, 3, 1, 1), torch.float32)
    torch.library.opcheck(torch.ops.wmfast.ensemble_euler_step.default, (x, v, dt, context))
    torch.library.opcheck(torch.ops.wmfast.ensemble_mean_var.default, (x,))

    def step_then_mean(x, v, dt, context):
        return ops.ensemble_mean_var(ops.ensemble_euler_step(x, v, dt, context))

    compiled = torch.compile(step_then_mean, fullgraph=True, backend="eager")
    for got, want in zip(compiled(x, v, dt, context), step_then_mean(x, v, dt, context)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad, match", [
    ({"x": torch.randn(2, 3, 4, 5)}, "x must be"),
    ({"v": torch.randn(2, 3, 4, 5, 5)}, "v shape"),
    ({"context": torch.randn(3, 3, 1, 5, 6)}, "context must be"),
    ({"context": torch.randn(1, 3, 5, 5, 6)}, "context must be"),
    ({"dt": torch.tensor([0.1, 0.2])}, "dt must hold one value"),
    ({"x": torch.zeros(2, 3, 4, 5, 6, dtype=torch.int32)}, "x must be floating point"),
])
def test_step_validation(bad, match):
    args = {"x": torch.randn(2, 3, 4, 5, 6), "v": torch.randn(2, 3, 4, 5, 6), "dt": -0.1,
                "context": torch.randn(1, 3, 1, 5, 6)}
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.ensemble_euler_step(args["x"], args["v"], args["dt"], args["context"])


def test_mean_var_validation():
    with pytest.raises(ValueError, match="x must be a floating-point"):
        ops.ensemble_mean_var(torch.zeros(3, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"x must be \[N >= 1"):
        ops.ensemble_mean_var(torch.zeros(0, 4))


@pytest.mark.gpu
def test_euler_step_cuda_graph_capture():
    x, v, dt, context = (t.cuda() for t in _step_inputs((8, 48, 6, 32, 32, 2, 1), torch.bfloat16))
    ops.ensemble_euler_step(x, v, dt, context)  # compile the kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.ensemble_euler_step(x, v, dt, context)
    graph.replay()
    torch.testing.assert_close(y.float(), ensemble_euler_step_ref(x.float(), v.float(), dt, context.float()),
                               atol=2e-2, rtol=2e-2)
