"""`wmfast env`: the report names every backend with a reason, and the CLI prints it (text and JSON)."""
from __future__ import annotations

import json

from wmfast.kernels._launch import triton_interpret

from wmfast.cli import main
from wmfast.env import collect_env, format_env, nvcc_version


def test_collect_env_reports_backends_and_versions():
    env = collect_env()
    assert env["torch"] and env["packages"]["triton"]
    assert set(env["backends"]) == {"triton", "cuda", "torch"}
    for b in env["backends"].values():
        assert isinstance(b["usable"], bool) and b["reason"]
    # conftest sets TRITON_INTERPRET=1 without a GPU: the kernels are usable on CPU tensors and selected for them;
    # with a GPU they are usable and selected for CUDA tensors (unless the CUDA extension is)
    assert env["backends"]["triton"]["usable"]
    if triton_interpret():
        assert env["selected"]["cpu"] == "triton"
    else:
        assert env["selected"]["cpu"] == "torch" and env["selected"]["cuda"] in ("triton", "cuda")
    text = format_env(env)
    assert "backends:" in text and "triton" in text and "GPU" in text and "nvcc " in text


def test_env_reports_nvcc_and_wmfast_env_vars(monkeypatch):
    import shutil

    monkeypatch.setenv("WMFAST_CUDA_ARCHS", "90")
    monkeypatch.setenv("WMFAST_AUTOTUNE", "0")
    env = collect_env()
    assert env["env_vars"]["WMFAST_CUDA_ARCHS"] == "90" and env["env_vars"]["WMFAST_AUTOTUNE"] == "0"
    if shutil.which("nvcc"):
        assert env["nvcc"].startswith("release "), env["nvcc"]
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    assert nvcc_version() is None


def test_cli_env_json(capsys):
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["backends"]["torch"]["usable"] is True
    assert isinstance(env["gpus_nvml"], list) and env["nvml_note"]


def test_cli_env_forced_backend_that_cannot_run(monkeypatch, capsys):
    monkeypatch.setenv("WMFAST_BACKEND", "cuda")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "cpu tensors -> error: WMFAST_BACKEND=cuda" in out
