"""The ST-Transformer's training head: chunked linear cross-entropy (the mean CE of h @ W.T over the 64000-way
vocabulary, no [N, V] logits), forward and forward + backward, and its per-chunk cross-entropy-gradient kernel.

    python benchmarks/bench_cross_entropy.py [--quick] [--profile lease] [--out DIR] [--device cuda|cpu]

Sections (rows in bench_cross_entropy.csv, shared harness wmfast.bench):
1. linear_cross_entropy on the model's shapes: h [N, D] and the tied embedding W [V, D] in bf16, N = 3072 future
   tokens per sample x micro-batch (1, 4, 8; mb 8 -> N = 24576), D = 512, V = 64000, chunk 4096. Modes: fwd
   (no_grad: the loss and metrics only, as evaluation runs it) and fwd+bwd (the loss's gradient w.r.t. h and W).
   Providers: wmfast-triton (the public op on the Triton backend: the kernel overwrites each chunk's logits with
   their gradient), torch-chunked (the same chunk loop on the torch backend, the reference: an fp32 copy of every
   chunk; what wmfast ran before the kernel), torch.compile (Inductor on a plain F.cross_entropy(h @ W.T), the
   full [N, V] logits) and torch (the same, eager; not under --profile lease). FLOPs: 2 N V D for the logits,
   3x that with the two gradient matmuls; peak_mem_mb: above the inputs, i.e. what the head costs a training step.
2. cross_entropy_grad: the kernel alone on one [4096, 64000] bf16 chunk against the torch reference
   (cross_entropy_grad_ref, eager). Ideal bytes: the chunk read once and written once (the kernel reads it twice,
   so it can reach about 2/3 of the copy ceiling).

--profile lease: micro-batch 8 only; torch.compile only while 20 s of the budget are left (its first call
compiles). --quick: tiny shapes on the CPU in seconds (the kernel runs under TRITON_INTERPRET=1, which this
script sets when there is no GPU, before anything imports triton). Only measured numbers are ever committed.
"""
from __future__ import annotations

import torch

from wmfast.bench.context import interpret_triton_without_gpu, script_main

interpret_triton_without_gpu()  # before anything imports triton

import torch.nn.functional as F

from wmfast.ops import use_backend

SUITE = "ops"
TOKENS_PER_SAMPLE = 3 * 1024  # the 3 future frames of 32 x 32 tokens that a sample's loss covers
D, V, CHUNK = 512, 64000, 4096


def _shapes(ctx):
    """(micro-batch, N, D, V, chunk)."""
    if ctx.quick:
        return [(1, 64, 16, 517, 48)]  # two uneven chunks
    return [(mb, mb * TOKENS_PER_SAMPLE, D, V, CHUNK) for mb in ((8,) if ctx.lease else (1, 4, 8))]


def _wmfast(backend: str, chunk: int):
    from wmfast.ops import linear_cross_entropy

    def fn(h, w, y):
        with use_backend(backend):
            return linear_cross_entropy(h, w, y, chunk_size=chunk)[0]

    return fn


def plain_cross_entropy(h, w, y):
    """What a model without a fused head runs: the full [N, V] logits, then F.cross_entropy."""
    return F.cross_entropy(h @ w.t(), y)


def _compiled(fn):
    """torch.compile(fn, dynamic=False) with AOTAutograd's donated buffers off (as bench_adaln's baseline: a
    backward compiled with them refuses a second backward over one graph, which timing loops may do)."""
    import torch._functorch.config as functorch_config

    inner = torch.compile(fn, dynamic=False)

    def run(*args):
        with functorch_config.patch(donated_buffer=False):
            return inner(*args)

    return run


def _triton_runs_here(ctx) -> bool:
    """Whether the Triton kernels run on ctx.device (a GPU, or the CPU under the interpreter); else one log line."""
    from wmfast.kernels._launch import triton_interpret

    from wmfast.ops.dispatch import triton_available

    ok, why = triton_available()
    if ok and (ctx.device.type == "cuda" or triton_interpret()):
        return True
    ctx.log(f"wmfast-triton: skipped ({why if not ok else 'CPU tensors need TRITON_INTERPRET=1'})")
    return False


def _providers(ctx, chunk):
    out = {"wmfast-triton": _wmfast("triton", chunk)} if _triton_runs_here(ctx) else {}
    out["torch-chunked"] = _wmfast("torch", chunk)
    if ctx.device.type == "cuda" and not ctx.quick and ctx.can_afford(20, "linear_cross_entropy torch.compile"):
        out["torch.compile"] = _compiled(plain_cross_entropy)
    if not ctx.lease:
        out["torch"] = plain_cross_entropy
    return out


def bench_head(ctx):
    for mb, N, d, v, chunk in _shapes(ctx):
        h = torch.randn(N, d, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(v, d, device=ctx.device) * 0.05).to(torch.bfloat16).requires_grad_()
        y = torch.randint(0, v, (N,), device=ctx.device)
        shape = f"mb={mb} N={N} D={d} V={v} chunk={chunk} bf16"
        flops = 2 * N * v * d
        for name, fn in _providers(ctx, chunk).items():
            with torch.no_grad():
                ctx.bench("linear_cross_entropy", shape, name, "fwd", lambda fn=fn, a=(h, w, y): fn(*a), flops=flops,
                          dtype=torch.bfloat16)
            ctx.bench("linear_cross_entropy", shape, name, "fwd+bwd",
                      lambda fn=fn, a=(h, w, y): torch.autograd.grad(fn(*a), a[:2]), flops=3 * flops,
                      dtype=torch.bfloat16)


def bench_kernel(ctx):
    from wmfast.kernels import cross_entropy as K

    n, v = (32, 517) if ctx.quick else (CHUNK, V)
    logits = torch.randn(n, v, device=ctx.device).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device=ctx.device)
    shape = f"n={n} V={v} bf16"
    nbytes = 2 * logits.numel() * logits.element_size()  # read once, write once
    providers = {"torch": lambda: K.cross_entropy_grad_ref(logits, y)}
    if _triton_runs_here(ctx):
        # in place: from the second call on it reads the previous call's gradient, the same amount of work
        providers = {"wmfast-triton": lambda: K.cross_entropy_grad_op(logits, y, 1.0, K.IGNORE_INDEX, True),
                     **providers}
    for name, fn in providers.items():
        ctx.bench("cross_entropy_grad", shape, name, "fwd", fn, bytes=nbytes, dtype=torch.bfloat16)


def run(ctx):
    bench_head(ctx)
    bench_kernel(ctx)


def main(argv=None) -> int:
    return script_main(run, argv, name="cross_entropy")


if __name__ == "__main__":
    raise SystemExit(main())
