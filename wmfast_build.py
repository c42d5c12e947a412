"""Build logic for the optional CUDA extension `wmfast._C` (csrc/), shared by setup.py, the JIT dev path
(wmfast/csrc_ops.py) and the CPU compile check (tests/test_csrc.py).

setup.py calls `cuda_extension_kwargs(root)`: setup() keyword arguments, or {} when there is nothing to
build, no CUDA toolkit, or a CPU-only torch. Environment:
- WMFAST_SKIP_CUDA_BUILD=1: skip (checked in setup.py).
- WMFAST_CUDA_ARCHS="90;100" (default): "90" -> sm_90a (H100/H200), "100" -> sm_100a (B200). An entry with
  a letter or an "8x" arch is taken as given ("120" -> sm_120a, "89" -> sm_89).
- MAX_JOBS: parallel compile jobs; default from free memory (~1.5 GiB per nvcc job) and the CPU count.
"""
import glob
import os

DEFAULT_ARCHS = "90;100"
# No -std: torch.utils.cpp_extension adds the one its headers need (c++17 on torch 2.11, c++20 later); the
# .cu files include no torch header and compile under either.
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas=--warn-on-spills"]


def cuda_sources(root):
    """Every kernel .cu under csrc/ (sorted: a stable build order) and the binding."""
    cu = sorted(glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True))
    return cu, os.path.join(root, "csrc", "binding.cpp")


def gencode_flags(archs=None):
    """nvcc -gencode flags for WMFAST_CUDA_ARCHS. Hopper and Blackwell get the arch-specific 'a' targets
    (sm_90a, sm_100a): the kernels do not rely on their extra instructions, but 'a' cubins are what the
    Triton kernels they are compared with also compile for."""
    archs = archs if archs is not None else os.environ.get("WMFAST_CUDA_ARCHS", DEFAULT_ARCHS)
    flags = []
    for arch in (a.strip() for a in archs.replace(",", ";").split(";")):
        if not arch:
            continue
        digits = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
        if not digits.isdigit():
            raise ValueError(f"WMFAST_CUDA_ARCHS: {arch!r} is not a compute capability like 90 or 100")
        sm = arch if arch != digits or int(digits) < 90 else f"{arch}a"
        flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    if not flags:
        raise ValueError(f"WMFAST_CUDA_ARCHS={archs!r}: no architecture given")
    return flags


def default_max_jobs():
    """Parallel nvcc jobs that fit in the memory available now (each takes ~1.5 GiB at -O3)."""
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_mem = max(1, int(avail_kib / 1024 ** 2 / 1.5))
    except (OSError, StopIteration, ValueError):
        by_mem = 2
    return max(1, min(os.cpu_count() or 1, by_mem))


def extension_args(root):
    """Keyword arguments shared by CUDAExtension and torch.utils.cpp_extension.load."""
    return {
        "extra_compile_args": {"cxx": ["-O3"], "nvcc": NVCC_FLAGS + gencode_flags()},
        "include_dirs": [os.path.join(root, "csrc")],
    }


def cuda_extension_kwargs(root):
    cu, binding = cuda_sources(root)
    if not cu:
        print("wmfast: no CUDA sources under csrc/: skipping the CUDA extension")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:  # pip's isolated build environment has no torch: install with --no-build-isolation
        print(f"wmfast: skipping the CUDA extension: torch is not importable at build time ({e}); "
              "to build it, install with `pip install --no-build-isolation`")
        return {}

    if torch.version.cuda is None or CUDA_HOME is None:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc / CUDA_HOME) found"
        print(f"wmfast: skipping the CUDA extension: {why}")
        return {}
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    rel = [os.path.relpath(s, root) for s in cu + [binding]]
    print(f"wmfast: building the CUDA extension wmfast._C for {gencode_flags()} with MAX_JOBS={os.environ['MAX_JOBS']}")
    ext = CUDAExtension(name="wmfast._C", sources=rel, **extension_args(root))
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}
