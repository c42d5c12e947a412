"""Finding and loading the bench scripts (`benchmarks/bench_<x>.py`, not an installed package)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def find_bench_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory holding benchmarks/bench_*.py; FileNotFoundError naming every place looked at.

    In order: `explicit` (--bench-dir), $WMFAST_BENCH_DIR, the `benchmarks/` directory of the checkout wmfast is
    installed from (an editable install), ./benchmarks."""
    candidates = []
    if explicit:
        candidates.append(("--bench-dir", Path(explicit)))
    if os.environ.get("WMFAST_BENCH_DIR"):
        candidates.append(("$WMFAST_BENCH_DIR", Path(os.environ["WMFAST_BENCH_DIR"])))
    repo = Path(__file__).resolve().parents[2]  # wmfast/bench/discovery.py -> the checkout of an editable install
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
    path = Path(path)
    name = f"wmfast_bench_{path.stem.removeprefix('bench_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{path} defines no run(ctx) (see the convention in wmfast/bench/context.py)")
    return module
