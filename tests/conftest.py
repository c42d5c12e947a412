"""Shared test set-up: the Triton interpreter (so the real kernels run on the CPU), seeding, the GPU and
optional-package markers."""
import importlib.util
import os

import torch

# Must be set before anything imports triton. Without a GPU the interpreter runs the real Triton kernels on CPU
# tensors; with one, the compiled kernels run (an explicit TRITON_INTERPRET in the environment always wins).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import random

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: multi-process or long-running CPU tests")
    config.addinivalue_line("markers", "requires(*packages): needs these optional packages, e.g. "
                            "requires('deepspeed'); skipped where one is not installed")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device") if not torch.cuda.is_available() else None
    for item in items:
        if no_gpu and "gpu" in item.keywords:
            item.add_marker(no_gpu)
        # find_spec looks the package up without importing it (importing deepspeed or diffusers takes seconds).
        missing = [name for mark in item.iter_markers("requires") for name in mark.args
                   if importlib.util.find_spec(name) is None]
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} (optional, not installed)"))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    import wmfast

    return [(f"wmfast {wmfast.__version__} from {os.path.dirname(wmfast.__file__)}; "
             f"torch {torch.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")]
