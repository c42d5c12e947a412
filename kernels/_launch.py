"""Registration and launch plumbing shared by every Triton op of wmfast.kernels.

- `register(qualname, fn, fake, mutates_args)`: the op under `torch.library`. On a GPU it is a `triton_op`, whose
  kernels are launched through `wrap_triton`, so torch.compile(fullgraph=True) traces into them and Inductor sees
  (and can fuse around) the kernels. Under TRITON_INTERPRET=1 wrap_triton hands back the interpreted function,
  so a triton_op's fake (meta) pass would run the interpreter on FakeTensors and fail (torch 2.13 / triton 3.9:
  "Attempted to set the storage of a tensor on device meta"; older torch rejects interpreted kernels in
  wrap_triton). There the op is a plain `custom_op` with the explicit `fake`: eager calls, opcheck and
  torch.compile (an opaque op, no graph break) still run the real kernels on the CPU.
- `launcher(kernel)`: what a launcher indexes with its grid (wrap_triton on a GPU, the kernel itself under the
  interpreter).
- `launch_params(kernel, key, device, **given)`: the launch parameters the caller gave, else the measured table
  of this GPU (`wmfast.kernels.tuning`), else None for each (the kernel's hand-set default applies).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from wmfast.kernels.tuning import launch_config


def triton_interpret() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fp32_dot_precision() -> str:
    """tl.dot's input_precision for fp32 operands as torch's fp32 matmul setting says: "tf32" when TF32 is allowed,
    else "ieee" (exact products, what an fp32 F.linear computes under the default "highest"). Reads the
    per-backend `torch.backends.cuda.matmul.fp32_precision` when it is set (the legacy getter raises once it is),
    else `torch.get_float32_matmul_precision()`."""
    new = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", "none")
    if new in ("tf32", "ieee"):
        return new
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def launcher(kernel):
    """The kernel to index with a grid inside a torch.library op (see the module docstring)."""
    return kernel if triton_interpret() else torch.library.wrap_triton(kernel)


def register(qualname: str, fn: Callable, fake: Callable, mutates_args: Sequence[str] = ()):
    """`fn` registered as the op `qualname` ("wmfast::name"): a triton_op on a GPU, a custom_op with `fake` under
    the interpreter (see the module docstring). Returns the op (call it like `fn`)."""
    if triton_interpret():
        op = torch.library.custom_op(qualname, fn, mutates_args=tuple(mutates_args))
        op.register_fake(fake)
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=tuple(mutates_args))


def op(qualname: str, fake: Callable, mutates_args: Sequence[str] = ()):
    """`register` as a decorator."""
    return lambda fn: register(qualname, fn, fake, mutates_args)


def launch_params(kernel: str, key: str, device, **given):
    """{name: value} for the launch parameters in `given`: the caller's values when any is set, else the entry of
    the measured table for (kernel, key) on `device`'s GPU, else None each (the kernel's default applies)."""
    if any(v is not None for v in given.values()):
        return given
    cfg = launch_config(kernel, key, device)
    return {name: cfg.get(name) for name in given}
