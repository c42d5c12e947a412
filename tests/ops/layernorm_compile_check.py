"""Run by tests/ops/test_layernorm.py in a subprocess WITHOUT TRITON_INTERPRET (the GPU registration path), on a
machine with or without a GPU, as tests/ops/adaln_compile_check.py does for AdaLN:

1. the ops are triton_ops launching through wrap_triton; their fake-tensor pass (what torch.compile runs) runs the
   launchers on fake CUDA tensors at the ST-Transformer's shapes (the residual stream [8*5*1024, 1, 512] bf16, the
   QK-norm rows [8*5*1024, 16, 64] of a qkv projection) and at D = 8192 (the limit), and records every launch;
2. each recorded launch is compiled for sm_90a exactly as Triton's JIT would specialise it (`compile_launch` of
   adaln_compile_check.py); `ptxas -v` gives registers and spill bytes.

Prints one JSON object: {"outputs": [[shape, dtype, device], ...], "compiled": [{kernel, consts, num_warps, regs,
spill_bytes, vector_accesses, scalar_accesses}, ...]}.
"""
import importlib.util
import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from wmfast.kernels import layernorm as K

assert type(K._layer_norm_fwd_kernel).__name__ == "JITFunction", "expected compiled-kernel mode"
_spec = importlib.util.spec_from_file_location(
    "adaln_compile_check", os.path.join(os.path.dirname(os.path.abspath(__file__)), "adaln_compile_check.py"))
_adaln_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_adaln_check)  # (its module code only wraps the AdaLN launcher, unused here)
K._sm_count = lambda index: 132  # H100 SXM; there may be no GPU to ask

launches = _adaln_check.record_launches(K)


def fake_pass():
    outputs = []
    bf = torch.bfloat16
    with FakeTensorMode():
        for M, inner, D, G in ((40960, 1, 512, 1), (40960, 16, 64, 2), (64, 1, 8192, 1)):
            if inner == 1:
                x = torch.empty(M, 1, D, device="cuda", dtype=bf)
            else:  # the q and k columns of a qkv projection [M, 3 * 8 * 64], read in place
                x = torch.empty(M, 3 * inner // 2 * D, device="cuda", dtype=bf).view(M, 3, inner // 2, D).narrow(1, 0, 2)
                x = x.flatten(1, 2)
            w = torch.empty(G, D, device="cuda")
            y, out = K.residual_layer_norm_op(torch.empty_like(x), x, w, w, 1e-5) if inner == 1 else (
                K.layer_norm_op(x, w, w, 1e-5), None)
            dx, dw, _db = K.layer_norm_bwd_op(torch.empty_like(y), out, out if out is not None else x, w, 1e-5)
            outputs += [[list(t.shape), str(t.dtype), t.device.type] for t in (y, dx, dw)]
    return outputs


def main():
    outputs = fake_pass()
    compiled, seen = [], set()
    for kernel, args, kwargs in launches:
        key = (kernel.__name__, tuple(sorted(kwargs.items())))
        if key not in seen:
            seen.add(key)
            compiled.append(_adaln_check.compile_launch(kernel, args, kwargs))
    print(json.dumps({"outputs": outputs, "compiled": compiled}))


if __name__ == "__main__":
    main()
