"""Run by tests/ops/test_norm_linear.py in a subprocess WITHOUT TRITON_INTERPRET (the GPU registration path), on a
machine with or without a GPU, as tests/ops/layernorm_compile_check.py does for the LayerNorm:

1. the ops are triton_ops launching through wrap_triton; their fake-tensor pass (what torch.compile runs) runs the
   launcher on fake CUDA tensors at the ST-Transformer's shapes: M = 1024 rows (decoding one sample) and 131072
   (128 samples), D = 512; the qkv projection N = 1536 with QK-norm (H = 8, Dh = 64), without and with the
   residual add, and fc1 N = 2048 with GELU after a residual add; bf16 and fp32; every launch is recorded;
2. each distinct launch is compiled for sm_90a exactly as Triton's JIT would specialise it (`compile_launch` of
   adaln_compile_check.py); `ptxas -v` gives registers and spill bytes.

Prints one JSON object: {"outputs": [[shape, dtype, device], ...], "compiled": [{kernel, consts, num_warps, regs,
spill_bytes, vector_accesses, scalar_accesses, dtype}, ...]}.
"""
import importlib.util
import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from wmfast.kernels import norm_linear as K

assert type(K._norm_linear_fwd_kernel).__name__ == "JITFunction", "expected compiled-kernel mode"
_spec = importlib.util.spec_from_file_location(
    "adaln_compile_check", os.path.join(os.path.dirname(os.path.abspath(__file__)), "adaln_compile_check.py"))
_adaln_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_adaln_check)  # (its module code only wraps the AdaLN launcher, unused here)

launches = _adaln_check.record_launches(K)
D, H, DH = 512, 8, 64


def fake_pass():
    outputs = []
    with FakeTensorMode():
        for dt in (torch.bfloat16, torch.float32):
            for M in (1024, 131072):
                x, res = (torch.empty(M, D, device="cuda", dtype=dt) for _ in range(2))
                ln = torch.empty(D, device="cuda", dtype=dt)
                w_qkv, b_qkv = torch.empty(3 * D, D, device="cuda", dtype=dt), torch.empty(3 * D, device="cuda", dtype=dt)
                w_fc1, b_fc1 = torch.empty(4 * D, D, device="cuda", dtype=dt), torch.empty(4 * D, device="cuda", dtype=dt)
                qk = [torch.empty(DH, device="cuda", dtype=dt) for _ in range(4)]
                y1 = K.norm_linear_op(x, w_qkv, b_qkv, ln, ln, 1e-5, "none", *qk, H, 1e-5)
                y2, out2 = K.residual_norm_linear_op(res, x, w_qkv, b_qkv, ln, ln, 1e-5, "none", *qk, H, 1e-5)
                y3, out3 = K.residual_norm_linear_op(res, x, w_fc1, b_fc1, ln, ln, 1e-5, "gelu_tanh", None, None,
                                                     None, None, 0, 1e-5)
                outputs += [[list(t.shape), str(t.dtype), t.device.type] for t in (y1, y2, out2, y3, out3)]
        torch.set_float32_matmul_precision("high")  # fp32 with TF32 products (tensor cores), at the larger M
        try:
            y4 = K.norm_linear_op(x, w_qkv, b_qkv, ln, ln, 1e-5, "none", *qk, H, 1e-5)
            y5, _ = K.residual_norm_linear_op(res, x, w_fc1, b_fc1, ln, ln, 1e-5, "gelu_tanh", None, None, None,
                                              None, 0, 1e-5)
        finally:
            torch.set_float32_matmul_precision("highest")
        outputs += [[list(t.shape), str(t.dtype), t.device.type] for t in (y4, y5)]
    return outputs


def main():
    outputs = fake_pass()
    compiled, seen = [], set()
    for kernel, args, kwargs in launches:
        key = (kernel.__name__, str(args[0].dtype), tuple(sorted(kwargs.items())))
        if key not in seen:
            seen.add(key)
            compiled.append({**_adaln_check.compile_launch(kernel, args, kwargs), "dtype": str(args[0].dtype)})
    print(json.dumps({"outputs": outputs, "compiled": compiled}))


if __name__ == "__main__":
    main()
