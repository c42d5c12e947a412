"""The suite collects where the optional packages cannot be imported: `pytest -m gpu --collect-only` over tests/
in a subprocess whose pytest blocks diffusers, deepspeed, av and hypothesis (a plugin sets `sys.modules[name] =
None`, so `import name` raises ImportError) must collect every module without an error. The modules that need
one of them skip (`pytest.importorskip`) or mark their tests (`@pytest.mark.requires(...)`, see conftest.py).

Runtime: one collection of the whole suite, ~10 s on the 2-core machine."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKED = ("diffusers", "deepspeed", "av", "hypothesis")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PLUGIN = textwrap.dedent(f"""
    import sys

    for name in {BLOCKED!r}:
        sys.modules[name] = None
""")


def test_collects_without_optional_packages(tmp_path):
    (tmp_path / "block_optional_packages.py").write_text(PLUGIN)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    # -p block_optional_packages loads the plugin before the conftest and the test modules; hypothesis' own pytest
    # plugin (an entry point, absent where hypothesis is not installed) is turned off, as it imports hypothesis.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider",
           "-p", "no:hypothesispytest", "-p", "block_optional_packages", "tests/"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "ERROR collecting" not in out and not re.search(r"\d+ errors?\b", out), out[-5000:]
    m = re.search(r"(\d+)/(\d+) tests collected", out)  # "220/640 tests collected (420 deselected)" under -m gpu
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 100, out[-5000:]
    for name in ("test_wan.py", "test_wan_lora.py", "test_adaln_hypothesis.py"):  # whole modules skip, with reasons
        assert re.search(rf"SKIPPED \[1\] tests/(\w+/)?{name}:\d+: .*cannot be imported here", out), out[-5000:]


def test_reports_need_no_pytest():
    # a benchmark report (its lease section included) is written where no test runs: pytest is a test extra
    committed = sorted(p for p in (Path(REPO) / "benchmarks" / "results").glob("*/*") if (p / "lease.json").exists())
    assert committed, "no committed lease run to read"
    code = ("import sys; sys.modules['pytest'] = None\nfrom wmfast.bench import lease_summary, report\n"
            "lines = report.lease_lines(sys.argv[1]); assert lines and lines[0].startswith('## Lease'), lines")
    subprocess.run([sys.executable, "-c", code, str(committed[-1])], check=True)
