"""The shared benchmark harness: timing, peak memory, roofline ceilings, CSV rows, GPU telemetry.

Every benchmark in wmfast measures through this module so that all results share one set of statistics,
one CSV schema and one set of ceilings measured in the same run.

Convention for per-op bench scripts (`benchmarks/bench_<x>.py`; `benchmarks/` is not an installed package)
-----------------------------------------------------------------------------------------------------------
Each script defines

    SUITE = "ops"              # optional: which `wmfast bench --suite` runs it ("ops" when absent);
                               # one of "ops", "train", "generate", "ensemble"
    def run(ctx: BenchContext) -> None:
        ...                    # measure with ctx.bench(...) (or measure() + ctx.writer.add(...))
    def main(argv=None) -> int:
        return script_main(run, argv, name="<x>")   # `python benchmarks/bench_<x>.py [--quick] [--out DIR]`
    if __name__ == "__main__":
        raise SystemExit(main())

`run(ctx)` must honour `ctx.quick` (tiny shapes, CPU-friendly, a few seconds at most: CI runs it) and
`ctx.device`; it writes its rows through `ctx.writer` and may save plots into `ctx.out_dir`. It raises
on a real failure; for a provider that cannot run here (flash-attn absent, no GPU) it logs one line
saying why with `ctx.log(...)` and skips that provider. A minimal script:

    from wmfast.benchmarking import script_main

    def run(ctx):
        x = torch.randn(1024 if ctx.quick else 1 << 24, device=ctx.device)
        ctx.bench("relu", f"N={x.numel()}", "torch", "fwd", lambda: torch.relu(x),
                  bytes=2 * x.nbytes, dtype=x.dtype)

`wmfast bench` finds scripts with `find_bench_dir()`: `--bench-dir`, then `$WMFAST_BENCH_DIR`, then the
`benchmarks/` directory of the checkout that wmfast is installed from (editable install), then
`./benchmarks`; it fails with a message naming the places it looked when none holds a bench script.

Measurement conventions
-----------------------
- Times are milliseconds per call: median, 20th and 80th percentiles. CUDA: `triton.testing.do_bench`
  (CUDA events, L2 flushed before every call). CPU: a `time.perf_counter` loop with the same statistics.
  `warmup` and `rep` are time budgets in milliseconds, as in `do_bench`.
- Peak memory (`peak_mem_mb`): the most memory allocated during ONE call of `fn` above what was already
  allocated before the call, i.e. what the op itself needs (outputs, saved tensors, workspace), inputs
  excluded. CUDA: `torch.cuda.max_memory_allocated`. CPU: an estimate, the peak of live bytes of the
  tensors that aten ops create during the call (a TorchDispatchMode tracks them); it misses library
  internal scratch space. `peak_mem_method` in `Measurement` says which.
- Throughput: pass `bytes` (bytes moved to/from memory by an ideal kernel) and/or `flops`; the row gets
  GB/s and/or TFLOP/s and `fraction_of_ceiling` = roofline time / measured time, where roofline time
  = max(flops / matmul ceiling[dtype], bytes / copy bandwidth). 1.0 means at the roofline.
- Ceilings (`ceilings()`): device-to-device copy bandwidth (bytes read + written per second) and dense
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
import contextlib
import csv
import datetime as _dt
import functools
import importlib.metadata
import logging
import math
import os
import platform
import re
import subprocess
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .telemetry import GpuSampler, driver_version

logger = logging.getLogger("wmfast.bench")

COLUMNS = ("op", "shape", "provider", "mode", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops",
           "fraction_of_ceiling", "peak_mem_mb", "gpu_name", "driver", "torch", "triton", "cuda",
           "commit", "timestamp")
SUITES = ("ceilings", "ops", "attention-memory", "train", "generate", "ensemble")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Measurement:
    """One measured callable: times in ms per call, peak memory in bytes above the inputs (None: unknown)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_bytes: int | None = None
    peak_mem_method: str = "none"  # "cuda" | "cpu-estimate" | "none"
    reps: int = 0


def _clear_grads(grad_to_none: Sequence[torch.Tensor] | None) -> None:
    for t in grad_to_none or ():
        t.grad = None


def _cpu_times(fn: Callable, warmup: float, rep: float, grad_to_none) -> list[float]:
    """Per-call wall times (ms) from a perf_counter loop sized from one timed call, like do_bench."""
    _clear_grads(grad_to_none)
    t0 = time.perf_counter()
    fn()
    est = max((time.perf_counter() - t0) * 1e3, 1e-4)
    n_warmup = min(1000, int(warmup / est))  # the sizing call above already warmed up once
    n_rep = max(5, min(1000, int(rep / est)))
    for _ in range(n_warmup):
        _clear_grads(grad_to_none)
        fn()
    times = []
    for _ in range(n_rep):
        _clear_grads(grad_to_none)  # outside the timed region, as do_bench does
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(fn: Callable, *, warmup: float = 25, rep: float = 100, grad_to_none: Sequence[torch.Tensor] | None = None,
            device: torch.device | str | None = None, memory: bool = True) -> Measurement:
    """Time `fn()` (median, p20, p80 in ms) and measure its peak memory above the inputs.

    warmup, rep: time budgets in ms (triton.testing.do_bench semantics). grad_to_none: tensors whose .grad
    is reset before each call (for backward benchmarks). device: where fn runs (default: CUDA if present).
    memory: False skips the extra memory-measuring call."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        reps = 0  # do_bench does not report its repetition count
    else:
        times = sorted(_cpu_times(fn, warmup, rep, grad_to_none))
        med, p20, p80 = (_quantile(times, q) for q in (0.5, 0.2, 0.8))
        reps = len(times)
    peak, method = (peak_memory(fn, device=device, grad_to_none=grad_to_none) if memory else (None, "none"))
    return Measurement(float(med), float(p20), float(p80), peak, method, reps)


def peak_memory(fn: Callable, *, device: torch.device | str | None = None,
                grad_to_none: Sequence[torch.Tensor] | None = None) -> tuple[int | None, str]:
    """(bytes, method): the peak memory of one call of fn above what was allocated before it."""
    device = torch.device(device) if device is not None else default_device()
    _clear_grads(grad_to_none)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), "cuda"
    try:
        with LiveBytesTracker() as tracker:
            out = fn()
            del out
    except Exception as e:  # noqa: BLE001 - some ops (custom kernels) may not run under a dispatch mode
        logger.info(f"wmfast.bench: CPU peak-memory estimate unavailable ({type(e).__name__}: {e})")
        return None, "none"
    return int(tracker.peak), "cpu-estimate"


class LiveBytesTracker:
    """Context manager estimating peak memory on the CPU: the live bytes of storages created by aten ops.

    A TorchDispatchMode sees every op's outputs (forward and backward); a storage not among the op's
    inputs is new and counted until it is freed (a weakref finalizer on the storage, whose Python object
    lives exactly as long as the storage does, including when autograd saved it for backward). Storages
    that existed before the context are never counted. `peak`, `current`, `allocated` (the sum of every
    new storage) are in bytes."""

    def __init__(self):
        self.current = 0
        self.peak = 0
        self.allocated = 0
        self._live: dict[int, int] = {}  # data_ptr -> nbytes
        self._mode = None

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, out, input_keys: set[int]) -> None:
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live or key in input_keys:
                continue  # empty, already counted, or a view of / in-place result on an input
            self._live[key] = nbytes
            self.current += nbytes
            self.allocated += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                keys = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor) and a.device.type != "meta"}
                out = func(*args, **kwargs)
                tracker._track(out, keys)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


# --------------------------------------------------------------------------------------------- ceilings
@dataclass
class Ceilings:
    """Roofline ceilings measured on `device` in this run. copy_gbps counts bytes read + written."""

    device: str
    copy_gbps: float
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # "bf16" | "fp32" | "tf32" -> TFLOP/s
    shapes: dict[str, str] = field(default_factory=dict)

    def tflops_for(self, dtype: torch.dtype | str | None) -> float | None:
        key = _dtype_key(dtype)
        return self.matmul_tflops.get(key) if key else None


def _dtype_key(dtype) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return dtype
    return {torch.bfloat16: "bf16", torch.float16: "bf16", torch.float32: "fp32"}.get(dtype)


def ceilings(device: torch.device | str | None = None, *, quick: bool = False, writer: ResultWriter | None = None
             ) -> Ceilings:
    """Measure copy bandwidth and matmul TFLOP/s on `device` (tiny sizes when quick or on the CPU in CI).

    When `writer` is given each ceiling is also written as a row (op "ceiling:copy", "ceiling:matmul")."""
    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    # 1 GiB copies and 8192^3 matmuls are large enough to saturate a datacenter GPU; on the CPU 64 MiB /
    # 1024^3 keep the whole ceiling step near a second, and quick runs shrink further for CI.
    n_copy = (1 << 28 if cuda else 1 << 24) if not quick else 1 << 20  # fp32 elements
    n_mm = (8192 if cuda else 1024) if not quick else 256
    budget = {"warmup": 25, "rep": 100} if not quick else {"warmup": 2, "rep": 10}
    m_copy = _time_copy(n_copy, device, budget)
    # A ceiling is the fastest the device goes: rate from the 20th-percentile time (robust to a shared or
    # throttling machine, where the median drifts with other load) while the row keeps all three statistics.
    result = Ceilings(str(device), 2 * n_copy * 4 / (m_copy.p20_ms * 1e-3) / 1e9,
                      shapes={"copy": f"N={n_copy} fp32", "matmul": f"M=N=K={n_mm}"})
    rows = [("ceiling:copy", f"N={n_copy} fp32", "copy", m_copy, 2 * n_copy * 4, None, None)]
    dtypes = [("bf16", torch.bfloat16, False), ("fp32", torch.float32, False)]
    if cuda:  # TF32 tensor cores: what fp32 matmuls get with torch.backends.cuda.matmul.allow_tf32
        dtypes.append(("tf32", torch.float32, True))
    for key, dtype, tf32 in dtypes:
        m = _time_matmul(n_mm, dtype, tf32, device, budget)
        flops = 2 * n_mm ** 3
        result.matmul_tflops[key] = flops / (m.p20_ms * 1e-3) / 1e12
        rows.append(("ceiling:matmul", f"M=N=K={n_mm} {key}", key, m, None, flops, key))
    if writer is not None:
        writer.ceilings = writer.ceilings or result
        for op, shape, mode, meas, nbytes, flops, dtype in rows:
            writer.add(op, shape, "torch", mode, meas, bytes=nbytes, flops=flops, dtype=dtype, ceilings=result)
    return result


def _time_copy(n: int, device: torch.device, budget: dict) -> Measurement:
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), device=device, memory=False, **budget)


def _time_matmul(n: int, dtype: torch.dtype, tf32: bool, device: torch.device, budget: dict) -> Measurement:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with _tf32(tf32):
        return measure(lambda: a @ b, device=device, memory=False, **budget)


@contextlib.contextmanager
def direct_triton_launches():
    """Launch `wrap_triton` kernels directly, as a `triton_op` does in eager mode. A kernel launcher called
    outside its op (the launch-configuration sweeps) otherwise goes through the triton_kernel_wrapper_mutation
    higher-order op, whose dispatch hides the kernel's own time: on an H200 (torch 2.11) the decode step at
    B=1 took 0.21 ms a call through its launcher and 0.05 ms through its op."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # an older torch: its wrap_triton has no such switch
        yield
        return
    with set_wrap_triton_enabled(False):
        yield


@contextlib.contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# -------------------------------------------------------------------------------------------- env / rows
def git_commit(path: str | os.PathLike | None = None) -> str:
    """Short commit (+"-dirty") of the checkout holding `path` (default: this package); "unknown" outside git.
    $WMFAST_COMMIT overrides it: a copy of a working tree whose .git is not its own (a GPU machine's copy)."""
    if os.environ.get("WMFAST_COMMIT"):
        return os.environ["WMFAST_COMMIT"]
    path = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=path, capture_output=True, text=True,
                             timeout=10, check=False)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10, check=False)
        return sha.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def environment(device: str = "") -> dict[str, str]:
    """The per-row environment columns: gpu_name, driver, torch, triton, cuda, commit."""
    dev = torch.device(device) if device else default_device()
    try:  # the version from metadata: importing triton here would fix its interpreter mode too early
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    if dev.type == "cuda":
        gpu_name, driver = torch.cuda.get_device_name(dev), driver_version()
    else:
        gpu_name, driver = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)", ""
    return {"gpu_name": gpu_name, "driver": driver, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none", "commit": git_commit()}


def slug(name: str) -> str:
    """A directory-safe name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}"


class ResultWriter:
    """Appends rows with exactly `COLUMNS` to a CSV (header written when the file is new) and keeps them.

    path None keeps rows in memory only. Appending to a CSV with a different header is an error."""

    def __init__(self, path: str | os.PathLike | None, *, ceilings: Ceilings | None = None, device=None):
        self.path = Path(path) if path is not None else None
        self.ceilings = ceilings
        self.device = str(torch.device(device) if device is not None else default_device())
        self.rows: list[dict[str, str]] = []
        if self.path is not None and self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != COLUMNS:
                raise ValueError(f"{self.path}: existing CSV header {header} differs from {list(COLUMNS)}; "
                                 "write to a new file or directory")

    def add(self, op: str, shape: str, provider: str, mode: str, m: Measurement, *, bytes: float | None = None,
            flops: float | None = None, dtype=None, ceilings: Ceilings | None = None) -> dict[str, str]:
        """Write one row. bytes/flops: ideal memory traffic / FLOPs per call; dtype picks the matmul ceiling."""
        ceil = ceilings or self.ceilings
        sec = m.median_ms * 1e-3
        gbps = bytes / sec / 1e9 if bytes and sec > 0 else None
        tflops = flops / sec / 1e12 if flops and sec > 0 else None
        fraction = roofline_fraction(m.median_ms, bytes=bytes, flops=flops, dtype=dtype, ceilings=ceil)
        row = {"op": op, "shape": shape, "provider": provider, "mode": mode, "median_ms": _fmt(m.median_ms),
               "p20_ms": _fmt(m.p20_ms), "p80_ms": _fmt(m.p80_ms), "gbps": _fmt(gbps), "tflops": _fmt(tflops),
               "fraction_of_ceiling": _fmt(fraction, 3),
               "peak_mem_mb": "" if m.peak_mem_bytes is None else f"{m.peak_mem_bytes / 2**20:.3f}",
               **environment(self.device),
               "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.rows.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                if new:
                    w.writeheader()
                w.writerow(row)
        return row


def roofline_fraction(median_ms: float, *, bytes=None, flops=None, dtype=None, ceilings: Ceilings | None = None
                      ) -> float | None:
    """Roofline time / measured time: max(flops / peak TFLOP/s[dtype], bytes / copy GB/s) / median."""
    if ceilings is None or median_ms <= 0:
        return None
    bound = []
    if bytes and ceilings.copy_gbps > 0:
        bound.append(bytes / (ceilings.copy_gbps * 1e9))
    peak = ceilings.tflops_for(dtype if dtype is not None else "bf16") if flops else None
    if flops and peak:
        bound.append(flops / (peak * 1e12))
    return max(bound) / (median_ms * 1e-3) if bound else None


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- telemetry
# ------------------------------------------------------------------------------------- script contexts
PROFILES = ("quick", "lease", "full")
# Timing budgets (ms, do_bench semantics) per profile. "lease" times half as long as "full" to fit a 9-minute
# lease: a 0.1-2 ms kernel still gets 25-500 timed calls for its median and 20/80 percentiles.
_BUDGETS = {"quick": {"warmup": 1, "rep": 5}, "lease": {"warmup": 10, "rep": 50}, "full": {"warmup": 25, "rep": 100}}


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

    quick: bool
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


def make_context(*, quick: bool = False, out_dir: str | os.PathLike, device: str | torch.device | None = None,
                 csv_name: str = "results.csv", log: Callable[[str], None] = print, profile: str | None = None,
                 ceilings_measured: Ceilings | None = None) -> BenchContext:
    """Measure the ceilings (unless `ceilings_measured` were measured earlier in the same run) and open the CSV:
    the context that `wmfast bench` and script_main hand to run(). profile None: "quick" if quick else "full"."""
    profile = profile or ("quick" if quick else "full")
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: expected one of {', '.join(PROFILES)}")
    quick = profile == "quick"
    device = torch.device(device) if device is not None else default_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ResultWriter(out_dir / csv_name, device=device, ceilings=ceilings_measured)
    ceil = ceilings_measured or ceilings(device, quick=quick, writer=writer)
    earlier = " (measured earlier in this run)" if ceilings_measured else ""
    log(f"ceilings on {environment(str(device))['gpu_name']}{earlier}: copy {ceil.copy_gbps:.1f} GB/s, matmul "
        + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in ceil.matmul_tflops.items()))
    return BenchContext(quick=quick, device=device, ceilings=ceil, writer=writer, out_dir=out_dir, log=log,
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
    if args.quick and args.profile not in (None, "quick"):
        p.error(f"--quick contradicts --profile {args.profile}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out) if args.out else default_out_dir(args.device)
    ctx = make_context(quick=args.quick, out_dir=out, device=args.device, csv_name=f"bench_{name}.csv",
                       profile=args.profile)
    with GpuSampler() as sampler:
        run(ctx)
    if sampler.samples:
        sampler.write_csv(out / f"bench_{name}_gpu_telemetry.csv")
    print(f"wrote {ctx.writer.path}")
    return 0


# ------------------------------------------------------------------------------------------ discovery
def find_bench_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory holding benchmarks/bench_*.py; FileNotFoundError naming every place looked at."""
    candidates = []
    if explicit:
        candidates.append(("--bench-dir", Path(explicit)))
    if os.environ.get("WMFAST_BENCH_DIR"):
        candidates.append(("$WMFAST_BENCH_DIR", Path(os.environ["WMFAST_BENCH_DIR"])))
    repo = Path(__file__).resolve().parent.parent  # the checkout of an editable install
    candidates += [("the wmfast checkout", repo / "benchmarks"), ("the working directory", Path.cwd() / "benchmarks")]
    for i, (_, path) in enumerate(candidates):
        if path.is_dir() and any(path.glob("bench_*.py")):
            return path
        if i == 0 and explicit:  # an explicit directory that holds no script is an error, not a fallback
            break
    looked = "; ".join(f"{why}: {p}" for why, p in candidates)
    raise FileNotFoundError(f"no benchmarks/bench_*.py scripts found (looked at {looked}). Run from a wmfast "
                            "checkout, install it editable (pip install -e .), or pass --bench-dir / set "
                            "WMFAST_BENCH_DIR to the checkout's benchmarks/ directory")


def load_bench_script(path: str | os.PathLike):
    """Import benchmarks/bench_<x>.py as module `wmfast_bench_<x>`; it must define run(ctx)."""
    import importlib.util
    import sys

    path = Path(path)
    name = f"wmfast_bench_{path.stem.removeprefix('bench_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{path} defines no run(ctx) (see the convention in wmfast/benchmarking.py)")
    return module
