"""What a training sample of the ST-Transformer costs, old block vs new: FLOPs, activation bytes per token and
layer and per sample, a training step's peak memory, largest tensor and kernels, and the largest micro-batch that
fits an H100 / H200 / B200 (a model, with and without activation checkpointing). Suite "model-cost".

    python benchmarks/bench_model_cost.py [--quick | --profile lease|full] [--out DIR] [--device cuda|cpu]
        [--presets 1x-compression-reference,1x-compression] [--parts layer,sample,step,compile]
        [--micro-batch N] [--depth N] [--compile | --no-compile] [--backend auto|torch|triton|none]

Writes model_cost.csv, model_cost.md and rows (op "model-cost") in bench_model_cost.csv. The methods and
their caveats are in wmfast/bench/model_cost.py; the suite and its profiles in wmfast/bench/model_cost_report.py.
The per-layer numbers alone, on the CPU at the real shape (about 2 minutes for both presets):

    python benchmarks/bench_model_cost.py --device cpu --parts layer --out /tmp/model-cost
"""
from __future__ import annotations

import argparse
import functools

from wmfast.bench.context import interpret_triton_without_gpu, script_main

interpret_triton_without_gpu()  # before anything imports triton

SUITE = "model-cost"


def run(ctx, **options):
    from wmfast.bench import model_cost_report

    model_cost_report.run(ctx, **options)


def _options(argv):
    from wmfast.bench.model_cost_report import PARTS

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--presets", default=None, help="comma-separated STTransformerConfig presets")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--micro-batch", type=int, default=None, help="the training step's micro-batch")
    p.add_argument("--depth", type=int, default=None, help="layers of the whole-model parts (default: the "
                   "preset's; 2 on the CPU outside --quick)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="count torch.compile's kernels (default: only in the full profile)")
    p.add_argument("--backend", default="auto", help="wmfast.ops backend: auto (torch on the CPU), torch, "
                   "triton, cuda, or none (automatic dispatch)")
    args, rest = p.parse_known_args(argv)
    split = (lambda s: tuple(x.strip() for x in s.split(",") if x.strip()) if s else None)
    if args.parts and set(split(args.parts)) - set(PARTS):
        p.error(f"--parts {args.parts}: expected a subset of {','.join(PARTS)}")
    backend = None if args.backend == "none" else args.backend
    return {"presets": split(args.presets), "parts": split(args.parts), "micro_batch": args.micro_batch,
                "depth": args.depth, "compile": args.compile, "backend": backend}, rest


def main(argv=None) -> int:
    options, rest = _options(argv)
    return script_main(functools.partial(run, **options), rest, name="model_cost")


if __name__ == "__main__":
    raise SystemExit(main())
