"""The end-to-end latency of an ensemble prediction (benchmarks/bench_ensemble.py's latency section).

Seconds per averaged prediction, as `wmfast sample` runs it (wmfast.inference.predict.predict_sample): VAE
encode of the context + conditioning, denoising (with the per-sample CUDA-graph capture), the VAE decodes of
the N members and of the latent mean, the averaging. On a GPU: the full 30-layer TI2V-5B DiT and the TI2V-5B VAE
(random weights, bf16) at 512x512; on the CPU (--quick or no GPU) the tiny preset. The floor of the denoising is
steps x dit_flops(N) at the bf16 matmul ceiling measured in the same run.

Provider "batched" (the default sampler: eager DiT, fused ops, CUDA-graph step) at every N; then, at VARIANT_NS,
what the sampler offers on top, each row against the same floor:
    batched-latent-avg        latent averaging only (one VAE decode instead of N + 1)
    batched-cache             the first-block step cache at CACHE_THRESHOLD (schedule calibrated on the sample
                              with one member, before the timing: a schedule calibrated offline)
    batched-compiled          the DiT blocks compiled (regional torch.compile), captured in the step's graph
    batched-compiled-fp8      compiled, with fp8 block GEMMs (GPUs of compute capability 8.9+ only)
The compiled and fp8 variants change the model in place, so they run last, in that order.
"""
from __future__ import annotations

import time

import torch

from wmfast.bench import figures


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


LATENCY_NS, LEASE_LATENCY_NS, QUICK_LATENCY_NS = (1, 2, 4, 8, 16), (1, 8), (1, 2)
LATENCY_STEPS = 10
FIT_NS = (16, 32, 64)  # the one-batch fit probes (full profile, GPU): bounded, N = 64 is 115k tokens per forward
# The seconds the lease profile must have left to run the section: the 30-layer build and the N = 1 and N = 8
# predictions (a 1-step warm-up and one timed each). The section logs what it took ("latency section took").
LEASE_LATENCY_S = 45
VARIANT_NS, QUICK_VARIANT_NS = (1, 8), (2,)
CACHE_THRESHOLD = 0.1  # the step cache's threshold in the variant rows (eval-psnr --cache-threshold sweeps it)


def run_latency(ctx) -> None:
    quick = ctx.quick or ctx.device.type != "cuda"
    ns = QUICK_LATENCY_NS if quick else LEASE_LATENCY_NS if ctx.lease else LATENCY_NS
    if ctx.lease and not quick and not ctx.can_afford(LEASE_LATENCY_S, "ensemble_predict (30 layers, N=1, 8)"):
        return
    steps, reps = (1, 1) if quick else (LATENCY_STEPS, 1 if ctx.lease else 3)
    t0 = time.perf_counter()
    model, frames, states = _latency_model(ctx, quick)
    table = []
    for n in ns:
        if table and not ctx.can_afford((reps + 1) * table[-1]["total"] * n / table[-1]["n"], f"ensemble_predict "
                                        f"N={n}"):
            break
        table.append(_predict_rows(ctx, model, frames, states, n, steps, reps, "batched", quick))
    fits = _largest_fitting_batch(ctx, model) if not quick and not ctx.lease else None
    variants = _variants(ctx, model, frames, states, steps, reps, quick) if table and not ctx.lease else []
    ctx.log(f"ensemble_predict: latency section took {time.perf_counter() - t0:.1f} s")
    _latency_summary(ctx, model, table, steps, fits, variants)


def _predict_rows(ctx, model, frames, states, n, steps, reps, provider, quick, modes=("pixel", "latent"),
                  skip_steps=()) -> dict:
    """Time `reps` predictions of N=n (after an untimed 1-step one: kernels tuned and compiled for batch n, the
    allocator's blocks for the decode of n); write the e2e row and one row per phase; return the medians (s)."""
    from wmfast.inference.ensemble import EnsembleConfig
    from wmfast.inference.predict import predict_sample

    F, (h, w) = model.schedule.num_latents, (model.preset.height // 16, model.preset.width // 16)
    dtype = next(model.transformer.parameters()).dtype
    ceiling = ctx.ceilings.tflops_for(dtype)
    if not quick:
        predict_sample(model, frames, states, EnsembleConfig(n=n, steps=1, progress=False), modes)
    cfg = EnsembleConfig(n=n, steps=steps, progress=False, skip_steps=skip_steps)
    preds = [predict_sample(model, frames, states, cfg, modes, track_memory=True) for _ in range(reps)]
    peak = max(p.peak_memory["total"] for p in preds) - _weight_bytes(model) if preds[0].peak_memory else None
    flops = steps * dit_flops(model, n, F, h, w)
    row = {"n": n, "provider": provider, "peak": peak, "floor": flops / (ceiling * 1e12) if ceiling else float("nan"),
           "skipped": len(skip_steps), "steps": steps}
    shape = f"N={n} steps={steps} {model.preset.height}x{model.preset.width} {model.preset.name}"
    for mode in ("e2e", "conditioning", "denoise", "decode", "average"):
        secs = [p.timings["total" if mode == "e2e" else mode] for p in preds]
        m = _measurement(secs, peak if mode == "e2e" else None)
        # the denoise row carries the DiT FLOPs of every step (the work asked for): fraction_of_ceiling is
        # floor / denoise, and a skipping cache can take it above 1
        ctx.writer.add("ensemble_predict", shape, provider, mode, m, flops=flops if mode == "denoise" else None,
                       dtype=dtype)
        row["total" if mode == "e2e" else mode] = m.median_ms * 1e-3
    ctx.log(f"ensemble_predict {provider} N={n}: {row['total']:.3f} s = conditioning {row['conditioning']:.3f} + "
            f"denoise {row['denoise']:.3f} (floor {row['floor']:.3g}) + decode {row['decode']:.3f} + average "
            f"{row['average']:.4f}" + ("" if peak is None else f"; peak {peak / 2**30:.2f} GiB above the weights"))
    return row


def _variants(ctx, model, frames, states, steps, reps, quick) -> list[dict]:
    """The variant providers (module docstring) at VARIANT_NS, while the budget allows each."""
    from wmfast.inference.ensemble import EnsembleConfig
    from wmfast.inference.predict import calibrate_sample_skips
    from wmfast.models.wan.fp8 import quantize_dit_fp8
    from wmfast.modules.fp8_linear import fp8_support

    ns = QUICK_VARIANT_NS if quick else VARIANT_NS
    if quick:  # one step has nothing to skip: the smoke test runs 3 steps with the middle one skipped
        cache = {"steps": 3, "skip_steps": (1,)}
    else:
        cfg = EnsembleConfig(n=1, steps=steps, progress=False)
        skip = calibrate_sample_skips(model, frames, states, cfg, CACHE_THRESHOLD)
        ctx.log(f"ensemble_predict: the step cache at threshold {CACHE_THRESHOLD} skips steps {list(skip)} of {steps}")
        cache = {"skip_steps": skip}
    plans = [("batched-latent-avg", {"modes": ("latent",)}), ("batched-cache", cache)]
    if not quick:  # Inductor on 2 CPU cores would take minutes; fp8 needs fp8 tensor cores
        plans.append(("batched-compiled", {}))
        fp8 = fp8_support(ctx.device)
        if fp8 is None:
            plans.append(("batched-compiled-fp8", {}))
        else:
            ctx.log(f"ensemble_predict: batched-compiled-fp8 skipped ({fp8})")
    rows = []
    for provider, extra in plans:
        if not ctx.can_afford(60 if "compiled" in provider else 5, f"ensemble_predict {provider}"):
            break
        if provider == "batched-compiled":
            model.transformer.compile_blocks()
        elif provider == "batched-compiled-fp8":
            quantize_dit_fp8(model.transformer)  # inside the compiled blocks: they recompile once
        n_steps = extra.pop("steps", steps)
        rows += [_predict_rows(ctx, model, frames, states, n, n_steps, reps, provider, quick, **extra) for n in ns]
    return rows


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


def _latency_summary(ctx, model, table: list[dict], steps: int, fits, variants: list[dict]) -> None:
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
    if variants:
        plain = {r["n"]: r for r in table}
        lines += ["", "Variants (module docstring of wmfast.bench.ensemble_latency); speed-up = batched total / total:",
                  "", "| variant | N | steps | total s | denoise | decode | denoise/floor | skipped steps | speed-up |",
                  "|---" * 9 + "|"]
        for r in variants:
            ref = plain.get(r["n"])
            same = ref is not None and ref["steps"] == r["steps"]  # the quick cache row runs more steps
            speedup = f"{ref['total'] / r['total']:.2f}x" if same else "-"
            lines.append(f"| {r['provider']} | {r['n']} | {r['steps']} | {r['total']:.3f} | {r['denoise']:.3f} | "
                         f"{r['decode']:.3f} | "
                         f"{r['denoise'] / r['floor']:.3g} | {r['skipped']} | {speedup} |")
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
    figures.save_figure(fig, ctx.out_dir / "plot_ensemble-latency.png", off_gpu=figures.running_off_gpu(ctx.device))


