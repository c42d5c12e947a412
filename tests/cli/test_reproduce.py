"""`wmfast reproduce --quick`: the whole pipeline (uncertain synthetic data, the tiny ST-Transformers and the tiny
Wan LoRA trained by `wmfast train`, generate, eval-psnr, the report) end to end, and the directions of the seed's
findings that hold even at this size: an ensemble mean scores at least the PSNR of one sample, the trained
compression model beats copying the last grid in CE, and the measured attention-memory ratio is the formula's."""
import json
import os
import subprocess
import sys

import pytest


def test_reproduce_refuses_an_out_of_other_settings(tmp_path, capsys):
    """A second run resumes the first one's training runs: with other settings it would mix them, so it refuses."""
    from wmfast.cli import main

    out = tmp_path / "repro"
    out.mkdir()
    (out / "reproduce.json").write_text(json.dumps({"scale": "full", "seed": 0}))
    assert main(["reproduce", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wmfast reproduce: error: --out" in err and "other settings" in err
    assert sorted(p.name for p in out.iterdir()) == ["reproduce.json"]  # nothing written


@pytest.mark.requires("diffusers", "peft", "deepspeed", "av")
def test_reproduce_quick(tmp_path):
    """Run as a user runs it: in its own process without the Triton interpreter (the suite's interpreter would run
    every LayerNorm of the training runs through Triton's Python emulation, about 100x slower)."""
    out = tmp_path / "repro"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "wmfast.cli", "reproduce", "--quick", "--out", str(out)], check=False,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["scale"] == "quick"

    rows = results["sampling"]["rows"]
    n_max = max(r["ensemble"] for r in rows)
    largest = [r for r in rows if r["ensemble"] == n_max]
    assert largest and all(r["psnr_pixel"] >= r["psnr_member"] for r in largest), largest
    refs = results["sampling"]["references"]
    assert set(refs) == {"bayes", "vae", "copy"} and refs["bayes"]["psnr"] > refs["copy"]["psnr"]

    c = results["compression"]
    assert c["models"]["factorized"]["ce"] < c["copy_last_grid"]["ce"]
    assert c["ceiling"]["ce"] < c["models"]["factorized"]["ce"]
    real = next(r for r in c["memory"] if (r["T"], r["S"]) == (5, 1024))
    assert abs(real["scores_pct"] - real["formula_pct"]) <= 1.0 and abs(real["formula_pct"] - 20.1) < 0.05

    md = (out / "results.md").read_text()
    assert "seed (real data, 5B model, 8xB200)" in md and "wmfast (synthetic, tiny, CPU" in md
    assert md.count("| yes |") + md.count("| no |") == 4  # a verdict for each finding
    for png in ("ce_curves.png", "psnr_vs_n.png", "psnr_vs_steps.png"):
        assert (out / png).stat().st_size > 10_000, png
    assert "wmfast reproduce: done" in done.stdout
    settings = json.loads((out / "reproduce.json").read_text())
    assert settings["scale"] == "quick" and settings["seed"] == 0
