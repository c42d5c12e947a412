"""The ensemble sampler's solvers (wmfast.inference.solvers): UniPC against diffusers' UniPCMultistepScheduler
configured as Wan2.2's, batched == sequential, no host sync in the step loop, and the config's validation."""
import math

import pytest
import torch

from wmfast.inference.ensemble import EnsembleConfig, member_noise, run_sequential, sample_ensemble
from wmfast.inference.solvers import UNIPC_COLUMNS, UniPCUpdate, unipc_coefficients, unipc_orders, unipc_sigmas
from wmfast.testing import no_host_reads

C, FC, F, H, W = 3, 2, 5, 4, 3


class NonlinearToy:
    """A velocity nonlinear in x and in t (channel mixing through tanh, a t-dependent gain and a quadratic
    term), plus the batch-1 conditioning; any float dtype. Records the timesteps it is called with."""

    def __init__(self, dtype=torch.float64):
        g = torch.Generator().manual_seed(3)
        self.mix = (torch.randn(C, C, generator=g) * 0.7).to(dtype)
        self.calls = []

    def prepare_conditioning(self, states):
        return states[:, :, :C].mean(1)  # [1, C]

    def velocity(self, latents, timestep_per_frame, cond):
        self.calls.append(timestep_per_frame.clone())
        t = timestep_per_frame.to(latents.dtype)[:, None, :, None, None] / 1000.0
        h = torch.einsum("ncfhw,dc->ndfhw", latents, self.mix)
        return torch.tanh(h) * (1 + 2 * t) + 0.2 * torch.sin(3 * t) * latents ** 2 + cond[:, :, None, None, None]


def _setup(dtype=torch.float64, n=2, steps=5):
    model = NonlinearToy(dtype)
    g = torch.Generator().manual_seed(4)
    context = torch.randn(1, C, FC, H, W, generator=g).to(dtype)
    cond = model.prepare_conditioning(torch.randn(1, 6, 25, generator=g).to(dtype))
    return model, context, cond, EnsembleConfig(n=n, steps=steps, progress=False, solver="unipc")


def wan_unipc_scheduler():
    """diffusers' UniPC with Wan2.2-TI2V-5B's scheduler config (every key written out, defaults included)."""
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
        final_sigmas_type="zero", timestep_spacing="linspace", thresholding=False)


def diffusers_loop(model, context, cond, steps, seeds, dtype, sigmas_fp64=False):
    """Wan's denoising loop with diffusers' scheduler, the clean context re-imposed after every step as wmfast
    does. Returns (final latents, the timestep rows given to the model)."""
    sched = wan_unipc_scheduler()
    sched.set_timesteps(steps)
    if sigmas_fp64:  # the same sigma values, diffusers' coefficient arithmetic in fp64
        sched.sigmas = sched.sigmas.double()
    x = member_noise((C, F, H, W), seeds, "cpu", dtype)
    x[:, :, :FC] = context
    rows = []
    for t in sched.timesteps:
        t_row = torch.full((1, F), float(t))  # Wan's per-token timestep: mask * t, 0 on the context frames
        t_row[:, :FC] = 0
        rows.append(t_row)
        v = model.velocity(x, t_row, cond)
        x = sched.step(v, t, x).prev_sample.clone()
        x[:, :, :FC] = context
    return x, rows


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 50])
def test_unipc_matches_diffusers_wan_scheduler(steps):
    model, context, cond, cfg = _setup(steps=steps)
    ours = sample_ensemble(model, context, cond, F, cfg, seeds=[5, 6])
    our_t, model.calls = model.calls, []
    exact, ref_t = diffusers_loop(model, context, cond, steps, [5, 6], torch.float64, sigmas_fp64=True)
    model.calls = []
    stock, _ = diffusers_loop(model, context, cond, steps, [5, 6], torch.float64)
    assert len(our_t) == steps and all(torch.equal(a, b) for a, b in zip(our_t, ref_t))  # integer timesteps
    assert torch.isfinite(ours).all()
    # Same sigmas, same algebra: fp64 agreement. diffusers computes its coefficients from fp32 sigma tensors,
    # wmfast in fp64 from the same values: stock diffusers differs by that fp32 rounding only.
    torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours, stock, rtol=2e-5, atol=2e-5)
    assert torch.equal(ours[:, :, :FC], context.expand(2, -1, -1, -1, -1))


def test_unipc_fp32_latents_match_diffusers():
    model, context, cond, cfg = _setup(dtype=torch.float32, steps=10)
    ours = sample_ensemble(model, context, cond, F, cfg, seeds=[1, 2])
    stock, _ = diffusers_loop(model, context, cond, 10, [1, 2], torch.float32)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


def test_unipc_schedule_is_diffusers():
    sched = wan_unipc_scheduler()
    for steps in (1, 4, 50):
        sched.set_timesteps(steps)
        sigmas, timesteps = unipc_sigmas(steps, 5.0)
        assert torch.equal(torch.from_numpy(sigmas).float(), sched.sigmas)
        assert torch.equal(torch.from_numpy(timesteps).long(), sched.timesteps)
    assert timesteps[0] == 999 and sigmas[-1] == 0


def test_missing_terms_are_zero_coefficients():
    """One code path for every step: no corrector at step 0, order 1 first and last, order 2 in between."""
    steps = 6
    coefs = unipc_coefficients(unipc_sigmas(steps, 5.0)[0])
    col = {name: coefs[:, j] for j, name in enumerate(UNIPC_COLUMNS)}
    assert unipc_orders(steps) == [1, 2, 2, 2, 2, 1]
    assert col["cs"][0] == 1 and (col["cs"][1:] == 0).all()
    assert col["cl"][0] == col["c0"][0] == col["c1"][0] == col["c2"][0] == 0
    assert col["c2"][1] == 0 and (col["c2"][2:] != 0).all()  # the corrector after an order-1 predictor
    assert col["p1"][0] == 0 and col["p1"][-1] == 0 and (col["p1"][1:-1] != 0).all()
    assert col["px"][-1] == 0 and col["p0"][-1] == 1  # the last step lands on its x0-prediction
    # Consistency: a constant x0-prediction is reproduced exactly (the coefficients of m sum to 1 - px).
    assert all(math.isclose(p0 + p1 + px, 1.0, abs_tol=1e-12) for p0, p1, px in zip(col["p0"], col["p1"], col["px"]))


@pytest.mark.parametrize("max_batch", [None, 1])
def test_unipc_batched_equals_sequential(max_batch):
    model, context, cond, cfg = _setup(dtype=torch.float32, n=3, steps=4)
    cfg.max_batch = max_batch
    batched = sample_ensemble(model, context, cond, F, cfg)
    torch.testing.assert_close(batched, run_sequential(model, context, cond, F, cfg), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(batched[0], batched[1])


def test_history_reset_for_every_chunk():
    """The cached runner's history buffers are zeroed before each chunk: stale (even NaN) history from an
    earlier call changes nothing."""
    model, context, cond, cfg = _setup(n=2, steps=3)
    first = sample_ensemble(model, context, cond, F, cfg)
    runner = model._wmfast_step_runners[1][2]
    assert isinstance(runner.update, UniPCUpdate)
    for buf in (runner.update.m1, runner.update.m2, runner.update.last):
        buf.fill_(float("nan"))
    torch.testing.assert_close(sample_ensemble(model, context, cond, F, cfg), first, rtol=0, atol=0)


def test_solvers_differ_and_euler_keeps_its_schedule():
    model, context, cond, cfg = _setup(n=1, steps=4)
    unipc = sample_ensemble(model, context, cond, F, cfg)
    unipc_t, model.calls = model.calls, []
    cfg.solver = "euler"
    euler = sample_ensemble(model, context, cond, F, cfg)
    assert not torch.allclose(unipc, euler)
    assert model.calls[0][0, -1] == 1000.0 and unipc_t[0][0, -1] == 999.0  # wmfast's vs diffusers' schedule


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_step_loop_makes_no_host_sync(solver):
    """No tensor is read back to the host while sampling (tables are built before the loop)."""
    model, context, cond, cfg = _setup(dtype=torch.float32, n=2, steps=4)
    cfg.solver = solver

    with no_host_reads():
        out = sample_ensemble(model, context, cond, F, cfg)
    assert torch.isfinite(out).all()


def test_solver_is_validated():
    with pytest.raises(ValueError, match=r"EnsembleConfig.solver must be one of euler, unipc, got 'heun'"):
        EnsembleConfig(solver="heun")
    model, context, cond, cfg = _setup()
    cfg.solver = "dpm"  # changed after construction: sample_ensemble checks again
    with pytest.raises(ValueError, match="EnsembleConfig.solver"):
        sample_ensemble(model, context, cond, F, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_cuda_graph_equals_eager_and_steps_never_sync(monkeypatch, solver):
    from wmfast.inference import ensemble

    model, context, cond, cfg = _setup(dtype=torch.float32, n=3, steps=6)
    model.mix, context, cond = model.mix.cuda(), context.cuda(), cond.cuda()
    cfg.solver, cfg.graph = solver, False
    eager = sample_ensemble(model, context, cond, F, cfg)
    cfg.graph = True
    graphed = sample_ensemble(model, context, cond, F, cfg)  # captures, verifies (one sync), replays
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)
    assert model._wmfast_step_runners[1][3].graph is not None
    step = ensemble._StepRunner.__call__

    def no_sync_step(self, *args):  # the cached graph replays every step: a sync raises
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(ensemble._StepRunner, "__call__", no_sync_step)
    torch.testing.assert_close(sample_ensemble(model, context, cond, F, cfg), eager, atol=1e-5, rtol=1e-5)
