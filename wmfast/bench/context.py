"""What a bench script gets and how it is written: `BenchContext`, `make_context`, `script_main`, the profiles.

Every benchmark in wmfast measures through wmfast.bench (timing, memory, ceilings, results) so that all results
share one set of statistics, one CSV schema and one set of ceilings measured in the same run.

Convention for per-op bench scripts (`benchmarks/bench_<x>.py`; `benchmarks/` is not an installed package)
-----------------------------------------------------------------------------------------------------------
Each script defines

    SUITE = "ops"              # optional: which `wmfast bench --suite` runs it ("ops" when absent);
                               # one of "ops", "train", "generate", "ensemble", "model-cost"
    def run(ctx: BenchContext) -> None:
        ...                    # measure with ctx.bench(...) (or ctx.measure() + ctx.writer.add(...))
    def main(argv=None) -> int:
        return script_main(run, argv, name="<x>")   # `python benchmarks/bench_<x>.py [--quick] [--out DIR]`
    if __name__ == "__main__":
        raise SystemExit(main())

`run(ctx)` must honour `ctx.quick` (tiny shapes, CPU-friendly, a few seconds at most: CI runs it) and
`ctx.device`; it writes its rows through `ctx.writer` and may save plots into `ctx.out_dir`. It raises
on a real failure; for a provider that cannot run here (flash-attn absent, no GPU) it logs one line
saying why with `ctx.log(...)` and skips that provider. A minimal script:

    from wmfast.bench.context import script_main

    def run(ctx):
        x = torch.randn(1024 if ctx.quick else 1 << 24, device=ctx.device)
        ctx.bench("relu", f"N={x.numel()}", "torch", "fwd", lambda: torch.relu(x),
                  bytes=2 * x.nbytes, dtype=x.dtype)

`wmfast bench` finds scripts with `wmfast.bench.discovery.find_bench_dir()`: `--bench-dir`, then
`$WMFAST_BENCH_DIR`, then the `benchmarks/` directory of the checkout that wmfast is installed from (editable
install), then `./benchmarks`; it fails with a message naming the places it looked when none holds a bench script.

Measurement conventions
-----------------------
- Times are milliseconds per call: median, 20th and 80th percentiles. CUDA: `triton.testing.do_bench`
  (CUDA events, L2 flushed before every call). CPU: a `time.perf_counter` loop with the same statistics.
  `warmup` and `rep` are time budgets in milliseconds, as in `do_bench` (wmfast.bench.timing).
- Peak memory (`peak_mem_mb`): the most memory allocated during ONE call of `fn` above what was already
  allocated before the call, i.e. what the op itself needs (outputs, saved tensors, workspace), inputs
  excluded. CUDA: `torch.cuda.max_memory_allocated`. CPU: an estimate, the peak of live bytes of the
  tensors that aten ops create during the call (wmfast.bench.memory.LiveBytesTracker, a TorchDispatchMode);
  it misses library internal scratch space. `peak_mem_method` in `Measurement` says which.
- Throughput: pass `bytes` (bytes moved to/from memory by an ideal kernel) and/or `flops`; the row gets
  GB/s and/or TFLOP/s and `fraction_of_ceiling` = roofline time / measured time, where roofline time
  = max(flops / matmul ceiling[dtype], bytes / copy bandwidth). 1.0 means at the roofline (wmfast.bench.results).
- Ceilings (wmfast.bench.ceilings): device-to-device copy bandwidth (bytes read + written per second) and dense
  matmul TFLOP/s for bf16 and fp32 (plus tf32 on CUDA), measured in the same run, each computed from the
  20th-percentile time (the fastest the device sustains); the ceiling rows in the CSV keep all statistics.
- Provider names: wmfast's own implementations start with "wmfast", "triton" or "cuda" ("triton",
  "wmfast-cuda", "triton-br16-w4");
  baselines are named after what they run ("torch" = eager, "torch.compile", "sdpa", "flash-attn",
  "liger"). The report's headline compares the best "wmfast*" provider with the best baseline.
- Shapes: a short string of the dims and dtype ("B=2 T=5 S=1024 D=512 bf16"); modes: "fwd", "bwd",
  "fwd+bwd" (or a suite's own, e.g. "step", "decode").
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from wmfast.bench import PROFILES
from wmfast.bench.ceilings import Ceilings, ceilings
from wmfast.bench.results import ResultWriter, environment, slug
from wmfast.bench.timing import Measurement, default_device, measure
from wmfast.telemetry import GpuSampler

# Timing budgets (ms, do_bench semantics) per profile. "lease" times half as long as "full" to fit a 9-minute
# lease: a 0.1-2 ms kernel still gets 25-500 timed calls for its median and 20/80 percentiles.
_BUDGETS = {"quick": {"warmup": 1, "rep": 5}, "lease": {"warmup": 10, "rep": 50}, "full": {"warmup": 25, "rep": 100}}


def interpret_triton_without_gpu() -> None:
    """Without a GPU the Triton kernels run through the interpreter, which must be chosen before triton is first
    imported: set TRITON_INTERPRET=1 (unless set) when there is no GPU and nothing has imported triton yet. If
    something imported triton already (e.g. `wmfast bench` ran another script), changing the variable now would
    make wmfast.ops.dispatch pick kernels that were compiled for a GPU: it is left alone (the Triton rows are
    then skipped). Bench scripts call it before importing anything that imports triton; so does `wmfast bench`."""
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


class BudgetExhausted(BaseException):
    """Raised by BenchContext.measure once the context's deadline has passed. A BaseException, so that the
    scripts' `except Exception` (one failing provider must not hide the others) lets it through to the
    suite runner, which records the script as cut off at its budget and keeps the rows already written."""


@dataclass
class BenchContext:
    """What `run(ctx)` of a bench script gets.

    profile: "quick" (tiny shapes, CPU smoke test; `quick` is True), "lease" (the real shapes, fewer variants
    and sweeps: what fits a short GPU lease, benchmarks/lease/run.sh), "full" (everything). warmup/rep:
    default time budgets (ms) for measure(). deadline: time.monotonic() after which measure() raises
    BudgetExhausted (None: no budget)."""

    device: torch.device
    ceilings: Ceilings
    writer: ResultWriter
    out_dir: Path
    log: Callable[[str], None] = print
    warmup: float = 25
    rep: float = 100
    profile: str = "full"
    deadline: float | None = None

    @property
    def quick(self) -> bool:
        return self.profile == "quick"

    @property
    def lease(self) -> bool:
        return self.profile == "lease"

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def can_afford(self, seconds: float, what: str) -> bool:
        """False (and one log line) when less than `seconds` of the budget is left for `what` (e.g. a
        torch.compile that takes that long before its first timed call)."""
        left = self.time_left()
        if left >= seconds:
            return True
        self.log(f"{what}: skipped (needs about {seconds:.0f} s, {max(left, 0):.0f} s of the budget left)")
        return False

    def measure(self, fn: Callable, **kw) -> Measurement:
        if self.time_left() <= 0:
            raise BudgetExhausted(f"the budget ran out before measuring {getattr(fn, '__name__', fn)}")
        kw.setdefault("warmup", self.warmup)
        kw.setdefault("rep", self.rep)
        kw.setdefault("device", self.device)
        return measure(fn, **kw)

    def bench(self, op: str, shape: str, provider: str, mode: str, fn: Callable, *, bytes=None, flops=None,
              dtype=None, grad_to_none=None, memory: bool = True, **kw) -> Measurement:
        """measure(fn) and write its row; returns the Measurement."""
        m = self.measure(fn, grad_to_none=grad_to_none, memory=memory, **kw)
        self.writer.add(op, shape, provider, mode, m, bytes=bytes, flops=flops, dtype=dtype)
        self.log(f"{op:<24} {shape:<36} {provider:<14} {mode:<5} {m.median_ms:10.4f} ms"
                 + ("" if m.peak_mem_bytes is None else f"  peak {m.peak_mem_bytes / 2**20:9.2f} MiB"))
        return m


def resolve_profile(quick: bool, profile: str | None) -> str:
    """The profile of a call: `profile`, else "quick" with quick, else "full"; ValueError naming --quick or
    --profile when they contradict or the profile is unknown."""
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"--profile {profile!r}: expected one of {', '.join(PROFILES)}")
    if quick and profile not in (None, "quick"):
        raise ValueError(f"--quick contradicts --profile {profile}")
    return profile or ("quick" if quick else "full")


def make_context(*, quick: bool = False, out_dir: str | os.PathLike, device: str | torch.device | None = None,
                 csv_name: str = "results.csv", log: Callable[[str], None] = print, profile: str | None = None,
                 ceilings_measured: Ceilings | None = None) -> BenchContext:
    """Measure the ceilings (unless `ceilings_measured` were measured earlier in the same run) and open the CSV:
    the context that `wmfast bench` and script_main hand to run(). profile None: "quick" if quick else "full"."""
    profile = resolve_profile(quick, profile)
    quick = profile == "quick"
    device = torch.device(device) if device is not None else default_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ResultWriter(out_dir / csv_name, device=device, ceilings=ceilings_measured)
    ceil = ceilings_measured or ceilings(device, quick=quick, writer=writer)
    earlier = " (measured earlier in this run)" if ceilings_measured else ""
    log(f"ceilings on {environment(str(device))['gpu_name']}{earlier}: copy {ceil.copy_gbps:.1f} GB/s, matmul "
        + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in ceil.matmul_tflops.items()))
    return BenchContext(device=device, ceilings=ceil, writer=writer, out_dir=out_dir, log=log,
                        profile=profile, **_BUDGETS[profile])


def default_out_dir(device: str | torch.device | None = None) -> Path:
    """benchmarks/results/<gpu-name-slug>/ (relative to the working directory)."""
    return Path("benchmarks") / "results" / slug(environment(str(device or default_device()))["gpu_name"])


def script_main(run: Callable[[BenchContext], None], argv: Sequence[str] | None = None, *, name: str) -> int:
    """The `main()` of a bench script: `python benchmarks/bench_<name>.py [--quick] [--out DIR] [--device D]`."""
    p = argparse.ArgumentParser(prog=f"bench_{name}", description=f"wmfast benchmark: {name}")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test): --profile quick")
    p.add_argument("--profile", default=None, choices=PROFILES, help="quick | lease | full (default full)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<gpu>/)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    args = p.parse_args(argv)
    try:
        profile = resolve_profile(args.quick, args.profile)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out) if args.out else default_out_dir(args.device)
    ctx = make_context(out_dir=out, device=args.device, csv_name=f"bench_{name}.csv", profile=profile)
    with GpuSampler() as sampler:
        run(ctx)
    if sampler.samples:
        sampler.write_csv(out / f"bench_{name}_gpu_telemetry.csv")
    print(f"wrote {ctx.writer.path}")
    return 0
