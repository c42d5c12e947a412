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

Latency section (op "ensemble_predict", provider "batched"): seconds per averaged prediction end to end, i.e.
wmfast.inference.predict.predict_sample as `wmfast sample` runs it (VAE encode of the context + conditioning,
denoising incl. the per-sample CUDA-graph capture, the VAE decodes of the N members and of the latent mean, the
averaging), with the full 30-layer TI2V-5B DiT and the TI2V-5B VAE (random weights, bf16) at 512x512, N in
{1, 2, 4, 8, 16}, 10 Euler steps, one warm-up (1 step) and 3 timed predictions per N (medians). Rows per N: mode
"e2e" (with the peak memory above the weights) and one per phase ("conditioning", "denoise", "decode",
"average"); the denoise row carries steps x dit_flops(N), so its fraction_of_ceiling is floor / denoise, the
floor being those FLOPs at the bf16 matmul ceiling measured in the same run. Then the largest N whose denoising
step fits as one batch (max_batch=N, no halving), probing N = 16, 32, 64 while the budget allows. Writes
bench_ensemble_latency.md (N | total | phases | floor | denoise/floor | per-member / N=1 | peak GiB) and
plot_ensemble-latency.png (stacked seconds per N, the floor marked). --profile lease: N in {1, 8}, one timed
prediction each, only when ctx.can_afford the estimated LEASE_LATENCY_S (else one log line); --quick / no GPU:
the tiny preset, N in {1, 2}, 1 step.

Sections: WMFAST_BENCH_ENSEMBLE_SECTIONS=sampling,latency (default: both; script_main takes no extra arguments).
The full-scale latency table alone, on a GPU:
    WMFAST_BENCH_ENSEMBLE_SECTIONS=latency python benchmarks/bench_ensemble.py --out DIR
"""
from __future__ import annotations

import os
import time

import torch

from wmfast.bench.context import interpret_triton_without_gpu, script_main

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


def dit_flops(model, batch: int, num_latents: int, h: int, w: int) -> float:
    """Matmul FLOPs of one DiT forward (2 per multiply-add): per block self-attention q/k/v/o projections
    (4 D^2 per token), cross-attention q/o (2 D^2; text K/V are cached), the FFN (2 D ffn), attention scores
    and values (4 L^2 D per sample) and cross-attention over the text (4 L S D)."""
    cfg = model.transformer.config
    D = cfg.num_attention_heads * cfg.attention_head_dim
    p_t, p_h, p_w = cfg.patch_size
    L = (num_latents // p_t) * (h // p_h) * (w // p_w)
    S = model.empty_text.shape[1]
    per_block = 2 * L * (6 * D * D + 2 * D * cfg.ffn_dim) + 4 * L * L * D + 4 * L * S * D
    return float(batch * cfg.num_layers * per_block)


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
    if "sampling" in sections:
        _sampling(ctx)
    if "latency" in sections:
        _latency(ctx)


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


# ---------------------------------------------------------------------------------------------- latency section

LATENCY_NS, LEASE_LATENCY_NS, QUICK_LATENCY_NS = (1, 2, 4, 8, 16), (1, 8), (1, 2)
LATENCY_STEPS = 10
FIT_NS = (16, 32, 64)  # the one-batch fit probes (full profile, GPU): bounded, N = 64 is 115k tokens per forward
# What the lease's latency run needs: the 30-layer build and the N = 1 and N = 8 predictions (a 1-step warm-up and
# one timed each). An estimate until an H200 lease measures it (see the log line "latency section took").
LEASE_LATENCY_S = 60


def _latency(ctx) -> None:
    from wmfast.inference.ensemble import EnsembleConfig
    from wmfast.inference.predict import predict_sample

    quick = ctx.quick or ctx.device.type != "cuda"
    ns = QUICK_LATENCY_NS if quick else LEASE_LATENCY_NS if ctx.lease else LATENCY_NS
    if ctx.lease and not quick and not ctx.can_afford(LEASE_LATENCY_S, "ensemble_predict (30 layers, N=1, 8)"):
        return
    steps, reps = (1, 1) if quick else (LATENCY_STEPS, 1 if ctx.lease else 3)
    t0 = time.perf_counter()
    model, frames, states = _latency_model(ctx, quick)
    F, (h, w) = model.schedule.num_latents, (model.preset.height // 16, model.preset.width // 16)
    dtype = next(model.transformer.parameters()).dtype
    ceiling = ctx.ceilings.tflops_for(dtype)
    weights = _weight_bytes(model)
    table = []
    for n in ns:
        if table and not ctx.can_afford((reps + 1) * table[-1]["total"] * n / table[-1]["n"], f"ensemble_predict "
                                        f"N={n}"):
            break
        if not quick:  # kernels compiled and tuned for batch n, the allocator's blocks for the decode of n
            predict_sample(model, frames, states, EnsembleConfig(n=n, steps=1, progress=False))
        preds = [predict_sample(model, frames, states, EnsembleConfig(n=n, steps=steps, progress=False),
                                track_memory=True) for _ in range(reps)]
        peak = max(p.peak_memory["total"] for p in preds) - weights if preds[0].peak_memory else None
        flops = steps * dit_flops(model, n, F, h, w)
        row = {"n": n, "peak": peak, "floor": flops / (ceiling * 1e12) if ceiling else float("nan")}
        shape = f"N={n} steps={steps} {model.preset.height}x{model.preset.width} {model.preset.name}"
        for mode in ("e2e", "conditioning", "denoise", "decode", "average"):
            secs = [p.timings["total" if mode == "e2e" else mode] for p in preds]
            m = _measurement(secs, peak if mode == "e2e" else None)
            # the denoise row carries the DiT FLOPs: its fraction_of_ceiling is floor / denoise
            ctx.writer.add("ensemble_predict", shape, "batched", mode, m, flops=flops if mode == "denoise" else None,
                           dtype=dtype)
            row["total" if mode == "e2e" else mode] = m.median_ms * 1e-3
        ctx.log(f"ensemble_predict N={n}: {row['total']:.3f} s = conditioning {row['conditioning']:.3f} + denoise "
                f"{row['denoise']:.3f} (floor {row['floor']:.3g}) + decode {row['decode']:.3f} + average "
                f"{row['average']:.4f}" + ("" if peak is None else f"; peak {peak / 2**30:.2f} GiB above the weights"))
        table.append(row)
    fits = _largest_fitting_batch(ctx, model) if not quick and not ctx.lease else None
    ctx.log(f"ensemble_predict: latency section took {time.perf_counter() - t0:.1f} s")
    _latency_summary(ctx, model, table, steps, fits)


def _latency_model(ctx, quick: bool):
    """The world model with its VAE (random weights) and one sample's inputs at the preset's resolution."""
    from wmfast.models.wan import build_world_model, get_preset

    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # the sampling section's model is gone: give its cached blocks back first
    if quick and not ctx.quick:
        ctx.log("ensemble_predict: no GPU: the real-size model is not timed on the CPU; running the tiny preset")
    preset = get_preset("tiny" if quick else "ti2v-5b")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_world_model(preset, device=ctx.device, dtype=torch.float32 if quick else torch.bfloat16,
                              vae=True).eval()
    ctx.log(f"ensemble_predict: built {preset.name} ({preset.transformer['num_layers']} layers) + VAE, random "
            f"weights, in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (model.schedule.context_count, 3, preset.height, preset.width),
                           dtype=torch.uint8, generator=g)
    return model, frames, torch.randn(77, 25, generator=g)


def _weight_bytes(model) -> int:
    """Bytes of the DiT's and the VAE's parameters and buffers: what every peak below is measured above (the
    CUDA-graph pool, the caches, the activations and the decode all count as the prediction's)."""
    tensors = [*model.parameters(), *model.buffers(), *model.vae.parameters(), *model.vae.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _measurement(seconds: list[float], peak: int | None):
    from wmfast.bench.timing import Measurement

    q = torch.tensor(seconds, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    p20, med, p80 = (1e3 * float(v) for v in q)
    return Measurement(med, p20, p80, peak, "none" if peak is None else "cuda", len(seconds))


class _BatchRecorder:
    """A Denoiser that forwards to the model and records the largest batch whose velocity returned."""

    def __init__(self, model):
        self.model, self.largest = model, 0

    def velocity(self, x, t, cond):
        v = self.model.velocity(x, t, cond)
        self.largest = max(self.largest, x.shape[0])
        return v


def _largest_fitting_batch(ctx, model) -> tuple[int | None, list[int]]:
    """(largest N of FIT_NS whose denoising step runs as one batch, the Ns probed). The sampler halves the
    micro-batch on OOM instead of failing, so a probe runs one step with max_batch=N and checks that a batch of N
    went through the model."""
    from wmfast.inference.ensemble import EnsembleConfig, sample_ensemble

    sched, (h, w) = model.schedule, (model.preset.height // 16, model.preset.width // 16)
    context = torch.randn(1, 48, sched.num_context_latents, h, w, device=ctx.device, dtype=torch.bfloat16)
    largest, probed, weights = None, [], _weight_bytes(model)
    with torch.no_grad():
        cond = model.prepare_conditioning(torch.randn(1, 77, 25, device=ctx.device, dtype=torch.bfloat16))
        for n in FIT_NS:
            if not ctx.can_afford(30, f"ensemble_predict: the one-batch fit probe at N={n}"):
                break
            recorder = _BatchRecorder(model)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            sample_ensemble(recorder, context, cond, sched.num_latents,
                            EnsembleConfig(n=n, steps=1, max_batch=n, progress=False))
            peak = (torch.cuda.max_memory_allocated(ctx.device) - weights) / 2**30
            probed.append(n)
            ctx.log(f"ensemble_predict: N={n} {'fits' if recorder.largest == n else 'does not fit'} as one batch "
                    f"(largest batch run {recorder.largest}, peak {peak:.1f} GiB above the weights)")
            if recorder.largest != n:
                break
            largest = n
    return largest, probed


def _latency_summary(ctx, model, table: list[dict], steps: int, fits) -> None:
    if not table:
        return
    p, base = model.preset, table[0]["total"] / table[0]["n"]
    title = (f"ensemble_predict: {p.name} ({p.transformer['num_layers']} layers) + VAE, {p.height}x{p.width}, "
             f"{steps} Euler steps: seconds per averaged prediction (pixel and latent means), medians; floor = steps "
             "x DiT FLOPs at the matmul ceiling measured in the same run")
    head = ("| N | total s | conditioning | denoise | decode | average | floor s | denoise/floor | per-member / N=1 "
            "| peak GiB |")
    lines = [title, "", head, "|---" * 10 + "|"]
    for r in table:
        peak = "-" if r["peak"] is None else f"{r['peak'] / 2**30:.2f}"
        lines.append(f"| {r['n']} | {r['total']:.3f} | {r['conditioning']:.3f} | {r['denoise']:.3f} | "
                     f"{r['decode']:.3f} | {r['average']:.4f} | {r['floor']:.3g} | {r['denoise'] / r['floor']:.3g} | "
                     f"{r['total'] / r['n'] / base:.3f} | {peak} |")
    if fits is not None and fits[1]:
        largest, probed = fits
        bound = f">= {largest}" if largest == probed[-1] else str(largest)
        lines += ["", f"Largest N whose denoising step fits as one batch: {bound} (probed {probed})"]
    note = ("denoise includes the per-sample CUDA-graph capture (the conditioning is new per sample); peak GiB: "
            "torch.cuda.max_memory_allocated during the prediction minus the weights' bytes.")
    text = "\n".join([*lines, "", note])
    ctx.log(text)
    (ctx.out_dir / "bench_ensemble_latency.md").write_text(text + "\n")
    _latency_plot(ctx, model, table, steps)


def _latency_plot(ctx, model, table: list[dict], steps: int) -> None:
    """Stacked seconds per N (one segment per phase), each bar's denoise floor marked where the denoise segment
    would end if the DiT ran at the measured matmul ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wmfast.inference.predict import PHASES

    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = list(range(len(table)))
    bottom = [0.0] * len(table)
    for phase, colour in zip(PHASES, ("#9ecae1", "#3182bd", "#fd8d3c", "#74c476")):
        vals = [r[phase] for r in table]
        ax.bar(xs, vals, 0.6, bottom=bottom, label=phase, color=colour)
        bottom = [b + v for b, v in zip(bottom, vals)]
    floors = [r["conditioning"] + r["floor"] for r in table]
    ax.hlines(floors, [x - 0.3 for x in xs], [x + 0.3 for x in xs], colors="black", linestyles="--",
              label="denoise floor (DiT FLOPs at the matmul ceiling)")
    for x, r in zip(xs, table):
        ax.annotate(f"{r['total']:.2f} s", (x, r["total"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [f"N={r['n']}" for r in table])
    ax.set_ylabel("seconds per averaged prediction")
    ax.set_title(f"ensemble_predict: {model.preset.name} + VAE, {model.preset.height}x{model.preset.width}, "
                 f"{steps} Euler steps ({ctx.device.type})", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()  # the phases top to bottom, as stacked, then the floor
    order = [*range(len(PHASES), 0, -1), 0]
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(ctx.out_dir / "plot_ensemble-latency.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    return script_main(run, argv, name="ensemble")


if __name__ == "__main__":
    raise SystemExit(main())
