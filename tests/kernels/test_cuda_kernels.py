"""The CUDA kernels (csrc/) without a GPU: every kernel .cu compiled for sm_90a and sm_100a with ptxas spill
warnings (an error or a spill fails), the binding syntax-checked against the torch headers, the AdaLN backward's
work geometry checked by a C++ program, and the kernels themselves run on the CPU through an emulator (the .cu
files compiled by g++ with csrc/tests/cuda_emu.h) and checked against the references.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile

import pytest
import torch
from wmfast.kernels.adaln import gated_residual_layernorm_modulate_ref, layernorm_modulate_ref

from wmfast.ops import cuda_build
from wmfast.testing import assert_2x_rule, check_decode, leaves, modulation_layout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME")
                                else None)
ARCHS = ("90a", "100a")

# ------------------------------------------------------------------------------------------------ compile check
def _nvcc(src: str, arch: str, out_dir: str) -> tuple[str, int, str]:
    obj = os.path.join(out_dir, f"{os.path.basename(src)}.{arch}.o")
    cmd = [NVCC, "-std=c++17", "-O3", "-c", src, "-o", obj, "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-Xptxas=--warn-on-spills", "-I", os.path.join(REPO, "csrc")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    return f"{os.path.relpath(src, REPO)} [sm_{arch}]", proc.returncode, proc.stdout + proc.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME): the CUDA compile check needs it")
def test_every_kernel_compiles_for_hopper_and_blackwell_without_spills():
    sources, _ = cuda_build.cuda_sources(REPO)
    assert len(sources) >= 3, sources
    jobs = [(src, arch) for src in sources for arch in ARCHS]
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: _nvcc(*job, tmp), jobs))
    failed = [f"{name}: exit {rc}\n{log}" for name, rc, log in results if rc != 0]
    assert not failed, "\n".join(failed)
    spills = [f"{name}: {line}" for name, _, log in results for line in _spill_lines(log)]
    assert not spills, "register spills (ptxas --warn-on-spills):\n" + "\n".join(spills)


def _spill_lines(log: str) -> list[str]:
    """The ptxas lines that report a spill: any non-zero "N bytes spill stores/loads" count (summed, so that
    "0 bytes spill stores, 8 bytes spill loads" counts), or a "spilled" warning that gives no byte counts."""
    hits = []
    for line in log.splitlines():
        counts = [int(n) for n in re.findall(r"(\d+) bytes spill", line)]
        if sum(counts) > 0 or (not counts and re.search(r"\bspilled\b", line)):
            hits.append(line)
    return hits


@pytest.mark.parametrize("line, spills", [
    pytest.param("ptxas info    : Used 40 registers, 0 bytes spill stores, 0 bytes spill loads", False, id="none"),
    pytest.param("ptxas info    : 8 bytes stack frame, 8 bytes spill stores, 0 bytes spill loads", True, id="stores"),
    pytest.param("ptxas info    : 0 bytes stack frame, 0 bytes spill stores, 4 bytes spill loads", True, id="loads"),
    pytest.param("ptxas warning : Registers are spilled to local memory in function 'k', 16 bytes spill stores, "
                 "16 bytes spill loads", True, id="warning"),
    pytest.param("ptxas warning : Registers are spilled to local memory in function 'k'", True, id="no-counts"),
    pytest.param("ptxas info    : Compiling entry function 'k' for 'sm_90a'", False, id="other"),
])
def test_spill_check_parses_ptxas_lines(line, spills):
    # The compile check above must be able to fail: a line with any spill byte is caught, a clean one is not.
    assert bool(_spill_lines("ptxas info    : Function properties\n" + line)) is spills


def _torch_stub_dir(tmp: str) -> list[str]:
    """A CPU build of torch ships c10/cuda headers without the generated cuda_cmake_macros.h: supply it."""
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    if os.path.exists(os.path.join(tinc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        return []
    os.makedirs(os.path.join(tmp, "c10", "cuda", "impl"))
    with open(os.path.join(tmp, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n")
    return ["-isystem", tmp]


@pytest.mark.skipif(shutil.which("g++") is None or NVCC is None, reason="g++ or the CUDA toolkit headers missing")
def test_binding_compiles_against_torch_headers():
    from torch.utils.cpp_extension import include_paths

    homes = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    cuda_inc = next((os.path.join(h, "include") for h in homes if os.path.exists(os.path.join(h, "include",
                                                                                             "cuda_runtime.h"))), None)
    assert cuda_inc is not None, f"cuda_runtime.h not found under {homes} (nvcc is {NVCC})"
    with tempfile.TemporaryDirectory() as tmp:
        inc = [a for p in include_paths() for a in ("-isystem", p)] + _torch_stub_dir(tmp)
        inc += ["-isystem", cuda_inc, "-isystem", sysconfig.get_paths()["include"], "-I", os.path.join(REPO, "csrc")]
        std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
        proc = subprocess.run(["g++", std, "-fsyntax-only", "-Wall", *inc, os.path.join(REPO, "csrc", "binding.cpp")],
                              check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_adaln_backward_geometry_covers_every_row_once():
    """The backward's work units and stage-2 reduction (csrc/adaln/adaln_geom.h, the very header the kernels
    use), checked by a C++ program over ~20k shape/layout cases: each row in one unit, each unit summed into
    the modulation row its rows belong to."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "geom")
        build = subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-o", exe,
                                os.path.join(REPO, "csrc", "tests", "adaln_geom_check.cpp")],
                               check=False, capture_output=True, text=True, timeout=120)
        assert build.returncode == 0, build.stderr[-4000:]
        run = subprocess.run([exe], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr


# ----------------------------------------------------------------------- the kernels themselves, emulated on CPU
# The .cu files compiled by g++ with csrc/tests/cuda_emu.h (one host thread per CUDA thread, std::barrier for
# __syncthreads and warp shuffles) and called through ctypes: the real kernel code (index math, masks, vector
# loads, reductions, both launch paths) runs on CPU tensors and is checked against the references.
class _ModView(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("stride_b", ctypes.c_int64), ("stride_m", ctypes.c_int64),
                ("stride_d", ctypes.c_int64), ("rows", ctypes.c_int64)]


class _FwdParams(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int64), ("L", ctypes.c_int64), ("D", ctypes.c_int64),
                ("x", ctypes.c_void_p), ("x_sb", ctypes.c_int64), ("x_sl", ctypes.c_int64),
                ("residual", ctypes.c_void_p), ("r_sb", ctypes.c_int64), ("r_sl", ctypes.c_int64),
                ("gate", _ModView), ("shift", _ModView), ("scale", _ModView),
                ("y", ctypes.c_void_p), ("out", ctypes.c_void_p), ("mean", ctypes.c_void_p), ("rstd", ctypes.c_void_p),
                ("eps", ctypes.c_float), ("act", ctypes.c_int), ("mod", ctypes.c_int)]


class _BwdParams(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int64), ("L", ctypes.c_int64), ("D", ctypes.c_int64),
                ("dy", ctypes.c_void_p), ("dout", ctypes.c_void_p),
                ("x", ctypes.c_void_p), ("x_sb", ctypes.c_int64), ("x_sl", ctypes.c_int64),
                ("residual", ctypes.c_void_p), ("r_sb", ctypes.c_int64), ("r_sl", ctypes.c_int64),
                ("gate", _ModView), ("shift", _ModView), ("scale", _ModView),
                ("mean", ctypes.c_void_p), ("rstd", ctypes.c_void_p),
                ("dx", ctypes.c_void_p), ("dresidual", ctypes.c_void_p), ("dgate", ctypes.c_void_p),
                ("dshift", ctypes.c_void_p), ("dscale", ctypes.c_void_p), ("workspace", ctypes.c_void_p),
                ("num_sms", ctypes.c_int), ("act", ctypes.c_int), ("mod", ctypes.c_int)]


class _DecodeParams(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in ("B", "S", "H", "T_max", "Dh", "t")]
                + [(n, ctypes.c_void_p) for n in ("q", "k", "v")]
                + [(f"{t}_{s}", ctypes.c_int64) for t in "qkv" for s in ("sb", "ss", "sh")]
                + [("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]
                + [(f"{c}_{s}", ctypes.c_int64) for c in ("kc", "vc") for s in ("sb", "ss", "sh", "st")]
                + [("o", ctypes.c_void_p), ("dtype", ctypes.c_int)])


_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EMU_SOURCES = ["adaln/adaln_fwd.cu", "adaln/adaln_bwd.cu", "temporal_attention/temporal_decode.cu",
               "tests/emu_shim.cpp"]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("g++") is None or NVCC is None:
        pytest.skip("g++ or the CUDA toolkit headers (for cuda_bf16.h) missing")
    homes = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    cuda_inc = next(os.path.join(h, "include") for h in homes if os.path.exists(os.path.join(h, "include",
                                                                                             "cuda_bf16.h")))
    out = tmp_path_factory.mktemp("emu")
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-DWMFAST_EMULATE", "-include",
             os.path.join(REPO, "csrc", "tests", "cuda_emu.h"), "-isystem", cuda_inc]

    def compile_one(src):
        obj = str(out / (os.path.basename(src) + ".o"))
        proc = subprocess.run(["g++", *flags, "-x", "c++", "-c", os.path.join(REPO, "csrc", src), "-o", obj],
                              check=False, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{src}:\n{proc.stderr[-6000:]}"
        return obj

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, EMU_SOURCES))
    lib_path = str(out / "libwmfast_emu.so")
    subprocess.run(["g++", "-shared", "-pthread", "-o", lib_path, *objs], check=True, timeout=120)
    lib = ctypes.CDLL(lib_path)
    for name in ("emu_adaln_bwd_workspace", "emu_sizeof_fwd", "emu_sizeof_bwd", "emu_sizeof_decode"):
        getattr(lib, name).restype = ctypes.c_longlong
    assert (lib.emu_sizeof_fwd(), lib.emu_sizeof_bwd(), lib.emu_sizeof_decode()) == (
        ctypes.sizeof(_FwdParams), ctypes.sizeof(_BwdParams), ctypes.sizeof(_DecodeParams))
    return lib


def _mv(m):
    return _ModView(m.data_ptr(), m.stride(0), m.stride(1), m.stride(2), m.shape[1]) if m is not None else _ModView()


def _emu_fwd(lib, x, shift, scale, residual=None, gate=None, eps=1e-6):
    B, L, D = x.shape
    y, out = torch.empty_like(x), torch.empty_like(x) if residual is not None else None
    mean, rstd = torch.empty(B, L), torch.empty(B, L)
    p = _FwdParams(B=B, L=L, D=D, x=x.data_ptr(), x_sb=x.stride(0), x_sl=x.stride(1), gate=_mv(gate),
                   shift=_mv(shift), scale=_mv(scale), y=y.data_ptr(), mean=mean.data_ptr(), rstd=rstd.data_ptr(),
                   eps=eps, act=_DT[x.dtype], mod=_DT[shift.dtype])
    if residual is not None:
        p.residual, p.r_sb, p.r_sl, p.out = residual.data_ptr(), residual.stride(0), residual.stride(1), out.data_ptr()
    assert lib.emu_adaln_fwd(ctypes.byref(p)) == 0
    return y, out, mean, rstd


def _emu_bwd(lib, dy, x, shift, scale, mean, rstd, residual=None, gate=None, dout=None, num_sms=2):
    B, L, D = x.shape
    dx, dres = torch.empty_like(x), torch.empty_like(x) if residual is not None else None
    dshift, dscale = torch.empty(shift.shape, dtype=shift.dtype), torch.empty(scale.shape, dtype=scale.dtype)
    dgate = torch.empty(gate.shape, dtype=gate.dtype) if gate is not None else None
    p = _BwdParams(B=B, L=L, D=D, dy=dy.data_ptr(), x=x.data_ptr(), x_sb=x.stride(0), x_sl=x.stride(1),
                   gate=_mv(gate), shift=_mv(shift), scale=_mv(scale), mean=mean.data_ptr(), rstd=rstd.data_ptr(),
                   dx=dx.data_ptr(), dshift=dshift.data_ptr(), dscale=dscale.data_ptr(), num_sms=num_sms,
                   act=_DT[x.dtype], mod=_DT[shift.dtype])
    if residual is not None:
        p.residual, p.r_sb, p.r_sl = residual.data_ptr(), residual.stride(0), residual.stride(1)
        p.dresidual, p.dgate = dres.data_ptr(), dgate.data_ptr()
        p.dout = dout.data_ptr() if dout is not None else None
    workspace = torch.empty(max(1, lib.emu_adaln_bwd_workspace(ctypes.byref(p))))
    p.workspace = workspace.data_ptr()
    assert lib.emu_adaln_bwd(ctypes.byref(p)) == 0
    return dx, dres, dgate, dshift, dscale


EMU_CASES = [  # (layout, act dtype, mod dtype, D): the vector path (D % 16 bytes == 0) and the scalar one
    pytest.param("per-sample-2d", torch.bfloat16, torch.bfloat16, 64, id="per-sample-bf16-D64-warp"),
    pytest.param("per-frame", torch.bfloat16, torch.float32, 1024, id="per-frame-bf16-fp32mod-D1024-2warps"),
    pytest.param("chunk-views", torch.bfloat16, torch.float32, 768, id="chunk-views-bf16-fp32mod-D768-block"),
    pytest.param("per-token", torch.float16, torch.float16, 40, id="per-token-fp16-D40"),
    pytest.param("per-sample", torch.float32, torch.float32, 61, id="per-sample-fp32-D61-scalar"),
    pytest.param("strided-last-dim", torch.bfloat16, torch.float32, 64, id="strided-last-dim-scalar"),
    pytest.param("per-frame", torch.float16, torch.float32, 1000, id="per-frame-fp16-D1000-scalar-multiwarp"),
    pytest.param("mixed", torch.bfloat16, torch.bfloat16, 256, id="mixed-layouts-bf16-D256"),
    pytest.param("chunk-views", torch.bfloat16, torch.float32, 3072, id="wan-D3072-bf16-fp32mod"),
]


def _to_mod3(m):
    return m.unsqueeze(1) if m.dim() == 2 else m


@pytest.mark.parametrize("layout,dtype,mod_dtype,D", EMU_CASES)
def test_emulated_adaln_kernels_fwd_bwd(emu, layout, dtype, mod_dtype, D):
    B, L, F = 2, 6, 3
    x, res = torch.randn(B, L, D).to(dtype), torch.randn(B, L, D).to(dtype)
    (gate, shift, scale), frame_len = modulation_layout(layout, B, L, D, F, dtype, "cpu", mod_dtype)
    g3, s3, c3 = (_to_mod3(m) for m in (gate, shift, scale))
    dy, dout = torch.randn(B, L, D).to(dtype), torch.randn(B, L, D).to(dtype)
    for gated in (False, True):
        ins = [res, x, gate, shift, scale] if gated else [x, shift, scale]
        y, out, mean, rstd = _emu_fwd(emu, x, s3, c3, res if gated else None, g3 if gated else None)
        dx, dres, dg, ds, dc = _emu_bwd(emu, dy, x, s3, c3, mean, rstd, res if gated else None,
                                        g3 if gated else None, dout if gated else None)
        kernel_grads = ([dres, dx, dg, ds, dc] if gated else [dx, ds, dc])

        def ref(i, upcast, gated=gated):
            if gated:
                return gated_residual_layernorm_modulate_ref(*i, frame_len=frame_len, upcast=upcast)
            return (layernorm_modulate_ref(*i, frame_len=frame_len, upcast=upcast),)

        r32_in, lp_in = leaves([t.float() for t in ins]), leaves(ins)
        r32, lp = ref(r32_in, True), ref(lp_in, False)
        for o, r, low, name in zip((y, out), r32, lp, ("y", "out")):
            assert_2x_rule(o, r, low, name=f"{name} gated={gated}", dtype=dtype)  # r: the unrounded fp32 reference
        cot = [dy, dout] if gated else [dy]
        g32 = torch.autograd.grad(r32, r32_in, [c.float() for c in cot])
        glp = torch.autograd.grad(lp, lp_in, cot)
        names = ("residual", "x", "gate", "shift", "scale") if gated else ("x", "shift", "scale")
        for a, r, low, name in zip(kernel_grads, g32, glp, names):
            a = a.reshape(r.shape)  # [B, 1, D] kernel grads of [B, D] inputs
            assert_2x_rule(a, r, low, name=f"d{name} gated={gated}", dtype=dtype)


def test_emulated_adaln_row_whose_variance_overflows_is_nan(emu):
    """As the references (kernels/layernorm.py overflow_nan): rsqrtf(inf) = 0 would give y = shift on that row."""
    x, shift, scale = torch.randn(2, 3, 64), torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    x[0, 1] *= 1e20
    y, _, _, rstd = _emu_fwd(emu, x, shift, scale)
    ref = layernorm_modulate_ref(x, shift, scale)
    assert_2x_rule(y, ref, ref, name="y", dtype=torch.float32)  # NaN in the same places, the other rows close
    assert int(y.isnan().sum()) == 64 and y[0, 1].isnan().all() and rstd[0, 1].isnan()


def test_emulated_adaln_backward_reduces_deterministically_across_chunking(emu):
    """Per-sample gradients over 96 rows: many work units (num_sms=1 -> chunks of 16) vs few; two-stage sums in
    a fixed order give the same bits every run, and agree across chunkings to fp32 rounding."""
    B, L, D = 2, 96, 64
    x, dy = torch.randn(B, L, D), torch.randn(B, L, D)
    shift, scale = torch.randn(B, 1, D), torch.randn(B, 1, D)
    _, _, mean, rstd = _emu_fwd(emu, x, shift, scale)
    first = _emu_bwd(emu, dy, x, shift, scale, mean, rstd, num_sms=1)
    again = _emu_bwd(emu, dy, x, shift, scale, mean, rstd, num_sms=1)
    other = _emu_bwd(emu, dy, x, shift, scale, mean, rstd, num_sms=64)
    for a, b, c in zip(first, again, other):
        if a is not None:
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def _emu_decode(lib, q, k, v, kc, vc, t):
    o = torch.empty(q.shape, dtype=q.dtype)
    p = _DecodeParams(B=q.shape[0], S=q.shape[2], H=q.shape[3], T_max=kc.shape[3], Dh=q.shape[4], t=t,
                      q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), k_cache=kc.data_ptr(), v_cache=vc.data_ptr(),
                      o=o.data_ptr(), dtype=_DT[q.dtype])
    for name, ten in (("q", q), ("k", k), ("v", v)):
        setattr(p, f"{name}_sb", ten.stride(0))
        setattr(p, f"{name}_ss", ten.stride(2))
        setattr(p, f"{name}_sh", ten.stride(3))
    for name, ten in (("kc", kc), ("vc", vc)):
        for i, s in enumerate(("sb", "ss", "sh", "st")):
            setattr(p, f"{name}_{s}", ten.stride(i))
    assert lib.emu_temporal_decode(ctypes.byref(p)) == 0
    return o


@pytest.mark.parametrize("dtype,Dh,t,view", [
    pytest.param(torch.bfloat16, 128, 3, "contiguous", id="bf16-Dh128-t3"),
    pytest.param(torch.float16, 64, 0, "qkv-split", id="fp16-Dh64-t0-qkv-split"),
    pytest.param(torch.float32, 32, 5, "contiguous", id="fp32-Dh32-t5"),
    pytest.param(torch.bfloat16, 64, 4, "unaligned", id="bf16-Dh64-unaligned-scalar"),
])
def test_emulated_temporal_decode(emu, dtype, Dh, t, view):
    B, S, H, T_max = 2, 3, 2, 6
    if view == "contiguous":
        q, k, v = (torch.randn(B, 1, S, H, Dh).to(dtype) for _ in range(3))
    else:  # views of one fused projection; "unaligned" shifts them by one element (the scalar path)
        off = 1 if view == "unaligned" else 0
        qkv = torch.randn(B, 1, S, H, 3 * Dh + off).to(dtype)
        q, k, v = (qkv[..., off + i * Dh: off + (i + 1) * Dh] for i in range(3))
    cache = [torch.randn(B, S, H, T_max, Dh).to(dtype) for _ in range(2)]
    check_decode(lambda *a: _emu_decode(emu, *a), q, k, v, cache, t, dtype)

