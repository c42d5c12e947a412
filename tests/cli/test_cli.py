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

    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and "Traceback" not in err


def test_every_command_parses_its_help(capsys):
    from wmfast.cli import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
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
