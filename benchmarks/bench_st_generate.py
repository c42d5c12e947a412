"""Greedy generation latency of the ST-Transformer: 3 future grids after 3 context grids, batch 1/8/64.

    python benchmarks/bench_st_generate.py [--quick] [--out DIR] [--device cuda|cpu]

Providers: "cache" (prefill the context once, then one frame a step through the fused temporal decode step of
the per-layer [B, S, H, T_max, Dh] KV cache), "no-cache" (recompute every frame at every step: 1xgpt's way) and,
on GPU, "cache-compiled-step" (the per-step function under torch.compile mode="reduce-overhead": CUDA graphs).
Issue targets on an H100 (unmeasured by the session that wrote this): cache >= 2x faster than no-cache, and
<= 5 ms at batch 1 with the CUDA graph. --profile lease: batch 1 and 16. Preset 1x-compression in bf16 (--quick: 1 layer of 4x4 grids, fp32, CPU).
"""
from __future__ import annotations

import torch

from wmfast.bench.context import interpret_triton_without_gpu, script_main

interpret_triton_without_gpu()  # before anything imports triton
from wmfast.bench.workloads import compression_batch

SUITE = "generate"


def bench_generate(ctx, model, c, dtype):
    """Greedy generation of the 3 future grids from the 3 context grids: with the temporal cache (eager, and on
    GPU with the per-step function compiled, mode="reduce-overhead": CUDA graphs) and without it."""
    import inspect

    import wmfast.inference

    if not hasattr(wmfast.inference, "generate"):
        ctx.log("generate_3_frames: skipped (the generation loop is not present in this checkout)")
        return
    variants = {"cache": {"use_cache": True}, "no-cache": {"use_cache": False}}
    if (ctx.device.type == "cuda" and "compile_step" in inspect.signature(wmfast.inference.generate).parameters
            and ctx.can_afford(45, "generate cache-compiled-step")):
        variants["cache-compiled-step"] = {"use_cache": True, "compile_step": True}
    model.eval()
    for B in ((1,) if ctx.quick else (1, 16) if ctx.lease else (1, 8, 64)):
        batch = compression_batch(c, B, ctx.device, dtype)
        context = batch["tokens"][:, : c.context_frames]
        for name, kw in variants.items():
            with torch.inference_mode():
                ctx.bench("generate_3_frames", f"B={B} {c.num_layers}x{c.d_model} {str(dtype)[6:]}", name, "fwd",
                          lambda a=(context, batch["states"]), kw=kw: model.generate(
                              *a, num_frames=c.future_frames, **kw), memory=False)


def run(ctx):
    from wmfast.models import STTransformer, STTransformerConfig

    c = (STTransformerConfig.from_name("tiny", num_layers=1, grid_size=4) if ctx.quick
         else STTransformerConfig.from_name("1x-compression", dropout=0.0))
    dtype = torch.float32 if ctx.quick else torch.bfloat16
    bench_generate(ctx, STTransformer(c).to(ctx.device, dtype), c, dtype)


def main(argv=None) -> int:
    return script_main(run, argv, name="st_generate")


if __name__ == "__main__":
    raise SystemExit(main())
