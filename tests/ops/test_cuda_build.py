"""The CUDA extension's build logic (wmfast.ops.cuda_build): target flags, parallel jobs, the CPU-torch skip, and
where the JIT build finds csrc/ (a checkout, or the copy installed as package data)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from wmfast.ops import cuda_build, dispatch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gencode_flags_default_hopper_and_blackwell():
    assert cuda_build.gencode_flags("90;100") == ["-gencode", "arch=compute_90a,code=sm_90a",
                                                  "-gencode", "arch=compute_100a,code=sm_100a"]
    assert cuda_build.gencode_flags("89, 120") == ["-gencode", "arch=compute_89,code=sm_89",
                                                   "-gencode", "arch=compute_120a,code=sm_120a"]
    with pytest.raises(ValueError, match="compute capability"):
        cuda_build.gencode_flags("hopper")
    with pytest.raises(ValueError, match="no architecture"):
        cuda_build.gencode_flags(" ; ")


def test_max_jobs_positive_and_bounded_by_cpus():
    assert 1 <= cuda_build.default_max_jobs() <= (os.cpu_count() or 1)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch skip path")
def test_build_skipped_with_reason_on_cpu_torch(capsys):
    assert cuda_build.cuda_extension_kwargs(REPO) == {}
    assert "CPU build" in capsys.readouterr().out
    ok, why = dispatch.cuda_ext_available()
    assert not ok and "CPU build" in why


def test_jit_sources_found_in_a_checkout_or_an_install(tmp_path, monkeypatch):
    assert cuda_build.csrc_root() == REPO  # this checkout (an editable install)
    cu, binding = cuda_build.cuda_sources(REPO)
    assert binding == os.path.join(REPO, "csrc", "binding.cpp") and len(cu) >= 3
    # a non-editable install: wmfast/ops/cuda_build.py with the sources as package data in wmfast/csrc/
    ops_dir = tmp_path / "site-packages" / "wmfast" / "ops"
    ops_dir.mkdir(parents=True)
    shutil.copy(cuda_build.__file__, ops_dir / "cuda_build.py")
    monkeypatch.setattr(cuda_build, "__file__", str(ops_dir / "cuda_build.py"))
    with pytest.raises(FileNotFoundError, match="needed for a JIT build"):
        cuda_build.csrc_root()
    shutil.copytree(os.path.join(REPO, "csrc"), ops_dir.parent / "csrc")
    assert cuda_build.csrc_root() == str(ops_dir.parent)
    cu, binding = cuda_build.cuda_sources(cuda_build.csrc_root())
    assert os.path.exists(binding) and len(cu) >= 3
