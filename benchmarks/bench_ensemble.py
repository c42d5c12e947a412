"""Ensemble sampling latency: N members as one batch vs N sequential runs, with and without the fused kernels and
the conditioning reuse, and the MFU of the DiT forward.

Shapes: the real-size Wan2.2 TI2V-5B DiT (random weights: timing only) at 512x512 with the default frame schedule
(stride 3: 7 latent frames = 2 clean context + 5 denoised, 32x32 latents, 1792 tokens per member), N in
{1, 2, 4, 8, 16}, a fixed number of denoising steps (Euler; UniPC for batched-unipc). `--quick`: the tiny preset on the CPU (CI smoke test).

Providers (op "ensemble_sample", one row per N; mode "fwd"):
- batched:           N members per forward, fused sampler op + fused DiT blocks, conditioning computed once
                     (state modulation, per-frame timestep modulation and text K/V broadcast from batch 1),
                     CUDA-graph step on a GPU;
- sequential:        N runs of one member (max_batch=1), otherwise as batched;
- batched-unfused:   diffusers' unfused DiT blocks (per-token fp32 modulation) and the unfused sampler update;
- batched-no-reuse:  the state conditioning and text K/V recomputed every step with batch N (copies), the
                     timestep fed per member: what a straightforward batched loop does;
- batched-unipc:     as batched, with the UniPC solver (Wan2.2's default) instead of Euler, at the same steps: the
                     cost of its unfused torch update and history buffers (full profile only).
The ensemble_sample rows carry steps x the DiT forward FLOPs at batch N (the useful work of every provider).
Without CUDA the kernels run under TRITON_INTERPRET=1 (set here unless already set): CPU rows compare the
kernels' code paths, not speed.
Op "dit_forward": one velocity call at batch N, with its FLOPs: the row's fraction_of_ceiling is the fraction of
the bf16 matmul ceiling measured in the same run, and the log line adds the MFU (model FLOP/s over the datasheet
dense bf16 peak, wmfast.train.runlog.mfu: the same MFU as the training log and bench_train).
--profile lease: 2 real-width blocks, N in {1, 2, 4, 8}, 2 Euler steps, batched and sequential only.
Targets on an H100: per-sample cost at N=8 <= 0.8x the N=1 cost; N=8 batched >= 1.25x faster than sequential.

Latency section (op "ensemble_predict"; wmfast.bench.ensemble_latency, whose docstring has the details): seconds
per averaged prediction end to end (wmfast.inference.predict.predict_sample as `wmfast sample` runs it) with the full
30-layer TI2V-5B DiT and the TI2V-5B VAE (random weights, bf16) at 512x512, N in {1, 2, 4, 8, 16}, 10 Euler steps,
one warm-up and 3 timed predictions per N (medians). Rows per N: mode "e2e" (with the peak memory above the weights)
and one per phase ("conditioning", "denoise", "decode", "average"); the denoise row carries steps x dit_flops(N), so
its fraction_of_ceiling is floor / denoise. Then the largest N whose denoising step fits as one batch (N = 16, 32,
64 while the budget allows), and the variants at N = 1 and 8: latent averaging only, the step cache, the compiled
DiT, the compiled DiT with fp8 GEMMs. Writes bench_ensemble_latency.md and plot_ensemble-latency.png (stacked
seconds per N, the floor marked). --profile lease: first, N in {1, 8}, one timed prediction each, no variants, only
when ctx.can_afford the estimated LEASE_LATENCY_S; --quick / no GPU: the tiny preset, N in {1, 2}, 1 step.

Sections: WMFAST_BENCH_ENSEMBLE_SECTIONS=sampling,latency (default: both; script_main takes no extra arguments).
The full-scale latency table alone, on a GPU:
    WMFAST_BENCH_ENSEMBLE_SECTIONS=latency python benchmarks/bench_ensemble.py --out DIR
"""
from __future__ import annotations

import os

import torch

from wmfast.bench.context import interpret_triton_without_gpu, script_main
from wmfast.bench.ensemble_latency import dit_flops, run_latency  # imports only torch: triton stays unimported

interpret_triton_without_gpu()  # before anything imports triton

SUITE = "ensemble"
SECTIONS = ("sampling", "latency")
SECTIONS_ENV = "WMFAST_BENCH_ENSEMBLE_SECTIONS"


class _Unfused:
    """The world model through diffusers' unfused blocks."""

    def __init__(self, model):
        self.model = model

    def velocity(self, x, t, cond):
        return self.model.velocity(x, t, cond, fused=False)


class _NoReuse:
    """Recomputes everything shared every step, at the full batch: the baseline for conditioning reuse."""

    def __init__(self, model, states):
        self.model, self.states = model, states

    def velocity(self, x, t, cond):
        B = x.shape[0]
        self.model.clear_cache()
        cond = self.model.prepare_conditioning(self.states.expand(B, -1, -1).contiguous())
        return self.model.velocity(x, t.expand(B, -1).contiguous(), cond)


LEASE_LAYERS = 2  # the lease times a few real-width blocks: the per-sample cost ratios do not need all 30


def _setup(ctx):
    import dataclasses

    from wmfast.models.wan import build_world_model, get_preset

    quick = ctx.quick or ctx.device.type != "cuda"
    preset = get_preset("tiny" if quick else "ti2v-5b")
    if ctx.lease and not quick:
        preset = dataclasses.replace(preset, name=f"{preset.name}-{LEASE_LAYERS}-blocks",
                                     transformer={**preset.transformer, "num_layers": LEASE_LAYERS})
    dtype = torch.float32 if quick else torch.bfloat16
    torch.manual_seed(0)
    model = build_world_model(preset, device=ctx.device, dtype=dtype, vae=False).eval()
    sched = model.schedule
    h, w = model.preset.height // 16, model.preset.width // 16
    context = torch.randn(1, 48, sched.num_context_latents, h, w, device=ctx.device, dtype=dtype)
    states = torch.randn(1, 77, 25, device=ctx.device, dtype=dtype)
    ns = (1, 2) if quick else (1, 2, 4, 8) if ctx.lease else (1, 2, 4, 8, 16)
    steps = 1 if quick else 2 if ctx.lease else 10  # quick: the kernels run under the Triton interpreter in CI
    if not ctx.quick and ctx.device.type != "cuda":
        ctx.log("bench_ensemble: no GPU: the real-size DiT is not timed on the CPU; running the tiny preset")
    return model, context, states, ns, steps, (h, w)


def chosen_sections() -> tuple[str, ...]:
    """The sections $WMFAST_BENCH_ENSEMBLE_SECTIONS names (comma-separated), in SECTIONS order; unset: all."""
    raw = os.environ.get(SECTIONS_ENV, "").strip()
    if not raw:
        return SECTIONS
    names = {name.strip() for name in raw.split(",") if name.strip()}
    if not names or names - set(SECTIONS):
        raise ValueError(f"{SECTIONS_ENV}={raw!r}: expected a comma-separated subset of {', '.join(SECTIONS)}")
    return tuple(name for name in SECTIONS if name in names)


def run(ctx) -> None:
    sections = chosen_sections()
    # A lease runs the real-size latency first: the 2-block sampling rows matter less than the 30-layer prediction
    order = ("latency", "sampling") if ctx.lease else SECTIONS
    for name in order:
        if name in sections:
            (run_latency if name == "latency" else _sampling)(ctx)


def _sampling(ctx) -> None:
    from wmfast.inference.ensemble import EnsembleConfig, sample_ensemble
    from wmfast.train.runlog import mfu

    model, context, states, ns, steps, (h, w) = _setup(ctx)
    F = model.schedule.num_latents
    with torch.no_grad():
        cond = model.prepare_conditioning(states)
        results = {}
        for n in ns:
            shape = f"N={n} steps={steps} L={F * h * w // 4} {model.preset.name}"
            variants = {
                "batched": (model, cond, {}),
                "sequential": (model, cond, {"max_batch": 1}),
                "batched-unfused": (_Unfused(model), cond, {"fused": False}),
                "batched-no-reuse": (_NoReuse(model, states), cond, {}),
                "batched-unipc": (model, cond, {"solver": "unipc"}),
            }
            if ctx.lease:  # the per-sample cost and the batching gain; the others are the full profile's
                variants = {k: variants[k] for k in ("batched", "sequential")}
            elif ctx.quick:  # the CI smoke test: the solvers' own tests cover unipc
                del variants["batched-unipc"]
            # Every provider does the same useful work: `steps` DiT forwards over N members (the no-reuse
            # provider's recomputed conditioning is overhead, not counted), so fraction_of_ceiling compares.
            flops = steps * dit_flops(model, n, F, h, w)
            for provider, (denoiser, c, extra) in variants.items():
                cfg = EnsembleConfig(n=n, steps=steps, progress=False, **extra)
                m = ctx.bench("ensemble_sample", shape, provider, "fwd",
                              lambda d=denoiser, c=c, cfg=cfg: sample_ensemble(d, context, c, F, cfg),
                              flops=flops, dtype=context.dtype)
                results[provider, n] = m.median_ms
            x = torch.randn(n, 48, F, h, w, device=ctx.device, dtype=context.dtype)
            t = torch.full((1, F), 500.0, device=ctx.device)
            flops = dit_flops(model, n, F, h, w)
            m = ctx.bench("dit_forward", f"B={n} L={F * h * w // 4} {model.preset.name}", "fused", "fwd",
                          lambda x=x, t=t: model.velocity(x, t, cond), flops=flops, dtype=context.dtype)
            util = mfu(flops / (m.median_ms * 1e-3), ctx.device)
            ctx.log(f"  dit_forward N={n}: MFU {'n/a' if util is None else f'{util:.3f}'} (datasheet bf16 peak)")
    _summary(ctx, results, ns)


def _summary(ctx, results, ns) -> None:
    """Per-sample cost relative to N=1 and the batched speed-up over sequential runs (the issue's targets)."""
    header = ("| N | batched ms | per-sample / N=1 | sequential ms | batched speed-up | unfused ms | no-reuse ms "
              "| unipc ms |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    base = results["batched", 1]
    for n in ns:
        b, s = results["batched", n], results["sequential", n]
        other = [results.get((k, n)) for k in ("batched-unfused", "batched-no-reuse", "batched-unipc")]
        lines.append(f"| {n} | {b:.1f} | {b / n / base:.3f} | {s:.1f} | {s / b:.2f}x | "
                     + " | ".join("-" if o is None else f"{o:.1f}" for o in other) + " |")
    text = "\n".join(lines)
    ctx.log(text)
    (ctx.out_dir / "bench_ensemble_summary.md").write_text(text + "\n")


def main(argv=None) -> int:
    return script_main(run, argv, name="ensemble")


if __name__ == "__main__":
    raise SystemExit(main())
