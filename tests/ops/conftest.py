"""Fixtures of the ops tests: forcing a backend for one test (use_backend), the Triton backend on DEVICE, and the
sm_90a compile checks (tests/ops/*_compile_check.py) run in a subprocess."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from wmfast.kernels._launch import triton_interpret

from wmfast.ops import use_backend

# Where the Triton kernels run in this session: CPU tensors under the interpreter (CI), else the GPU (conftest
# leaves TRITON_INTERPRET unset when a GPU is present, so the same tests then run the compiled kernels).
DEVICE = "cpu" if triton_interpret() or not torch.cuda.is_available() else "cuda"


@pytest.fixture
def force_backend():
    """force_backend("triton"): every op in the rest of the test runs on that backend (a later call overrides an
    earlier one); restored when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(use_backend(name))


@pytest.fixture
def on_device():
    """Tensors created on DEVICE by default for the rest of the test."""
    if DEVICE == "cpu":  # (a default-device mode costs every op a Python dispatch: only when needed)
        yield
        return
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


@pytest.fixture
def triton_backend(force_backend, on_device):
    """The triton backend forced, tensors created on DEVICE by default."""
    force_backend("triton")


@pytest.fixture
def sm90_compile_check():
    """run(script, *args) -> the JSON object tests/ops/<script> prints last, run in a subprocess WITHOUT
    TRITON_INTERPRET (the GPU registration path) on any machine; skips where Triton has no ptxas for sm_90a."""
    import triton

    if not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")):
        pytest.skip("this Triton has no NVIDIA backend binaries (ptxas) to compile for sm_90a")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(script: str, *args: str) -> dict:
        path = os.path.join(os.path.dirname(__file__), script)
        proc = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=600, env=env,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
