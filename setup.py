"""wmfast: fast kernels, training and inference for video world models (1X World Model Challenge).

`kernels/` (Triton) is installed as `wmfast.kernels`, never as a top-level `kernels` package: Hugging Face
ships a package of that name that transformers and diffusers probe for.

The CUDA extension (`csrc/`) is optional: it is built only when a CUDA toolkit and a CUDA build of torch
are present, and `WMFAST_SKIP_CUDA_BUILD=1` forces the skip (see `wmfast_build.py`).
"""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def _cuda_extension_kwargs():
    """ext_modules/cmdclass for the CUDA extension, or {} when it cannot or must not be built."""
    if os.environ.get("WMFAST_SKIP_CUDA_BUILD", "0") == "1":
        print("wmfast: WMFAST_SKIP_CUDA_BUILD=1: skipping the CUDA extension")
        return {}
    try:
        import sys

        sys.path.insert(0, here)
        from wmfast_build import cuda_extension_kwargs
    except ImportError as e:  # torch absent at build time (isolated build): nothing to build against
        print(f"wmfast: skipping the CUDA extension ({e})")
        return {}
    return cuda_extension_kwargs(here)


packages = find_packages(include=["wmfast", "wmfast.*"]) + ["wmfast.kernels"]

setup(
    name="wmfast",
    version="0.1.0",
    description="Fast kernels, training and inference for video world models (1X World Model Challenge)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"wmfast.kernels": "kernels"},
    package_data={"wmfast.kernels": ["configs/*.json"]},  # the measured per-GPU launch tables (wmfast.tuning)
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
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["wmfast=wmfast.cli:main"]},
    **_cuda_extension_kwargs(),
)
