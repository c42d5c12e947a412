"""Greedy generation of the ST-Transformer: latency of a 3-frame rollout (3 context grids -> 3 future grids) per
precision and provider, throughput over the batch size, greedy-token agreement with fp32, launches per decode step.

    python benchmarks/bench_st_generate.py [--quick | --profile lease] [--out DIR] [--device cuda|cpu]

Providers (all `wmfast.inference.Generator`: static buffers, the cache never zero-filled, the greedy head without
full logits): "recompute" (eager, no cache: every step reruns all grids so far, 1xgpt's way), "cache" (eager, the
temporal KV cache), and on a GPU "recompute-graph" / "wmfast-graph" (the whole rollout as one CUDA graph replay).
Latency is host-timed over back-to-back calls with a synchronise after each (what a caller waits): median and p20/p80
in bench_st_generate.csv (op generate_3_frames, mode rollout), with p90, samples/s and agreement in
bench_st_generate_latency.csv. Launches per decode step (bench_st_generate_launches.csv): aten ops that write memory (`OpCounter`, any device; custom
ops count once) of one eager decode step, the inference path against the training path with full logits (the path
generation took before it had one), at the preset's real widths with 1 and 2 layers, extrapolated linearly to its
depth; on a GPU also the CUDA kernels the profiler sees in one decode step of the whole model.
Preset 1x-compression with random weights (--quick: 1 layer of 4x4 grids on the CPU). Targets on an H100/H200:
B=1 rollout <= 5 ms in bf16, <= 8 ms in tf32; cache >= 2x faster than recompute at B=1 and B=16.
--profile lease: B=1 (graphed in fp32, tf32, bf16; eager and recompute in bf16), B=16 in bf16, throughput at
B=1/8/32/128 in bf16, in priority order until its share of the lease budget is spent (under a minute).
"""
from __future__ import annotations

import csv
import statistics
import time

import torch

from wmfast.bench.context import interpret_triton_without_gpu, script_main

interpret_triton_without_gpu()  # before anything imports triton
from wmfast.bench.results import environment
from wmfast.bench.timing import Measurement
from wmfast.bench.workloads import compression_batch

SUITE = "generate"
OP = "generate_3_frames"


def latency(ctx, fn, budget_s: float, min_calls: int = 5, max_calls: int = 200) -> list[float]:
    """Seconds of back-to-back calls, each synchronised (after 2 warm-up calls)."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _quantile(times: list[float], q: int) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] if len(times) > 1 else times[0]


class Rows:
    """The rows of one run: bench_st_generate.csv through ctx.writer, the latency table beside it."""

    def __init__(self, ctx):
        self.ctx, self.latency_rows = ctx, []
        self.path = ctx.out_dir / "bench_st_generate_latency.csv"

    def add(self, c, B: int, precision: str, provider: str, times: list[float], agreement=None) -> float:
        med = statistics.median(times)
        m = Measurement(median_ms=1e3 * med, p20_ms=1e3 * _quantile(times, 20), p80_ms=1e3 * _quantile(times, 80),
                        reps=len(times))
        shape = f"B={B} L={c.num_layers} D={c.d_model} S={c.seq_len} {precision}"
        self.ctx.writer.add(OP, shape, provider, "rollout", m)
        row = {"batch": B, "precision": precision, "provider": provider, "median_ms": f"{1e3 * med:.4g}",
               "p90_ms": f"{1e3 * _quantile(times, 90):.4g}", "samples_per_s": f"{B / med:.4g}", "calls": len(times),
               "agreement_with_fp32": "" if agreement is None else f"{agreement:.4f}",
               "layers": c.num_layers, **environment(str(self.ctx.device))}
        self.latency_rows.append(row)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerows(self.latency_rows)
        self.ctx.log(f"{OP} {shape:<40} {provider:<16} median {1e3 * med:9.3f} ms  p90 {row['p90_ms']:>9} ms  "
                     f"{B / med:9.1f} samples/s" + ("" if agreement is None else f"  agree {agreement:.4f}"))
        return med


def decode_launches(c, device, *, inference: bool) -> int:
    """Aten ops that write memory in one eager decode step (B=1) of a model of config c: the inference path with
    the greedy head, or (inference=False) the training-path blocks with the full logits and their argmax."""
    from wmfast.bench.model_cost import OpCounter
    from wmfast.models import STTransformer

    torch.manual_seed(0)
    model = STTransformer(c).to(device).train(not inference)  # dropout is 0: train() only selects the path
    step = prefilled_step(model, c, device, return_logits=not inference)
    with OpCounter() as counter:
        step()
    return counter.count


def prefilled_step(model, c, device, return_logits: bool = False):
    """A zero-argument eager decode step (B=1, position C) of `model`, its cache prefilled with random context."""
    from wmfast.inference import TemporalKVCache, decode_step

    batch = compression_batch(c, 1, device)
    ctx = batch["tokens"][:, : c.context_frames].reshape(1, c.context_frames, -1)
    with torch.no_grad():
        sg = model.state_encoder(batch["states"])
        cache = TemporalKVCache.for_model(model, 1)
        model.hidden(ctx, state_grids=sg, kv_cache=cache)
    return torch.no_grad()(lambda: decode_step(model, ctx[:, -1:], sg, c.context_frames, cache,
                                               return_logits=return_logits))


def cuda_kernels_per_step(model, c, device) -> int | None:
    """CUDA kernels the profiler records in one eager decode step (B=1) of `model` (None: no profiler here)."""
    from torch.profiler import ProfilerActivity, profile

    step = prefilled_step(model, c, device)
    step()  # warm-up
    torch.cuda.synchronize()
    try:  # a profiler that cannot start (CUPTI busy or absent) costs this one number, not the suite
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        return None
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA" and not e.name.startswith(("Memcpy", "Memset")))


def bench_launches(ctx, c, model=None) -> None:
    """Ops per decode step at the preset's widths, 1 and 2 layers, extrapolated to its depth (linear in layers),
    and on a GPU the CUDA kernels of one step of `model`: bench_st_generate_launches.csv (counts, not times, so
    they stay out of the timing rows)."""
    rows = []
    for name, inference in (("training-path+logits", False), ("inference", True)):
        n1, n2 = (decode_launches(type(c)(**{**c.to_dict(), "num_layers": L}), ctx.device, inference=inference)
                  for L in (1, 2))
        per_layer, total = n2 - n1, n1 + (n2 - n1) * (c.num_layers - 1)
        ctx.log(f"decode step ({name}): {per_layer} ops a layer, {total} at {c.num_layers} layers (OpCounter)")
        rows.append({"path": name, "method": "OpCounter (aten ops that write memory)", "layers": c.num_layers,
                     "per_layer": per_layer, "per_step": total})
    if model is not None:
        n = cuda_kernels_per_step(model, model.config, ctx.device)
        ctx.log(f"decode step: {n} CUDA kernels (profiler, {model.config.num_layers} layers, eager inference path)")
        rows.append({"path": "inference", "method": "CUDA kernels (profiler)", "layers": model.config.num_layers,
                     "per_layer": "", "per_step": "" if n is None else n})
    with open(ctx.out_dir / "bench_st_generate_launches.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], *environment(str(ctx.device))])
        w.writeheader()
        w.writerows({**r, **environment(str(ctx.device))} for r in rows)


def _jobs(ctx, gpu: bool) -> list[tuple[int, str, str]]:
    """(batch, precision, provider) in priority order: what a short lease must not miss comes first."""
    if ctx.quick:
        return [(1, p, v) for p in ("fp32", "bf16") for v in ("recompute", "cache")]
    if not gpu:
        return [(1, "fp32", "cache"), (1, "fp32", "recompute"), (1, "bf16", "cache")]
    jobs = [(1, "bf16", "wmfast-graph"), (1, "tf32", "wmfast-graph"), (1, "fp32", "wmfast-graph"),
            (1, "bf16", "recompute-graph"), (16, "bf16", "wmfast-graph"), (16, "bf16", "recompute-graph"),
            (1, "bf16", "cache"), (1, "bf16", "recompute"), (16, "bf16", "cache"), (16, "bf16", "recompute")]
    if not ctx.lease:
        jobs += [(1, p, v) for p in ("fp32", "tf32") for v in ("cache", "recompute", "recompute-graph")]
    return jobs


PROVIDERS = {"recompute": (False, False), "cache": (True, False), "recompute-graph": (False, True),
             "wmfast-graph": (True, True)}  # provider -> (use_cache, graph)


def run(ctx):
    from wmfast.inference import Generator, precision_scope
    from wmfast.models import STTransformer, STTransformerConfig

    gpu = ctx.device.type == "cuda"
    c = (STTransformerConfig.from_name("tiny", num_layers=1, grid_size=4) if ctx.quick
         else STTransformerConfig.from_name("1x-compression", dropout=0.0))
    torch.manual_seed(0)
    model = STTransformer(c).to(ctx.device).eval()
    bench_launches(ctx, c if gpu or ctx.quick else type(c)(**{**c.to_dict(), "vocab_size": 4096}),
                   model if gpu else None)
    rows, budget = Rows(ctx), (0.3 if ctx.quick else 0.5 if ctx.lease else 2.0)
    inputs, reference, best = {}, {}, {}
    for B, precision, provider in _jobs(ctx, gpu):
        if not ctx.can_afford(4 if B == 1 else 8, f"{OP} B={B} {precision} {provider}"):
            break
        if B not in inputs:
            batch = compression_batch(c, B, ctx.device)
            inputs[B] = (batch["tokens"][:, : c.context_frames], batch["states"])
            with precision_scope("fp32"):
                reference[B] = model.generate(*inputs[B])  # the eager fp32 rollout: what agreement counts against
        cache, graph = PROVIDERS[provider]
        gen = Generator(model, B, precision=precision, use_cache=cache, graph=graph)
        agree = (gen(*inputs[B]) == reference[B]).float().mean().item()
        best[B, precision, provider] = rows.add(c, B, precision, provider,
                                                latency(ctx, lambda g=gen, a=inputs[B]: g(*a), budget), agree)
        del gen
    for (B, precision, provider), seconds in best.items():
        base = {"cache": "recompute", "wmfast-graph": "recompute-graph"}.get(provider)
        if (B, precision, base) in best:
            ctx.log(f"B={B} {precision}: {provider} {best[B, precision, base] / seconds:.2f}x faster than {base}")
    if not ctx.quick:
        throughput(ctx, c, model, rows, (8, 32, 128), "bf16", gpu)


def throughput(ctx, c, model, rows, batches, precision, graph) -> None:
    """Samples/s of the cached rollout over the batch size (B=1 from the latency rows), and the batch where it
    saturates (the smallest whose samples/s is within 10% of the best)."""
    from wmfast.inference import Generator

    provider = "wmfast-graph" if graph else "cache"
    rate = {int(r["batch"]): float(r["samples_per_s"]) for r in rows.latency_rows
            if r["precision"] == precision and r["provider"] == provider}
    for B in batches:
        if not ctx.can_afford(5 + B / 16, f"throughput B={B}"):
            break
        batch = compression_batch(c, B, ctx.device)
        context, states = batch["tokens"][:, : c.context_frames], batch["states"]
        try:
            gen = Generator(model, B, precision=precision, graph=graph)
            rate[B] = B / rows.add(c, B, precision, provider, latency(ctx, lambda g=gen, a=(context, states): g(*a),
                                                                      0.5 if ctx.lease else 1.0))
        except torch.OutOfMemoryError:
            ctx.log(f"throughput B={B}: out of memory")
            break
        finally:
            gen = None
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    if rate:
        top = max(rate.values())
        sat = min(B for B, r in rate.items() if r >= 0.9 * top)
        ctx.log(f"throughput {precision}: " + ", ".join(f"B={B} {r:.1f}/s" for B, r in sorted(rate.items()))
                + f"; saturates at B={sat} (within 10% of the best {top:.1f} samples/s)")


def main(argv=None) -> int:
    return script_main(run, argv, name="st_generate")


if __name__ == "__main__":
    raise SystemExit(main())
