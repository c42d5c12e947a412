"""wmfast.inference.Generator: static buffers and one CUDA graph of a whole greedy rollout; precision scopes."""
import pytest
import torch

from wmfast.bench.memory import DispatchObserver
from wmfast.inference import Generator, precision_scope
from wmfast.ops.dispatch import use_backend


class _NewShapes(DispatchObserver):
    """The shapes of the tensors aten ops create inside it (views and in-place results excluded)."""

    def __init__(self):
        self.shapes = []

    def _seen(self, func, out, input_keys):
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_keys:
                self.shapes.append(tuple(t.shape))


@use_backend("torch")  # the Generator's bookkeeping; the kernels' tokens are test_cache_matches_recompute's
def test_generator_matches_generate_and_allocates_once(tiny_st, st_inputs):
    """The Generator (no graph on the CPU): same tokens as generate(); its cache and input buffers are made once,
    so a second call allocates no cache-sized tensor (the eager generate() allocates a new cache every call)."""
    model = tiny_st()
    ctx, states = st_inputs()
    expected = model.generate(ctx, states)
    gen = Generator(model, 2)
    assert torch.equal(gen(ctx, states), expected)
    ptrs = [t.data_ptr() for t in gen._cache.k]
    cache_shape = tuple(gen._cache.k[0].shape)
    with _NewShapes() as second:
        assert torch.equal(gen(ctx, states), expected)
    assert [t.data_ptr() for t in gen._cache.k] == ptrs and cache_shape not in second.shapes
    with _NewShapes() as eager:
        model.generate(ctx, states)
    assert eager.shapes.count(cache_shape) == 2 * model.config.num_layers
    # generate(graph=True) keeps one Generator per setting on the model
    assert torch.equal(model.generate(ctx, states, graph=True), expected)
    assert model.generate(ctx.flatten(2)[:1], states[:1], graph=True).shape == (1, 3, 64)
    assert len(model._wmfast_generators) == 2


@use_backend("torch")
def test_generator_bf16_follows_the_model_weights(tiny_st, st_inputs):
    model = tiny_st()
    ctx, states = st_inputs()
    gen = Generator(model, 2, precision="bf16")
    assert gen.model is not model and next(gen.model.parameters()).dtype == torch.bfloat16
    first = gen(ctx, states)
    assert (first == model.generate(ctx, states)).float().mean() > 0.5  # random tiny model: bf16 flips near-ties
    with torch.no_grad():
        model.tok_emb.weight.copy_(torch.roll(model.tok_emb.weight, 1, 0))  # an in-place update (optimizer step)
    assert torch.equal(gen(ctx, states), Generator(model, 2, precision="bf16")(ctx, states))
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


@use_backend("torch")
def test_generator_follows_data_writes_and_dtype_moves(tiny_st, st_inputs):
    """A `.data` write moves no version counter: the bf16 copy keeps the old weights until sync_weights(). A model
    cast to another dtype is seen at the next call (the Generator rebuilds, here refusing float64)."""
    model = tiny_st()
    ctx, states = st_inputs()
    gen = Generator(model, 2, precision="bf16")
    before = gen(ctx, states)
    model.tok_emb.weight.data.copy_(torch.roll(model.tok_emb.weight.data, 1, 0))
    assert torch.equal(gen(ctx, states), before)  # documented: not seen
    gen.sync_weights()
    assert torch.equal(gen(ctx, states), Generator(model, 2, precision="bf16")(ctx, states))
    fp32 = Generator(model, 2)
    model.double()
    with pytest.raises(ValueError, match="parameters are torch.float64"):
        fp32(ctx, states)
    model.float()
    assert torch.equal(fp32(ctx, states), model.generate(ctx, states))


@use_backend("torch")
def test_generator_ignores_callers_autocast_and_inference_mode(tiny_st, st_inputs):
    model = tiny_st()
    ctx, states = st_inputs()
    expected = model.generate(ctx, states)
    with torch.inference_mode():
        gen = Generator(model, 2)  # buffers made here must stay writable outside inference mode
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gen(ctx, states), expected)
    assert torch.equal(gen(ctx, states), expected)


@use_backend("torch")
def test_cached_generators_are_not_copied_or_pickled(tiny_st, st_inputs, tmp_path):
    import copy
    import io

    model = tiny_st()
    ctx, states = st_inputs()
    model.generate(ctx, states, graph=True)
    assert len(model._wmfast_generators) == 1
    assert len(copy.deepcopy(model)._wmfast_generators) == 0
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert len(torch.load(buffer, weights_only=False)._wmfast_generators) == 0
    Generator.release(model)
    assert not hasattr(model, "_wmfast_generators")


def test_generator_bad_arguments(tiny_st, st_inputs):
    model = tiny_st()
    ctx, states = st_inputs()
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16"):
        Generator(model, 2, precision="fp16")
    with pytest.raises(ValueError, match="batch 2"):
        Generator(model, 2)(ctx[:1], states[:1])
    with pytest.raises(ValueError, match="graph=True needs the model on a CUDA device"):
        Generator(model, 2, graph=True)
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            Generator(model, bad)
    with pytest.raises(ValueError, match="num_frames must be an int >= 1"):
        Generator(model, 2, num_frames=True)
    with pytest.raises(ValueError, match="return_logits"):
        model.generate(ctx, states, graph=True, return_logits=True)
    with pytest.raises(ValueError, match="Generator setting"):
        model.generate(ctx, states, precision="bf16")


def test_precision_scope_sets_and_restores():
    from wmfast.kernels._launch import fp32_dot_precision

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with precision_scope("tf32"):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        assert fp32_dot_precision() == "tf32"
    with precision_scope("fp32"):
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        assert fp32_dot_precision() == "ieee"
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
def test_precision_scope_with_the_per_backend_api():
    """A process that set torch.backends.cuda.matmul.fp32_precision (after which the legacy getter raises): the
    scope and the kernels' precision read and write that API."""
    from wmfast.kernels._launch import fp32_dot_precision

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        with precision_scope("tf32"):
            assert (matmul.fp32_precision, conv.fp32_precision, fp32_dot_precision()) == ("tf32", "tf32", "tf32")
        assert matmul.fp32_precision == "ieee" and fp32_dot_precision() == "ieee"
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
    torch.get_float32_matmul_precision()  # the legacy API works again


@pytest.mark.gpu
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
def test_cuda_graph_rollout_matches_eager_without_host_sync(tiny_st, st_inputs, use_cache):
    """generate(graph=True): the whole rollout captured once (first call) and replayed; in fp32 the tokens equal
    the eager path's, and a replay does not sync the host."""
    model = tiny_st().cuda()
    ctx, states = (x.cuda() for x in st_inputs())
    eager = model.generate(ctx, states, use_cache=use_cache)
    assert torch.equal(model.generate(ctx, states, use_cache=use_cache, graph=True), eager)  # captures
    gen = Generator.cached(model, 2, num_frames=3, context_frames=3, precision="fp32", use_cache=use_cache)
    graph = gen._graph
    assert graph is not None
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the call raises
    try:
        for _ in range(2):
            replayed = model.generate(ctx, states, use_cache=use_cache, graph=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(replayed, eager) and gen._graph is graph  # replayed, not captured again
    ctx2, states2 = (x.cuda() for x in st_inputs(seed=5))  # new inputs flow through the static buffers
    assert torch.equal(model.generate(ctx2, states2, use_cache=use_cache, graph=True),
                       model.generate(ctx2, states2, use_cache=use_cache))


@pytest.mark.gpu
def test_cuda_graph_precisions_weight_updates_and_moves(tiny_st, st_inputs):
    """tf32 and bf16 graphs run; a captured bf16 graph follows in-place weight updates; fp32 parameters moved to
    other memory are captured again."""
    model = tiny_st().cuda()
    ctx, states = (x.cuda() for x in st_inputs())
    eager = model.generate(ctx, states)
    for precision in ("tf32", "bf16"):
        out = model.generate(ctx, states, graph=True, precision=precision)
        assert out.shape == eager.shape and (out == eager).float().mean() > 0.5
    gen = Generator(model, 2, precision="bf16")
    before = gen(ctx, states)
    with torch.no_grad():
        model.tok_emb.weight.copy_(torch.roll(model.tok_emb.weight, 1, 0))
    assert torch.equal(gen(ctx, states), Generator(model, 2, precision="bf16")(ctx, states))
    assert not torch.equal(gen(ctx, states), before)
    fp32 = Generator(model, 2)
    fp32(ctx, states)
    graph = fp32._graph
    model.cpu().cuda()  # new parameter memory: the old graph would read freed memory
    assert torch.equal(fp32(ctx, states), model.generate(ctx, states)) and fp32._graph is not graph
