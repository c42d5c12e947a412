"""Training throughput of the ST-Transformer: samples/s, tokens/s, MFU and peak memory, the new fused block
("1x-compression": fused residual + LayerNorm and QK-norm kernels, bf16 residual stream, selective recomputation)
beside the old one ("1x-compression-reference"), for ZeRO-0/1/2/3, with and without activation checkpointing,
wmfast kernels vs plain torch (eager and torch.compile).

One row per configuration: op "train_step", mode "step" (one micro-batch forward + backward + optimizer step,
gradient accumulation 1), `tflops` = achieved model TFLOP/s (task FLOP formula, wmfast/models/st_transformer/config.py)
and `fraction_of_ceiling` = that over the bf16 matmul ceiling measured in the same run. bench_train_summary.csv
beside the CSV has samples/s, tokens/s, `mfu` (against the datasheet dense bf16 peak: wmfast.train.runlog.mfu,
the one MFU of every wmfast log and bench), `fraction_of_matmul_ceiling` (the measured ceiling, a separate
column, never called MFU) and the step's peak memory. bench_train_kernels.csv: one profiled step of each ZeRO-0
wmfast configuration, its kernels by total time (wmfast.bench.kernel_profile): the breakdown of any shortfall.
Providers: "wmfast" (the default dispatch: Triton/CUDA kernels on GPU), "torch" (use_backend("torch"): the
pure-torch references of every op, eager), "torch.compile" (those under regional torch.compile of the blocks,
as `wmfast train --compile`), "wmfast+compile" (the kernels inside the compiled blocks).
--profile lease (under 2 minutes): ZeRO-0 without checkpointing at micro-batch 20 (the winning team's per-GPU
micro-batch; its peak memory says whether it fits an 80 GB H100): the new block with wmfast kernels, torch eager,
wmfast+compile and torch.compile, and the old block with wmfast kernels; then ZeRO-2 (the presets' default) for the
new block. A compiled provider runs only while 90 s of the budget are left.
The full profile searches the micro-batch (wmfast.train.microbatch.find_micro_batch, as `--micro-batch auto`) with
eager trials for every configuration; the torch.compile providers are then timed at the eager-found size.
Anchor (the issue): the winning team trained at ~50 samples/s per B200, ~11% of its bf16 peak.

    python benchmarks/bench_train.py [--quick] [--out DIR]       # --quick: the tiny presets on CPU, seconds
"""
from __future__ import annotations

import csv
import os
import time

import torch

from wmfast.bench.context import script_main
from wmfast.bench.kernel_profile import kernel_breakdown, write_breakdown
from wmfast.bench.workloads import compression_batch
from wmfast.ops import use_backend

SUITE = "train"


def _synthetic_task(preset: str):
    """The compression task on random tokens/states held in memory (the throughput does not depend on the
    values; no dataset needs to exist on the benchmark machine)."""
    from wmfast.models import STTransformerConfig
    from wmfast.tasks.compression import CompressionTask

    class _Random(torch.utils.data.Dataset):
        def __init__(self, c, n=256):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.batch = compression_batch(c, n, "cpu")

        def __len__(self):
            return len(self.batch["tokens"])

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.batch.items()}

    task = CompressionTask.__new__(CompressionTask)
    task.preset, task.config, task.top_k = preset, STTransformerConfig.from_name(preset), 500
    task._train, task._val = _Random(task.config), None
    return task


def _backend(provider: str):
    """The torch references for the "torch" providers, else the automatic choice (WMFAST_BACKEND ignored)."""
    return use_backend("torch" if provider.startswith("torch") else None)


LEASE_MICRO_BATCH = 20  # the lease times a fixed micro-batch (no search): the team's 20 samples per GPU


def _configs(profile: str, quick_presets=("tiny", "tiny-reference"),
             presets=("1x-compression", "1x-compression-reference")):
    """(zero stage, activation checkpointing, model preset, provider) of each configuration, in run order."""
    new, old = quick_presets if profile == "quick" else presets
    if profile == "quick":  # CI smoke test: ZeRO-0 and ZeRO-3 code paths, checkpointing on and off, both blocks
        return [(0, False, new, "wmfast"), (3, True, old, "torch")]
    if profile == "lease":  # one GPU, no checkpointing: new vs old block, kernels vs torch, eager vs compiled
        return [(0, False, new, "wmfast"), (0, False, old, "wmfast"), (0, False, new, "torch"),
                (0, False, new, "wmfast+compile"), (0, False, new, "torch.compile"), (2, False, new, "wmfast")]
    return [(zero, ckpt, preset, provider) for preset in (new, old) for zero in (0, 1, 2, 3) for ckpt in (False, True)
            for provider in ("wmfast", "torch", "torch.compile", "wmfast+compile")]


def _bench_one(ctx, task, preset, zero, ckpt, provider, summary):
    """Time one configuration's training step and append its summary row."""
    from wmfast.train import TrainConfig
    from wmfast.train.config import resolve_precision
    from wmfast.train.engine import build_engine, destroy_engine
    from wmfast.train.microbatch import find_micro_batch
    from wmfast.train.runlog import mfu as model_flops_utilisation
    from wmfast.train.step import train_step

    device = ctx.device
    precision = resolve_precision("auto", device.type)
    # the search candidates are the divisors of the per-rank batch: 240 = 2^4 * 3 * 5 keeps them dense
    cfg = TrainConfig(name="bench", model=preset, global_batch=1 if ctx.quick else 240, micro_batch="auto",
                      steps=10**6, warmup_steps=10, zero_stage=zero, activation_checkpointing=ckpt,
                      precision=precision, compile=provider.endswith("compile"))
    run_dir = str(ctx.out_dir / "bench_train_runs" / f"{preset}-z{zero}-{'ckpt' if ckpt else 'nockpt'}-{provider}")
    os.makedirs(run_dir, exist_ok=True)
    if provider.endswith("compile") and not ctx.can_afford(90, f"train_step {provider}"):
        return
    with _backend(provider):
        t0 = time.perf_counter()
        mb = (LEASE_MICRO_BATCH if ctx.lease else find_micro_batch(task, cfg, 1, device, precision, run_dir, rank=0))
        search_s = time.perf_counter() - t0
        cfg = cfg.replace(global_batch=mb, micro_batch=mb)
        engine, optimizer, _ = build_engine(task, cfg, mb, 1, device, precision)  # compiles the blocks if asked
        batch = task.collate([task.train_dataset()[i % len(task.train_dataset())] for i in range(mb)])
        step = [0]

        def fn():
            train_step(engine, optimizer, task, [batch], cfg, step[0], device, precision)
            step[0] += 1

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            m = ctx.measure(fn, memory=ctx.lease)  # peak memory: one more step (the lease reports it)
            # the absolute peak over every step measured: parameters, gradients and AdamW state included
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            if provider in ("wmfast", "wmfast+compile") and zero == 0 and not ckpt:  # where the step's time goes
                write_breakdown(ctx.out_dir / "bench_train_kernels.csv", kernel_breakdown(fn, device),
                                f"{preset} zero={zero} mb={mb} {provider}")
        finally:
            destroy_engine(engine)
    flops = task.flops_per_sample() * mb
    shape = f"{preset} zero={zero} ckpt={'on' if ckpt else 'off'} mb={mb} {precision}"
    ctx.writer.add("train_step", shape, provider, "step", m, flops=flops, dtype=torch.bfloat16)
    sps = mb / (m.median_ms * 1e-3)
    mfu = model_flops_utilisation(sps * task.flops_per_sample(), device)
    ceiling = ctx.ceilings.tflops_for(torch.bfloat16)  # the ceiling of the CSV row's fraction_of_ceiling
    of_ceiling = sps * task.flops_per_sample() / (ceiling * 1e12) if ceiling else None
    summary.append({"preset": preset, "zero": zero, "activation_checkpointing": ckpt, "provider": provider,
                    "micro_batch": mb, "search_s": round(search_s, 2), "median_ms": round(m.median_ms, 3),
                    "samples_per_s": round(sps, 3), "tokens_per_s": round(sps * task.tokens_per_sample(), 1),
                    "mfu": "" if mfu is None else round(mfu, 4),
                    "fraction_of_matmul_ceiling": "" if of_ceiling is None else round(of_ceiling, 4),
                    "peak_gib": "" if peak is None else round(peak / 2**30, 2), "device": str(device)})
    ctx.log(f"train_step {shape:<64} {provider:<15} {sps:9.2f} samples/s "
            + ("" if mfu is None else f"MFU {100 * mfu:5.1f}% ") + ("" if peak is None else f"peak {peak / 2**30:.1f} GiB"))


def run(ctx) -> None:
    from wmfast.train.distributed import setup_distributed

    if ctx.device.type == "cpu" and not ctx.quick:
        ctx.log("bench_train: the 136M preset needs a GPU; on CPU run --quick (the tiny presets)")
        return
    setup_distributed()  # a 1-rank group (gloo on CPU, nccl on GPU) for DeepSpeed
    tasks: dict = {}
    summary: list[dict] = []
    for zero, ckpt, preset, provider in _configs(ctx.profile):
        task = tasks.get(preset) or tasks.setdefault(preset, _synthetic_task(preset))
        try:
            _bench_one(ctx, task, preset, zero, ckpt, provider, summary)
        except Exception as e:  # one failing configuration (e.g. compile) must not hide the others
            if ctx.quick:
                raise
            ctx.log(f"bench_train: {preset} zero={zero} ckpt={ckpt} {provider}: skipped ({type(e).__name__}: {e})")
    path = ctx.out_dir / "bench_train_summary.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]) if summary else ["preset"])
        if new:
            w.writeheader()
        w.writerows(summary)
    ctx.log(f"bench_train: summary in {path}")


def main(argv=None) -> int:
    return script_main(run, argv, name="train")


if __name__ == "__main__":
    raise SystemExit(main())
