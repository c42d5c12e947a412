"""`wmfast bench`: ceilings first, then the chosen suites, then CSV + summary + plots + raw log in one directory.

Suites and where they come from:
- attention-memory: this package (wmfast.bench.attention_memory).
- ops, train, generate, ensemble: the scripts benchmarks/bench_<x>.py (convention in wmfast/benchmarking.py);
  a script joins the suite named by its `SUITE` attribute ("ops" when absent). The scripts the project
  plans for each suite are listed in EXPECTED_SCRIPTS: one that is absent is reported as "missing" (exit
  status 2), never skipped silently, and so is a suite that no script declares.
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

from wmfast import benchmarking as bm

EXPECTED_SCRIPTS = {
    "ops": ("bench_adaln.py", "bench_st_attention.py", "bench_wan_block.py"),
    "train": ("bench_train.py",),
    "generate": (),
    "ensemble": ("bench_ensemble.py",),
}
OUTPUTS = ("results.csv", "summary.md", "bench.log", "status.json", "gpu_telemetry.csv", "attention_memory.csv")


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
    if name == "all":
        return list(bm.SUITES)
    if name not in bm.SUITES:
        raise ValueError(f"--suite {name!r}: expected one of {', '.join(bm.SUITES)} or all")
    return [name]


def _script_suites(module) -> tuple[str, ...]:
    suite = getattr(module, "SUITE", "ops")
    return (suite,) if isinstance(suite, str) else tuple(suite)


def discover(bench_dir: Path | None) -> tuple[dict[str, list[Path]], list[SuiteStatus]]:
    """{suite: [script paths]} from the scripts' SUITE attributes; statuses of scripts that fail to import."""
    by_suite: dict[str, list[Path]] = {s: [] for s in bm.SUITES}
    broken = []
    for path in sorted(bench_dir.glob("bench_*.py")) if bench_dir else []:
        try:
            module = bm.load_bench_script(path)
        except Exception as e:  # noqa: BLE001 - one broken script must not hide the others' results
            broken.append(SuiteStatus("?", path.name, "failed", 0.0, f"import: {type(e).__name__}: {e}"))
            continue
        for suite in _script_suites(module):
            by_suite.setdefault(suite, []).append(path)
    return by_suite, broken


def run_script(ctx: bm.BenchContext, suite: str, path: Path) -> SuiteStatus:
    t0 = time.perf_counter()
    try:
        bm.load_bench_script(path).run(ctx)
    except Exception as e:  # noqa: BLE001 - record, print the traceback into the raw log, go on
        traceback.print_exc(file=sys.stdout)
        return SuiteStatus(suite, path.name, "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    return SuiteStatus(suite, path.name, "ok", time.perf_counter() - t0)


def run_suite(ctx: bm.BenchContext, suite: str, by_suite: dict, bench_dir: Path | None, dir_error: str
              ) -> list[SuiteStatus]:
    if suite == "attention-memory":
        from wmfast.bench import attention_memory

        t0 = time.perf_counter()
        rows = attention_memory.run(ctx)
        failed = [r for r in rows if r["check"] == "FAIL"]
        msg = f"{len(failed)} eager ratio(s) off the formula by more than {attention_memory.TOLERANCE_PP} pt"
        return [SuiteStatus(suite, "wmfast.bench.attention_memory", "failed" if failed else "ok",
                            time.perf_counter() - t0, msg if failed else "")]
    if bench_dir is None:
        return [SuiteStatus(suite, "benchmarks/", "missing", 0.0, dir_error)]
    statuses = [run_script(ctx, suite, p) for p in by_suite.get(suite, [])]
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


def run_bench(suite: str = "all", *, quick: bool = False, out: str | Path | None = None, device: str | None = None,
              bench_dir: str | Path | None = None) -> int:
    """Run `wmfast bench`; returns the exit status: 0 all ran, 1 something failed, 2 something is missing."""
    suites = resolve_suites(suite)
    device = torch.device(device) if device else bm.default_device()
    try:
        bdir, dir_error = bm.find_bench_dir(bench_dir), ""
    except FileNotFoundError as e:
        bdir, dir_error = None, str(e)
    if out is None:  # results/<gpu>/ beside the scripts (the checkout's benchmarks/), else ./benchmarks/results
        out = bdir / "results" / bm.default_out_dir(device).name if bdir else bm.default_out_dir(device)
    out = Path(out)
    _fresh_out_dir(out)
    with open(out / "bench.log", "w") as log_file, contextlib.redirect_stdout(_Tee(sys.stdout, log_file)):
        handler = logging.StreamHandler(sys.stdout)
        logging.getLogger().addHandler(handler)
        try:
            statuses = _run_all(suites, quick, out, device, bdir, dir_error)
        finally:
            logging.getLogger().removeHandler(handler)
    if any(s.status == "failed" for s in statuses):
        return 1
    return 2 if any(s.status == "missing" for s in statuses) else 0


def _run_all(suites, quick, out: Path, device, bdir, dir_error) -> list[SuiteStatus]:
    from wmfast.bench import report

    before = {p.name for p in out.iterdir() if p.is_file()}  # not this run's: never removed by the next
    env = bm.environment(str(device))
    print(f"wmfast bench: suites {', '.join(suites)}{' (quick)' if quick else ''} on {env['gpu_name']} "
          f"(torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}) -> {out}")
    if bdir is None and set(suites) - {"attention-memory"}:
        print(f"wmfast bench: {dir_error}")
    ctx = bm.make_context(quick=quick, out_dir=out, device=device, csv_name="results.csv")
    by_suite, statuses = discover(bdir) if set(suites) - {"attention-memory"} else ({}, [])
    with bm.GpuSampler() as sampler:
        for suite in suites:
            print(f"== suite {suite}")
            statuses += run_suite(ctx, suite, by_suite, bdir, dir_error)
    if sampler.samples:
        sampler.write_csv(out / "gpu_telemetry.csv")
    elif sampler.reason:
        print(f"wmfast bench: no GPU telemetry ({sampler.reason})")
    status = {"suites": suites, "quick": quick, "device": str(device), "environment": env,
              "ceilings": asdict(ctx.ceilings), "telemetry": sampler.summary(),
              "statuses": [asdict(s) for s in statuses]}
    (out / "status.json").write_text(json.dumps(status, indent=2))
    report.write_report(out)
    # what this run wrote (scripts may add their own files): the next run removes exactly these
    status["files"] = sorted({p.name for p in out.iterdir() if p.is_file()} - before | {"status.json"})
    (out / "status.json").write_text(json.dumps(status, indent=2))
    for s in statuses:
        print(f"{s.status.upper():8} {s.suite:<17} {s.script:<32} {s.seconds:7.1f} s  {s.message}")
    print(f"wrote {out}/: " + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
    return statuses
