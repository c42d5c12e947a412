"""The entry point imports only the module of the command being run."""
import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_help_imports_no_command():
    mods = _modules_after("import contextlib, io\nfrom wmfast.cli import main\n"
                          "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): "
                          "main(['--help'])")
    from wmfast.cli import COMMANDS

    assert "wmfast.cli" in mods and not {f"wmfast.cli.{m}" for m, _ in COMMANDS.values()} & mods


def test_a_command_imports_only_its_module():
    mods = _modules_after("from wmfast.cli import build_parser; build_parser('env').parse_args(['env'])")
    commands = {m for m in mods if m.startswith("wmfast.cli.")}  # wmfast.cli itself is the entry point
    assert commands == {"wmfast.cli.env"}, commands
    assert "wmfast.train" not in mods and "deepspeed" not in mods


def test_unknown_command_is_one_line_exit_2(capsys):
    from wmfast.cli import main

    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and "Traceback" not in err


def test_every_command_parses_its_help(capsys):
    from wmfast.cli import COMMANDS, main

    for name in COMMANDS:
        assert main([name, "--help"]) == 0, name
        assert f"usage: wmfast {name}" in capsys.readouterr().out


def test_train_flags_reach_the_config():
    import argparse
    import json

    from wmfast.cli.train import add_arguments, config_from_args
    from wmfast.train import TrainConfig

    p = argparse.ArgumentParser()
    add_arguments(p)

    def cfg(*args):
        return config_from_args(p.parse_args(["--config", "tiny", *args]))

    assert cfg().compile is False and cfg("--compile").compile is True and cfg("--no-compile").compile is False
    assert cfg("--zero", "0").zero_stage == 0 and cfg().zero_stage == 2  # the preset's stage is unchanged
    compiled = cfg("--compile", "--zero", "0")
    saved = json.loads(json.dumps(compiled.to_dict()))  # as config.json and trainer_state.json store it
    assert saved["compile"] is True and TrainConfig.from_dict(saved) == compiled
    del saved["compile"]  # a run saved before the field existed
    assert TrainConfig.from_dict(saved).compile is False


def test_sample_solver_flag_reaches_the_config(capsys):
    from wmfast.cli import _sampling, build_parser
    from wmfast.inference.solvers import SOLVERS

    def parse(*extra):
        return build_parser("sample").parse_args(["sample", "--model", "tiny", "--data", "d", "--out", "o", *extra])

    assert parse().solver == "euler"
    args = parse("--solver", "unipc")
    assert _sampling.ensemble_config(args, 2, 3, args.solver).solver == "unipc"
    with pytest.raises(SystemExit) as e:
        parse("--solver", "heun")
    assert e.value.code == 2 and "invalid choice: 'heun'" in capsys.readouterr().err
    assert _sampling.SOLVERS == SOLVERS  # the CLI's copy (kept so --help does not import the sampler)


def test_eval_psnr_bad_solver_is_one_line_exit_2(capsys, tmp_path):
    from wmfast.cli import main

    # checked before the model or the data is touched
    assert main(["eval-psnr", "--model", "tiny", "--data", str(tmp_path / "none"), "--solver", "euler,heun"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wmfast eval-psnr: error: --solver: ") and "'euler,heun'" in err and err.count("\n") == 1
    assert main(["eval-psnr", "--model", "tiny", "--data", str(tmp_path / "none"), "--cache-threshold", "0,-1"]) == 2
    assert capsys.readouterr().err == "wmfast eval-psnr: error: --cache-threshold: expected numbers >= 0, got '0,-1'\n"


def test_fp8_without_fp8_tensor_cores_is_one_line_exit_2(capsys, tmp_path):
    from wmfast.cli import main

    # checked before the weights load and before the data is opened
    assert main(["sample", "--model", "tiny", "--data", str(tmp_path / "none"), "--device", "cpu", "--fp8",
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("wmfast sample: error: --fp8: fp8 GEMMs need a CUDA GPU of compute capability "
                                       "8.9+ (Ada/Hopper); cpu has none\n")


def test_eval_psnr_tables_and_plot_per_solver(tmp_path):
    import csv

    from wmfast.cli.eval_psnr import _solver_list, _threshold_list, markdown_table, plot, plot_cache, write_tables

    assert _solver_list(" unipc,euler,unipc ") == ["unipc", "euler"]
    rows = [{"solver": s, "steps": k, "cache_threshold": th, "skipped_steps": int(th * k), "ensemble": n,
             "psnr_pixel": 20.0 + n - th, "psnr_latent": 19.0 + n, "psnr_member": 18.0, "sharpness_pixel": 10.0 / n,
             "sharpness_latent": 9.0 / n, "sharpness_member": 10.0, "sharpness_target": 12.0,
             "seconds_per_sample": 0.5 * k * (1 - th / 2),
             "samples": 3} for s in ("euler", "unipc") for k in (2, 4) for th in (0.0, 0.5) for n in (1, 2)]
    write_tables(rows, str(tmp_path))
    table = (tmp_path / "psnr.md").read_text().splitlines()
    assert table[0] == ("| solver | steps | cache threshold | skipped steps | N | PSNR pixel avg (dB) | "
                        "PSNR latent avg (dB) | PSNR one member (dB) | sharpness pixel avg | sharpness one member | "
                        "denoise s/sample (N=2) | samples |")
    assert table[-2] == "| unipc | 4 | 0.5 | 2 | 2 | 21.500 | 21.000 | 18.000 | 5.00 | 10.00 | 1.500 | 3 |"
    assert table[-1].startswith("sharpness: RMS gradient magnitude (grey levels per pixel); the true frames: 12.00.")
    assert table == markdown_table(rows).splitlines()
    plot_cache(rows, str(tmp_path / "psnr_cache.png"))
    assert (tmp_path / "psnr_cache.png").stat().st_size > 0
    assert _threshold_list("0.1, 0,0.1") == [0.0, 0.1]
    for bad in ("nan", "0,-1", ","):
        with pytest.raises(ValueError, match="--cache-threshold: expected numbers >= 0"):
            _threshold_list(bad)
    rows = [r for r in rows if r["cache_threshold"] == 0]
    saved = list(csv.DictReader((tmp_path / "psnr.csv").read_text().splitlines()))
    assert saved[0]["solver"] == "euler" and float(saved[-1]["seconds_per_sample"]) == 1.5
    plot(rows, str(tmp_path / "psnr.png"))
    from PIL import Image

    assert Image.open(tmp_path / "psnr.png").size[0] > Image.open(tmp_path / "psnr.png").size[1] * 2  # two panels
