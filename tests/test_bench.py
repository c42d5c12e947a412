"""The benchmark harness (wmfast.benchmarking) and the `wmfast bench` suite, on the CPU with tiny shapes.

No timing is asserted (CI machines are shared); the statistics, memory accounting, CSV schema, discovery
and the output files are."""
from __future__ import annotations

import csv
import os
import textwrap

import pytest
import torch

from wmfast import benchmarking as bm


def test_measure_cpu_statistics_and_memory():
    x = torch.randn(256, 256)
    m = bm.measure(lambda: x @ x, warmup=1, rep=5, device="cpu")
    assert m.reps >= 5 and m.p20_ms <= m.median_ms <= m.p80_ms and m.median_ms > 0
    # the only new tensor of one call is the 256x256 fp32 product
    assert m.peak_mem_method == "cpu-estimate" and m.peak_mem_bytes == 256 * 256 * 4


def test_measure_resets_grads():
    w = torch.randn(8, requires_grad=True)
    seen = []

    def step():
        seen.append(w.grad is None)
        (w * 2).sum().backward()

    bm.measure(step, warmup=0.1, rep=0.1, grad_to_none=[w], device="cpu", memory=False)
    assert all(seen)


def test_live_bytes_tracker_counts_frees_and_views():
    pre = torch.randn(64, 64)
    with bm.LiveBytesTracker() as t:
        a = pre @ pre          # +16 KiB
        v = a.t()              # a view: no new storage
        b = a.softmax(-1)      # +16 KiB -> peak 32 KiB
        del a, v
        pre.add_(1)            # in place on a tensor from before: not counted
        c = b * 2              # b still alive: 32 KiB again
        del b, c
    assert t.peak == 2 * 64 * 64 * 4 and t.allocated == 3 * 64 * 64 * 4 and t.current == 0


def test_writer_columns_roofline_and_header_check(tmp_path):
    ceil = bm.Ceilings("cpu", copy_gbps=100.0, matmul_tflops={"bf16": 10.0, "fp32": 1.0})
    w = bm.ResultWriter(tmp_path / "r.csv", ceilings=ceil, device="cpu")
    m = bm.Measurement(median_ms=1.0, p20_ms=0.9, p80_ms=1.1, peak_mem_bytes=2**20)
    # 50 MB in 1 ms = 50 GB/s against 100 GB/s; 1 GFLOP in 1 ms = 1 TFLOP/s against 1 (fp32): compute-bound
    w.add("op", "N=1", "torch", "fwd", m, bytes=50e6)
    w.add("op", "N=1", "torch", "fwd", m, bytes=50e6, flops=1e9, dtype=torch.float32)
    rows = bm.read_rows(tmp_path / "r.csv")
    assert tuple(rows[0]) == bm.COLUMNS and len(rows) == 2
    assert float(rows[0]["gbps"]) == pytest.approx(50) and float(rows[0]["fraction_of_ceiling"]) == pytest.approx(.5)
    assert float(rows[1]["tflops"]) == pytest.approx(1) and float(rows[1]["fraction_of_ceiling"]) == pytest.approx(1)
    assert rows[0]["peak_mem_mb"] == "1.000" and rows[0]["torch"] == torch.__version__ and rows[0]["timestamp"]
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        bm.ResultWriter(tmp_path / "other.csv")


def test_ceilings_quick_cpu(tmp_path):
    w = bm.ResultWriter(tmp_path / "c.csv", device="cpu")
    c = bm.ceilings("cpu", quick=True, writer=w)
    assert c.copy_gbps > 0 and set(c.matmul_tflops) == {"bf16", "fp32"}
    assert [r["op"] for r in w.rows] == ["ceiling:copy", "ceiling:matmul", "ceiling:matmul"]


def test_git_commit_outside_checkout(tmp_path):
    assert bm.git_commit(tmp_path) == "unknown"


def test_gpu_sampler_noop_without_gpu():
    with bm.GpuSampler(interval_s=0.01) as s:
        pass
    if not torch.cuda.is_available():
        assert not s.available and s.samples == [] and s.summary() == {}


def test_find_bench_dir_and_load(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="--bench-dir"):
        bm.find_bench_dir(empty)
    (tmp_path / "bench_x.py").write_text(textwrap.dedent("""
        SUITE = "train"
        def run(ctx):
            ctx.log("ran")
    """))
    monkeypatch.setenv("WMFAST_BENCH_DIR", str(tmp_path))
    assert bm.find_bench_dir() == tmp_path
    mod = bm.load_bench_script(tmp_path / "bench_x.py")
    assert mod.SUITE == "train" and callable(mod.run)
    (tmp_path / "bench_bad.py").write_text("x = 1\n")
    with pytest.raises(TypeError, match="run"):
        bm.load_bench_script(tmp_path / "bench_bad.py")


def test_script_main_writes_csv(tmp_path):
    def run(ctx):
        x = torch.randn(64)
        ctx.bench("relu", "N=64", "torch", "fwd", lambda: torch.relu(x), bytes=2 * x.nbytes, dtype=x.dtype)

    assert bm.script_main(run, ["--quick", "--out", str(tmp_path), "--device", "cpu"], name="t") == 0
    with open(tmp_path / "bench_t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["op"] for r in rows][-1] == "relu" and os.path.getsize(tmp_path / "bench_t.csv") > 0
