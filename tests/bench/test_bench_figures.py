"""Benchmark PNGs (wmfast.bench.figures.save_figure): a figure whose numbers were not measured on a GPU carries a
red "not GPU performance" subtitle, decided from the run's records (results.csv gpu_name, the attention-memory
method) when redrawn from files and from the measuring process (device, TRITON_INTERPRET) during a run."""
from types import SimpleNamespace

import pytest
import torch

from wmfast.bench import figures
from wmfast.bench.attention_memory import _ratio_rows, plot_ratios
from wmfast.bench.report import plot_results

CPU = "cpu (x86_64, 2 threads)"


@pytest.fixture
def saved(monkeypatch):
    """The figures written through save_figure, as (path name, suptitle, suptitle colour)."""
    from matplotlib.colors import to_hex

    real, out = figures.save_figure, []

    def record(fig, path, **kw):
        written = real(fig, path, **kw)
        title = next((t for t in fig.texts if fig.get_suptitle() and t.get_text() == fig.get_suptitle()), None)
        out.append((written.name, fig.get_suptitle(), to_hex(title.get_color()) if title is not None else None))
        assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return written

    monkeypatch.setattr(figures, "save_figure", record)
    return out


def result_rows(gpu_name: str) -> list[dict]:
    return [{"op": "relu", "shape": "N=256", "mode": "fwd", "provider": p, "median_ms": m, "p20_ms": m, "p80_ms": m,
             "gpu_name": gpu_name} for p, m in (("torch", "0.02"), ("wmfast-triton", "0.5"))]


def test_records_and_process_decide_where_numbers_come_from(monkeypatch):
    assert figures.recorded_off_gpu(CPU) and figures.recorded_off_gpu("CPU")
    assert not figures.recorded_off_gpu("NVIDIA H100 80GB HBM3") and not figures.recorded_off_gpu("")
    assert not figures.recorded_off_gpu(None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert figures.running_off_gpu(torch.device("cpu")) and figures.running_off_gpu("cpu")
    assert not figures.running_off_gpu(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert figures.running_off_gpu("cuda")  # interpreted kernels are not GPU performance either
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not figures.running_off_gpu("cuda")


def test_op_plots_of_a_cpu_run_say_so_in_red(tmp_path, saved):
    plot_results(result_rows(CPU), tmp_path)
    assert saved == [("plot_relu.png", figures.NOT_GPU_NOTE, "#ff0000")]
    assert "not GPU performance" in figures.NOT_GPU_NOTE


def test_op_plots_of_a_gpu_run_are_not_marked_even_when_redrawn_on_a_cpu(tmp_path, saved, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the redrawing process; the rows say where they were measured
    plot_results(result_rows("NVIDIA H200"), tmp_path)
    assert saved == [("plot_relu.png", "", None)]


def test_attention_memory_plot_marked_from_its_method(tmp_path, saved):
    peaks = {(impl, attn, mode): 100 if attn == "full" else 10 for impl in ("eager", "fused")
             for attn in ("full", "factorized") for mode in ("fwd", "fwd+bwd", "saved")}
    for method, marked in (("cpu live-bytes estimate", True), ("cuda max_memory_allocated", False)):
        rows = [r for T in (2, 5) for S in (16, 64) for r in _ratio_rows(T, S, f"T={T} S={S}", peaks, method)]
        plot_ratios(rows, tmp_path / "attention_memory.png")
        assert saved[-1][1] == (figures.NOT_GPU_NOTE if marked else "")
    plot_ratios(rows, tmp_path / "attention_memory.png", off_gpu=True)  # the measuring run says so itself
    assert saved[-1][1] == figures.NOT_GPU_NOTE


def test_ensemble_latency_plot_marked_on_the_cpu(tmp_path, saved):
    from wmfast.bench.ensemble_latency import _latency_plot

    ctx = SimpleNamespace(out_dir=tmp_path, device=torch.device("cpu"))
    model = SimpleNamespace(preset=SimpleNamespace(name="tiny", height=64, width=64))
    table = [{"n": n, "conditioning": 0.1, "denoise": 0.2 * n, "decode": 0.05 * n, "average": 0.01, "floor": 0.01,
              "total": 0.11 + 0.26 * n} for n in (1, 2)]
    _latency_plot(ctx, model, table, steps=4)
    assert saved == [("plot_ensemble-latency.png", figures.NOT_GPU_NOTE, "#ff0000")]


def test_existing_suptitle_is_kept_above_the_note(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    fig.suptitle("ops")
    figures.save_figure(fig, tmp_path / "f.png", off_gpu=True)
    assert fig.get_suptitle() == f"ops\n{figures.NOT_GPU_NOTE}"
