"""Fused AdaLN-Zero ops: layernorm_modulate, gated_residual, gated_residual_layernorm_modulate, and the AdaLN
expressions of one Wan2.2 block.

    python benchmarks/bench_adaln.py [--quick] [--out DIR] [--device cuda|cpu]

Sections (rows in bench_adaln.csv, shared harness wmfast.bench; modes fwd, bwd, fwd+bwd):
1. each op on real shapes: Wan2.2-TI2V-5B blocks (D=3072, L=1536 tokens = 6 latent frames x 256 per
   512x512 sample, batch 1 and 8, bf16 x, fp32 modulation per-sample [B, 6, D], per-frame [B, 6 frames, 6, D]
   and per-token [B, L, 6, D], the kernels reading `unbind` views in place) and the ST-Transformer (D=512,
   L=5120 = 5 frames x 1024, batch 20, bf16, per-sample and per-frame). Providers: wmfast-triton (the public
   op), wmfast-cuda (when the extension is built), torch (the eager fp32 reference), torch.compile (of the
   reference), and for layernorm_modulate `liger` (Liger-Kernel's LayerNorm + torch modulation; on a GPU when
   liger_kernel is importable, else skipped with a log line). Ideal bytes: every [B, L, D] tensor read or written once, plus each modulation view read (and
   its gradient written in bwd) once; fraction_of_ceiling = ideal time at the copy bandwidth measured in this
   run / measured time.
2. wan_block_adaln: the four AdaLN expressions of diffusers' WanTransformerBlock with per-token timesteps
   (norm1 + modulate, gated residual, norm3 + modulate, gated residual; attention/FFN outputs are inputs, the
   cross-attention in between is left out), including the (1, 6, D) table + (B, L, 6, D) fp32 temb sum that
   diffusers materialises in every block. Providers: diffusers (eager), diffusers-compiled, wmfast-triton
   (per-frame modulation, the same information: timesteps are constant within a latent frame) and
   wmfast-triton-pertoken (the materialised per-token views read in place).

--profile lease (`wmfast bench`, benchmarks/lease/run.sh): the Wan (B=8) and ST-Transformer (B=20) per-frame shapes,
the two ops with a CUDA kernel, a 3 x 3 sweep, the Wan block at B=8; torch.compile baselines only while at least
20 s of the budget is left.
--quick: tiny shapes on the CPU in a few seconds (the Triton kernels run under TRITON_INTERPRET=1, which this
script sets when there is no GPU, before anything imports triton). Only measured numbers are ever committed.
"""
from __future__ import annotations

import os

import torch

from wmfast.bench.context import interpret_triton_without_gpu, script_main

interpret_triton_without_gpu()  # before anything imports triton

import torch.nn.functional as F

from wmfast.bench.timing import direct_triton_launches
from wmfast.ops import use_backend

SUITE = "ops"
OPS = ("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate")
CUDA_OPS = ("layernorm_modulate", "gated_residual_layernorm_modulate")  # what csrc/adaln implements


def _with_backend(fn, name):
    def run(*a, **k):
        with use_backend(name):
            return fn(*a, **k)

    return run


def _backends(ctx) -> dict[str, str]:
    """wmfast providers that can run here -> backend name (one log line for each that cannot)."""
    from wmfast.ops.dispatch import cuda_ext_available, triton_available

    out = {}
    ok, why = triton_available()
    if ok and (ctx.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        out["wmfast-triton"] = "triton"
    else:
        ctx.log(f"wmfast-triton: skipped ({why})")
    ok, why = cuda_ext_available()
    try:
        import wmfast.ops.cuda_ext  # noqa: F401
    except ImportError as e:
        ok, why = False, f"wmfast.ops.cuda_ext not importable ({e})"
    if ok:
        out["wmfast-cuda"] = "cuda"
    else:
        ctx.log(f"wmfast-cuda: skipped ({why})")
    return out


# ------------------------------------------------------------------------------------------------ 1. the ops
def _liger_layernorm_modulate():
    """Liger-Kernel's Triton LayerNorm (the optional `liger` provider of layernorm_modulate) followed by the
    modulation in torch: what a model gets from swapping in LigerLayerNorm. None (and a log line) when
    liger_kernel is not importable; it is never a dependency of wmfast."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        return None

    def fn(x, shift, scale, frame_len=None):
        D = x.shape[-1]
        ones = torch.ones(D, device=x.device, dtype=x.dtype)  # Wan's norm1/norm2 have no affine parameters
        zeros = torch.zeros(D, device=x.device, dtype=x.dtype)
        y = LigerLayerNormFunction.apply(x, ones, zeros, 1e-6).float()
        B, L = x.shape[:2]
        if shift.dim() == 2:  # per sample [B, D]
            return (y * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)
        if shift.shape[1] != L:  # per frame [B, F, D]
            y = y.view(B, shift.shape[1], L // shift.shape[1], D)
            return (y * (1 + scale[:, :, None]) + shift[:, :, None]).reshape(B, L, D).to(x.dtype)
        return (y * (1 + scale) + shift).to(x.dtype)  # per token [B, L, D]

    return fn


def _op_shapes(ctx):
    """(label, B, L, D, frame_len, layout) with bf16 x and fp32 modulation."""
    if ctx.quick:
        return [("tiny", 2, 12, 64, 4, "frame")]  # the interpreter is slow: one layout keeps CI to seconds
    if ctx.lease:  # the ensemble / training shapes of both models, per-frame modulation (what the models use)
        return [("wan2.2-5b", 8, 1536, 3072, 256, "frame"), ("st-transformer", 20, 5120, 512, 1024, "frame")]
    wan = [("wan2.2-5b", B, 1536, 3072, 256, layout) for B in (1, 8) for layout in ("sample", "frame", "token")]
    st = [("st-transformer", 20, 5120, 512, 1024, layout) for layout in ("sample", "frame")]
    return wan + st


def _make_mod(B, L, D, frame_len, layout, device):
    """fp32 modulation [B, 6, D] / [B, F, 6, D] / [B, L, 6, D]."""
    rows = {"sample": (), "frame": (L // frame_len,), "token": (L,)}[layout]
    return torch.randn(B, *rows, 6, D, device=device) * 0.1


def _op_call(op, fn, res, x, views, frame_len):
    shift, scale, gate = views[:3]
    if op == "layernorm_modulate":
        return (fn(x, shift, scale, frame_len=frame_len),)
    if op == "gated_residual":
        return (fn(res, x, gate, frame_len=frame_len),)
    return tuple(fn(res, x, gate, shift, scale, frame_len=frame_len))


def _op_bytes(op, N, es, mod_bytes):
    """Ideal (fwd, bwd) bytes: N elements per [B, L, D] tensor of es bytes; mod_bytes per modulation view."""
    if op == "layernorm_modulate":  # fwd: x -> y; bwd: dy, x, scale -> dx, dshift, dscale
        return 2 * N * es + 2 * mod_bytes, 3 * N * es + 3 * mod_bytes
    if op == "gated_residual":  # fwd: res, x -> out; bwd: dout, x -> dx, dgate (d_res is d_out itself)
        return 3 * N * es + mod_bytes, 3 * N * es + 2 * mod_bytes
    # fwd: res, x -> y, out; bwd: dy, dout, res, x -> dres, dx, dgate, dshift, dscale
    return 4 * N * es + 3 * mod_bytes, 6 * N * es + 5 * mod_bytes


def compiled(fn):
    """torch.compile(fn, dynamic=False), with AOTAutograd's donated buffers off for its forward and its backward:
    the "bwd" rows run backward twice over one stored forward (retain_graph=True), which a backward compiled with
    donated buffers refuses (seen on an H200 with torch 2.11, on the second shape, whose backward compiled lazily
    outside a patch of the forward call alone). Donated buffers only let the backward reuse saved tensors' memory.
    dynamic=False: one specialised graph per shape, as a user compiling a fixed-shape model gets."""
    inner = torch.compile(fn, dynamic=False)

    def run(*args, **kwargs):
        with _no_donated_buffers():
            return inner(*args, **kwargs)

    return run


def _no_donated_buffers():
    import torch._functorch.config as functorch_config

    return functorch_config.patch(donated_buffer=False)


def _bench_modes(ctx, op_name, shape, provider, fwd, inputs, nbytes):
    """fwd, bwd (autograd.grad of one stored forward) and fwd+bwd rows."""
    fwd_bytes, bwd_bytes = nbytes
    with torch.no_grad():
        ctx.bench(op_name, shape, provider, "fwd", fwd, bytes=fwd_bytes, dtype=torch.bfloat16)
    outs = fwd()
    cots = [torch.randn_like(o) for o in outs]
    with _no_donated_buffers():  # a compiled backward may compile lazily, here
        ctx.bench(op_name, shape, provider, "bwd",
                  lambda: torch.autograd.grad(outs, inputs, cots, retain_graph=True),
                  bytes=bwd_bytes, dtype=torch.bfloat16)
    ctx.bench(op_name, shape, provider, "fwd+bwd", lambda: torch.autograd.grad(fwd(), inputs, cots),
              bytes=fwd_bytes + bwd_bytes, dtype=torch.bfloat16)


def bench_ops(ctx, backends):
    from wmfast.kernels import adaln as K

    from wmfast import ops

    liger = _liger_layernorm_modulate() if ctx.device.type == "cuda" else None
    if liger is None:
        ctx.log("adaln: liger provider skipped (" + ("liger_kernel is not importable: pip install liger-kernel"
                                                     if ctx.device.type == "cuda" else "needs a GPU") + ")")
    for label, B, L, D, fl, layout in _op_shapes(ctx):
        x = torch.randn(B, L, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        res = torch.randn(B, L, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        mod = _make_mod(B, L, D, fl, layout, ctx.device).requires_grad_()
        views = mod.unbind(-2)  # strided views of the fp32 modulation, as models chunk it
        mod_bytes = views[0].numel() * 4
        shape = f"{label} B={B} L={L} D={D} bf16 mod={layout}-fp32"
        for op in OPS:
            if ctx.lease and op not in CUDA_OPS:  # gated_residual has no CUDA kernel to choose against
                continue
            providers = {name: _with_backend(getattr(ops, op), be) for name, be in backends.items()
                         if be != "cuda" or op in CUDA_OPS}  # csrc/ has no gated_residual kernel
            providers["torch"] = getattr(K, op + "_ref")
            if liger is not None and op == "layernorm_modulate":
                providers["liger"] = liger
            if ctx.device.type == "cuda" and not ctx.quick and ctx.can_afford(20, f"{op} torch.compile"):
                providers["torch.compile"] = compiled(getattr(K, op + "_ref"))
            inputs = (x, mod) if op == "layernorm_modulate" else (res, x, mod)
            for name, fn in providers.items():
                call = (lambda fn=fn, op=op, a=(res, x, views, fl): _op_call(op, fn, *a))
                _bench_modes(ctx, op, shape, name, call, inputs, _op_bytes(op, B * L * D, 2, mod_bytes))


# --------------------------------------------------------------------------------- 2. the Wan block's AdaLN
def wan_block_adaln_diffusers(x, attn_out, ff_out, table, temb, eps=1e-6):
    """diffusers WanTransformerBlock.forward's AdaLN expressions (temb.ndim == 4: per-token timesteps).
    table: (1, 6, D) fp32; temb: (B, L, 6, D). Returns (norm1 output, x after gate 1, norm3 output, x out)."""
    D = x.shape[-1]
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (
        (table.unsqueeze(0) + temb.float()).chunk(6, dim=2))
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (
        t.squeeze(2) for t in (shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate))
    n1 = (F.layer_norm(x.float(), (D,), eps=eps) * (1 + scale_msa) + shift_msa).type_as(x)
    x1 = (x.float() + attn_out * gate_msa).type_as(x)
    n3 = (F.layer_norm(x1.float(), (D,), eps=eps) * (1 + c_scale) + c_shift).type_as(x)
    x2 = (x1.float() + ff_out.float() * c_gate).type_as(x)
    return n1, x1, n3, x2


def wan_block_adaln_wmfast(x, attn_out, ff_out, table, temb, frame_len=None, eps=1e-6):
    """The same with wmfast ops. temb: (B, F, 6, D) per-frame (with frame_len) or (B, L, 6, D) per-token; the
    table is added to the (small, per-frame) temb and the six chunks are read as views."""
    from wmfast import ops

    mod = table.unsqueeze(0) + temb.float() if temb.dim() == 4 else table + temb.float()
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mod.unbind(-2)
    n1 = ops.layernorm_modulate(x, shift_msa, scale_msa, eps=eps, frame_len=frame_len)
    x1 = ops.gated_residual(x, attn_out, gate_msa, frame_len=frame_len)
    n3 = ops.layernorm_modulate(x1, c_shift, c_scale, eps=eps, frame_len=frame_len)
    x2 = ops.gated_residual(x1, ff_out, c_gate, frame_len=frame_len)
    return n1, x1, n3, x2


def bench_wan_block(ctx, backends):
    shapes = [(2, 12, 64, 4)] if ctx.quick else [(B, 1536, 3072, 256) for B in ((8,) if ctx.lease else (1, 8))]
    for B, L, D, fl in shapes:
        dev, bf = ctx.device, torch.bfloat16
        x, attn_out, ff_out = (torch.randn(B, L, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
        table = (torch.randn(1, 6, D, device=dev) * 0.1).requires_grad_()
        temb_frames = (torch.randn(B, L // fl, 6, D, device=dev) * 0.1).requires_grad_()
        temb_tokens = temb_frames.detach().repeat_interleave(fl, dim=1).requires_grad_()  # what diffusers gets
        N = B * L * D
        # ideal: x, attn_out, ff_out read; n1, x1, n3, x2 written (x1 read again by norm3: fused away in the ideal)
        fwd_bytes = 7 * N * 2
        bwd_bytes = 11 * N * 2  # 4 output grads + x, attn_out, ff_out, x1 read; dx, d_attn, d_ff written (approx.)
        shape = f"wan2.2-5b-block B={B} L={L} D={D} bf16 timesteps=per-token"
        providers = {"diffusers": (wan_block_adaln_diffusers, temb_tokens, {})}
        if dev.type == "cuda" and not ctx.quick and ctx.can_afford(20, "wan_block_adaln diffusers-compiled"):
            providers["diffusers-compiled"] = (compiled(wan_block_adaln_diffusers), temb_tokens, {})
        if "wmfast-triton" in backends:
            fast = _with_backend(wan_block_adaln_wmfast, "triton")
            providers["wmfast-triton"] = (fast, temb_frames, {"frame_len": fl})
            providers["wmfast-triton-pertoken"] = (fast, temb_tokens, {})
        if "wmfast-cuda" in backends:  # the CUDA C++ kernels (csrc/adaln); gated_residual alone runs on Triton
            fast = _with_backend(wan_block_adaln_wmfast, "cuda")
            providers["wmfast-cuda"] = (fast, temb_frames, {"frame_len": fl})
            providers["wmfast-cuda-pertoken"] = (fast, temb_tokens, {})
        for name, (fn, temb, kw) in providers.items():
            inputs = (x, attn_out, ff_out, table, temb)
            _bench_modes(ctx, "wan_block_adaln", shape, name, lambda fn=fn, a=inputs, kw=kw: fn(*a, **kw),
                         inputs, (fwd_bytes, bwd_bytes))


def sweep_tiles(ctx):
    """Tile size (elements per program) x warps of the fused op's forward and backward kernels, on the Wan
    per-frame and ST-Transformer shapes (the defaults, 4096 elements and up to 8 warps, were chosen without a
    GPU: this sweep is how to set them from measurements)."""
    for label, B, L, D, fl in (("wan2.2-5b", 8, 1536, 3072, 256), ("st-transformer", 20, 5120, 512, 1024)):
        with direct_triton_launches():  # the launchers as the ops call them: no higher-order-op dispatch
            _sweep_shape(ctx, label, B, L, D, fl)


# tile (elements per program) x warps; the lease profile keeps the 3 x 3 around the hand-set default (4096, 8)
SWEEP_TILES, SWEEP_WARPS = (1024, 2048, 4096, 8192, 16384), (2, 4, 8, 16)
LEASE_TILES, LEASE_WARPS = (2048, 4096, 8192), (4, 8, 16)


def _sweep_shape(ctx, label, B, L, D, fl):
    from wmfast.kernels.adaln import _adaln_bwd, _adaln_fwd

    x, res, dy, dout = (torch.randn(B, L, D, device=ctx.device, dtype=torch.bfloat16) for _ in range(4))
    shift, scale, gate = _make_mod(B, L, D, fl, "frame", ctx.device).unbind(-2)[:3]
    fwd_bytes, bwd_bytes = _op_bytes("gated_residual_layernorm_modulate", B * L * D, 2, shift.numel() * 4)
    shape = f"{label} B={B} L={L} D={D} bf16 mod=frame-fp32"
    for tile in LEASE_TILES if ctx.lease else SWEEP_TILES:
        for warps in LEASE_WARPS if ctx.lease else SWEEP_WARPS:
            name = f"wmfast-triton-tile{tile}-w{warps}"
            try:
                ctx.bench("gated_residual_layernorm_modulate_sweep", shape, name, "fwd",
                          lambda t=tile, w=warps: _adaln_fwd(x, res, gate, shift, scale, 1e-6, fl, True, True,
                                                             tile=t, num_warps=w),
                          bytes=fwd_bytes, dtype=torch.bfloat16, memory=False)
                ctx.bench("gated_residual_layernorm_modulate_sweep", shape, name, "bwd",
                          lambda t=tile, w=warps: _adaln_bwd(dy, dout, x, res, gate, shift, scale, 1e-6, fl, True,
                                                             True, tile=t, num_warps=w),
                          bytes=bwd_bytes, dtype=torch.bfloat16, memory=False)
            except Exception as e:  # noqa: BLE001 - a config out of registers/shared memory: record, go on
                ctx.log(f"{name}: failed ({type(e).__name__}: {str(e)[:120]})")


def run(ctx):
    """The ops, the launch-configuration sweep (before the Wan block under the lease profile: its rows set the
    kernels' per-GPU table, wmfast.kernels.tuning), then the Wan block's AdaLN expressions."""
    backends = _backends(ctx)
    bench_ops(ctx, backends)
    sweep = ctx.device.type == "cuda" and not ctx.quick and "wmfast-triton" in backends
    if sweep and ctx.lease:
        sweep_tiles(ctx)
    bench_wan_block(ctx, backends)
    if sweep and not ctx.lease:
        sweep_tiles(ctx)


def main(argv=None) -> int:
    return script_main(run, argv, name="adaln")


if __name__ == "__main__":
    raise SystemExit(main())
