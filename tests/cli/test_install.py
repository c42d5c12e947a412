"""The tests import the installed package (not a stray copy), and `kernels/` is installed as wmfast.kernels."""
import os
import subprocess
import sys
import tempfile

import wmfast.kernels

import wmfast

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kernels_installed_under_wmfast_name():
    assert os.path.realpath(wmfast.kernels.__file__) == os.path.realpath(os.path.join(REPO, "kernels", "__init__.py"))


def test_no_top_level_kernels_package_installed():
    # From a directory outside the checkout, only what is installed is importable: `kernels` must not be
    # ours (it would shadow Hugging Face's `kernels`, which transformers and diffusers probe for).
    code = ("import importlib.util, wmfast.kernels; s = importlib.util.find_spec('kernels'); "
            "print(wmfast.kernels.__file__); print(s.origin if s else 'none')")
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    ours, top = out.stdout.split()
    assert os.path.realpath(ours).startswith(os.path.realpath(REPO)), ours
    assert top == "none" or not os.path.realpath(top).startswith(os.path.realpath(REPO)), top


def test_cli_lists_commands():
    from wmfast.cli import build_parser

    parser = build_parser()
    assert parser.prog == "wmfast"
    assert parser.parse_args(["demo"]).command == "demo"


def test_cuda_build_skips_cleanly_without_torch():
    # pip's isolated build environment has no torch: setup.py must skip the extension, not fail the install.
    # setup.py loads wmfast/ops/cuda_build.py by path (the package is not importable while it is built): so here.
    code = ("import importlib.util, os, sys; sys.modules['torch'] = None; "
            "spec = importlib.util.spec_from_file_location('b', os.path.join(sys.argv[1], 'wmfast', 'ops', "
            "'cuda_build.py')); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); "
            "print(repr(b.cuda_extension_kwargs(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "{}", out.stdout
    assert "skipping the CUDA extension" in out.stdout


def test_host_compiler_with_static_libstdcxx_is_replaced(tmp_path):
    # A CXX that links libstdc++ into the extension (a wrapper adding -static-libstdc++) makes every error the
    # binding raises crash the process; the build must detect it and fall back to the g++ on PATH.
    import shutil

    import pytest

    from wmfast.ops import cuda_build

    gxx = shutil.which("g++")
    if not gxx or not shutil.which("gcc") or not shutil.which("readelf"):
        pytest.skip("needs g++, gcc and readelf")
    wrapper = tmp_path / "g++-static"
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    assert cuda_build.links_libstdcxx_dynamically(gxx) is True
    assert cuda_build.links_libstdcxx_dynamically(str(wrapper)) is False
    assert cuda_build.links_libstdcxx_dynamically(str(tmp_path / "missing-g++")) is None

    env = {"CXX": str(wrapper), "CC": "/opt/elsewhere/gcc"}
    note = cuda_build.host_compiler(env)
    assert env == {"CXX": gxx, "CC": shutil.which("gcc")} and "statically" in note
    env = {"CXX": gxx}
    assert cuda_build.host_compiler(env) == "" and env == {"CXX": gxx}
    assert cuda_build.host_compiler({}) == ""
