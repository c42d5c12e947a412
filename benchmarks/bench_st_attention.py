"""ST-Transformer attention: the temporal kernel, the cached decode step, and training with it.

    python benchmarks/bench_st_attention.py [--quick] [--out DIR] [--device cuda|cpu]

Sections (rows in bench_st_attention.csv, shared harness wmfast.bench):
1. temporal_attention fwd / bwd / fwd+bwd on the model layout [B, T, S, H, Dh] (q, k, v are views of one
   fused qkv projection [B, T, S, 3, H, Dh]): the Triton kernel reading them in place, vs the 1xgpt way
   (transpose to [B*S, H, T, Dh] copies, SDPA, transpose back; copies included in the time), the same
   compiled, and flash-attn on [B*S, T, H, Dh] copies when importable. Ideal bytes: q, k, v read + o written
   (fwd); q, k, v, do read + dq, dk, dv written (bwd). Block-size sweep of the kernel on GPU.
1b. spatial_attention fwd / bwd / fwd+bwd on each kernel it chooses among (SDPA's cuDNN, flash and
   memory-efficient kernels pinned with sdpa_kernel, flash-attn when importable, and SDPA's own pick) at the
   model's shape [B*T = 40, H = 8, S = 1024, Dh = 64] bf16: the ranking the lease's table records.
2. the decode step (one new frame at cache position t): fused Triton (write + attend, one launch) vs
   `flash_attn_with_kvcache` (cache [B*S, T_max, H, Dh]) vs cache write + SDPA vs the torch reference.
3. with wmfast.models: forward+backward of the 1x-compression preset (136M) with wmfast attention vs plain
   torch attention (SDPA on transposed copies), eager and compiled: tokens/s and MFU, where
   MFU = flops_per_sample(config) * samples/s / the datasheet dense bf16 peak (wmfast.train.runlog.mfu, the
   same MFU as the training log and bench_train; unknown device or CPU: n/a, or set WMFAST_PEAK_TFLOPS); the
   fraction of the bf16 matmul ceiling measured in this run is logged beside it and is the CSV row's
   fraction_of_ceiling; flops_per_sample (wmfast.models.st_transformer) = 3 x forward, forward = per layer and token
   2 * (2 * 4 D^2 + 2 * r D^2) (qkv + out projections of both attentions, MLP of ratio r) + 4 S D + 4 T D
   (spatial and temporal QK^T, PV), plus the tied output head 2 D V on the future frames.
Greedy generation with and without the temporal cache is benchmarks/bench_st_generate.py (suite "generate").

--quick: tiny shapes on the CPU in a few seconds (the Triton kernels run under TRITON_INTERPRET=1, which this
script sets when there is no GPU and nothing imported triton yet). No GPU numbers are claimed anywhere in the
repository unless measured: results/ holds only what ran.
"""
from __future__ import annotations

import contextlib

import torch

from wmfast.bench.context import interpret_triton_without_gpu, script_main

interpret_triton_without_gpu()  # before anything imports triton

import torch.nn.functional as F

from wmfast.bench.timing import direct_triton_launches
from wmfast.bench.workloads import compression_batch

SUITE = "ops"


# ---------------------------------------------------------------------------------------------- providers
def temporal_sdpa_transposed(q, k, v, *, causal=True):
    """The 1xgpt way: [B, T, S, H, Dh] -> [B*S, H, T, Dh] copies, SDPA, and back to [B, T, S, H, Dh]."""
    B, T, S, H, Dh = q.shape
    q2, k2, v2 = (x.permute(0, 2, 3, 1, 4).reshape(B * S, H, T, Dh) for x in (q, k, v))  # copies
    o = F.scaled_dot_product_attention(q2, k2, v2, is_causal=causal)
    return o.reshape(B, S, H, T, Dh).permute(0, 3, 1, 2, 4).contiguous()


def _flash_attn():
    try:
        import flash_attn
    except Exception:  # noqa: BLE001 - absent or built for another torch
        return None
    return flash_attn


def temporal_flash_transposed(q, k, v, *, causal=True):
    """flash-attn on [B*S, T, H, Dh] copies (its layout), output back to [B, T, S, H, Dh]."""
    B, T, S, H, Dh = q.shape
    q2, k2, v2 = (x.transpose(1, 2).reshape(B * S, T, H, Dh) for x in (q, k, v))
    o = _flash_attn().flash_attn_func(q2, k2, v2, causal=causal)
    return o.reshape(B, S, T, H, Dh).transpose(1, 2).contiguous()


def _triton_usable(ctx) -> bool:
    from wmfast.kernels import temporal_attention as ta

    if ctx.device.type == "cuda" or type(ta._temporal_attention_fwd_kernel).__name__ == "InterpretedFunction":
        return True
    ctx.log("triton: skipped (CPU tensors and the kernels were not built for the interpreter: set "
            "TRITON_INTERPRET=1 before importing wmfast)")
    return False


# ------------------------------------------------------------------------------------ 1. temporal attention
def _temporal_shapes(ctx):
    """(B, T, S, H, Dh, dtype): 1x-compression (T = 5 input grids of 32x32, 8 heads of 64) and T = 16."""
    if ctx.quick:
        return [(1, 5, 16, 2, 16, torch.float32)]
    if ctx.lease:
        return [(8, 5, 1024, 8, 64, torch.bfloat16)]
    return [(8, 5, 1024, 8, 64, torch.bfloat16), (32, 5, 1024, 8, 64, torch.bfloat16),
            (8, 16, 1024, 8, 64, torch.bfloat16), (8, 5, 1024, 4, 128, torch.bfloat16)]


def _bench_modes(ctx, op, shape, provider, fn, qkv, nbytes, dtype):
    """fwd, bwd (backward of a stored forward) and fwd+bwd rows for fn(q, k, v)."""
    do = torch.randn(qkv.shape[:3] + qkv.shape[4:], device=qkv.device, dtype=qkv.dtype)

    def fwd():
        return fn(*qkv.unbind(3))

    with torch.no_grad():
        ctx.bench(op, shape, provider, "fwd", fwd, bytes=4 * nbytes, dtype=dtype)
    out = fwd()
    ctx.bench(op, shape, provider, "bwd", lambda: out.backward(do, retain_graph=True), bytes=7 * nbytes,
              dtype=dtype, grad_to_none=[qkv])
    ctx.bench(op, shape, provider, "full", lambda: fwd().backward(do), bytes=11 * nbytes, dtype=dtype,
              grad_to_none=[qkv])


def bench_temporal(ctx):
    from wmfast.kernels.temporal_attention import temporal_attention_op

    providers = {"sdpa-transposed": temporal_sdpa_transposed}
    if _triton_usable(ctx):
        providers = {"triton": lambda q, k, v: temporal_attention_op(q, k, v, True), **providers}
    if ctx.device.type == "cuda" and not ctx.quick and ctx.can_afford(20, "sdpa-transposed-compiled"):
        providers["sdpa-transposed-compiled"] = torch.compile(temporal_sdpa_transposed)
    if _flash_attn() is not None and ctx.device.type == "cuda":
        providers["flash-attn-transposed"] = temporal_flash_transposed
    else:
        ctx.log("flash-attn-transposed: skipped (flash_attn not importable or no GPU)")
    for B, T, S, H, Dh, dtype in _temporal_shapes(ctx):
        qkv = torch.randn(B, T, S, 3, H, Dh, device=ctx.device, dtype=dtype, requires_grad=True)
        nbytes = B * T * S * H * Dh * qkv.element_size()  # one of q, k, v, o
        shape = f"B={B} T={T} S={S} H={H} Dh={Dh} {str(dtype).removeprefix('torch.')} causal"
        for name, fn in providers.items():
            _bench_modes(ctx, "temporal_attention", shape, name, fn, qkv, nbytes, dtype)
        if ctx.device.type == "cuda" and not ctx.quick and "triton" in providers:
            sweep_block_rows(ctx, qkv, shape, nbytes, dtype)


def sweep_block_rows(ctx, qkv, shape, nbytes, dtype):
    """Rows per program x warps of the Triton kernel (rows "temporal_attention_sweep": wmfast.kernels.tuning adopts the
    fastest where it beats the hand-set default), launched as the op launches them."""
    q, k, v = (x.detach() for x in qkv.unbind(3))
    do = torch.randn_like(q)
    with direct_triton_launches():
        _sweep_block_rows(ctx, q, k, v, do, shape, nbytes, dtype)


def _sweep_block_rows(ctx, q, k, v, do, shape, nbytes, dtype):
    from wmfast.kernels.temporal_attention import _temporal_attention_bwd, _temporal_attention_fwd

    for br in (2, 4, 8, 16) if ctx.lease else (1, 2, 4, 8, 16, 32):
        for warps in (2, 4, 8):
            try:
                ctx.bench("temporal_attention_sweep", shape, f"triton-br{br}-w{warps}", "fwd",
                          lambda br=br, w=warps: _temporal_attention_fwd(q, k, v, True, block_r=br, num_warps=w),
                          bytes=4 * nbytes, dtype=dtype, memory=False)
                ctx.bench("temporal_attention_sweep", shape, f"triton-br{br}-w{warps}", "bwd",
                          lambda br=br, w=warps: _temporal_attention_bwd(do, q, k, v, True, block_r=br, num_warps=w),
                          bytes=7 * nbytes, dtype=dtype, memory=False)
            except Exception as e:  # noqa: BLE001 - a config out of registers/shared memory: record and go on
                ctx.log(f"triton-br{br}-w{warps}: failed ({type(e).__name__}: {str(e)[:120]})")


# ------------------------------------------------------------------------------------ 1b. spatial attention
def bench_spatial(ctx):
    """Spatial attention fwd / bwd / full on each of its kernels (wmfast.ops.attention.SPATIAL_BACKENDS) at the
    model's shape: B*T = 8*5 frames of S = 1024 tokens, 8 heads of 64, bf16, q, k, v views of one fused qkv.
    The rows (op "spatial_attention", provider = backend) rank the kernels; wmfast.bench.adopt writes the
    fastest into the lease's launch_configs.json, which spatial_attention then uses instead of timing at first
    use. FLOPs: forward 4 * B*T * H * S^2 * Dh (QK^T and PV), backward 2.5x (5 matmuls, as flash attention)."""
    from wmfast.ops.attention import SPATIAL_BACKENDS, spatial_attention

    B, T, S, H, Dh, dtype = (1, 2, 16, 2, 16, torch.float32) if ctx.quick else (8, 5, 1024, 8, 64, torch.bfloat16)
    qkv = torch.randn(B, T, S, 3, H, Dh, device=ctx.device, dtype=dtype, requires_grad=True)
    nbytes = B * T * S * H * Dh * qkv.element_size()
    flops = 4 * B * T * H * S * S * Dh
    shape = f"B={B} T={T} S={S} H={H} Dh={Dh} {str(dtype).removeprefix('torch.')}"
    do = torch.randn(B, T, S, H, Dh, device=ctx.device, dtype=dtype)
    for name in SPATIAL_BACKENDS:
        def fwd(name=name):
            return spatial_attention(*qkv.unbind(3), backend=name)

        try:
            with torch.no_grad():
                fwd()  # a kernel that cannot run this shape raises here, before any row is written
        except (RuntimeError, ValueError) as e:
            ctx.log(f"spatial_attention {name}: skipped ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})")
            continue
        with torch.no_grad():
            ctx.bench("spatial_attention", shape, name, "fwd", fwd, bytes=4 * nbytes, flops=flops, dtype=dtype)
        out = fwd()
        ctx.bench("spatial_attention", shape, name, "bwd", lambda out=out: out.backward(do, retain_graph=True),
                  bytes=7 * nbytes, flops=2.5 * flops, dtype=dtype, grad_to_none=[qkv])
        ctx.bench("spatial_attention", shape, name, "full", lambda fwd=fwd: fwd().backward(do), bytes=11 * nbytes,
                  flops=3.5 * flops, dtype=dtype, grad_to_none=[qkv])
        del out


# ------------------------------------------------------------------------------------------ 2. decode step
def _decode_providers(ctx):
    from wmfast.kernels.temporal_attention import temporal_decode_op, temporal_decode_ref

    def sdpa(q, k, v, kc, vc, t):
        B, _, S, H, Dh = q.shape
        kc[:, :, :, t] = k[:, 0]
        vc[:, :, :, t] = v[:, 0]
        kk, vv = (c.view(B * S, H, c.shape[3], Dh)[:, :, : t + 1] for c in (kc, vc))  # views of the cache
        o = F.scaled_dot_product_attention(q.reshape(B * S, H, 1, Dh), kk, vv)
        return o.view(B, 1, S, H, Dh)

    providers = {"sdpa+cache-write": sdpa, "torch-ref": temporal_decode_ref}
    if _triton_usable(ctx):
        providers = {"triton-fused": temporal_decode_op, **providers}
    from wmfast.ops.dispatch import cuda_ext_available

    cuda_ok, cuda_why = cuda_ext_available()
    if cuda_ok and ctx.device.type == "cuda":  # the CUDA C++ kernel (csrc/temporal_attention), wmfast._C
        from wmfast.ops.cuda_ext import temporal_decode_step as cuda_decode_step

        providers = {"cuda-fused": cuda_decode_step, **providers}
    else:
        ctx.log(f"cuda-fused: skipped ({cuda_why})")
    fa = _flash_attn()
    if fa is not None and ctx.device.type == "cuda":
        providers["flash_attn_with_kvcache"] = "flash"  # needs its own cache layout: built per shape
    else:
        ctx.log("flash_attn_with_kvcache: skipped (flash_attn not importable or no GPU)")
    return providers


def bench_decode(ctx):
    shapes = [(1, 6, 16, 2, 32, torch.float32)] if ctx.quick else [
        (b, 6, 1024, 8, 64, torch.bfloat16) for b in ((1, 16) if ctx.lease else (1, 8, 64))]
    providers = _decode_providers(ctx)
    for B, T_max, S, H, Dh, dtype in shapes:
        t = T_max - 1  # the last frame: the most cache to read
        q, k, v = torch.randn(3, B, 1, S, H, Dh, device=ctx.device, dtype=dtype).unbind(0)
        row = B * S * H * Dh * q.element_size()
        nbytes = row * (3 + 2 + 2 * t + 1)  # read q, k, v; write k, v; read t old positions of k, v; write o
        shape = f"B={B} S={S} H={H} Dh={Dh} T_max={T_max} t={t} {str(dtype).removeprefix('torch.')}"
        for name, fn in providers.items():
            if fn == "flash":
                fn = _flash_decode(B, T_max, S, H, Dh, dtype, ctx.device, t)
                kc = vc = None
            else:
                kc, vc = torch.randn(2, B, S, H, T_max, Dh, device=ctx.device, dtype=dtype).unbind(0)
            with torch.inference_mode():
                ctx.bench("temporal_decode_step", shape, name, "fwd",
                          lambda fn=fn, a=(q, k, v, kc, vc, t): fn(*a), bytes=nbytes, dtype=dtype)
        if ctx.device.type == "cuda" and not ctx.quick and "triton-fused" in providers:
            sweep_decode(ctx, q, k, v, T_max, t, shape, nbytes, dtype)


def sweep_decode(ctx, q, k, v, T_max, t, shape, nbytes, dtype):
    """Rows per program x warps of the Triton decode kernel (rows "temporal_decode_sweep": wmfast.kernels.tuning picks
    the per-GPU launch configuration from them)."""
    from wmfast.kernels.temporal_attention import _temporal_decode

    B, _, S, H, Dh = q.shape
    kc, vc = torch.randn(2, B, S, H, T_max, Dh, device=q.device, dtype=dtype).unbind(0)
    for br in (1, 2, 4, 8, 16):
        for warps in (1, 2, 4):
            name = f"triton-br{br}-w{warps}"
            try:
                with torch.inference_mode(), direct_triton_launches():
                    ctx.bench("temporal_decode_sweep", shape, name, "fwd",
                              lambda br=br, w=warps: _temporal_decode(q, k, v, kc, vc, t, block_r=br, num_warps=w),
                              bytes=nbytes, dtype=dtype, memory=False)
            except Exception as e:  # noqa: BLE001 - a config out of registers/shared memory: record and go on
                ctx.log(f"{name}: failed ({type(e).__name__}: {str(e)[:120]})")


def _flash_decode(B, T_max, S, H, Dh, dtype, device, t):
    """flash_attn_with_kvcache on caches [B*S, T_max, H, Dh] (its layout), appending the new k, v at t."""
    fa = _flash_attn()
    kc, vc = torch.randn(2, B * S, T_max, H, Dh, device=device, dtype=dtype).unbind(0)
    seqlens = torch.full((B * S,), t, dtype=torch.int32, device=device)

    def step(q, k, v, _kc, _vc, _t):
        o = fa.flash_attn_with_kvcache(q.reshape(B * S, 1, H, Dh), kc, vc, k.reshape(B * S, 1, H, Dh),
                                       v.reshape(B * S, 1, H, Dh), cache_seqlens=seqlens)
        return o.view(B, 1, S, H, Dh)

    return step


# ------------------------------------------------------------------------------ 3. the model (wmfast.models)
@contextlib.contextmanager
def plain_torch_attention():
    """The model's temporal attention replaced by SDPA on transposed copies (what 1xgpt does)."""
    import wmfast.ops

    saved = wmfast.ops.temporal_attention
    wmfast.ops.temporal_attention = temporal_sdpa_transposed
    try:
        yield
    finally:
        wmfast.ops.temporal_attention = saved


def bench_model(ctx):
    try:
        from wmfast.models import STTransformer, STTransformerConfig, compression_loss, flops_per_sample
    except ImportError as e:
        ctx.log(f"model sections: skipped (wmfast.models not importable: {e})")
        return
    # quick: the tiny preset cut to 1 layer of 4x4 grids, so that the interpreted kernels take ~0.1 s a step
    c = (STTransformerConfig.from_name("tiny", num_layers=1, grid_size=4) if ctx.quick
         else STTransformerConfig.from_name("1x-compression", dropout=0.0))
    dtype = torch.float32 if ctx.quick else torch.bfloat16
    model = STTransformer(c).to(ctx.device, dtype)
    bench_train(ctx, model, c, dtype, compression_loss, flops_per_sample)


def bench_train(ctx, model, c, dtype, compression_loss, flops_per_sample):
    """Forward+backward of the training loss: tokens/s, MFU (datasheet peak) and the fraction of the measured
    bf16 matmul ceiling."""
    from wmfast.train.runlog import mfu

    model.train()
    B = 2 if ctx.quick else 8
    batch = compression_batch(c, B, ctx.device, dtype)
    flops = flops_per_sample(c, training=True) * B
    peak = ctx.ceilings.tflops_for(dtype)
    input_tokens = B * c.num_frames * c.seq_len
    variants = [("wmfast", contextlib.nullcontext), ("plain-torch-attn", plain_torch_attention)]
    for name, patch in variants:
        for compiled in ((False,) if ctx.quick else (False, True)):
            fn = torch.compile(model) if compiled else model
            provider = f"{name}{'-compiled' if compiled else ''}"

            def step(fn=fn):
                loss, _ = compression_loss(fn, batch)
                loss.backward()

            with patch():
                m = ctx.bench("st_transformer_train", f"B={B} {c.num_layers}x{c.d_model} {str(dtype)[6:]}",
                              provider, "full", step, flops=flops, dtype=dtype, memory=False,
                              grad_to_none=list(model.parameters()))
            sec = m.median_ms * 1e-3
            util = mfu(flops / sec, ctx.device)
            frac = f"{flops / sec / 1e12 / peak:.3f}" if peak else "n/a"
            ctx.log(f"  {provider}: {input_tokens / sec:,.0f} tokens/s, MFU "
                    f"{'n/a' if util is None else f'{util:.3f}'} (datasheet bf16 peak), {frac} of the measured "
                    "matmul ceiling")


def run(ctx):
    bench_temporal(ctx)
    bench_spatial(ctx)
    bench_decode(ctx)
    if ctx.lease:  # the lease times the 136M training step once, in bench_train (suite "train")
        ctx.log("model section: skipped under the lease profile (bench_train.py times the training step)")
        return
    bench_model(ctx)


def main(argv=None) -> int:
    return script_main(run, argv, name="st_attention")


if __name__ == "__main__":
    raise SystemExit(main())
