"""Step skipping (first-block cache, wmfast.models.wan.step_cache + calibrate_skip_steps) and the regionally
compiled DiT inside the ensemble sampler, on the tiny Wan world model."""
import pytest
import torch

pytest.importorskip("diffusers", reason="the Wan world model is built on diffusers, which cannot be imported here")

from wmfast import ops
from wmfast.inference.ensemble import EnsembleConfig, calibrate_skip_steps, run_sequential, sample_ensemble
from wmfast.models.wan import build_world_model
from wmfast.testing import no_host_reads

STEPS = 6


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    model = build_world_model("tiny", vae=False).eval()
    for block in model.transformer.blocks:  # non-zero state projections: the conditioning matters
        torch.nn.init.normal_(block.state_proj.weight, std=0.02)
    F = model.schedule.num_latents
    context = torch.randn(1, 48, model.schedule.num_context_latents, 4, 4)
    with torch.no_grad():
        cond = model.prepare_conditioning(torch.randn(1, 77, 25))
    return model, context, cond, F


def _cfg(**kw):
    return EnsembleConfig(**{"n": 3, "steps": STEPS, "progress": False, **kw})


def _count_block_calls(model):
    counts = [0] * len(model.transformer.blocks)
    handles = [block.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, block in enumerate(model.transformer.blocks)]
    return counts, handles


@pytest.mark.parametrize("backend", ["torch", None])
def test_skipped_steps_run_only_the_first_block(wan, backend):
    """The DiT body runs on steps - len(skip_steps) steps per chunk: the reduction is exactly the schedule's."""
    model, context, cond, F = wan
    skip = (2, 3)
    counts, handles = _count_block_calls(model)
    try:
        with ops.use_backend(backend):
            sample_ensemble(model, context, cond, F, _cfg(skip_steps=skip, max_batch=2))  # chunks of 2 and 1
    finally:
        for h in handles:
            h.remove()
    chunks = 2
    assert counts == [STEPS * chunks, (STEPS - len(skip)) * chunks]


def test_empty_schedule_and_zero_threshold_change_nothing(wan):
    model, context, cond, F = wan
    with ops.use_backend("torch"):
        assert calibrate_skip_steps(model, context, cond, F, _cfg(), threshold=0.0) == ()
        plain = sample_ensemble(model, context, cond, F, _cfg())
        cache = model.step_cache()
        v_plain = model.velocity(plain, torch.full((1, F), 300.0), cond)
        v_cached = model.velocity(plain, torch.full((1, F), 300.0), cond, cache=cache)  # a full step
    torch.testing.assert_close(v_cached, v_plain, rtol=0, atol=0)
    torch.testing.assert_close(cache.residual.shape[0], plain.shape[0])


def test_a_skipped_step_reuses_the_body_residual(wan):
    """On a skipped step the output is head(first block + the residual of the last full step): with the same
    input twice, the skipped step equals the full one exactly."""
    model, _, cond, F = wan
    x = torch.randn(2, 48, F, 4, 4)
    t = torch.full((1, F), 700.0)
    cache = model.step_cache()
    with ops.use_backend("torch"), torch.no_grad():
        full = model.velocity(x, t, cond, cache=cache)
        cache.skip = True
        skipped = model.velocity(x, t, cond, cache=cache)
        other = model.velocity(x * 0.5, t, cond, cache=cache)  # the residual is reused, not recomputed
        cache.skip = False
        recomputed = model.velocity(x * 0.5, t, cond, cache=cache)
    torch.testing.assert_close(skipped, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, recomputed, atol=1e-4)


def test_skipping_before_a_full_step_is_an_error(wan):
    model, _, cond, F = wan
    cache = model.step_cache()
    cache.skip = True
    with pytest.raises(RuntimeError, match="needs a full step before it"), torch.no_grad():
        model.velocity(torch.randn(1, 48, F, 4, 4), torch.full((1, F), 500.0), cond, cache=cache)


def test_calibration_skips_more_as_the_threshold_rises(wan):
    model, context, cond, F = wan
    with ops.use_backend("torch"):
        schedules = [calibrate_skip_steps(model, context, cond, F, _cfg(), threshold=th)
                     for th in (0.0, 0.05, 0.3, 1e9)]
    sizes = [len(s) for s in schedules]
    assert sizes == sorted(sizes) and sizes[0] == 0
    assert schedules[-1] == tuple(range(1, STEPS - 1))  # never the first nor the last step
    for s in schedules:
        EnsembleConfig(steps=STEPS, skip_steps=s)  # every calibrated schedule is a valid config
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        calibrate_skip_steps(model, context, cond, F, _cfg(), threshold=-1)


def test_skip_schedule_batched_equals_sequential_and_never_syncs(wan):
    """Members stay independent (each has its own cached residual), and the loop reads nothing back."""
    model, context, cond, F = wan
    cfg = _cfg(skip_steps=(2, 4))
    with ops.use_backend("torch"):
        sequential = run_sequential(model, context, cond, F, cfg)
        with no_host_reads():
            batched = sample_ensemble(model, context, cond, F, cfg)
    torch.testing.assert_close(batched, sequential, rtol=1e-5, atol=1e-5)
    plain = sample_ensemble(model, context, cond, F, _cfg())
    assert not torch.allclose(batched, plain)


def test_schedule_is_validated():
    with pytest.raises(ValueError, match=r"skip_steps: steps \[0, 6\] out of range \(1..5"):
        EnsembleConfig(steps=6, skip_steps=(0, 2, 6))

    class Toy:
        def velocity(self, x, t, cond):
            return x

    with pytest.raises(TypeError, match="needs a denoiser with step_cache"):
        sample_ensemble(Toy(), torch.zeros(1, 2, 1, 2, 2), None, 3, EnsembleConfig(n=1, steps=3, skip_steps=(1,),
                                                                                    progress=False))


@pytest.mark.parametrize("backend", ["torch", None])
def test_regional_compile_compiles_once_across_blocks_and_steps(backend):
    """Every block compiled in place (fullgraph), one graph for all blocks, no recompilation over the steps of
    two ensembles (and the skip graph of a cached step does not touch the blocks' compilation); with the fused
    ops (backend None: the custom ops inside the graph) and with diffusers' blocks (torch)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_world_model("tiny", vae=False).eval()
    F = model.schedule.num_latents
    context = torch.randn(1, 48, model.schedule.num_context_latents, 4, 4)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with ops.use_backend(backend), torch.no_grad():
        cond = model.prepare_conditioning(torch.randn(1, 77, 25))
        eager = sample_ensemble(model, context, cond, F, _cfg())
        model.transformer.compile_blocks(backend=counting_backend)
        compiled = sample_ensemble(model, context, cond, F, _cfg())
        sample_ensemble(model, context, cond, F, _cfg(skip_steps=(2, 3), seed=5))
    assert len(graphs) == 1, f"{len(graphs)} compilations for 2 blocks x {2 * STEPS} steps"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def _wan_cuda(dtype):
    torch.manual_seed(0)
    model = build_world_model("tiny", vae=False, device="cuda", dtype=dtype).eval()
    context = torch.randn(1, 48, model.schedule.num_context_latents, 4, 4, device="cuda", dtype=dtype)
    with torch.no_grad():
        cond = model.prepare_conditioning(torch.randn(1, 77, 25, device="cuda", dtype=dtype))
    return model, context, cond, model.schedule.num_latents


@pytest.mark.gpu
def test_cuda_graphs_of_full_and_skipped_steps_equal_eager_gpu():
    model, context, cond, F = _wan_cuda(torch.float32)
    cfg = _cfg(skip_steps=(2, 3), graph=False)
    eager = sample_ensemble(model, context, cond, F, cfg)
    cfg.graph = True
    graphed = sample_ensemble(model, context, cond, F, cfg)
    runner = model._wmfast_step_runners[1][3]
    assert set(runner.graphs) == {False, True}
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    torch.cuda.set_sync_debug_mode("error")  # both graphs cached: the replays never sync
    try:
        again = sample_ensemble(model, context, cond, F, cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(again, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_inductor_compiled_blocks_inside_the_graph_gpu():
    """The blocks compiled by Inductor, captured in the step's CUDA graph: equal to eager in bf16 (2x rule scale),
    one compilation for every block and step."""
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    model, context, cond, F = _wan_cuda(torch.bfloat16)
    eager = sample_ensemble(model, context, cond, F, _cfg(graph=False))
    compiled_graphs = []

    def inductor(gm, example_inputs):
        compiled_graphs.append(gm)
        return compile_fx(gm, example_inputs)

    model.transformer.compile_blocks(backend=inductor)
    graphed = sample_ensemble(model, context, cond, F, _cfg(graph=True))
    sample_ensemble(model, context, cond, F, _cfg(graph=True, seed=3))
    assert len(compiled_graphs) == 1
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=5e-2, atol=5e-2)
    torch._dynamo.reset()


def test_a_runner_state_holds_the_cache_residual(wan):
    """The CUDA-graph check replays a step and then restores what the step changes besides its output: the
    solver's history and the step cache's residual (else a rejected graph's residual would reach the eager
    fallback's next skipped step)."""
    from wmfast.inference.ensemble import _StepRunner
    from wmfast.inference.solvers import UniPCUpdate

    model, context, cond, F = wan
    runner = _StepRunner(model, cond, context, UniPCUpdate(), False, model.step_cache())
    x = torch.randn(2, 48, F, 4, 4)
    runner.reset(x)
    with ops.use_backend("torch"), torch.no_grad():
        runner(x, torch.full((1, F), 900.0), torch.zeros(9))
        saved = runner._state()
        residual = runner.cache.residual.clone()
        runner(x * 2, torch.full((1, F), 500.0), torch.zeros(9))  # another full step rewrites the residual
    assert not torch.equal(runner.cache.residual, residual)
    runner._load_state(saved)
    torch.testing.assert_close(runner.cache.residual, residual, rtol=0, atol=0)
