"""Fixtures of the ops tests: forcing a backend for one test (use_backend), and the Triton backend on DEVICE."""
import contextlib

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
