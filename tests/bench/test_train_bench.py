"""benchmarks/bench_train.py --quick runs (the tiny presets on CPU) and writes its rows and summary."""
import csv
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.requires("deepspeed")
def test_bench_train_quick(tmp_path, monkeypatch):
    from wmfast.bench.context import make_context

    monkeypatch.setenv("WMFAST_PROGRESS", "0")
    monkeypatch.setenv("WMFAST_PEAK_TFLOPS", "0.001")  # a known "datasheet" peak (1 GFLOP/s): the CPU run gets an MFU
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(REPO, "benchmarks", "bench_train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ctx = make_context(quick=True, out_dir=tmp_path, device="cpu", csv_name="bench_train.csv", log=lambda s: None)
    mod.run(ctx)
    rows = [r for r in ctx.writer.rows if r["op"] == "train_step"]
    assert {r["provider"] for r in rows} == {"wmfast", "torch"} and all(float(r["median_ms"]) > 0 for r in rows)
    with open(tmp_path / "bench_train_summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert {(s["preset"], s["zero"], s["activation_checkpointing"]) for s in summary} == {
        ("tiny", "0", "False"), ("tiny-reference", "3", "True")}  # the new block beside the old one
    assert all(float(s["samples_per_s"]) > 0 and int(s["micro_batch"]) == 1 for s in summary)
    # MFU is against the datasheet peak (here 1 GFLOP/s); the measured matmul ceiling is a separate column
    from wmfast.models import STTransformerConfig, flops_per_sample

    per_sample = flops_per_sample(STTransformerConfig.from_name("tiny"))
    for s in summary:
        assert float(s["mfu"]) == pytest.approx(float(s["samples_per_s"]) * per_sample / 1e9, rel=2e-3)
        assert float(s["fraction_of_matmul_ceiling"]) > 0
    assert (tmp_path / "bench_train_runs" / "tiny-z0-nockpt-wmfast" / "micro_batch.json").is_file()
    with open(tmp_path / "bench_train_kernels.csv") as f:  # the profiled step's breakdown by kernel
        kernels = list(csv.DictReader(f))
    assert kernels and {k["config"] for k in kernels} == {"tiny zero=0 mb=1 wmfast"}
    assert any("addmm" in k["kernel"] or "mm" in k["kernel"] for k in kernels)
    assert sum(float(k["share"]) for k in kernels) == pytest.approx(1.0, abs=0.01)
