"""wmfast: fast kernels, training and inference for video world models (1X World Model Challenge).

`kernels/` (Triton) is installed as `wmfast.kernels`, never as a top-level `kernels` package: Hugging Face
ships a package of that name that transformers and diffusers probe for.

The CUDA extension (`csrc/`) is optional: it is built only when a CUDA toolkit and a CUDA build of torch
are present, and `WMFAST_SKIP_CUDA_BUILD=1` forces the skip (see `wmfast/ops/cuda_build.py`). The csrc/ sources
are also installed as package data (wmfast/csrc/), so the JIT build (WMFAST_CUDA_JIT=1) works from an install.
"""
import importlib.util
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension_kwargs():
    """ext_modules/cmdclass for the CUDA extension, or {} when it cannot or must not be built."""
    if os.environ.get("WMFAST_SKIP_CUDA_BUILD", "0") == "1":
        print("wmfast: WMFAST_SKIP_CUDA_BUILD=1: skipping the CUDA extension")
        return {}
    # Loaded by path: the wmfast package is not importable while it is being built.
    spec = importlib.util.spec_from_file_location("wmfast_cuda_build", os.path.join(here, "wmfast", "ops",
                                                                                     "cuda_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.cuda_extension_kwargs(here)


packages = find_packages(include=["wmfast", "wmfast.*"]) + ["wmfast.kernels", "wmfast.csrc"]

setup(
    name="wmfast",
    version="0.1.0",
    description="Fast kernels, training and inference for video world models (1X World Model Challenge)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"wmfast.kernels": "kernels", "wmfast.csrc": "csrc"},
    package_data={
        "wmfast.kernels": ["configs/*.json"],  # the measured per-GPU launch tables (wmfast.kernels.tuning)
        "wmfast.csrc": ["*.cpp", "*/*.h", "*/*.cuh", "*/*.cu"],  # the CUDA sources, for the JIT build
        "wmfast.models.wan": ["assets/*.safetensors"],  # the tiny preset's fitted VAE (wmfast.models.wan.tiny_vae)
    },
    install_requires=[
        "torch>=2.6",  # a lower bound only: never replaces a torch that is already installed
        "triton>=3.2",
        "einops",
        "diffusers>=0.35",
        "peft>=0.15",
        "deepspeed>=0.16",
        "nvidia-ml-py",
        "safetensors",
        "tqdm",
        "numpy",
        "av",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "ruff"],
        "flash": ["flash-attn>=2.7"],
    },
    entry_points={"console_scripts": ["wmfast=wmfast.cli:main"]},
    **_cuda_extension_kwargs(),
)
