"""Run by tests/ops/test_greedy_head.py in a subprocess WITHOUT TRITON_INTERPRET (the GPU registration path), on a
machine with or without a GPU, as tests/ops/layernorm_compile_check.py does for LayerNorm:

1. the op is a triton_op launching through wrap_triton; its fake-tensor pass (what torch.compile runs) runs the
   launcher on fake CUDA tensors at the model's shapes (N = 1024 tokens: B = 1, vocabulary split over the GPU,
   then the partial reduction; N = 131072: one split, no reduction; V = 64000, D = 512; bf16, and fp32 at the
   default "highest" matmul precision (exact fp32 dot) and at "high" (TF32)) and records every launch;
2. each recorded launch is compiled for sm_90a exactly as Triton's JIT would specialise it (`compile_launch` of
   adaln_compile_check.py); `ptxas -v` gives registers and spill bytes, the compiled kernel its shared memory,
   its PTX whether the dot runs on the tensor cores (wgmma / mma).

`--sweep`: also compile tile alternatives at N = 1024 (what chose the defaults).

Prints one JSON object: {"outputs": [[shape, dtype, device], ...], "compiled": [{kernel, consts, num_warps, regs,
spill_bytes, vector_accesses, scalar_accesses, dtype, precision, grids, shared_bytes, wgmma, mma}, ...]}.
"""
import importlib.util
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from wmfast.kernels import greedy_head as K

assert type(K._greedy_head_kernel).__name__ == "JITFunction", "expected compiled-kernel mode"
_spec = importlib.util.spec_from_file_location(
    "adaln_compile_check", os.path.join(os.path.dirname(os.path.abspath(__file__)), "adaln_compile_check.py"))
_adaln_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_adaln_check)  # (its module code only wraps the AdaLN launcher, unused here)
K._sm_count = lambda index: 132  # H100 SXM; there may be no GPU to ask

SHAPES = [(1024, torch.bfloat16, "highest"), (131072, torch.bfloat16, "highest"), (1024, torch.float32, "highest"),
          (131072, torch.float32, "highest"), (1024, torch.float32, "high")]
V, D = 64000, 512

launches = []  # (kernel, args, kwargs, grid, fp32 matmul precision at launch)
_real_launcher = K.launcher


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            launches.append((self.kernel, args, kwargs, list(grid)))
            return _real_launcher(self.kernel)[grid](*args, **kwargs)

        return run


K.launcher = _Recorder

_compiled = {}  # the last kernel triton.compile returned (compile_launch keeps it to itself)
_real_compile = triton.compile


def _capture(*args, **kwargs):
    _compiled["last"] = _real_compile(*args, **kwargs)
    return _compiled["last"]


triton.compile = _capture


def fake_pass():
    outputs = []
    default = torch.get_float32_matmul_precision()
    try:
        with FakeTensorMode():
            for N, dtype, precision in SHAPES:
                torch.set_float32_matmul_precision(precision)
                h = torch.empty(N, D, device="cuda", dtype=dtype)
                w = torch.empty(V, D, device="cuda", dtype=dtype)
                index, value = K.greedy_head_op(h, w)
                outputs += [[list(t.shape), str(t.dtype), t.device.type] for t in (index, value)]
    finally:
        torch.set_float32_matmul_precision(default)
    return outputs


def sweep():
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) alternatives at N = 1024 (launched directly, compiled
    below): what chose the defaults."""
    with FakeTensorMode():
        for dtype, alternatives in SWEEP.items():
            h = torch.empty(1024, D, device="cuda", dtype=dtype)
            w = torch.empty(V, D, device="cuda", dtype=dtype)
            for bn, bv, bk, warps, stages in alternatives:
                K._greedy_head(h, w, block_n=bn, block_v=bv, block_k=bk, num_warps=warps, num_stages=stages)


SWEEP = {torch.bfloat16: [(128, 128, 64, 4, 3), (64, 128, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)],
         torch.float32: [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (128, 128, 16, 8, 3), (64, 64, 32, 4, 3),
                         (64, 128, 32, 4, 3), (128, 128, 32, 8, 2)]}


def main():
    outputs = fake_pass()
    if "--sweep" in sys.argv:
        sweep()
    compiled, seen = [], {}
    for kernel, args, kwargs, grid in launches:
        key = (kernel.__name__, tuple(sorted(kwargs.items())), str(args[0].dtype))
        if key in seen:
            seen[key]["grids"].append(grid)
            continue
        entry = seen[key] = _adaln_check.compile_launch(kernel, args, kwargs)
        ptx = _compiled["last"].asm["ptx"]
        entry.update(dtype=str(args[0].dtype), precision=kwargs.get("PRECISION"), grids=[grid],
                     shared_bytes=_compiled["last"].metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                     mma=ptx.count("mma.sync"))
        compiled.append(entry)
    print(json.dumps({"outputs": outputs, "compiled": compiled}))


if __name__ == "__main__":
    main()
