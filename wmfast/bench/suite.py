"""`wmfast bench`: ceilings first, then the chosen suites, then CSV + summary + plots + raw log in one directory.

Suites and where they come from:
- ceilings: only the ceilings (always measured first) and bf16 matmuls at the models' own shapes.
- attention-memory: this package (wmfast.bench.attention_memory).
- ops, train, generate, ensemble, model-cost: the scripts benchmarks/bench_<x>.py (convention in
  wmfast/bench/context.py); a script joins the suite named by its `SUITE` attribute ("ops" when absent). The
  scripts the project plans for each suite are listed in EXPECTED_SCRIPTS: one that is absent is reported as
  "missing" (exit status 2), never skipped silently, and so is a suite that no script declares.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wmfast.bench import SUITES
from wmfast.bench.ceilings import Ceilings
from wmfast.bench.context import BenchContext, BudgetExhausted, default_out_dir, make_context, resolve_profile
from wmfast.bench.discovery import find_bench_dir, load_bench_script
from wmfast.bench.results import environment, slug
from wmfast.bench.timing import default_device
from wmfast.kernels.tuning import dtype_name
from wmfast.telemetry import GpuSampler

EXPECTED_SCRIPTS = {
    "ops": ("bench_adaln.py", "bench_cross_entropy.py", "bench_st_attention.py", "bench_wan_block.py"),
    "train": ("bench_train.py",),
    "generate": (),
    "ensemble": ("bench_ensemble.py",),
    "model-cost": ("bench_model_cost.py",),
}
OUTPUTS = ("results.csv", "summary.md", "bench.log", "status.json", "gpu_telemetry.csv", "attention_memory.csv")

# bf16 matmuls of the two models ((M, N, K), what): the ST-Transformer (136M) at micro-batch 8 (8 x 5 x 1024 =
# 40960 input tokens, D = 512, MLP 2048, the 64000-way head over the 3 x 1024 future tokens of 8 samples) and
# one Wan2.2-5B block over an 8-member ensemble (8 x 1792 tokens, D = 3072, FFN 14336).
MODEL_MATMULS = (((40960, 1536, 512), "st-transformer qkv"), ((40960, 2048, 512), "st-transformer mlp-up"),
                 ((40960, 512, 2048), "st-transformer mlp-down"), ((24576, 64000, 512), "st-transformer head"),
                 ((14336, 3072, 3072), "wan2.2-5b attn-proj N=8"), ((14336, 14336, 3072), "wan2.2-5b ffn-up N=8"))
QUICK_MATMULS = (((64, 96, 32), "tiny"),)
# Shares of a --budget among the suites of one call (what a suite leaves unused goes to the next). In the
# first H200 lease an equal share (24 s) did not reach bench_train's first timed step (DeepSpeed start-up and
# the 136M model take ~20 s); generate needed 8 s, ensemble 11 s. generate now captures one CUDA graph per
# (batch, precision) and sweeps the batch to 128: about 30-50 s. ensemble: the 2-block rows took 8 s in the third
# lease; its latency section (the 30-layer model, N = 1 and 8) needs an estimated 45 s more.
SUITE_WEIGHTS = {"ceilings": 1, "ops": 3, "train": 3, "generate": 2, "ensemble": 3, "attention-memory": 2,
                 "model-cost": 1}


@dataclass
class SuiteStatus:
    suite: str
    script: str
    status: str  # "ok" | "missing" | "failed"
    seconds: float = 0.0
    message: str = ""


class _Tee(io.TextIOBase):
    """Writes to the terminal and to the raw log."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


def resolve_suites(name: str) -> list[str]:
    """"all", one suite, or a comma-separated list ("train,generate")."""
    if name == "all":
        return list(SUITES)
    names = [n.strip() for n in name.split(",") if n.strip()]
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise ValueError(f"--suite {name!r}: expected one of {', '.join(SUITES)}, a comma-separated list "
                         "of them, or all")
    return list(dict.fromkeys(names))


def check_arguments(suite: str, quick: bool, profile: str | None, budget: float | None) -> tuple[list[str], str]:
    """(suites, profile) of a `wmfast bench` call; ValueError naming the argument that is wrong."""
    if budget is not None and budget <= 0:
        raise ValueError(f"--budget {budget:g}: must be a positive number of seconds")
    return resolve_suites(suite), resolve_profile(quick, profile)


def _script_suites(module) -> tuple[str, ...]:
    suite = getattr(module, "SUITE", "ops")
    return (suite,) if isinstance(suite, str) else tuple(suite)


def discover(bench_dir: Path | None) -> tuple[dict[str, list[Path]], list[SuiteStatus]]:
    """{suite: [script paths]} from the scripts' SUITE attributes; statuses of scripts that fail to import."""
    by_suite: dict[str, list[Path]] = {s: [] for s in SUITES}
    broken = []
    for path in sorted(bench_dir.glob("bench_*.py")) if bench_dir else []:
        try:
            module = load_bench_script(path)
        except Exception as e:  # noqa: BLE001 - one broken script must not hide the others' results
            broken.append(SuiteStatus("?", path.name, "failed", 0.0, f"import: {type(e).__name__}: {e}"))
            continue
        for suite in _script_suites(module):
            by_suite.setdefault(suite, []).append(path)
    return by_suite, broken


def _guarded(suite: str, name: str, fn) -> SuiteStatus:
    """Run fn(); "ok", "failed" (traceback into the raw log) or "budget" (the deadline cut it short: the rows
    written before are kept)."""
    t0 = time.perf_counter()
    try:
        message = fn() or ""
    except BudgetExhausted as e:
        return SuiteStatus(suite, name, "budget", time.perf_counter() - t0, f"cut off by --budget ({e})")
    except Exception as e:  # noqa: BLE001 - record, print the traceback into the raw log, go on
        traceback.print_exc(file=sys.stdout)
        return SuiteStatus(suite, name, "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    return SuiteStatus(suite, name, "failed" if message else "ok", time.perf_counter() - t0, message)


def run_script(ctx: BenchContext, suite: str, path: Path) -> SuiteStatus:
    return _guarded(suite, path.name, lambda: load_bench_script(path).run(ctx))


def _share(ctx: BenchContext, end: float | None, parts_left: int) -> None:
    """Give the next of `parts_left` parts an equal share of the time left until `end` (what a part leaves
    unused goes to the ones after it)."""
    ctx.deadline = None if end is None else time.monotonic() + max(0.0, end - time.monotonic()) / max(1, parts_left)


def model_matmuls(ctx: BenchContext) -> None:
    """bf16 matmul TFLOP/s at the models' shapes, beside the 8192^3 ceiling (rows op "matmul")."""
    dtype = torch.float32 if ctx.device.type == "cpu" else torch.bfloat16
    for (M, N, K), what in (QUICK_MATMULS if ctx.quick or ctx.device.type == "cpu" else MODEL_MATMULS):
        a = torch.randn(M, K, device=ctx.device, dtype=dtype)
        b = torch.randn(K, N, device=ctx.device, dtype=dtype)
        ctx.bench("matmul", f"{what} M={M} N={N} K={K} {dtype_name(dtype)}", "torch", "fwd",
                  lambda a=a, b=b: a @ b, flops=2 * M * N * K, dtype=dtype, memory=False)


def run_suite(ctx: BenchContext, suite: str, by_suite: dict, bench_dir: Path | None, dir_error: str,
              end: float | None = None) -> list[SuiteStatus]:
    """Run one suite's scripts, each given an equal share of the time left until `end` (monotonic)."""
    if suite == "ceilings":
        _share(ctx, end, 1)
        return [_guarded(suite, "wmfast.bench.suite.model_matmuls", lambda: model_matmuls(ctx))]
    if suite == "attention-memory":
        from wmfast.bench import attention_memory

        def run():
            failed = [r for r in attention_memory.run(ctx) if r["check"] == "FAIL"]
            return (f"{len(failed)} eager ratio(s) off the formula by more than {attention_memory.TOLERANCE_PP} pt"
                    if failed else "")

        _share(ctx, end, 1)
        return [_guarded(suite, "wmfast.bench.attention_memory", run)]
    if bench_dir is None:
        return [SuiteStatus(suite, "benchmarks/", "missing", 0.0, dir_error)]
    scripts = by_suite.get(suite, [])
    statuses = []
    for i, p in enumerate(scripts):
        _share(ctx, end, len(scripts) - i)
        statuses.append(run_script(ctx, suite, p))
    present = {p.name for p in by_suite.get(suite, [])} | {p.name for p in bench_dir.glob("bench_*.py")}
    for name in EXPECTED_SCRIPTS.get(suite, ()):
        if name not in present:
            statuses.append(SuiteStatus(suite, name, "missing", 0.0, f"{bench_dir / name} has not landed yet"))
    if not statuses:
        statuses.append(SuiteStatus(suite, "-", "missing", 0.0, f"no script in {bench_dir} declares SUITE = '{suite}'"))
    return statuses


def _fresh_out_dir(out: Path) -> None:
    """The directory holds the latest run only: the previous run's files (listed in its status.json, plus
    the fixed OUTPUTS) are removed, nothing else (git keeps the history of committed results)."""
    out.mkdir(parents=True, exist_ok=True)
    names = set(OUTPUTS)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        names |= set(json.loads((out / "status.json").read_text())["files"])
    for name in names:
        if "/" not in name and not name.startswith("."):
            (out / name).unlink(missing_ok=True)


def default_run_dir(bdir: Path | None, device: torch.device) -> Path:
    """results/<gpu>/<date>-<commit>/ beside the scripts (the checkout's benchmarks/), else under
    ./benchmarks/results: one directory per run, so that a later run never overwrites a committed one."""
    env = environment(str(device))
    run = f"{time.strftime('%Y-%m-%d', time.gmtime())}-{env['commit']}"
    base = bdir / "results" / slug(env["gpu_name"]) if bdir else default_out_dir(device)
    return base / run


def load_status(out: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((out / "status.json").read_text())
    return {}


def run_bench(suite: str = "all", *, quick: bool = False, out: str | Path | None = None, device: str | None = None,
              bench_dir: str | Path | None = None, profile: str | None = None, budget: float | None = None,
              append: bool = False) -> int:
    """Run `wmfast bench`; returns the exit status: 0 all ran (or stopped at the budget), 1 something failed,
    2 something is missing.

    profile: "quick" | "lease" | "full" (wmfast.bench.context.PROFILES; default "quick" if quick else "full").
    budget: seconds for the whole call; each suite, and each script in it, gets an equal share of what is
    left, and a script that runs past its share stops at its next measurement (status "budget", its rows
    kept). append: add to the run already in `out` (its ceilings reused, its rows and statuses kept), as the
    stages of benchmarks/lease/run.sh do; otherwise `out` is cleared of a previous run's files first."""
    suites, profile = check_arguments(suite, quick, profile, budget)
    end = None if budget is None else time.monotonic() + budget
    device = torch.device(device) if device else default_device()
    try:
        bdir, dir_error = find_bench_dir(bench_dir), ""
    except FileNotFoundError as e:
        bdir, dir_error = None, str(e)
    out = Path(out) if out is not None else default_run_dir(bdir, device)
    if append:
        out.mkdir(parents=True, exist_ok=True)
    else:
        _fresh_out_dir(out)
    with open(out / "bench.log", "a" if append else "w") as log_file, \
            contextlib.redirect_stdout(_Tee(sys.stdout, log_file)):
        handler = logging.StreamHandler(sys.stdout)
        logging.getLogger().addHandler(handler)
        try:
            statuses = _run_all(suites, profile, out, device, bdir, dir_error, end, append)
        finally:
            logging.getLogger().removeHandler(handler)
    if any(s.status == "failed" for s in statuses):
        return 1
    return 2 if any(s.status == "missing" for s in statuses) else 0


def _run_all(suites, profile, out: Path, device, bdir, dir_error, end, append) -> list[SuiteStatus]:
    from wmfast.bench import report

    previous = load_status(out) if append else {}
    before = {p.name for p in out.iterdir() if p.is_file()}  # not this call's: never removed by the next run
    env = environment(str(device))
    print(f"wmfast bench: suites {', '.join(suites)} (profile {profile}) on {env['gpu_name']} (torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}) -> {out}")
    if bdir is None and set(suites) - {"attention-memory", "ceilings"}:
        print(f"wmfast bench: {dir_error}")
    earlier = Ceilings(**previous["ceilings"]) if previous.get("ceilings") else None
    ctx = make_context(profile=profile, out_dir=out, device=device, csv_name="results.csv",
                          ceilings_measured=earlier)
    by_suite, statuses = discover(bdir) if set(suites) - {"attention-memory", "ceilings"} else ({}, [])
    with GpuSampler() as sampler:
        for i, suite in enumerate(suites):
            print(f"== suite {suite}")
            weight = SUITE_WEIGHTS.get(suite, 1) / sum(SUITE_WEIGHTS.get(s, 1) for s in suites[i:])
            suite_end = None if end is None else time.monotonic() + max(0.0, end - time.monotonic()) * weight
            statuses += run_suite(ctx, suite, by_suite, bdir, dir_error, suite_end)
    telemetry = "gpu_telemetry.csv" if not append else f"gpu_telemetry_{slug('-'.join(suites))}.csv"
    if sampler.samples:
        sampler.write_csv(out / telemetry)
    elif sampler.reason:
        print(f"wmfast bench: no GPU telemetry ({sampler.reason})")
    status = {"suites": previous.get("suites", []) + suites, "profile": profile, "quick": profile == "quick",
              "device": str(device), "environment": env, "ceilings": asdict(ctx.ceilings),
              "telemetry": previous.get("telemetry") or sampler.summary(),
              "statuses": previous.get("statuses", []) + [asdict(s) for s in statuses]}
    (out / "status.json").write_text(json.dumps(status, indent=2))
    report.write_report(out)
    # what this run wrote (scripts may add their own files): the next run removes exactly these
    status["files"] = sorted(set(previous.get("files", [])) | ({p.name for p in out.iterdir() if p.is_file()} - before)
                             | {"status.json"})
    (out / "status.json").write_text(json.dumps(status, indent=2))
    for s in statuses:
        print(f"{s.status.upper():8} {s.suite:<17} {s.script:<32} {s.seconds:7.1f} s  {s.message}")
    print(f"wrote {out}/: " + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
    return statuses
