"""The real --quick paths of benchmarks/bench_ensemble.py, bench_wan_block.py and bench_st_generate.py (CI ran
none of them before): each script's main(["--quick"]) on the CPU must exit 0 and write its rows.

Runtime: the kernels run under TRITON_INTERPRET=1 (set by conftest, as the scripts set it without CUDA) at the
scripts' tiny quick shapes (bench_ensemble --quick takes 1 Euler step). Measured on the shared 2-core machine
while other jobs ran: 44-47 s for the file (bench_ensemble 30-42 s of it; bench_wan_block took 1.2 s in a quiet
moment and 10 s in a loaded one), so within 60 s idle; WMFAST_BACKEND stays at its default, so the
interpreted kernels are what runs (bench_st_attention.py is covered by its owner, bench_train.py by
test_train_bench.py)."""
import csv
from pathlib import Path

import pytest

from wmfast.bench.discovery import load_bench_script

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = {  # script -> (csv name, ops its rows must contain)
    "bench_ensemble.py": ("bench_ensemble.csv", {"ensemble_sample", "dit_forward", "ensemble_predict"}),
    "bench_wan_block.py": ("bench_wan_block.csv", {"wan_block"}),
    "bench_st_generate.py": ("bench_st_generate.csv", None),
}
REQUIRES = {"bench_ensemble.py": ("diffusers",), "bench_wan_block.py": ("diffusers",)}  # the Wan model, its block


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.requires(*REQUIRES.get(s, ())), id=s)
                                    for s in sorted(SCRIPTS)])
def test_bench_script_quick(script, tmp_path):
    module = load_bench_script(BENCH_DIR / script)
    assert module.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    name, ops = SCRIPTS[script]
    with open(tmp_path / name, newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["op"].startswith("ceiling:")]
    assert rows, f"{script} wrote no rows"
    assert all(float(r["median_ms"]) > 0 for r in rows)
    if ops:
        assert ops <= {r["op"] for r in rows}
    if script == "bench_ensemble.py":  # item of the audit: the sampling rows carry FLOPs (fraction_of_ceiling set)
        assert all(r["fraction_of_ceiling"] for r in rows if r["op"] == "ensemble_sample")
        # the latency section: one e2e row and one row per phase for each N; the denoise row's fraction is floor/denoise
        predict = {(r["provider"], r["shape"].split()[0], r["mode"]): r for r in rows if r["op"] == "ensemble_predict"}
        modes = ("e2e", "conditioning", "denoise", "decode", "average")
        # the variants (latent averaging only, the step cache) at N=2; compiled and fp8 need a GPU
        expected = [("batched", n) for n in (1, 2)] + [("batched-latent-avg", 2), ("batched-cache", 2)]
        assert set(predict) == {(p, f"N={n}", m) for p, n in expected for m in modes}
        assert all(bool(r["fraction_of_ceiling"]) == (key[2] == "denoise") for key, r in predict.items())
        # the quick cache row: 3 steps, the middle one skipped (one step alone has nothing to skip)
        assert "| batched-cache | 2 | 3 |" in (tmp_path / "bench_ensemble_latency.md").read_text()
        assert "| 1 | - |" in (tmp_path / "bench_ensemble_latency.md").read_text()  # no speed-up across step counts
        assert (tmp_path / "plot_ensemble-latency.png").stat().st_size > 0
        assert "| N | total s |" in (tmp_path / "bench_ensemble_latency.md").read_text()
    if script == "bench_wan_block.py":  # the kernel gain and the K/V caching gain reported apart
        assert {"diffusers", "wmfast", "wmfast-kv-in-call"} <= {r["provider"] for r in rows if r["mode"] == "fwd"}


def test_liger_provider_modulation_matches_reference(monkeypatch):
    """bench_adaln's optional `liger` provider: its modulation around Liger's LayerNorm (faked here by torch's,
    liger_kernel is not installed in CI) equals the reference for per-sample, per-frame and per-token views;
    without liger_kernel the provider is None (skipped with a log line)."""
    import sys
    import types

    import torch
    import torch.nn.functional as F
    from wmfast.kernels.adaln import layernorm_modulate_ref

    bench = load_bench_script(BENCH_DIR / "bench_adaln.py")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    assert bench._liger_layernorm_modulate() is None
    fake = types.ModuleType("liger_kernel.ops.layer_norm")
    fake.LigerLayerNormFunction = types.SimpleNamespace(
        apply=lambda x, w, b, eps: F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), eps).to(x.dtype))
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.layer_norm", fake)
    fn = bench._liger_layernorm_modulate()
    B, L, D, fl = 2, 6, 8, 3
    x = torch.randn(B, L, D)
    for rows, kw in (((), {}), ((L // fl,), {"frame_len": fl}), ((L,), {})):
        shift, scale = (torch.randn(B, *rows, D) for _ in range(2))
        torch.testing.assert_close(fn(x, shift, scale, **kw), layernorm_modulate_ref(x, shift, scale, **kw))


def test_bench_ensemble_sections_come_from_the_environment(monkeypatch):
    bench = load_bench_script(BENCH_DIR / "bench_ensemble.py")
    monkeypatch.delenv(bench.SECTIONS_ENV, raising=False)
    assert bench.chosen_sections() == ("sampling", "latency")
    monkeypatch.setenv(bench.SECTIONS_ENV, " latency ")
    assert bench.chosen_sections() == ("latency",)
    monkeypatch.setenv(bench.SECTIONS_ENV, "latency,sampling")
    assert bench.chosen_sections() == ("sampling", "latency")
    monkeypatch.setenv(bench.SECTIONS_ENV, "latncy")
    with pytest.raises(ValueError, match="sampling, latency"):
        bench.chosen_sections()
