"""The CUDA extension (csrc/): compile check, build logic, Python wiring, backend choice; GPU parity (marked).

Without a GPU (CI): every kernel .cu is compiled for sm_90a and sm_100a with ptxas spill warnings (an error or
a spill fails), the binding is syntax-checked against the torch headers, and the Python side (schemas parsed
from binding.cpp, fake kernels, autograd, layouts, torch.compile) runs on a CPU stand-in namespace whose
implementations mirror the kernels' math. With a GPU (marked `gpu`): CUDA vs Triton vs the fp32 reference by
the 2x rule, every modulation layout, forward and backward, determinism, opcheck, the decode step.
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
from wmfast.kernels.temporal_attention import temporal_decode_ref

from wmfast import backend, csrc_ops, tuning
from wmfast.testing import assert_2x_rule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
wmfast_build = csrc_ops.build_module()

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
    sources, _ = wmfast_build.cuda_sources(REPO)
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
    (gate, shift, scale), frame_len = _layout(layout, B, L, D, F, dtype, "cpu", mod_dtype)
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

        r32_in, lp_in = _leaf([t.float() for t in ins]), _leaf(ins)
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


def _decode_ref32(q, k, v, cache, t):
    """The decode reference in fp32 on fp32 copies: its output is not rounded to q's dtype (the 2x rule's
    ref_fp32; temporal_decode_ref itself returns q.dtype)."""
    kf, vf = (c.float() for c in cache)
    return temporal_decode_ref(q.float(), k.float(), v.float(), kf, vf, t)


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
    _check_decode(lambda *a: _emu_decode(emu, *a), q, k, v, cache, t, dtype)


def _check_decode(decode, q, k, v, cache, t, dtype):
    """Run `decode(q, k, v, k_cache, v_cache, t)` on copies of `cache`: the cache append must equal the
    reference's exactly, the output pass the 2x rule. Returns (o, fp32 reference)."""
    kc, vc = (c.clone() for c in cache)
    o = decode(q, k, v, kc, vc, t)
    kr, vr = (c.clone() for c in cache)
    temporal_decode_ref(q, k, v, kr, vr, t)  # the cache append to compare with
    kl, vl = (c.clone() for c in cache)
    lowp = temporal_decode_ref(q, k, v, kl, vl, t, upcast=False)
    assert torch.equal(kc, kr) and torch.equal(vc, vr), "cache append"
    ref32 = _decode_ref32(q, k, v, cache, t)
    assert_2x_rule(o, ref32, lowp, "o", dtype=dtype)
    return o, ref32


# ------------------------------------------------------------------------------------------------- build logic
def test_gencode_flags_default_hopper_and_blackwell():
    assert wmfast_build.gencode_flags("90;100") == ["-gencode", "arch=compute_90a,code=sm_90a",
                                                    "-gencode", "arch=compute_100a,code=sm_100a"]
    assert wmfast_build.gencode_flags("89, 120") == ["-gencode", "arch=compute_89,code=sm_89",
                                                     "-gencode", "arch=compute_120a,code=sm_120a"]
    with pytest.raises(ValueError, match="compute capability"):
        wmfast_build.gencode_flags("hopper")
    with pytest.raises(ValueError, match="no architecture"):
        wmfast_build.gencode_flags(" ; ")


def test_max_jobs_positive_and_bounded_by_cpus():
    assert 1 <= wmfast_build.default_max_jobs() <= (os.cpu_count() or 1)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch skip path")
def test_build_skipped_with_reason_on_cpu_torch(capsys):
    assert wmfast_build.cuda_extension_kwargs(REPO) == {}
    assert "CPU build" in capsys.readouterr().out
    ok, why = backend.cuda_ext_available()
    assert not ok and "CPU build" in why


# ------------------------------------------------------------------------------ CPU stand-in for the Python side
STANDIN = "wmfast_cuda_cpu_standin"


def _binding_schemas() -> list[str]:
    """The op schemas exactly as csrc/binding.cpp defines them (adjacent C string literals joined)."""
    with open(os.path.join(REPO, "csrc", "binding.cpp")) as f:
        src = f.read()
    return [re.sub(r'"\s*"', "", m) for m in re.findall(r'm\.def\("((?:[^;])*?)"\);', src, flags=re.DOTALL)]


def _expand(m, L):
    return m.float().repeat_interleave(L // m.shape[1], dim=1)


def _reduce(g, m):
    """Sum per-row contributions over the rows sharing a modulation row (what the two-stage reduction does)."""
    B, L, D = g.shape
    return g.view(B, m.shape[1], L // m.shape[1], D).sum(2).to(m.dtype)


def _stats(o, eps):
    mean = o.mean(-1)
    return mean, torch.rsqrt(((o - mean[..., None]) ** 2).mean(-1) + eps)


def _norm_bwd(dy, o, scale, mean, rstd):
    """The kernels' backward math (csrc/adaln/adaln_bwd.cu), in fp32 torch."""
    xhat = (o - mean[..., None]) * rstd[..., None]
    g = dy.float() * (1 + _expand(scale, o.shape[1]))
    c1, c2 = (g * xhat).mean(-1, keepdim=True), g.mean(-1, keepdim=True)
    return rstd[..., None] * (g - c2 - xhat * c1), xhat


def _standin_impls():
    def ln_fwd(x, shift, scale, eps):
        o = x.float()
        mean, rstd = _stats(o, eps)
        y = (o - mean[..., None]) * rstd[..., None] * (1 + _expand(scale, x.shape[1])) + _expand(shift, x.shape[1])
        return y.to(x.dtype), mean, rstd

    def ln_bwd(dy, x, shift, scale, mean, rstd):
        dn, xhat = _norm_bwd(dy, x.float(), scale, mean, rstd)
        return dn.to(x.dtype), _reduce(dy.float(), shift), _reduce(dy.float() * xhat, scale)

    def grln_fwd(residual, x, gate, shift, scale, eps):
        o = residual.float() + _expand(gate, x.shape[1]) * x.float()
        y, mean, rstd = ln_fwd(o, shift, scale, eps)
        return y.to(x.dtype), o.to(x.dtype), mean, rstd

    def grln_bwd(dy, dout, residual, x, gate, shift, scale, mean, rstd):
        o = residual.float() + _expand(gate, x.shape[1]) * x.float()
        dn, xhat = _norm_bwd(dy, o, scale, mean, rstd)
        if dout is not None:
            dn = dn + dout.float()
        return (dn.to(x.dtype), (dn * _expand(gate, x.shape[1])).to(x.dtype), _reduce(dn * x.float(), gate),
                _reduce(dy.float(), shift), _reduce(dy.float() * xhat, scale))

    def decode(q, k, v, k_cache, v_cache, t):
        return temporal_decode_ref(q, k, v, k_cache, v_cache, t).clone()

    return {"layernorm_modulate_fwd": ln_fwd, "layernorm_modulate_bwd": ln_bwd,
            "gated_residual_layernorm_modulate_fwd": grln_fwd, "gated_residual_layernorm_modulate_bwd": grln_bwd,
            "temporal_decode_step": decode}


_LIB = None


@pytest.fixture
def standin(monkeypatch):
    """csrc_ops wired to a CPU namespace with binding.cpp's schemas, so its Python side runs without a GPU."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library(STANDIN, "DEF")
        impls = _standin_impls()
        for schema in _binding_schemas():
            _LIB.define(schema)
            name = schema.split("(")[0]
            _LIB.impl(name, impls[name], "CPU")
        csrc_ops.register_python_side(STANDIN)
    monkeypatch.setattr(csrc_ops, "NAMESPACE", STANDIN)
    monkeypatch.setattr(csrc_ops, "supports_adaln", lambda *a, **k: (True, "stand-in"))
    monkeypatch.setattr(csrc_ops, "supports_temporal_decode", lambda *a, **k: (True, "stand-in"))
    return getattr(torch.ops, STANDIN)


def test_binding_defines_every_op_the_python_side_uses():
    names = {s.split("(")[0] for s in _binding_schemas()}
    assert names == {"layernorm_modulate_fwd", "layernorm_modulate_bwd", "gated_residual_layernorm_modulate_fwd",
                     "gated_residual_layernorm_modulate_bwd", "temporal_decode_step"}


def _layout(kind, B, L, D, F, dtype, device, mod_dtype=None):
    """(mods, frame_len): three modulation tensors in one of the layouts the ops accept."""
    md = mod_dtype or dtype
    if kind == "per-sample-2d":
        return [torch.randn(B, D, dtype=md, device=device) for _ in range(3)], None
    if kind == "per-sample":
        return [torch.randn(B, 1, D, dtype=md, device=device) for _ in range(3)], None
    if kind == "per-frame":
        return [torch.randn(B, F, D, dtype=md, device=device) for _ in range(3)], L // F
    if kind == "per-token":
        return [torch.randn(B, L, D, dtype=md, device=device) for _ in range(3)], None
    if kind == "chunk-views":  # diffusers' (B, F, 6, D) fp32 table, chunked: strided views, no copies
        table = torch.randn(B, F, 6, D, dtype=md, device=device)
        return [table[:, :, i] for i in (2, 0, 1)], L // F
    if kind == "mixed":  # gate per-token, shift per-sample, scale per-frame: one op, three reductions
        return [torch.randn(B, L, D, dtype=md, device=device), torch.randn(B, 1, D, dtype=md, device=device),
                torch.randn(B, F, D, dtype=md, device=device)], L // F
    if kind == "strided-last-dim":
        return [torch.randn(B, 1, 2 * D, dtype=md, device=device)[..., ::2] for _ in range(3)], None
    raise AssertionError(kind)


LAYOUTS = ["per-sample-2d", "per-sample", "per-frame", "per-token", "chunk-views", "mixed", "strided-last-dim"]


def _leaf(ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _check_grads(outs_kernel, inputs_kernel, ref_fn, inputs, dtype, names):
    """Forward and every gradient of the kernel path vs the fp32 and the low-precision references (2x rule)."""
    ref32_in, lowp_in = _leaf([t.float() for t in inputs]), _leaf(inputs)
    ref32, lowp = ref_fn(ref32_in, True), ref_fn(lowp_in, False)
    grads_out = [torch.randn_like(o) for o in outs_kernel]
    for o, r, lp, name in zip(outs_kernel, ref32, lowp, ("y", "out")):
        assert_2x_rule(o, r, lp, name=name, dtype=dtype)
    gk = torch.autograd.grad(outs_kernel, inputs_kernel, grads_out)
    g32 = torch.autograd.grad(ref32, ref32_in, [g.float() for g in grads_out])
    glp = torch.autograd.grad(lowp, lowp_in, grads_out)
    for a, r, lp, name in zip(gk, g32, glp, names):
        assert a.shape == r.shape, name
        assert_2x_rule(a, r, lp, name=f"d{name}", dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_standin_layernorm_modulate_layouts_fwd_bwd(standin, layout):
    B, L, D, F = 2, 6, 24, 3
    x = torch.randn(B, L, D, dtype=torch.float32)
    (_, shift, scale), frame_len = _layout(layout, B, L, D, F, torch.float32, "cpu")
    xk, sk, ck = _leaf([x, shift, scale])
    y = csrc_ops.layernorm_modulate(xk, sk, ck, eps=1e-6, frame_len=frame_len)

    def ref(ins, upcast):
        return (layernorm_modulate_ref(*ins, eps=1e-6, frame_len=frame_len, upcast=upcast),)

    _check_grads([y], [xk, sk, ck], ref, [x, shift, scale], torch.float32, ("x", "shift", "scale"))


@pytest.mark.parametrize("layout", ["per-sample", "per-frame", "chunk-views", "per-token", "mixed"])
def test_standin_gated_residual_layernorm_modulate_fwd_bwd(standin, layout):
    B, L, D, F = 2, 6, 24, 2
    x, res = torch.randn(B, L, D), torch.randn(B, L, D)
    (gate, shift, scale), frame_len = _layout(layout, B, L, D, F, torch.float32, "cpu")
    ins = _leaf([res, x, gate, shift, scale])
    y, out = csrc_ops.gated_residual_layernorm_modulate(*ins, eps=1e-6, frame_len=frame_len)

    def ref(i, upcast):
        return gated_residual_layernorm_modulate_ref(*i, eps=1e-6, frame_len=frame_len, upcast=upcast)

    _check_grads([y, out], ins, ref, [res, x, gate, shift, scale], torch.float32,
                 ("residual", "x", "gate", "shift", "scale"))


def _opcheck_every_op(ns, device, dtype):
    """torch.library.opcheck of all five ops of `ns` (the extension, or the CPU stand-in with its schemas): the
    forward ops with grads on, the backward ops on the statistics their forward returns (with and without
    dout for the gated one), the decode step."""
    B, L, D = 2, 8, 64
    x = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=True)
    res = torch.randn_like(x, requires_grad=True)
    mods = [torch.randn(B, 4, D, device=device, requires_grad=True) for _ in range(3)]  # fp32, per-frame
    torch.library.opcheck(ns.layernorm_modulate_fwd, (x, mods[1], mods[2], 1e-6))
    torch.library.opcheck(ns.gated_residual_layernorm_modulate_fwd, (res, x, *mods, 1e-6))
    plain = [t.detach() for t in (res, x, *mods)]
    dy = torch.randn(B, L, D, device=device, dtype=dtype)
    _, mean, rstd = ns.layernorm_modulate_fwd(plain[1], plain[3], plain[4], 1e-6)
    torch.library.opcheck(ns.layernorm_modulate_bwd, (dy, plain[1], plain[3], plain[4], mean, rstd))
    _, _, mean, rstd = ns.gated_residual_layernorm_modulate_fwd(*plain, 1e-6)
    for dout in (None, torch.randn_like(dy)):
        torch.library.opcheck(ns.gated_residual_layernorm_modulate_bwd, (dy, dout, *plain, mean, rstd))
    q, k, v = (torch.randn(2, 1, 5, 3, 64, device=device, dtype=dtype) for _ in range(3))
    kc, vc = (torch.randn(2, 5, 3, 8, 64, device=device, dtype=dtype) for _ in range(2))
    torch.library.opcheck(ns.temporal_decode_step, (q, k, v, kc, vc, 3))


def test_standin_opcheck_and_compile(standin):
    for dtype in (torch.float32, torch.bfloat16):  # the GPU test's very code, on the stand-in
        _opcheck_every_op(standin, "cpu", dtype)
    B, L, D = 2, 4, 8
    x, res = torch.randn(B, L, D, requires_grad=True), torch.randn(B, L, D, requires_grad=True)
    mods = [torch.randn(B, 2, D, requires_grad=True) for _ in range(3)]

    def block(x, res, g, s, c):
        y, out = csrc_ops.gated_residual_layernorm_modulate(res, x, g, s, c, frame_len=2)
        return csrc_ops.layernorm_modulate(y, s, c, frame_len=2) + out

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, res, *mods), block(x, res, *mods))


def test_bad_modulation_layout_is_a_value_error(standin):
    x = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match="frame_len"):
        csrc_ops.layernorm_modulate(x, torch.randn(2, 4, 8), torch.randn(2, 4, 8), frame_len=2)
    with pytest.raises(ValueError, match="shift"):
        csrc_ops.layernorm_modulate(x, torch.randn(3, 8), torch.randn(2, 8))


def _cuda_vs_triton(layout, dtype, mod_dtype, D, device):
    """csrc_ops vs the Triton ops, both AdaLN ops, forward and every gradient: the 2x rule against the unrounded
    fp32 reference with Triton's error as the baseline (the CUDA path is no further from the specification
    than twice the Triton path, + atol)."""
    from wmfast.kernels import adaln as k

    B, L, F = 2, 6, 3
    x, res = (torch.randn(B, L, D, device=device).to(dtype) for _ in range(2))
    (gate, shift, scale), fl = _layout(layout, B, L, D, F, dtype, device, mod_dtype)
    cases = [
        ("layernorm_modulate", [x, shift, scale], ("x", "shift", "scale"),
         lambda i: (csrc_ops.layernorm_modulate(*i, frame_len=fl),),
         lambda i: (k.layernorm_modulate_op(*i, 1e-6, fl or 0),),
         lambda i: (layernorm_modulate_ref(*i, frame_len=fl),)),
        ("gated_residual_layernorm_modulate", [res, x, gate, shift, scale], ("residual", "x", "gate", "shift", "scale"),
         lambda i: csrc_ops.gated_residual_layernorm_modulate(*i, frame_len=fl),
         lambda i: k.gated_residual_layernorm_modulate_op(*i, 1e-6, fl or 0),
         lambda i: gated_residual_layernorm_modulate_ref(*i, frame_len=fl))]
    for op, ins, names, cuda_fn, triton_fn, ref_fn in cases:
        ci, ti, ri = _leaf(ins), _leaf(ins), _leaf([t.float() for t in ins])
        co, to, ro = cuda_fn(ci), triton_fn(ti), ref_fn(ri)
        for c, t, r, name in zip(co, to, ro, ("y", "out")):
            assert_2x_rule(c, r, t, name=f"{op} {name}: cuda vs triton", dtype=dtype)
        cot = [torch.randn_like(o) for o in co]
        grads = zip(torch.autograd.grad(co, ci, cot), torch.autograd.grad(to, ti, cot),
                    torch.autograd.grad(ro, ri, [c.float() for c in cot]), names)
        for c, t, r, name in grads:
            assert_2x_rule(c, r, t, name=f"{op} d{name}: cuda vs triton", dtype=dtype)


@pytest.mark.skipif(not backend.triton_interpret(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("layout,dtype,D", [pytest.param("mixed", torch.bfloat16, 24, id="mixed-bf16"),
                                            pytest.param("per-frame", torch.float32, 61, id="per-frame-fp32-D61")])
def test_standin_cuda_vs_triton_runs(standin, layout, dtype, D):
    """The GPU test's comparison code, executed on the CPU stand-in vs the interpreted Triton kernels."""
    _cuda_vs_triton(layout, dtype, torch.float32, D, "cpu")


def test_residual_dtype_mismatch_is_a_value_error(standin):
    x, gate = torch.randn(2, 6, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"residual dtype torch.float64 must be x's dtype torch.float32"):
        csrc_ops.gated_residual_layernorm_modulate(x.double(), x, gate, gate, gate)


def test_rows_wider_than_triton_max_d_fall_back_to_the_reference(monkeypatch, caplog):
    """A row the CUDA kernel does not take and Triton's MAX_D excludes (it would spill) runs the reference."""
    import logging

    from wmfast.kernels import adaln as k

    def refuse(*args):
        raise AssertionError("the Triton kernel must not see D > MAX_D")

    monkeypatch.setattr(k, "MAX_D", 16)
    monkeypatch.setattr(k, "layernorm_modulate_op", refuse)
    monkeypatch.setattr(k, "gated_residual_layernorm_modulate_op", refuse)
    x, res, gate, shift, scale = (torch.randn(2, 3, 24) for _ in range(5))
    with caplog.at_level(logging.INFO, logger="wmfast"):
        y = csrc_ops.layernorm_modulate(x, shift, scale)  # CPU tensors: supports_adaln says no
        y2, out = csrc_ops.gated_residual_layernorm_modulate(res, x, gate, shift, scale)
    torch.testing.assert_close(y, layernorm_modulate_ref(x, shift, scale), rtol=0, atol=0)
    torch.testing.assert_close((y2, out), gated_residual_layernorm_modulate_ref(res, x, gate, shift, scale),
                               rtol=0, atol=0)
    assert "D = 24 > the Triton kernels' MAX_D = 16" in caplog.text


# ----------------------------------------------------------------------------------------------- backend choice
@pytest.fixture
def fake_gpu(monkeypatch):
    """select_backend's CUDA-tensor path with both kernel backends 'usable' (no device is touched)."""
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    monkeypatch.setattr(backend, "cuda_ext_available", lambda: (True, "test"))
    monkeypatch.setattr(backend, "triton_available", lambda: (True, "test"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(backend, "_timing_allowed", lambda: True)
    monkeypatch.setattr(tuning, "load_table", lambda gpu: {})
    monkeypatch.setattr(backend, "_TIMED", {})
    return torch.device("cuda")


def test_no_table_no_runners_keeps_preference_order(fake_gpu):
    assert backend.select_backend("layernorm_modulate", fake_gpu, ("cuda", "triton", "torch")) == "cuda"
    assert backend.select_backend("layernorm_modulate", fake_gpu, ("triton", "cuda", "torch")) == "triton"


def test_ops_without_cuda_kernel_never_pick_cuda(fake_gpu, monkeypatch):
    assert backend.select_backend("gated_residual", fake_gpu, ("cuda", "triton", "torch")) == "triton"
    monkeypatch.setenv("WMFAST_BACKEND", "cuda")
    assert backend.select_backend("gated_residual", fake_gpu, ("cuda", "triton", "torch")) == "triton"
    assert backend.select_backend("layernorm_modulate", fake_gpu, ("cuda", "triton", "torch")) == "cuda"


def test_measured_table_decides_per_gpu_and_shape(fake_gpu, monkeypatch):
    table = {"backend": {"layernorm_modulate": {"D=3072": "triton", "*": "cuda"}}}
    monkeypatch.setattr(tuning, "load_table", lambda gpu: table if gpu == "Test GPU" else {})
    sel = backend.select_backend
    assert sel("layernorm_modulate", fake_gpu, ("cuda", "triton", "torch"), shape_key="D=3072") == "triton"
    assert sel("layernorm_modulate", fake_gpu, ("triton", "cuda", "torch"), shape_key="D=512") == "cuda"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Other GPU")
    assert sel("layernorm_modulate", fake_gpu, ("triton", "cuda", "torch"), shape_key="D=3072") == "triton"


def test_first_use_timing_picks_fastest_once(fake_gpu, monkeypatch):
    calls = []

    def fake_time(runners, reps=10):
        calls.append(sorted(runners))
        return {"cuda": 2.0, "triton": 1.0}

    monkeypatch.setattr(backend, "time_backends", fake_time)
    runners = {"cuda": lambda: None, "triton": lambda: None}
    for _ in range(3):
        got = backend.select_backend("temporal_decode_step", fake_gpu, ("cuda", "triton", "torch"),
                                     shape_key="S=1024,H=8,Dh=64", runners=runners)
        assert got == "triton"
    assert calls == [["cuda", "triton"]]


def test_autotune_off_by_env(monkeypatch):
    monkeypatch.setenv("WMFAST_AUTOTUNE", "0")
    assert not backend._timing_allowed()


def test_cpu_tensors_unchanged_without_gpu(monkeypatch):
    monkeypatch.delenv("WMFAST_BACKEND", raising=False)
    got = backend.select_backend("layernorm_modulate", torch.device("cpu"), ("cuda", "triton", "torch"))
    assert got == ("triton" if backend.triton_interpret() else "torch")


# ------------------------------------------------------------------------------------------------------ GPU half
@pytest.fixture(scope="module")
def cuda_ext():
    ok, why = csrc_ops.load()
    if not ok:  # a GPU machine must be able to build csrc/: failing to is a failure, not a skip
        os.environ["WMFAST_CUDA_JIT"] = "1"
        csrc_ops.load.cache_clear()
        ok, why = csrc_ops.load()
    assert ok, why
    return torch.ops.wmfast_cuda


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,mod_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float32, torch.float32)],
                         ids=["bf16", "bf16-fp32mod", "fp16", "fp32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", [61, 512, 1000, 3072])
def test_gpu_adaln_vs_triton_vs_reference(cuda_ext, layout, dtype, mod_dtype, D):
    B, L, F = 2, 12, 3
    x, res = torch.randn(B, L, D, device="cuda", dtype=dtype), torch.randn(B, L, D, device="cuda", dtype=dtype)
    (gate, shift, scale), frame_len = _layout(layout, B, L, D, F, dtype, "cuda", mod_dtype)
    ins = _leaf([x, shift, scale])
    y = csrc_ops.layernorm_modulate(*ins, frame_len=frame_len)
    _check_grads([y], ins, lambda i, up: (layernorm_modulate_ref(*i, frame_len=frame_len, upcast=up),),
                 [x, shift, scale], dtype, ("x", "shift", "scale"))
    ins = _leaf([res, x, gate, shift, scale])
    yo = csrc_ops.gated_residual_layernorm_modulate(*ins, frame_len=frame_len)
    _check_grads(list(yo), ins, lambda i, up: gated_residual_layernorm_modulate_ref(*i, frame_len=frame_len, upcast=up),
                 [res, x, gate, shift, scale], dtype, ("residual", "x", "gate", "shift", "scale"))
    _cuda_vs_triton(layout, dtype, mod_dtype, D, "cuda")  # both ops, forward and gradients


@pytest.mark.gpu
def test_gpu_compile_fullgraph(cuda_ext):
    B, L, D, fl = 2, 8, 256, 4
    x, res = (torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mods = [torch.randn(B, L // fl, D, device="cuda", requires_grad=True) for _ in range(3)]

    def block(x, res, g, s, c):
        y, out = csrc_ops.gated_residual_layernorm_modulate(res, x, g, s, c, frame_len=fl)
        return csrc_ops.layernorm_modulate(y, s, c, frame_len=fl).float().sum() + out.float().sum()

    compiled = torch.compile(block, fullgraph=True)
    eager_grads = torch.autograd.grad(block(x, res, *mods), (x, res, *mods))
    compiled_grads = torch.autograd.grad(compiled(x, res, *mods), (x, res, *mods))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_adaln_backward_is_deterministic(cuda_ext):
    B, L, D = 2, 4096, 3072
    x = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shift, scale = (torch.randn(B, 1, D, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    grads = [torch.autograd.grad(csrc_ops.layernorm_modulate(x, shift, scale), (x, shift, scale), dy)
             for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_opcheck(cuda_ext):
    _opcheck_every_op(cuda_ext, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("Dh", [32, 64, 128])
@pytest.mark.parametrize("t", [0, 6])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_gpu_temporal_decode_vs_triton_vs_reference(cuda_ext, dtype, Dh, t, strided):
    from wmfast.kernels.temporal_attention import temporal_decode_op

    B, S, H, T_max = 2, 37, 3, 8
    if strided:  # q, k, v as views of one fused qkv projection [B, 1, S, H, 3 * Dh]
        qkv = torch.randn(B, 1, S, H, 3 * Dh, device="cuda", dtype=dtype)
        q, k, v = qkv.split(Dh, dim=-1)
    else:
        q, k, v = (torch.randn(B, 1, S, H, Dh, device="cuda", dtype=dtype) for _ in range(3))
    cache = [torch.randn(B, S, H, T_max, Dh, device="cuda", dtype=dtype) for _ in range(2)]
    o, ref32 = _check_decode(csrc_ops.temporal_decode_step, q, k, v, cache, t, dtype)
    kt, vt = (c.clone() for c in cache)
    assert_2x_rule(o, ref32, temporal_decode_op(q, k, v, kt, vt, t), "cuda vs triton", dtype=dtype)


@pytest.mark.gpu
def test_gpu_binding_rejects_bad_input(cuda_ext):
    x = torch.randn(2, 4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="shift must be"):
        cuda_ext.layernorm_modulate_fwd(x, torch.randn(2, 3, 8, device="cuda"), torch.randn(2, 1, 8, device="cuda"),
                                        1e-6)
    q = torch.randn(1, 1, 2, 2, 48, device="cuda")
    with pytest.raises(RuntimeError, match="head dim 48"):
        cuda_ext.temporal_decode_step(q, q, q, torch.zeros(1, 2, 2, 4, 48, device="cuda"),
                                      torch.zeros(1, 2, 2, 4, 48, device="cuda"), 0)
