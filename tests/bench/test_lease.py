"""The GPU-lease kit on the CPU: `benchmarks/lease/run.sh --dry-run` writes every file a real lease writes,
stages are killed at their budget, test reports stream to disk as they arrive, `wmfast bench --budget` stops
a suite and keeps its rows, and the README results block is generated, never typed."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from wmfast.bench import lease, pytest_stream, report, stream_records
from wmfast.bench.context import make_context
from wmfast.bench.results import COLUMNS, ResultWriter, git_commit, read_rows
from wmfast.bench.timing import Measurement

REPO = Path(__file__).resolve().parents[2]
RUN_SH = REPO / "benchmarks" / "lease" / "run.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module (about a minute on 2 cores): the run directory, the packed copy, stdout."""
    base = tmp_path_factory.mktemp("lease")
    out, packed = base / "run", base / "packed"
    env = dict(os.environ, OUT=str(packed), TRITON_INTERPRET="1")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(RUN_SH), "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, packed, proc.stdout, time.monotonic() - t0


def test_dry_run_writes_every_file_of_a_lease(dry_run):
    out, _, _, seconds = dry_run
    for name in ("lease.log", "lease.json", "env.json", "install.log", "tests.jsonl", "tests-cuda.jsonl", "junit.xml",
                 "results.csv", "status.json", "summary.md", "launch_configs.json", "bench.log"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list(out.glob("plot_*.png"))
    statuses = json.loads((out / "status.json").read_text())["statuses"]
    if any(s["suite"] == "attention-memory" and s["status"] == "ok" for s in statuses):
        assert (out / "attention_memory.csv").is_file()  # a suite cut by the budget (a loaded CI machine) has none
    assert seconds < 180  # CI's budget for the dry run: 3 minutes


def test_dry_run_stages_and_rows(dry_run):
    out = dry_run[0]
    state = json.loads((out / "lease.json").read_text())
    assert state["dry_run"] and [s["name"] for s in state["stages"]] == [
        "env", "tests", "tests-cuda", "ops", "e2e", "summary"]
    assert all(s["outcome"] in ("ok", "budget") for s in state["stages"]), state["stages"]
    assert state["elapsed_s"] <= state["budget_s"] + 5
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    ops = {r["op"] for r in rows}
    assert {"ceiling:copy", "ceiling:matmul", "matmul", "layernorm_modulate", "temporal_attention"} <= ops
    assert all(r["commit"] and r["timestamp"] and r["median_ms"] for r in rows)
    statuses = json.loads((out / "status.json").read_text())["statuses"]
    assert {"ceilings", "ops", "train", "generate", "ensemble", "attention-memory"} <= {s["suite"] for s in statuses}
    assert all(s["status"] in ("ok", "budget") for s in statuses), statuses
    assert json.loads((out / "env.json").read_text())["torch"]


def test_dry_run_tests_reports_and_junit(dry_run):
    out = dry_run[0]
    t = stream_records.tally(stream_records.read_records(out / "tests.jsonl"))
    assert t["finished"] and t["collected"] > 20 and t["skipped"] == t["collected"]  # -m gpu without a GPU
    root = ET.parse(out / "junit.xml").getroot()
    assert [s.get("name") for s in root] == ["tests", "tests-cuda"]
    assert all(int(s.get("tests")) > 0 for s in root)


def test_dry_run_summary_printed_last_and_packed(dry_run):
    out, packed, stdout, _ = dry_run
    tail = stdout[stdout.rindex("## Lease"):]
    assert "| stage | budget s | seconds | outcome | note |" in tail and "**tests**" in tail
    summary = (out / "summary.md").read_text()
    assert "## Lease (dry run, CPU)" in summary and "## Ceilings" in summary
    tars = list(packed.glob("*.tar.gz"))
    assert len(tars) == 1 and (packed / "summary.md").exists() and (packed / "lease.log").exists()
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    assert any(n.endswith("/results.csv") for n in names) and any(n.endswith("/junit.xml") for n in names)


def test_stage_is_killed_at_its_budget(tmp_path):
    run = lease.Lease(tmp_path, budget=60, dry_run=True)
    t0 = time.monotonic()
    child = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "print('started', flush=True); time.sleep(60)")
    code, _ = run.run([sys.executable, "-c", child], budget=2)
    assert code is None and time.monotonic() - t0 < 15
    assert "started" in (tmp_path / "lease.log").read_text()


def test_budget_shares_carry_unused_time_forward(tmp_path):
    run = lease.Lease(tmp_path, budget=100, dry_run=True)
    first = run.share(run.stages[0])
    assert first == pytest.approx(100 * run.stages[0].weight / sum(s.weight for s in run.stages), rel=0.05)
    run.stages[0].outcome = "ok"  # finished at once: the rest split all 100 s
    assert sum(run.share(s) for s in run.stages[1:]) == pytest.approx(100, rel=0.05)


def test_stream_report_survives_a_kill(tmp_path):
    (tmp_path / "test_inner.py").write_text(textwrap.dedent("""
        import time, pytest
        def test_pass(): pass
        def test_fail(): assert 1 == 2, "boom"
        def test_skip(): pytest.skip("skipped on purpose: the stream must record a skip")
        def test_slow(): time.sleep(60)
    """))
    stream = tmp_path / "r.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                             "wmfast.bench.pytest_stream", "--stream-report", str(stream), "test_inner.py"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the three fast tests are reported, then kill (a lease's end)
        if len([r for r in stream_records.read_records(stream) if r.get("event") == "report"]) >= 3:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    t = stream_records.tally(stream_records.read_records(stream))
    assert (t["collected"], t["passed"], t["failed"], t["skipped"], t["not run"]) == (4, 1, 1, 1, 1)
    assert not t["finished"] and "boom" in t["failures"][0][1]
    suite = ET.fromstring(stream_records.junit_xml({"inner": stream_records.read_records(stream)}).split("?>", 1)[1])[0]
    assert suite.get("failures") == "1" and suite.get("skipped") == "2"
    assert suite.find("properties/property").get("name") == "cut_off"


def test_bench_budget_stops_a_script_and_keeps_its_rows(tmp_path):
    from wmfast.bench.suite import run_bench

    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "bench_forever.py").write_text(textwrap.dedent("""
        import time
        SUITE = "generate"  # a suite that expects no particular script
        def run(ctx):
            i = 0
            while True:  # measures until the budget stops it
                ctx.bench("sleep", f"i={i}", "torch", "fwd", lambda: time.sleep(0.001), memory=False)
                i += 1
    """))
    out = tmp_path / "out"
    t0 = time.monotonic()
    code = run_bench("generate", profile="quick", out=out, device="cpu", bench_dir=bench_dir, budget=3)
    assert code == 0 and time.monotonic() - t0 < 30
    statuses = json.loads((out / "status.json").read_text())["statuses"]
    mine = [s for s in statuses if s["script"] == "bench_forever.py"]
    assert mine and mine[0]["status"] == "budget"
    assert any(r["op"] == "sleep" for r in read_rows(out / "results.csv"))
    # --append adds to the same run: the ceilings are reused (no second ceiling row), the statuses kept
    assert run_bench("ceilings", profile="quick", out=out, device="cpu", bench_dir=bench_dir, append=True) == 0
    rows = read_rows(out / "results.csv")
    assert sum(r["op"] == "ceiling:copy" for r in rows) == 1 and any(r["op"] == "matmul" for r in rows)
    assert len(json.loads((out / "status.json").read_text())["statuses"]) == len(statuses) + 1


@pytest.mark.parametrize("argv, message", [
    (["bench", "--budget", "-1"], "--budget -1: must be a positive"),
    (["bench", "--suite", "ops,nope"], "--suite 'ops,nope'"),
    (["bench", "--readme", "README.md"], "--readme needs --summarize"),
    (["bench", "--summarize", "/nonexistent"], "--summarize /nonexistent: no results.csv"),
    (["bench", "--quick", "--profile", "lease"], "--quick contradicts --profile lease"),
], ids=["budget", "suite", "readme", "summarize", "quick-profile"])
def test_bench_argument_errors_are_one_line(argv, message, capsys):
    from wmfast.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_run_sh_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(RUN_SH), "--bogus"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr


def test_readme_results_block_is_generated_from_the_newest_run(tmp_path, monkeypatch):
    newest = report.newest_run(REPO / "benchmarks" / "results")
    assert newest is not None, "benchmarks/results/ holds no run with a results.csv"
    text = (REPO / "README.md").read_text()
    assert text.count(report.README_BEGIN) == 1 and text.count(report.README_END) == 1
    block = text.split(report.README_BEGIN)[1].split(report.README_END)[0]
    monkeypatch.chdir(REPO)
    assert block.strip() == report.readme_block(newest.relative_to(REPO)).strip(), (
        f"README results block is stale: run `wmfast bench --summarize {newest.relative_to(REPO)} --readme README.md`")


def test_update_readme_replaces_only_the_block(tmp_path):
    out = tmp_path / "run"
    w = ResultWriter(out / "results.csv", device="cpu")
    m = Measurement(1.0, 0.9, 1.1)
    w.add("op", "N=1", "wmfast-triton", "fwd", m)
    w.add("op", "N=1", "torch", "fwd", Measurement(2.0, 1.9, 2.1))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{report.README_BEGIN}\nold\n{report.README_END}\nafter\n")
    report.update_readme(readme, out)
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n") and "old" not in text
    assert "| op | fwd | N=1 | wmfast-triton | 1 | torch | 2 | 2.00x |" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        report.update_readme(readme, out)


def test_stream_report_counts_xdist_collections_once(tmp_path):
    """Under pytest-xdist the controller collects nothing; each worker's list arrives through an xdist hook."""
    stream = pytest_stream._Stream(str(tmp_path / "r.jsonl"))
    for _ in range(2):  # two workers, the same list
        stream.pytest_xdist_node_collection_finished(node=None, ids=["t.py::a", "t.py::b"])
    stream.f.close()
    t = stream_records.tally(stream_records.read_records(tmp_path / "r.jsonl"))
    assert (t["collected"], t["not run"]) == (2, 2)


def test_commit_override_for_copied_working_trees(monkeypatch):
    monkeypatch.setenv("WMFAST_COMMIT", "0123456789ab")
    assert git_commit() == "0123456789ab"


def test_largest_batch_row_retries_smaller_when_timing_runs_out_of_memory(tmp_path):
    from wmfast.bench import largest_batch
    from wmfast.models import STTransformer, STTransformerConfig

    model = STTransformer(STTransformerConfig.from_name("tiny", num_layers=1, grid_size=4))
    opt = torch.optim.AdamW(model.parameters())
    timed = []

    def fake_measure(fn, **kw):
        b = len(timed)
        timed.append(b)
        if b == 0:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return Measurement(1.0, 0.9, 1.1)

    ctx = make_context(profile="quick", out_dir=tmp_path, device="cpu")
    ctx.measure = fake_measure
    largest_batch._write_step_row(ctx, model, opt, 20, "tiny", "full")
    rows = [r for r in ctx.writer.rows if r["op"] == largest_batch.ROW_OP]
    assert len(timed) == 2 and len(rows) == 1 and "B=20 (timed at B=19)" in rows[0]["shape"]


def test_largest_batch_search_stops_at_the_budget(tmp_path):
    from wmfast.bench import largest_batch
    from wmfast.bench.context import BudgetExhausted, make_context

    ctx = make_context(profile="quick", out_dir=tmp_path, device="cpu")
    ctx.deadline = 0.0  # long past: the first trial must not start
    with pytest.raises(BudgetExhausted):
        largest_batch.run(ctx, preset="tiny", max_batch=2)
