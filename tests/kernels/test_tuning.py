"""The per-GPU launch-configuration table (wmfast.kernels.tuning): chosen from sweep rows, read by the kernels' launchers
and by the backend choice, with the hand-set constants as the fallback."""
from __future__ import annotations

import json

import pytest
import torch
from wmfast.kernels import tuning

from wmfast.bench import adopt
from wmfast.bench.results import ResultWriter
from wmfast.bench.timing import Measurement
from wmfast.ops import dispatch


def _row(op, shape, provider, mode, ms, spread=0.02):
    return {"op": op, "shape": shape, "provider": provider, "mode": mode, "median_ms": str(ms),
            "p20_ms": str(ms * (1 - spread)), "p80_ms": str(ms * (1 + spread)), "gpu_name": "Test GPU",
            "commit": "abc", "torch": "2.x", "triton": "3.x", "cuda": "13.0", "driver": "1", "timestamp": "t"}


TEMPORAL = "B=8 T=5 S=1024 H=8 Dh=64 bfloat16 causal"
ADALN = "wan2.2-5b B=8 L=1536 D=3072 bf16 mod=frame-fp32"
DECODE = "B=1 S=1024 H=8 Dh=64 T_max=6 t=5 bfloat16"


def test_hand_set_defaults_are_what_the_launchers_run():
    # T=5 -> BLOCK_T 8, Dh 64: 4096-element tiles -> 4 rows (fwd: k, v), 2 rows (bwd: k, v, dk, dv); 4 warps
    assert adopt.default_launch("temporal_attention_fwd", "T=5,Dh=64,bf16") == {"block_r": 4, "num_warps": 4}
    assert adopt.default_launch("temporal_attention_bwd", "T=5,Dh=64,bf16") == {"block_r": 2, "num_warps": 4}
    assert adopt.default_launch("temporal_decode", "T_max=6,Dh=64,bf16") == {"block_r": 4, "num_warps": 4}
    assert adopt.default_launch("adaln_fwd", "D=3072,bf16") == {"tile": 4096, "num_warps": 8}
    assert adopt.default_launch("adaln_bwd", "D=3072,bf16") == {"tile": 4096, "num_warps": 16}


def test_choose_adopts_only_what_beats_the_default_beyond_noise():
    sweep = "temporal_attention_sweep"
    rows = [_row("ceiling:copy", "N=1", "torch", "copy", 1.0),
            _row(sweep, TEMPORAL, "triton-br4-w4", "fwd", 0.80),  # the default
            _row(sweep, TEMPORAL, "triton-br16-w4", "fwd", 0.25),
            _row(sweep, TEMPORAL, "triton-br2-w4", "bwd", 0.99),  # the default
            _row(sweep, TEMPORAL, "triton-br8-w2", "bwd", 0.90, spread=0.2),  # faster median, inside the noise
            _row("gated_residual_layernorm_modulate_sweep", ADALN, "wmfast-triton-tile2048-w16", "fwd", 0.1),
            _row("temporal_decode_sweep", DECODE, "triton-br4-w4", "fwd", 0.05),  # the default, fastest
            _row("temporal_decode_sweep", DECODE, "triton-br8-w4", "fwd", 0.06)]
    t = adopt.choose(rows)
    assert t["gpu"] == "Test GPU" and t["measured"]["commit"] == "abc"
    key = tuning.temporal_key(5, 64, torch.bfloat16)
    assert key == "T=5,Dh=64,bf16"
    fwd = t["launch"]["temporal_attention_fwd"][key]
    assert (fwd["block_r"], fwd["num_warps"], fwd["configs_timed"], fwd["default_median_ms"]) == (16, 4, 2, 0.8)
    kept = t["kept_defaults"]
    assert "temporal_attention_bwd" not in t["launch"] and "noise" in kept["temporal_attention_bwd"][key]["reason"]
    assert "not timed" in kept["adaln_fwd"]["D=3072,bf16"]["reason"]  # no evidence against the default
    assert "is the fastest" in kept["temporal_decode"]["T_max=6,Dh=64,bf16"]["reason"]


def test_choose_sums_over_the_shapes_of_one_key():
    """Two batch sizes share a key: the configuration is chosen on both, not on whichever shape is smaller."""
    b1, b16 = DECODE, DECODE.replace("B=1 ", "B=16 ")
    rows = [_row("temporal_decode_sweep", b1, "triton-br4-w4", "fwd", 0.30),
            _row("temporal_decode_sweep", b16, "triton-br4-w4", "fwd", 3.00),
            _row("temporal_decode_sweep", b1, "triton-br1-w1", "fwd", 0.10),  # best at B=1 only
            _row("temporal_decode_sweep", b16, "triton-br1-w1", "fwd", 2.90),
            _row("temporal_decode_sweep", b1, "triton-br8-w2", "fwd", 0.20),
            _row("temporal_decode_sweep", b16, "triton-br8-w2", "fwd", 1.00),
            _row("temporal_decode_sweep", b16, "triton-br16-w4", "fwd", 0.10)]  # timed on one shape: not eligible
    entry = adopt.choose(rows)["launch"]["temporal_decode"]["T_max=6,Dh=64,bf16"]
    assert (entry["block_r"], entry["num_warps"], entry["configs_timed"], len(entry["shapes"])) == (8, 2, 3, 2)


def test_backend_choice_needs_both_kernels_beyond_noise_and_majority_is_default():
    s1, s2, s3 = ADALN, ADALN.replace("B=8", "B=1"), ADALN.replace("D=3072", "D=512")
    rows = [_row("layernorm_modulate", s1, "wmfast-cuda", "fwd+bwd", 1.0),
            _row("layernorm_modulate", s1, "wmfast-triton", "fwd+bwd", 2.0),
            _row("layernorm_modulate", s1, "torch.compile", "fwd+bwd", 0.5),  # a baseline: not a backend
            _row("layernorm_modulate", s2, "wmfast-cuda", "fwd", 1.0),
            _row("layernorm_modulate", s2, "wmfast-triton", "fwd", 0.5),
            _row("layernorm_modulate", s3, "wmfast-cuda", "fwd+bwd", 3.0),
            _row("layernorm_modulate", s3, "wmfast-triton", "fwd+bwd", 4.0),
            _row("layernorm_modulate", s3, "wmfast-cuda", "fwd", 1.0),  # within the noise: no entry
            _row("layernorm_modulate", s3, "wmfast-triton", "fwd", 1.01),
            _row("gated_residual_layernorm_modulate", s1, "wmfast-triton", "fwd", 1.0)]  # one kernel timed
    lm = adopt.choose(rows)["backend"]["layernorm_modulate"]
    assert lm["B=8,L=1536,D=3072,bf16,per-frame,grad"] == "cuda"
    assert lm["B=1,L=1536,D=3072,bf16,per-frame"] == "triton"  # fwd rows: the key without ",grad"
    assert "B=8,L=1536,D=512,bf16,per-frame" not in lm
    assert lm["*"] == "cuda"  # 2 shapes of 3
    assert "gated_residual_layernorm_modulate" not in adopt.choose(rows)["backend"]


@pytest.fixture
def fake_table(monkeypatch, tmp_path):
    """A GPU named "Test GPU" whose table is written to a temporary kernels/configs/ directory."""
    monkeypatch.setattr(tuning, "config_dir", lambda: tmp_path)
    monkeypatch.setattr(tuning, "device_gpu", lambda device: "Test GPU" if torch.device(device).type == "cuda"
                        else None)
    tuning.load_table.cache_clear()
    yield lambda table: (adopt.write_table(table, tuning.table_path("Test GPU")), tuning.load_table.cache_clear())
    tuning.load_table.cache_clear()


def test_launchers_read_the_table_else_defaults(fake_table):
    from wmfast.kernels import adaln, temporal_attention

    cuda = torch.device("cuda")
    key = tuning.temporal_key(5, 64, torch.bfloat16)
    assert temporal_attention._launch_params("temporal_attention_fwd", key, cuda, None, None) == (None, 4)
    fake_table({"launch": {"temporal_attention_fwd": {key: {"block_r": 2, "num_warps": 8, "median_ms": 0.1}},
                           "adaln_bwd": {"D=3072,bf16": {"tile": 8192, "num_warps": 16}}}})
    assert temporal_attention._launch_params("temporal_attention_fwd", key, cuda, None, None) == (2, 8)
    assert temporal_attention._launch_params("temporal_attention_fwd", key, cuda, 16, None) == (16, 4)  # caller wins
    assert temporal_attention._launch_params("temporal_attention_bwd", key, cuda, None, None) == (None, 4)
    x = torch.empty(1, 1, 3072, dtype=torch.bfloat16, device="meta")
    x_cuda = type("T", (), {"device": cuda, "dtype": torch.bfloat16})()
    assert adaln._launch_params("adaln_bwd", 3072, x_cuda, None, None) == (8192, 16)
    assert adaln._launch_params("adaln_fwd", 3072, x_cuda, None, None) == (None, None)
    assert adaln._launch_params("adaln_bwd", 3072, x, None, None) == (None, None)  # not a CUDA tensor


def test_backend_reads_measured_table(fake_table, monkeypatch):
    fake_table({"backend": {"temporal_decode_step": {"B=1,S=1024,H=8,T_max=6,Dh=64,bf16": "triton", "*": "cuda"}}})
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "cuda_ext_available", lambda: (True, "test"))
    monkeypatch.setattr(dispatch, "triton_available", lambda: (True, "test"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    sel = dispatch.select_backend
    prefs = ("cuda", "triton", "torch")
    assert sel("temporal_decode_step", torch.device("cuda"), order=prefs,
               shape_key="B=1,S=1024,H=8,T_max=6,Dh=64,bf16") == "triton"
    assert sel("temporal_decode_step", torch.device("cuda"), order=("triton", "cuda", "torch"),
               shape_key="other") == "cuda"


def test_broken_table_falls_back_with_a_warning(fake_table, caplog):
    tuning.table_path("Test GPU").write_text("{not json")
    tuning.load_table.cache_clear()
    assert tuning.launch_config("adaln_fwd", "D=3072,bf16", "cuda") == {}
    assert "ignoring" in caplog.text


def test_adopt_writes_the_table(tmp_path, monkeypatch, capsys):
    from wmfast.cli import main

    monkeypatch.setattr(tuning, "config_dir", lambda: tmp_path / "configs")
    run = tmp_path / "run"
    w = ResultWriter(run / "results.csv", device="cpu")
    m = Measurement(0.3, 0.29, 0.31)
    w.add("temporal_attention_sweep", TEMPORAL, "triton-br2-w2", "fwd", m)
    w.add("temporal_attention_sweep", TEMPORAL, "triton-br4-w4", "fwd", Measurement(0.9, 0.89, 0.91))  # default
    assert main(["bench", "--adopt", str(run)]) == 0
    written = list((tmp_path / "configs").glob("*.json"))
    assert len(written) == 1 and "temporal_attention_fwd" in json.loads(written[0].read_text())["launch"]
    empty = tmp_path / "empty"
    ResultWriter(empty / "results.csv", device="cpu").add("op", "N=1", "torch", "fwd", m)
    assert main(["bench", "--adopt", str(empty)]) == 2
    assert "no sweep or backend rows" in capsys.readouterr().err
