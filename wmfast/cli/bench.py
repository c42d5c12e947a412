"""Benchmark suites with roofline ceilings measured in the same run.

Measures the device's copy bandwidth and matmul TFLOP/s first, runs the chosen suites, and writes
results.csv, summary.md, PNG plots, status.json, GPU telemetry and the raw log bench.log into --out
(default benchmarks/results/<gpu>/<date>-<commit>/). Exit status: 0 everything ran (or stopped at --budget),
1 something failed (or an eager attention-memory ratio is off the formula), 2 a suite's script has not landed
(missing) or an argument is wrong. See docs/benchmarks.md; a whole GPU lease is benchmarks/lease/run.sh.

    wmfast bench --suite ops --profile lease --budget 120    # the real shapes, fewer variants, 2 minutes
    wmfast bench --summarize DIR --readme README.md          # regenerate a run's report and the README table
    wmfast bench --adopt DIR                                 # install DIR's measured launch configurations
"""
from __future__ import annotations

import sys
from pathlib import Path

from wmfast.bench import PROFILES, SUITES

SUITE_CHOICES = (*SUITES, "all")


def add_arguments(p):
    p.add_argument("--suite", default="all", help=f"which suites to run: one of {', '.join(SUITE_CHOICES)}, or a "
                   "comma-separated list (default all)")
    p.add_argument("--profile", default=None, choices=PROFILES, help="quick: tiny shapes, CPU smoke test; "
                   "lease: the real shapes with fewer variants and sweeps (a short GPU lease); full: everything "
                   "(default full, or quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the same as --profile quick")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS", help="time budget of the whole call: "
                   "each suite and script gets an equal share of what is left and stops at its next measurement "
                   "when it runs out (rows written so far are kept)")
    p.add_argument("--append", action="store_true", help="add to the run already in --out (reuse its ceilings, "
                   "keep its rows) instead of starting a fresh one")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<gpu>/<date>-<commit>/)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--bench-dir", default=None, help="directory of the bench_<x>.py scripts (default: "
                   "$WMFAST_BENCH_DIR, else benchmarks/ of the wmfast checkout, else ./benchmarks)")
    p.add_argument("--summarize", metavar="RESULTS_DIR", default=None, help="measure nothing: regenerate "
                   "summary.md and plots of RESULTS_DIR and print the README headline table")
    p.add_argument("--readme", metavar="README", default=None, help="with --summarize: write the headline table "
                   "into README between its '<!-- results:begin -->' and '<!-- results:end -->' lines")
    p.add_argument("--adopt", metavar="RESULTS_DIR", default=None, help="measure nothing: choose the fastest "
                   "launch configurations and backends from RESULTS_DIR's sweeps and write them to the table the "
                   "kernels read (kernels/configs/<gpu>.json)")


def _error(message: str) -> int:
    print(f"wmfast bench: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    for flag, value in (("--summarize", args.summarize), ("--adopt", args.adopt)):
        if value is not None and not (Path(value) / "results.csv").is_file():
            return _error(f"{flag} {value}: no results.csv there (not a `wmfast bench` results directory)")
    if args.readme and not args.summarize:
        return _error("--readme needs --summarize RESULTS_DIR")
    if args.summarize or args.adopt:
        return _report(args)
    from wmfast.bench.context import interpret_triton_without_gpu

    interpret_triton_without_gpu()  # before the bench scripts import the kernels
    from wmfast.bench.suite import check_arguments, run_bench

    try:
        check_arguments(args.suite, args.quick, args.profile, args.budget)
    except ValueError as e:
        return _error(str(e))
    return run_bench(args.suite, quick=args.quick, out=args.out, device=args.device, bench_dir=args.bench_dir,
                     profile=args.profile, budget=args.budget, append=args.append)


def _report(args) -> int:
    from wmfast.bench.report import headline_table, update_readme, write_report

    if args.adopt:
        from wmfast.bench import adopt
        from wmfast.bench.results import read_rows
        from wmfast.kernels import tuning

        table = adopt.choose(read_rows(Path(args.adopt) / "results.csv"))
        if not table["launch"] and not table["backend"]:
            return _error(f"--adopt {args.adopt}: no sweep or backend rows to choose from (run the ops suite on a GPU)")
        path = adopt.write_table(table, tuning.table_path(table["gpu"]))
        print(f"wrote {path}: launch configurations of {', '.join(table['launch']) or 'no kernel'}; backends of "
              f"{', '.join(table['backend']) or 'no op'}")
    if args.summarize:
        path = write_report(args.summarize)
        print(f"wrote {path}")
        table = headline_table(args.summarize)
        print(table)
        if args.readme:
            try:
                update_readme(args.readme, args.summarize)
            except ValueError as e:
                return _error(str(e))
            print(f"wrote the results table into {args.readme}")
    return 0
