"""Run by tests/ops/test_linear_cross_entropy.py in a subprocess WITHOUT TRITON_INTERPRET (the GPU registration
path), on a machine with or without a GPU, as tests/ops/adaln_compile_check.py does for AdaLN:

1. the op is a triton_op launching through wrap_triton; its fake-tensor pass (what torch.compile runs) runs the
   launcher on fake CUDA logits (V=64000 bf16 and fp32: the ST-Transformer's chunk; V=517 fp16: odd) and records
   every kernel launch;
2. each recorded launch is compiled for sm_90a exactly as Triton's JIT would specialise it, with the ptxas Triton
   ships (`compile_launch` of adaln_compile_check.py); `ptxas -v` gives registers and spill bytes.

`--sweep`: also compile (BLOCK_V, num_warps) alternatives at V=64000 bf16 (what chose the defaults).
Prints one JSON object: {"outputs": [[shape, dtype, device], ...], "compiled": [{kernel, consts, num_warps, regs,
spill_bytes, vector_accesses, scalar_accesses}, ...]}.
"""
import importlib.util
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from wmfast.kernels import cross_entropy as K

assert type(K._cross_entropy_grad_kernel).__name__ == "JITFunction", "expected compiled-kernel mode"
_spec = importlib.util.spec_from_file_location(
    "adaln_compile_check", os.path.join(os.path.dirname(os.path.abspath(__file__)), "adaln_compile_check.py"))
_adaln_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_adaln_check)  # (its module code only wraps the AdaLN launcher, unused here)
compile_launch = _adaln_check.compile_launch

launches = _adaln_check.record_launches(K)


def fake_pass():
    outputs = []
    with FakeTensorMode():
        for n, V, dtype, grad in ((4096, 64000, torch.bfloat16, True), (4096, 64000, torch.float32, True),
                                  (37, 517, torch.float16, True), (4096, 64000, torch.bfloat16, False)):
            logits = torch.empty(n, V, device="cuda", dtype=dtype)
            targets = torch.empty(n, device="cuda", dtype=torch.int64)
            loss, correct = K.cross_entropy_grad_op(logits, targets, 1.0, -100, grad)
            outputs += [[list(t.shape), str(t.dtype), t.device.type] for t in (loss, correct)]
    return outputs


def sweep():
    """(BLOCK_V, num_warps) alternatives at V=64000 bf16, launched directly (recorded, compiled below)."""
    with FakeTensorMode():
        logits = torch.empty(4096, 64000, device="cuda", dtype=torch.bfloat16)
        targets = torch.empty(4096, device="cuda", dtype=torch.int64)
        for block_v, warps in ((2048, 4), (4096, 4), (4096, 16), (8192, 8), (8192, 16), (16384, 8), (16384, 16)):
            K._cross_entropy_grad(logits, targets, 1.0, -100, True, block_v=block_v, num_warps=warps)


def main():
    outputs = fake_pass()
    if "--sweep" in sys.argv:
        sweep()
    compiled, seen = [], set()
    if "--compile" in sys.argv or "--sweep" in sys.argv:
        for kernel, args, kwargs in launches:
            key = (kernel.__name__, tuple(sorted(kwargs.items())), tuple(str(getattr(a, "dtype", "")) for a in args))
            if key not in seen:
                seen.add(key)
                entry = compile_launch(kernel, args, kwargs)
                entry["dtype"] = str(args[0].dtype)
                compiled.append(entry)
    print(json.dumps({"outputs": outputs, "compiled": compiled}))


if __name__ == "__main__":
    main()
