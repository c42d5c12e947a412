"""Build logic for the optional CUDA extension `wmfast._C` (csrc/), shared by setup.py, the JIT path
(wmfast/ops/cuda_ext.py) and the CPU compile checks (tests/kernels/test_cuda_kernels.py).

This file imports neither torch at module level nor anything of wmfast: setup.py loads it by path, before the
package is importable (and pip's isolated build environment has no torch).

setup.py calls `cuda_extension_kwargs(root)`: setup() keyword arguments, or {} when there is nothing to
build, no CUDA toolkit, or a CPU-only torch. The JIT path builds from `csrc_root()`: the checkout's csrc/, or
the copy installed with the package (wmfast/csrc/, package data). Environment:
- WMFAST_SKIP_CUDA_BUILD=1: skip (checked in setup.py).
- WMFAST_CUDA_ARCHS="90;100" (default): "90" -> sm_90a (H100/H200), "100" -> sm_100a (B200). An entry with
  a letter or an "8x" arch is taken as given ("120" -> sm_120a, "89" -> sm_89).
- MAX_JOBS: parallel compile jobs; default from free memory (~1.5 GiB per nvcc job) and the CPU count.
- CXX / CC: the host compiler, as torch.utils.cpp_extension reads them; one that links libstdc++ statically
  is replaced by the g++/gcc on PATH (see `host_compiler`).
"""
import glob
import os
import shutil
import subprocess
import tempfile

DEFAULT_ARCHS = "90;100"
# No -std: torch.utils.cpp_extension adds the one its headers need (c++17 on torch 2.11, c++20 later); the
# .cu files include no torch header and compile under either.
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas=--warn-on-spills"]


def csrc_root():
    """The directory holding csrc/ for a JIT build: the checkout's (an editable install or a source tree), else
    the copy installed as package data next to this package (wmfast/csrc/). FileNotFoundError says where the
    sources are needed when neither has them."""
    here = os.path.dirname(os.path.abspath(__file__))  # wmfast/ops
    package = os.path.dirname(here)  # wmfast
    for root in (os.path.dirname(package), package):
        if os.path.exists(os.path.join(root, "csrc", "binding.cpp")):
            return root
    raise FileNotFoundError(
        f"the CUDA sources (csrc/binding.cpp and csrc/*/*.cu) are needed for a JIT build but are neither in a "
        f"checkout at {os.path.join(os.path.dirname(package), 'csrc')} nor installed at {os.path.join(package, 'csrc')}"
        " (reinstall wmfast from its source tree, or build wmfast._C with `pip install --no-build-isolation .`)")


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


def links_libstdcxx_dynamically(cxx):
    """True when `cxx` links a C++ shared object against libstdc++.so, False when it links libstdc++ into the
    object (a wrapper passing -static-libstdc++), None when the probe cannot tell (no compiler, no readelf).

    It matters because the binding's errors are c10::Error exceptions thrown through torch's libraries and
    caught by pybind11: with a second, static copy of the C++ runtime inside wmfast._C the catch misses and
    the process dies (seen on an H200 image whose CXX was such a wrapper: every rejected input segfaulted)."""
    readelf = shutil.which("readelf")
    if not readelf or not shutil.which(cxx.split()[0]):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write("#include <stdexcept>\nvoid wmfast_probe(int x) { if (x) throw std::runtime_error(\"x\"); }\n")
        try:
            subprocess.run(cxx.split() + ["-shared", "-fPIC", src, "-o", lib], check=True, capture_output=True,
                           timeout=60)
            dyn = subprocess.run([readelf, "-d", lib], check=True, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return "libstdc++.so" in dyn


def host_compiler(env=None):
    """Make CXX/CC in `env` (default os.environ) a pair that links libstdc++ dynamically, as torch does.

    Returns a line for the build log, or "" when nothing needed changing (CXX unset, or it already links
    dynamically, or the probe cannot tell). A static-runtime CXX is replaced by g++/gcc from PATH when those
    link dynamically; when there is none, CXX is kept and the line warns what will break."""
    env = os.environ if env is None else env
    cxx = env.get("CXX")
    if not cxx or links_libstdcxx_dynamically(cxx) is not False:
        return ""
    gxx, gcc = shutil.which("g++"), shutil.which("gcc")
    if gxx and gcc and links_libstdcxx_dynamically(gxx):
        env["CXX"], env["CC"] = gxx, gcc
        return (f"wmfast: CXX={cxx} links libstdc++ statically (exceptions from the binding would crash the "
                f"process): building with CXX={gxx} CC={gcc}")
    return (f"wmfast: warning: CXX={cxx} links libstdc++ statically and no g++ on PATH links it dynamically: "
            "errors raised by the CUDA binding may crash the process instead of raising")


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
    note = host_compiler()
    if note:
        print(note)
    rel = [os.path.relpath(s, root) for s in cu + [binding]]
    print(f"wmfast: building the CUDA extension wmfast._C for {gencode_flags()} with MAX_JOBS={os.environ['MAX_JOBS']}")
    ext = CUDAExtension(name="wmfast._C", sources=rel, **extension_args(root))
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}
