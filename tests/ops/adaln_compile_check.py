"""Run by tests/ops/test_adaln_registration.py in a subprocess WITHOUT TRITON_INTERPRET (the GPU registration path), on a machine
with or without a GPU:

1. the ops are triton_ops launching through wrap_triton; their fake-tensor pass (what torch.compile runs) runs
   the launchers on fake CUDA tensors (Wan2.2 per-frame / per-token and ST-Transformer shapes) and records
   every kernel launch;
2. each recorded launch is specialised exactly as Triton's JIT would (its own binder: stride-1 constants,
   16-byte alignment) and compiled to a cubin for sm_90a (H100) with Triton's pipeline and the ptxas it
   ships; `ptxas -v` gives registers and spill bytes.

Prints one JSON object: {"outputs": [[shape, dtype, device], ...], "compiled": [{kernel, consts, num_warps,
regs, spill_bytes, vector_accesses, scalar_accesses}, ...]} (global loads/stores in the PTX, vector = 64/128-bit).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from wmfast.kernels import adaln as K

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
if not os.path.exists(PTXAS):  # older Triton wheels ship a single ptxas
    PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

assert type(K._adaln_fwd_kernel).__name__ == "JITFunction", "expected compiled-kernel mode (TRITON_INTERPRET unset)"
K._sm_count = lambda index: 132  # H100 SXM; there may be no GPU to ask


def record_launches(module) -> list:
    """Make `module`'s launchers record each launch (kernel, args, kwargs) into the returned list, then run it (the
    compile checks of the other kernel files use this too)."""
    launches, real_launch = [], module.launcher

    class _Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append((self.kernel, args, kwargs))
                return real_launch(self.kernel)[grid](*args, **kwargs)

            return run

    module.launcher = _Recorder
    return launches


launches = record_launches(K)


def fake_pass():
    outputs = []
    with FakeTensorMode():
        for B, L, D, fl in ((2, 12, 61, 4), (2, 1536, 3072, 256), (2, 5120, 512, 1024)):
            x = torch.empty(B, L, D, device="cuda", dtype=torch.bfloat16)
            res = torch.empty_like(x)
            mod = torch.empty(B, L // fl, 6, D, device="cuda")
            shift, scale, gate = (mod.select(2, i) for i in range(3))  # (indexing would build CUDA index tensors)
            tok = torch.empty(B, L, 6, D, device="cuda").select(2, 1)
            y, out = K.gated_residual_layernorm_modulate_op(res, x, gate, tok, scale, 1e-6, fl)
            grads = K.gated_residual_layernorm_modulate_bwd_op(y, out, res, x, gate, tok, scale, 1e-6, fl)
            y2 = K.layernorm_modulate_op(x, shift, scale, 1e-6, fl)
            _, dshift, dscale = K.layernorm_modulate_bwd_op(y2, x, shift, scale, 1e-6, fl)
            out2 = K.gated_residual_op(res, x, mod.select(1, 0).select(1, 2), fl)
            _, dgate = K.gated_residual_bwd_op(out2, x, mod.select(1, 0).select(1, 2), fl)
            outputs += [[list(t.shape), str(t.dtype), t.device.type]
                        for t in (y, out, *grads, y2, dshift, dscale, out2, dgate)]
    return outputs


def compile_launch(kernel, args, kwargs):
    backend = make_backend(TARGET)
    real = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype) if isinstance(a, torch.Tensor) else a
            for a in args]  # CPU stand-ins with the same dtypes and strides (16-byte aligned, as CUDA allocations)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*real, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                              options=options.__dict__)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        proc = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True, check=True)
    info = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", info)
    accesses = re.findall(r"\b(ld|st)\.global\.(v\d\.)?", compiled.asm["ptx"])
    return {"kernel": kernel.__name__, "consts": {k: v for k, v in kwargs.items() if k != "num_warps"},
            "num_warps": kwargs["num_warps"], "regs": int(regs.group(1)),
            "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)),
            "vector_accesses": sum(1 for _, v in accesses if v),
            "scalar_accesses": sum(1 for _, v in accesses if not v)}


def main():
    outputs = fake_pass()
    compiled, seen = [], set()
    if "--compile" in sys.argv:
        for kernel, args, kwargs in launches:
            key = (kernel.__name__, tuple(sorted(kwargs.items())))
            if key not in seen:
                seen.add(key)
                compiled.append(compile_launch(kernel, args, kwargs))
    print(json.dumps({"outputs": outputs, "compiled": compiled}))


if __name__ == "__main__":
    main()
