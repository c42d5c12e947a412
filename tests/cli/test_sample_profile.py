"""`wmfast sample --profile`: the table of where the time went (every phase, seconds and share of the total), the
timings in sample.json, and --decode-batch / --vae-tiling reaching the prediction (tiny model, synthetic 1X raw
data at 64x64, CPU; WMFAST_BACKEND=torch: the CLI is under test, not the kernels)."""
import json

import pytest

pytestmark = [pytest.mark.requires("diffusers", "av")]

PHASES = ("conditioning", "denoise", "decode", "average")


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    from wmfast.data.raw_synthetic import write_synthetic_raw_dataset

    data = tmp_path_factory.mktemp("sample_profile") / "raw"
    write_synthetic_raw_dataset(str(data), shards=1, frames=154, size=64, val_frames=77)
    return data


def _sample(data, out, *extra):
    from wmfast.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WMFAST_BACKEND", "torch")
        return main(["sample", "--model", "tiny", "--data", str(data), "--ensemble", "3", "--steps", "2",
                     "--no-progress", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def profiled(raw_data, tmp_path_factory):
    """One `wmfast sample --profile` run: (sample.json, stdout)."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("profiled"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _sample(raw_data, out, "--profile") == 0
    return json.loads((out / "sample.json").read_text()), printed.getvalue()


def test_profile_prints_every_phase_and_the_numbers_add_up(profiled):
    report, out = profiled
    timings = report["timings"]
    assert list(timings) == [*PHASES, "total"]
    phases = sum(timings[p] for p in PHASES)
    assert all(timings[p] > 0 for p in PHASES)
    assert 0.9 * timings["total"] < phases <= timings["total"], timings
    assert report["denoise_s"] == timings["denoise"]
    assert "peak_memory_bytes" not in report  # CUDA only
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(PHASES) | {"other", "total"} <= set(rows), out
    for phase in PHASES:  # seconds as printed (3 decimals) and the share of the total
        cells = [c.strip() for c in rows[phase].split("|")[1:-1]]
        assert float(cells[1]) == pytest.approx(timings[phase], abs=6e-4)
        assert float(cells[2].rstrip("%")) == pytest.approx(100 * timings[phase] / timings["total"], abs=0.06)
    assert float(rows["total"].split("|")[3].strip().rstrip("%")) == 100.0


def test_decode_batch_and_vae_tiling_reach_the_prediction(raw_data, profiled, tmp_path, capsys):
    reports = {"all": profiled[0]}
    for name, extra in {"one": ("--decode-batch", "1"), "tiled": ("--vae-tiling",)}.items():
        assert _sample(raw_data, tmp_path / name, *extra) == 0
        reports[name] = json.loads((tmp_path / name / "sample.json").read_text())
    assert "| phase |" not in capsys.readouterr().out  # the table only with --profile
    assert (reports["all"]["decode_batch"], reports["one"]["decode_batch"]) == (None, 1)
    assert (reports["all"]["vae_tiling"], reports["tiled"]["vae_tiling"]) == (False, True)
    # batching the decode changes no pixel of the saved PNG (float rounding at most); tiling changes the decode
    assert reports["one"]["psnr_pixel"] == pytest.approx(reports["all"]["psnr_pixel"], abs=1e-3)
    assert reports["tiled"]["psnr_pixel"] != pytest.approx(reports["all"]["psnr_pixel"], abs=1e-3)
    assert _sample(raw_data, tmp_path / "bad", "--decode-batch", "0") == 2
    assert "--decode-batch: '0'" in capsys.readouterr().err


def test_cache_threshold_calibrates_and_skips(raw_data, profiled, tmp_path, capsys):
    """--cache-threshold: a threshold no change reaches skips every step but the first and the last (the schedule
    is reported), and changes the prediction; 0 (the default) skips nothing; a negative one is one line, exit 2."""
    from wmfast.cli import main

    assert profiled[0]["skipped_steps"] == [] and profiled[0]["calibration_s"] == 0.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WMFAST_BACKEND", "torch")
        assert main(["sample", "--model", "tiny", "--data", str(raw_data), "--ensemble", "3", "--steps", "4",
                     "--cache-threshold", "1e9", "--no-progress", "--out", str(tmp_path / "c")]) == 0
        assert main(["sample", "--model", "tiny", "--data", str(raw_data), "--ensemble", "3", "--steps", "4",
                     "--no-progress", "--out", str(tmp_path / "p")]) == 0
    cached = json.loads((tmp_path / "c" / "sample.json").read_text())
    plain = json.loads((tmp_path / "p" / "sample.json").read_text())
    assert cached["skipped_steps"] == [1, 2] and cached["calibration_s"] > 0
    assert "2 skipped after" in capsys.readouterr().out
    assert cached["psnr_pixel"] != pytest.approx(plain["psnr_pixel"], abs=1e-6)
    assert _sample(raw_data, tmp_path / "bad", "--cache-threshold", "-0.5") == 2
    assert capsys.readouterr().err == "wmfast sample: error: --cache-threshold must be >= 0, got -0.5\n"
    assert _sample(raw_data, tmp_path / "nan", "--cache-threshold", "nan") == 2
    assert capsys.readouterr().err == "wmfast sample: error: --cache-threshold must be >= 0, got nan\n"
