"""Batched ensemble denoising: N samples of the future as one batch per step, averaged into one prediction.

The winning sampling-track team generates N samples and averages them: PSNR rises with N even as frames blur
(averaging blurs exactly the regions of high uncertainty). wmfast makes that cheap:
- the N members run as one batch per step; everything shared by the members (clean context latents, state
  conditioning, the per-frame timesteps of each step, the empty-prompt cross-attention K/V inside the model)
  is computed once with batch 1 and broadcast (`expand`, stride 0), never copied N times;
- one fused op per step (`wmfast.ops.ensemble_euler_step`) does the Euler update of the whole ensemble and
  re-imposes the clean context latents; one fused op (`ensemble_mean_var`) gives the mean and the spread;
- every member has its own seed (its own generator), so the batched result equals N sequential runs;
- members are split into micro-batches when N * tokens does not fit (`max_batch`, or halving on OOM);
- the step loop has no host syncs (step sizes and timesteps are precomputed device tables); on a GPU the
  step is captured once in a CUDA graph and replayed; the graph stays on the model, so later calls with the
  same conditioning (more seeds, benchmark repeats) replay it without capturing or verifying again.

Solvers (`EnsembleConfig.solver`, wmfast.inference.solvers): "euler" (default) and "unipc". Euler is first
order and stateless, exactly the ODE the flow-matching loss trains (x_t = (1 - s) x0 + s * noise, v = noise - x0);
its update is one fused op. Schedule: s_i = 1 - i / steps, shifted like Wan2.2 TI2V (shift 5: s' = 5 s / (1 + 4 s)),
timestep 1000 s'. UniPC is Wan2.2's default sampler (diffusers' UniPCMultistepScheduler, flow_prediction,
flow_shift 5, order 2, bh2): a predictor-corrector multistep method that reuses the last two x0-predictions
(higher order, meant for fewer steps; whether it gets there on this model is not measured here: no trained
weights). It samples on diffusers' schedule (s from 1 to 1/1000, the same shift, integer timesteps), so it
matches Wan, and runs the same batched, graph-captured step: its per-step coefficients are a device table like
Euler's step sizes, its history three preallocated buffers updated in place.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from wmfast.inference.solvers import EulerUpdate, UniPCUpdate, check_solver, unipc_tables

logger = logging.getLogger("wmfast")
T = TypeVar("T")


class Denoiser(Protocol):
    """What the ensemble sampler needs from a world model (wmfast.models.wan's model implements it)."""

    def prepare_conditioning(self, states: torch.Tensor) -> Any:
        """States [1, T, 25] -> an opaque conditioning object of batch 1, computed once per prediction."""

    def velocity(self, latents: torch.Tensor, timestep_per_frame: torch.Tensor, cond: Any) -> torch.Tensor:
        """latents [B, C, F', H', W'], timesteps [1 or B, F'] in [0, 1000] (0 = clean), cond of batch 1
        (both broadcast to B) -> predicted flow velocity [B, C, F', H', W']."""


@dataclass
class EnsembleConfig:
    n: int = 8                     # ensemble size N
    steps: int = 50                # denoising steps (model evaluations)
    shift: float = 5.0             # Wan2.2 TI2V flow shift
    seed: int = 0                  # member i uses seed + i unless seeds are given
    max_batch: int | None = None   # members per forward; None: all N, halved automatically on OOM
    graph: bool | None = None      # CUDA-graph capture of the step; None: on when the latents are on a GPU
    fused: bool = True             # Euler: the fused sampler op (False: unfused torch update, for benchmarks)
    progress: bool = True          # tqdm bar over steps
    solver: str = "euler"          # "euler" (wmfast's schedule) or "unipc" (Wan2.2's default, diffusers' schedule)
    # Steps whose DiT body is skipped (the first block runs, the rest reuses the last full step's residual;
    # calibrate_skip_steps picks them). Needs a denoiser with step_cache() (the Wan world model).
    skip_steps: tuple[int, ...] = ()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checked at construction and again by sample_ensemble (a config can be changed after construction)."""
        check_solver(self.solver, "EnsembleConfig.solver")
        bad = [s for s in self.skip_steps if not 0 < s < self.steps]
        if bad:
            raise ValueError(f"EnsembleConfig.skip_steps: steps {bad} out of range (1..{self.steps - 1}: the first step "
                             "always runs the whole DiT)")


def flow_schedule(steps: int, shift: float, num_frames: int, num_context: int, device) -> tuple[torch.Tensor, ...]:
    """Device tables for the whole loop (built once, so the loop never touches the host).

    Returns (timesteps [steps, F'] with 0 on the context frames and 1000 * s'_i elsewhere,
    dts [steps] = s'_{i+1} - s'_i < 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    t = (1000.0 * s[:-1]).float()[:, None].repeat(1, num_frames)
    t[:, :num_context] = 0.0
    return t.to(device), (s[1:] - s[:-1]).float().to(device)


def member_noise(shape: Sequence[int], seeds: Sequence[int], device, dtype) -> torch.Tensor:
    """[len(seeds), *shape] standard normal noise; member i drawn from its own generator seeded seeds[i], so a
    member's noise does not depend on the batch it runs in."""
    out = torch.empty((len(seeds), *shape), device=device, dtype=dtype)
    for i, seed in enumerate(seeds):
        g = torch.Generator(device=device).manual_seed(int(seed))
        out[i] = torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32).to(dtype)
    return out


def solver_tables(cfg: EnsembleConfig, num_frames: int, num_context: int, device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps, F'], per-step rows: Euler's step sizes [steps], UniPC's coefficients [steps, 9])."""
    if cfg.solver == "unipc":
        return unipc_tables(cfg.steps, cfg.shift, num_frames, num_context, device, UniPCUpdate.compute_dtype(dtype))
    return flow_schedule(cfg.steps, cfg.shift, num_frames, num_context, device)


def _make_update(cfg: EnsembleConfig):
    return UniPCUpdate() if cfg.solver == "unipc" else EulerUpdate(cfg.fused)


class _StepRunner:
    """One denoising step for a micro-batch: eager, or captured once in a CUDA graph and replayed.

    `update` is the solver's step (wmfast.inference.solvers): `row` is its per-step table row (Euler: dt;
    UniPC: the coefficients), and a stateful solver's history lives in buffers the update owns, so the graph
    reads and writes them in place."""

    def __init__(self, model: Denoiser, cond, context, update, graph: bool, cache=None):
        self.model, self.cond, self.context, self.update, self.cache = model, cond, context, update, cache
        self.graph_enabled, self.graphs = graph, {}  # one graph per kind of step: full, skipped (cache.skip)
        self.static_x = self.static_t = self.static_row = None

    @property
    def graph(self):
        return self.graphs.get(False)

    def _state(self):
        """What a step changes besides its output: the solver's history and the step cache's residual."""
        return self.update.state(), None if self.cache is None else self.cache.state()

    def _load_state(self, state) -> None:
        self.update.load_state(state[0])
        if self.cache is not None:
            self.cache.load_state(state[1])

    def reset(self, x):
        """Before the first step of a chunk: the solver's history starts empty (a device op, no sync)."""
        self.update.reset(x)
        if self.cache is not None:
            self.cache.reset()

    def eager(self, x, t_row, row):
        # t_row: [1, F'], passed with batch 1: the model computes the per-frame timestep modulation once and
        # broadcasts it to the members (as it does the batch-1 conditioning).
        if self.cache is None:
            v = self.model.velocity(x, t_row, self.cond)
        else:
            v = self.model.velocity(x, t_row, self.cond, cache=self.cache)
        return self.update(x, v, row, self.context)

    def __call__(self, x, t_row, row, skip: bool = False):
        if self.cache is not None:
            self.cache.skip = skip
        if not self.graph_enabled:
            return self.eager(x, t_row, row)
        if skip not in self.graphs:
            return self._warm_up_and_capture(x, t_row, row, skip)
        self.static_x.copy_(x)  # device-to-device copies into the graph's input buffers: no host sync
        self.static_t.copy_(t_row)
        self.static_row.copy_(row)
        self.graphs[skip].replay()
        return self.static_y  # the next call copies it into static_x; the caller copies the last one out

    def _warm_up_and_capture(self, x, t_row, row, skip):
        """Run this step eagerly (its result is the step's output: warm-up costs nothing extra), capture it,
        and replay once on the same inputs and the same solver state to check the graph against the eager
        result (one host sync per micro-batch size and kind of step, before the graph is used); the solver's
        state is then the eager step's. Every graph of the runner reads the same input buffers and writes the
        same output. Any failure falls back to eager, logged once."""
        if self.static_x is None:
            self.static_x, self.static_t, self.static_row = x.clone(), t_row.clone(), row.clone()
        else:
            self.static_x.copy_(x)
            self.static_t.copy_(t_row)
            self.static_row.copy_(row)
        before = self._state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graphs recommends
            y = self.eager(self.static_x, self.static_t, self.static_row)
        torch.cuda.current_stream().wait_stream(stream)
        after = self._state()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.eager(self.static_x, self.static_t, self.static_row)
                if self.graphs:  # a second kind of step: its output lands where the first graph's does
                    self.static_y.copy_(out)
            if not self.graphs:
                self.static_y = out
            self._load_state(before)
            graph.replay()
            tol = 1e-4 if y.dtype == torch.float32 else 3e-2  # same kernels; bf16 only rounds differently
            if not torch.allclose(self.static_y.float(), y.float(), atol=tol, rtol=tol):
                raise RuntimeError("the replayed step differs from the eager step")
            self.graphs[skip] = graph
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly, and say why
            logger.info(f"wmfast: CUDA-graph capture of the sampling step failed ({e}); running eagerly")
            self.graph_enabled, self.graphs = False, {}
        finally:
            self._load_state(after)
        return y


_RUNNERS_ATTR = "_wmfast_step_runners"


def _cached_runners(model, cond, context, shape, dtype, options: tuple) -> dict:
    """The step runners (one per micro-batch size) kept on the model between calls, so a CUDA graph is captured
    and verified once per key, not once per call. A captured graph reads the conditioning, the context and the
    weights at their addresses, so the key holds the identities of cond and context (the runners keep both
    alive: an id cannot be reused while cached), the first parameter's address (model.to() moves the weights)
    and the shapes, dtype and options (solver, fused, graph). Only the latest key is kept: a new conditioning (the
    next sample) drops the old graphs and their memory."""
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    key = (id(cond), id(context), tuple(shape), dtype, context.device, options,
           first.data_ptr() if first is not None else None)
    cache = getattr(model, _RUNNERS_ATTR, None)
    if cache is None or cache[0] != key:
        cache = (key, {})
        try:
            setattr(model, _RUNNERS_ATTR, cache)
        except AttributeError:  # a denoiser that takes no attributes: runners live for this call only
            pass
    return cache[1]


def drop_cached_runners(model) -> None:
    """Free the step runners (CUDA graphs, their memory pools, static buffers) cached on the model: after the
    last sampling call with a conditioning (a new one never reuses them)."""
    if getattr(model, _RUNNERS_ATTR, None) is not None:
        setattr(model, _RUNNERS_ATTR, None)


def halving_on_oom(attempt: Callable[[int], T], batch: int, what: str, cleanup: Callable[[], None] | None = None) -> T:
    """attempt(batch), retried with half the batch (rounded up) while CUDA runs out of memory, down to 1 (then the
    error propagates); `cleanup` drops what the failed attempt cached. One log line per retry."""
    while True:
        try:
            return attempt(batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # outside the except block, so that the failed attempt's tensors (held by the traceback) are freed first
        batch = (batch + 1) // 2
        if cleanup is not None:
            cleanup()
        torch.cuda.empty_cache()
        logger.info(f"wmfast: {what} does not fit; retrying with micro-batches of {batch}")


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()  # sampling is forward only: no autograd graph over the steps
def sample_ensemble(model: Denoiser, context_latents: torch.Tensor, cond: Any, num_latent_frames: int,
                    cfg: EnsembleConfig, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Denoise N members conditioned on the same clean context; returns the final latents [N, C, F', H', W'].

    context_latents: [1, C, Fc, H', W'] clean latents of the context frames (Fc < F' = num_latent_frames);
    cond: model.prepare_conditioning(states) (batch 1, reused by every step and every member)."""
    if context_latents.dim() != 5 or context_latents.shape[0] != 1:
        raise ValueError(f"context_latents must be [1, C, Fc, H', W'], got shape {tuple(context_latents.shape)}")
    _, C, Fc, H, W = context_latents.shape
    if not 0 < Fc < num_latent_frames:
        raise ValueError(f"num_latent_frames ({num_latent_frames}) must exceed the context's {Fc} latent frames")
    if cfg.n < 1 or (cfg.max_batch is not None and cfg.max_batch < 1):
        raise ValueError(f"n ({cfg.n}) and max_batch ({cfg.max_batch}) must be >= 1")
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(cfg.n)]
    if len(seeds) != cfg.n:
        raise ValueError(f"seeds has {len(seeds)} entries for an ensemble of n={cfg.n}")
    cfg.validate()  # again: a config can be changed after construction
    if cfg.skip_steps:
        _need_step_cache(model)
    device, dtype = context_latents.device, context_latents.dtype
    timesteps, rows = solver_tables(cfg, num_latent_frames, Fc, device, dtype)
    graph = device.type == "cuda" if cfg.graph is None else cfg.graph
    shape = (C, num_latent_frames, H, W)
    return halving_on_oom(
        lambda batch: _sample_in_chunks(model, context_latents, cond, shape, seeds, batch, timesteps, rows, cfg,
                                        graph, dtype),
        min(cfg.max_batch or cfg.n, cfg.n), f"ensemble of {cfg.n}", lambda: drop_cached_runners(model))


def _sample_in_chunks(model, context, cond, shape, seeds, batch, timesteps, rows, cfg, graph, dtype):
    device = context.device
    out = torch.empty((len(seeds), *shape), device=device, dtype=dtype)
    parts = chunks(len(seeds), batch)
    bar = tqdm(total=cfg.steps * len(parts), desc=f"ensemble N={len(seeds)} (micro-batch {batch})",
               disable=not cfg.progress, leave=False)
    cached = bool(cfg.skip_steps)
    runners = _cached_runners(model, cond, context, shape, dtype, (cfg.solver, cfg.fused, graph, cached))
    skipped = set(cfg.skip_steps)
    skip = [i in skipped for i in range(cfg.steps)]
    for idx in parts:
        members = [seeds[i] for i in idx]
        x = _start(shape, members, context)
        if len(members) not in runners:
            runners[len(members)] = _StepRunner(model, cond, context, _make_update(cfg), graph,
                                                model.step_cache() if cached else None)
        runner = runners[len(members)]
        runner.reset(x)
        for i in range(cfg.steps):
            x = runner(x, timesteps[i : i + 1], rows[i], skip[i])
            bar.update(1)
        out[idx.start : idx.stop] = x
    bar.close()
    return out


def _start(shape, seeds, context) -> torch.Tensor:
    """The members' first latents: clean context frames, pure noise after them."""
    x = member_noise(shape, seeds, context.device, context.dtype)
    x[:, :, : context.shape[2]] = context
    return x


def run_sequential(model: Denoiser, context_latents, cond, num_latent_frames: int, cfg: EnsembleConfig,
                   seeds: Sequence[int] | None = None) -> torch.Tensor:
    """The baseline: N independent single-sample runs (same seeds), stacked [N, C, F', H', W']."""
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(cfg.n)]
    one = EnsembleConfig(**{**cfg.__dict__, "n": 1, "max_batch": 1})
    return torch.cat([sample_ensemble(model, context_latents, cond, num_latent_frames, one, [s]) for s in seeds])


@torch.no_grad()
def calibrate_skip_steps(model, context_latents: torch.Tensor, cond, num_latent_frames: int, cfg: EnsembleConfig,
                         threshold: float, seed: int | None = None) -> tuple[int, ...]:
    """The steps a first-block cache skips at `threshold`, measured on one member (seed: cfg.seed) denoised
    eagerly with `cfg`'s solver and steps; the schedule then serves the whole ensemble (cfg.skip_steps).

    TeaCache's rule on ParaAttention's probe: the relative L1 change of the first block's residual since the
    previous step accumulates over the steps; a step whose accumulated change is below `threshold` skips the
    rest of the DiT, a step at or above it runs every block and resets the sum. The first and the last step
    always run every block. threshold 0 skips nothing. One host read per step: calibration only."""
    check_cache_threshold(threshold, "the step-cache threshold")
    _need_step_cache(model)
    _, C, Fc, H, W = context_latents.shape
    device, dtype = context_latents.device, context_latents.dtype
    timesteps, rows = solver_tables(cfg, num_latent_frames, Fc, device, dtype)
    x = _start((C, num_latent_frames, H, W), [cfg.seed if seed is None else seed], context_latents)
    skipped, total = [], 0.0

    def decide(change) -> bool:  # reads the loop's step i
        nonlocal total
        if change is None or i in (0, cfg.steps - 1):
            total = 0.0
            return False
        total += float(change)
        if total < threshold:
            skipped.append(i)
            return True
        total = 0.0
        return False

    runner = _StepRunner(model, cond, context_latents, _make_update(cfg), False, model.step_cache(decide))
    runner.reset(x)
    for i in range(cfg.steps):
        x = runner(x, timesteps[i : i + 1], rows[i])  # eager; the cache's decide sets skip
    return tuple(skipped)


def check_cache_threshold(value: float, name: str) -> float:
    """A step-cache threshold: a number >= 0 (NaN refused: it would compare false and skip nothing)."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _need_step_cache(model) -> None:
    if not callable(getattr(model, "step_cache", None)):
        raise TypeError(f"step skipping needs a denoiser with step_cache(); {type(model).__name__} has none")
