"""One GPU lease, one command (benchmarks/lease/run.sh runs this after the offline install).

    python -m wmfast.bench.lease [--budget 530] [--out DIR] [--pack DIR] [--dry-run]

The CUDA extension builds in the background for this GPU's arch while the stages run, most valuable first,
each in its own process with its own share of the time budget (the weights below, rescaled over the stages
still to run, so that time one stage leaves unused goes to the next) and killed with its process group at the
end of that share. Everything is written as it arrives, so a stage cut short leaves all before it:

    env         `wmfast env --json`, nvidia-smi, and the ceilings (copy GB/s, bf16 matmul TFLOP/s at 8192^3 and
                at the models' shapes): `wmfast bench --suite ceilings`
    tests       `pytest -m gpu` but the CUDA extension's tests (the Triton kernels against their references, fwd and bwd),
                parallel with pytest-xdist when present, a per-test timeout, every report streamed to tests.jsonl
    tests-cuda  `pytest -m gpu tests/**/test_cuda_*.py` once the extension is built (the CUDA kernels)
    ops         `wmfast bench --suite ops --profile lease` (AdaLN, temporal attention, decode step, Wan block
                against eager, torch.compile and the external kernels present; the launch-configuration sweeps)
    e2e         `wmfast bench --suite train,model-cost,generate,ensemble,attention-memory --profile lease`
    summary     launch_configs.json chosen from the sweeps, junit.xml, summary.md, and the table printed last

The run directory (default benchmarks/results/<gpu>/<date>-<commit>/) ends up with lease.log (everything
printed), lease.json (the stages: budget, seconds, outcome), env.json, build.log, tests*.jsonl, junit.xml,
results.csv, status.json, summary.md, plots, and launch_configs.json. --pack DIR also writes one .tar.gz of
it, and summary.md and lease.log beside, into DIR (the device machine returns at most 8 files).
--dry-run: the same stages and files on the CPU (Triton interpreter, --profile quick, no CUDA build).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from wmfast.bench.lease_summary import final_table, pack, summarize, write_summary

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 530  # the run ends by itself inside a 9-minute device call, install included
DRY_RUN_BUDGET_S = 170  # CI runs the dry run: under 3 minutes there


@dataclass
class Stage:
    name: str
    weight: float
    budget_s: float = 0.0
    seconds: float = 0.0
    outcome: str = "not run"  # ok | failed | budget (killed at its share) | skipped | not run
    note: str = ""


def stages() -> list[Stage]:
    # Weights: the first H200 call spent ~130 s on the 69 Triton GPU tests (8 workers) and ~50 s per bench
    # script at the real shapes; the CUDA build (~130 s) runs beside env and tests.
    return [Stage("env", 0.05), Stage("tests", 0.22), Stage("tests-cuda", 0.12), Stage("ops", 0.33),
            Stage("e2e", 0.25), Stage("summary", 0.03)]


class Lease:
    def __init__(self, out: Path, budget: float, dry_run: bool, python: str = sys.executable,
                 gpu: tuple[str, tuple[int, int]] | None = None):
        self.out, self.dry_run, self.python, self.gpu = out, dry_run, python, gpu
        self.t0 = time.monotonic()
        self.end = self.t0 + budget
        self.stages = stages()
        self.build: subprocess.Popen | None = None
        self.build_note = ""
        self.children: list[subprocess.Popen] = []
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "lease.log", "a", buffering=1)  # noqa: SIM115 - open for the whole run
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if dry_run:
            self.env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")

    # ---------------------------------------------------------------------------------------------- output
    def say(self, line: str) -> None:
        stamp = f"[lease {time.monotonic() - self.t0:6.1f}s] "
        for stream in (sys.stdout, self.log_file):
            stream.write(stamp + line + "\n")
            stream.flush()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in iter(proc.stdout.readline, ""):
            sys.stdout.write(line)
            self.log_file.write(line)
        sys.stdout.flush()

    def run(self, cmd: list[str], budget: float) -> tuple[int | None, float]:
        """Run cmd in its own process group, its output into the log; kill the group at `budget` seconds.
        Returns (exit code, or None when killed; seconds)."""
        self.say("$ " + " ".join(cmd) + f"   (budget {budget:.0f} s)")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        self.children.append(proc)
        pump = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        pump.start()
        try:
            code = proc.wait(timeout=max(1.0, budget))
        except subprocess.TimeoutExpired:
            self.say(f"budget of {budget:.0f} s reached: killing {cmd[2] if len(cmd) > 2 else cmd[0]}")
            _kill_group(proc)
            code = None
        pump.join(timeout=5)
        self.children.remove(proc)
        return code, time.monotonic() - t0

    # ---------------------------------------------------------------------------------------------- budget
    def share(self, stage: Stage) -> float:
        """stage's weight over the weights of the stages still to run, of the time left."""
        left = [s for s in self.stages if s.outcome == "not run"]
        return max(0.0, self.end - time.monotonic()) * stage.weight / sum(s.weight for s in left)

    def write_state(self) -> None:
        state = {"budget_s": round(self.end - self.t0, 1), "elapsed_s": round(time.monotonic() - self.t0, 1),
                 "dry_run": self.dry_run, "build": self.build_note, "stages": [asdict(s) for s in self.stages]}
        (self.out / "lease.json").write_text(json.dumps(state, indent=2))

    # ----------------------------------------------------------------------------------------------- build
    def start_build(self) -> None:
        gpu = None if self.dry_run else self.gpu
        if gpu is None:
            self.build_note = "skipped: " + ("dry run" if self.dry_run else "no CUDA device")
            self.say(f"CUDA extension build {self.build_note}")
            return
        major, minor = gpu[1]
        env = dict(self.env, WMFAST_CUDA_ARCHS=f"{major}{minor}", MAX_JOBS=str(os.cpu_count() or 4))
        log = open(self.out / "build.log", "w")  # noqa: SIM115 - the background build writes it until it ends
        log.write(_toolchain_report() + "\n")
        log.flush()
        self.say(f"building the CUDA extension for sm_{major}{minor} in the background (build.log)")
        self.build = subprocess.Popen([self.python, "setup.py", "build_ext", "--inplace"], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.build_t0 = time.monotonic()

    def wait_build(self, timeout: float) -> bool:
        """True when the extension is built (waiting up to timeout s); a build still running is killed."""
        if self.build is None:
            return False
        try:
            code = self.build.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            _kill_group(self.build)
            self.build_note = f"killed after {time.monotonic() - self.build_t0:.0f} s (not finished in its budget)"
            self.build = None
            self.say(f"CUDA extension build {self.build_note}")
            return False
        if not self.build_note:
            self.build_note = f"exit {code} after {time.monotonic() - self.build_t0:.0f} s"
            self.say(f"CUDA extension build: {self.build_note}")
            with open(self.out / "build.log", "a") as log:  # which libstdc++ / torch libraries it resolves to
                for so in (REPO / "wmfast").glob("_C*.so"):
                    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=False).stdout
                    log.write(f"ldd {so.name}:\n{ldd}")
        return code == 0

    # ---------------------------------------------------------------------------------------------- stages
    def bench(self, suites: str, budget: float) -> int | None:
        """`wmfast bench` into the run directory; its own --budget ends a little before the stage's, so that it
        stops between measurements and writes its status rather than being killed."""
        profile = "quick" if self.dry_run else "lease"
        cmd = [self.python, "-m", "wmfast.cli", "bench", "--suite", suites, "--profile", profile, "--append",
               "--out", str(self.out), "--budget", f"{max(5.0, 0.9 * budget - 5):.0f}"]
        if self.dry_run:
            cmd += ["--device", "cpu"]
        before = len(_statuses(self.out))
        code = self.run(cmd, budget)[0]
        cut = [f"{s['script']} {s['status']}" for s in _statuses(self.out)[before:] if s["status"] != "ok"]
        self.stage_notes = cut
        return code

    def pytest(self, name: str, args: list[str], budget: float) -> int | None:
        import importlib.util

        cmd = [self.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-p",
               "wmfast.bench.pytest_stream", "--stream-report", str(self.out / f"{name}.jsonl"), "-rfE",
               "--tb=short", "--durations=15"]
        if importlib.util.find_spec("xdist") and not self.dry_run:
            cmd += ["-n", str(min(16, os.cpu_count() or 2))]
        if importlib.util.find_spec("pytest_timeout"):  # opcheck tests took over 37 s on an H200: a generous cap
            cmd += ["--timeout", f"{max(30, 0.8 * budget):.0f}"]
        return self.run(cmd + args, budget)[0]

    def stage_env(self, budget: float) -> int | None:
        cmd = [self.python, "-m", "wmfast.cli", "env", "--json"]
        self.say("$ " + " ".join(cmd) + " > env.json")
        try:  # a floor of 15 s: importing torch alone can take seconds on a loaded 2-core machine
            env = subprocess.run(cmd, check=False, cwd=REPO, env=self.env, capture_output=True, text=True,
                                 timeout=max(15.0, budget / 3))
            self.log_file.write(env.stdout + env.stderr)
            sys.stdout.write(env.stdout + env.stderr)
            report = env.stdout if env.returncode == 0 else json.dumps({"error": env.stderr[-2000:]})
        except subprocess.TimeoutExpired:
            self.say("wmfast env did not answer in time")
            report = json.dumps({"error": "wmfast env --json did not answer in time"})
        (self.out / "env.json").write_text(report)
        if not self.dry_run:
            self.run(["nvidia-smi"], 10.0)
        return self.bench("ceilings", max(5.0, self.share_left(budget)))

    def share_left(self, budget: float) -> float:
        return budget - (time.monotonic() - self.stage_t0)

    def stage_tests(self, budget: float) -> int | None:
        return self.pytest("tests", [a for path in cuda_tests() for a in ("--ignore", path)] + ["tests"], budget)

    def stage_tests_cuda(self, budget: float) -> int | None:
        if self.build is None and not self.dry_run:
            raise _Skip(f"no CUDA extension ({self.build_note})")
        if not self.dry_run and not self.wait_build(0.6 * budget):  # the CUDA tests themselves take ~20 s
            raise _Skip(f"the CUDA extension did not build ({self.build_note}; see build.log)")
        if not cuda_tests():
            raise _Skip("no tests/**/test_cuda_*.py in this checkout")
        return self.pytest("tests-cuda", cuda_tests(), self.share_left(budget))

    def stage_ops(self, budget: float) -> int | None:
        if self.build is not None:  # nothing else may load the CPUs while kernels are timed
            self.wait_build(min(60.0, budget / 4))
        return self.bench("ops", self.share_left(budget))

    def stage_e2e(self, budget: float) -> int | None:
        return self.bench("train,model-cost,generate,ensemble,attention-memory", budget)

    def stage_summary(self, budget: float) -> int:
        summarize(self.out)
        return 0

    def run_all(self) -> int:
        self.say(f"lease: {'dry run on the CPU' if self.dry_run else 'GPU run'} -> {self.out}, "
                 f"budget {self.end - self.t0:.0f} s")
        self.start_build()
        for stage in self.stages:
            stage.budget_s = round(self.share(stage), 1)
            self.stage_t0 = time.monotonic()
            self.say(f"== stage {stage.name} (budget {stage.budget_s:.0f} s)")
            self.stage_notes = []
            try:
                code = getattr(self, f"stage_{stage.name.replace('-', '_')}")(stage.budget_s)
                stage.outcome = "budget" if code is None else "ok" if code == 0 else "failed"
                stage.note = "; ".join(([] if code in (0, None) else [f"exit {code}"]) + self.stage_notes)
            except _Skip as e:
                stage.outcome, stage.note = "skipped", str(e)
            except Exception as e:  # noqa: BLE001 - one broken stage must not cost the stages after it
                stage.outcome, stage.note = "failed", f"{type(e).__name__}: {e}"
                self.say(f"stage {stage.name} failed: {stage.note}")
            stage.seconds = round(time.monotonic() - self.stage_t0, 1)
            self.say(f"== stage {stage.name}: {stage.outcome} in {stage.seconds:.0f} s {stage.note}")
            self.write_state()
        if self.build is not None and self.build.poll() is None:
            self.wait_build(0)
        self.write_state()
        summary_ran = any(s.name == "summary" and s.outcome == "ok" for s in self.stages)
        (write_summary if summary_ran else summarize)(self.out)  # the text again, now with the summary row
        table = final_table(self.out)
        print(table)
        self.log_file.write(table)
        return 1 if any(s.outcome == "failed" for s in self.stages) else 0

    def kill_children(self) -> None:
        for proc in list(self.children) + ([self.build] if self.build else []):
            _kill_group(proc)


class _Skip(Exception):
    pass


def cuda_tests() -> list[str]:
    """The CUDA extension's test files (tests/**/test_cuda_*.py), relative to the checkout: they need it built."""
    return sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("tests/**/test_cuda_*.py"))


def _toolchain_report() -> str:
    """Which compilers build the extension and which C++ ABI torch has (a CXX that links libstdc++ statically
    made every error the binding raises crash the process on an H200; the build's own log says when
    `cuda_build.host_compiler` replaces such a CXX)."""
    import shutil

    import torch

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), _GLIBCXX_USE_CXX11_ABI="
             f"{int(torch._C._GLIBCXX_USE_CXX11_ABI)}; torch built with: "
             + next((ln.strip() for ln in torch.__config__.show().splitlines() if "GCC" in ln or "clang" in ln), "?")]
    tools = ["c++", "g++", "gcc", "nvcc"] + [os.environ[v] for v in ("CXX", "CC") if os.environ.get(v)]
    for tool in tools:
        path = shutil.which(tool)
        if path:
            try:
                first = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                                       check=False).stdout.strip().splitlines()
            except (OSError, subprocess.SubprocessError) as e:
                first = [f"--version failed: {e}"]
            lines.append(f"{tool}: {path}: {(first or ['?'])[-1] if tool == 'nvcc' else (first or ['?'])[0]}")
    lines.append(f"CXX={os.environ.get('CXX', '')} CC={os.environ.get('CC', '')}")
    return "\n".join(lines)


def _statuses(out: Path) -> list[dict]:
    try:
        return json.loads((out / "status.json").read_text()).get("statuses", [])
    except (OSError, ValueError):
        return []


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def gpu_facts() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of GPU 0, asked in a child process: the lease process itself never creates a
    CUDA context, which would hold GPU memory through every stage (and shrink the largest batch found)."""
    probe = ("import torch; assert torch.cuda.is_available(); "
             "print(torch.cuda.get_device_name(0)); print(*torch.cuda.get_device_capability(0))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or len(lines) < 2:
        return None
    major, minor = (int(v) for v in lines[-1].split())
    return lines[-2], (major, minor)


def default_out(dry_run: bool, gpu: tuple | None) -> Path:
    from wmfast.bench.results import environment, git_commit, slug

    name = gpu[0] if gpu and not dry_run else environment("cpu")["gpu_name"]
    return (REPO / "benchmarks" / "results" / slug(name)
            / f"{time.strftime('%Y-%m-%d', time.gmtime())}-{git_commit(REPO)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wmfast.bench.lease", description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help=f"whole run (default {DEFAULT_BUDGET_S}; dry run {DRY_RUN_BUDGET_S})")
    p.add_argument("--out", default=None, help="run directory (default benchmarks/results/<gpu>/<date>-<commit>/)")
    p.add_argument("--pack", default=None, metavar="DIR", help="also write <gpu>-<run>.tar.gz, summary.md and "
                   "lease.log into DIR")
    p.add_argument("--dry-run", action="store_true", help="the same stages and files on the CPU (tiny shapes)")
    p.add_argument("--install-log", default=None, help="a log of the install step to copy into the run directory")
    args = p.parse_args(argv)
    budget = args.budget if args.budget is not None else DRY_RUN_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
    if budget < 30:
        print(f"wmfast lease: error: --budget {budget:g}: at least 30 seconds", file=sys.stderr)
        return 2
    gpu = None if args.dry_run else gpu_facts()
    out = Path(args.out) if args.out else default_out(args.dry_run, gpu)
    lease = Lease(out.resolve(), budget, args.dry_run, gpu=gpu)
    if args.install_log and Path(args.install_log).exists():
        (out / "install.log").write_text(Path(args.install_log).read_text())

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    code = 1
    try:
        code = lease.run_all()
    except KeyboardInterrupt as e:
        lease.say(f"interrupted ({e}): keeping what was written")
        lease.kill_children()
        lease.write_state()
        summarize(out)
    finally:
        if args.pack:
            pack(out, Path(args.pack))
    return code


if __name__ == "__main__":
    sys.exit(main())
