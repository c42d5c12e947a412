"""Benchmark suites with roofline ceilings measured in the same run.

Measures the device's copy bandwidth and matmul TFLOP/s first, runs the chosen suites, and writes
results.csv, summary.md, PNG plots, status.json, GPU telemetry and the raw log bench.log into --out.
Exit status: 0 everything ran, 1 something failed (or an eager attention-memory ratio is off the
formula), 2 a suite's script has not landed (missing). See docs/benchmarks.md.
"""
from __future__ import annotations

SUITE_CHOICES = ("ops", "attention-memory", "train", "generate", "ensemble", "all")


def add_arguments(p):
    p.add_argument("--suite", default="all", choices=SUITE_CHOICES, help="which suite to run (default all)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU-friendly path: a smoke test, "
                   "not performance numbers")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<gpu-name>/)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--bench-dir", default=None, help="directory of the bench_<x>.py scripts (default: "
                   "$WMFAST_BENCH_DIR, else benchmarks/ of the wmfast checkout, else ./benchmarks)")
    p.add_argument("--summarize", metavar="RESULTS_DIR", default=None, help="measure nothing: regenerate "
                   "summary.md and plots of RESULTS_DIR and print the README headline table")


def run(args) -> int:
    if args.summarize:
        from wmfast.bench.report import headline_table, write_report

        path = write_report(args.summarize)
        print(f"wrote {path}")
        print(headline_table(args.summarize))
        return 0
    import os

    import torch

    if not torch.cuda.is_available() and "triton" not in __import__("sys").modules:
        # No GPU: the Triton kernels can only run through the interpreter, which must be chosen before
        # triton is first imported (the bench scripts import the kernels).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from wmfast.bench.suite import run_bench

    return run_bench(args.suite, quick=args.quick, out=args.out, device=args.device, bench_dir=args.bench_dir)
