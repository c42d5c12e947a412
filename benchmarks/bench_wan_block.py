"""One real-size Wan2.2-TI2V-5B DiT block: diffusers' WanTransformerBlock vs wmfast's patched block.

    python benchmarks/bench_wan_block.py [--quick] [--out DIR] [--device cuda|cpu]

Shapes: D = 3072 (24 heads x 128), FFN 14336, 512 text tokens, L = 1536 tokens (6 latent frames x 256 =
16x16 patches of a 512x512 frame) at batch 1 and 8 (8 x 1536), bf16 weights and activations, per-token
timesteps (TI2V: the context frames at t = 0, the others at t), i.e. diffusers' (B, L, 6, D) fp32 path.

Providers (rows in bench_wan_block.csv, shared harness wmfast.bench):
- diffusers: the unpatched block, eager; temb = (B, L, 6, D) fp32 built from per-token timesteps (its input).
- diffusers-compiled: torch.compile of the same block.
- wmfast: FusedWanTransformerBlock, eager: per-frame temb (B, 6, 6, D) + frame_len, norm/modulate and gated
  residuals in wmfast.ops (Triton on a GPU). fwd uses the cached text K/V (sampling: computed once per
  model); fwd+bwd recomputes them inside the timed call (training: LoRA trains attn2.to_k/to_v).
- wmfast-kv-in-call (fwd): wmfast with the text K/V of the full batch computed inside the timed call, as
  diffusers does: diffusers vs wmfast-kv-in-call is the kernel gain, wmfast-kv-in-call vs wmfast the caching gain.
- wmfast-compiled: torch.compile of the patched block (the ops are torch.library triton_ops: no graph break).
Modes: fwd (no grad) and fwd+bwd (gradients of the block input and of every block parameter).
The norm/modulate/gate part alone (the issue's >= 5x target) is section 2 of benchmarks/bench_adaln.py.

--profile lease: batch 1 only; the compiled providers while at least 40 s of the budget is left.
--quick: a tiny block (D = 24, batch 1, eager only) on the CPU, for CI; the Triton kernels then run under
TRITON_INTERPRET=1, so CPU times say nothing about speed.
Only measured numbers are ever committed.
"""
from __future__ import annotations

import torch

from wmfast.bench.context import interpret_triton_without_gpu, script_main

interpret_triton_without_gpu()  # before anything imports triton

SUITE = "ops"
REAL = {"heads": 24, "head_dim": 128, "ffn": 14336, "text": 512, "frames": 6, "frame_len": 256, "batches": (1, 8)}
QUICK = {"heads": 2, "head_dim": 12, "ffn": 32, "text": 8, "frames": 3, "frame_len": 4, "batches": (1,)}


def _blocks(cfg, device, dtype):
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from wmfast.models.wan.blocks import patch_blocks

    D = cfg["heads"] * cfg["head_dim"]
    torch.manual_seed(0)
    base = WanTransformerBlock(D, cfg["ffn"], cfg["heads"], "rms_norm_across_heads", True, 1e-6).to(device, dtype)
    base.scale_shift_table.data = base.scale_shift_table.data.float()  # diffusers keeps it fp32
    fused = WanTransformerBlock(D, cfg["ffn"], cfg["heads"], "rms_norm_across_heads", True, 1e-6).to(device, dtype)
    fused.load_state_dict(base.state_dict())
    fused.scale_shift_table.data = fused.scale_shift_table.data.float()
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([fused])
    patch_blocks(holder)
    return base, fused


def _inputs(cfg, B, device, dtype):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    D = cfg["heads"] * cfg["head_dim"]
    F, S = cfg["frames"], cfg["frame_len"]
    side = int(S**0.5)
    L = F * S
    x = torch.randn(B, L, D, device=device, dtype=dtype)
    text = torch.randn(B, cfg["text"], D, device=device, dtype=dtype)
    t = torch.full((B, F), 700.0, device=device)
    t[:, :2] = 0  # two clean context latent frames
    temb_frame = torch.randn(B, F, 6, D, device=device, dtype=dtype) * 0.1 + t[..., None, None].to(dtype) * 1e-4
    temb_token = temb_frame.repeat_interleave(S, dim=1)  # diffusers: (B, L, 6, D), made fp32 in every block
    rope = WanRotaryPosEmbed(cfg["head_dim"], (1, 2, 2), 1024).to(device)
    rotary = rope(torch.empty(1, 1, F, 2 * side, 2 * side, device=device))
    return x, text, temb_frame, temb_token, rotary


def _fns(base, fused, x, text, temb_frame, temb_token, rotary, S, compiled):
    from wmfast.models.wan.blocks import text_kv

    b = torch.compile(base) if compiled else base
    f = torch.compile(fused) if compiled else fused
    with torch.no_grad():
        kv_cached = text_kv(fused.attn2, text[:1])

    def diff_fwd():
        with torch.no_grad():
            return b(x, text, temb_token, rotary)

    def ours_fwd():
        with torch.no_grad():
            return f(x, None, temb_frame, rotary, frame_len=S, kv=kv_cached)

    def ours_fwd_kv():  # K/V of the full-batch text inside the timed call, as diffusers: the kernel gain alone
        with torch.no_grad():
            return f(x, None, temb_frame, rotary, frame_len=S, kv=text_kv(fused.attn2, text))

    xg = x.detach().clone().requires_grad_(True)

    def diff_fwd_bwd():
        b(xg, text, temb_token, rotary).float().square().mean().backward()

    def ours_fwd_bwd():
        kv = text_kv(fused.attn2, text[:1])
        f(xg, None, temb_frame, rotary, frame_len=S, kv=kv).float().square().mean().backward()

    return diff_fwd, ours_fwd, ours_fwd_kv, diff_fwd_bwd, ours_fwd_bwd, [xg, *base.parameters(),
                                                                         *fused.parameters()]


def _flops(cfg, B):
    D, L, T = cfg["heads"] * cfg["head_dim"], cfg["frames"] * cfg["frame_len"], cfg["text"]
    lin = 2 * B * (L * 4 * D * D + L * 2 * D * D + T * 2 * D * D + L * 2 * D * cfg["ffn"])  # attn1, attn2 q/o, kv, FFN
    att = 4 * B * D * (L * L + L * T)
    return lin + att


def run(ctx):
    cfg = QUICK if ctx.quick else {**REAL, "batches": (1,)} if ctx.lease else REAL
    device = ctx.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, fused = _blocks(cfg, device, dtype)
    S = cfg["frame_len"]
    for B in cfg["batches"]:
        x, text, temb_frame, temb_token, rotary = _inputs(cfg, B, device, dtype)
        shape = (f"B={B} L={cfg['frames']}x{S} D={cfg['heads'] * cfg['head_dim']} "
                 f"{str(dtype).replace('torch.', '')} per-token-t")
        flops = _flops(cfg, B)
        for compiled in (False, True):
            if compiled and device.type != "cuda":  # CPU: interpreter-run kernels, compile time dominates
                ctx.log("wan_block: torch.compile rows need a GPU (skipped on the CPU)")
                continue
            if compiled and not ctx.can_afford(40, "wan_block compiled providers"):
                continue
            try:
                fns = _fns(base, fused, x, text, temb_frame, temb_token, rotary, S, compiled)
            except Exception as e:  # noqa: BLE001 - a provider that cannot run here is reported and skipped
                ctx.log(f"wan_block: compiled providers unavailable ({e})")
                continue
            diff_fwd, ours_fwd, ours_fwd_kv, diff_fb, ours_fb, grads = fns
            suffix = "-compiled" if compiled else ""
            ctx.bench("wan_block", shape, "diffusers" + suffix, "fwd", diff_fwd, flops=flops, dtype=dtype)
            ctx.bench("wan_block", shape, "wmfast" + suffix, "fwd", ours_fwd, flops=flops, dtype=dtype)
            ctx.bench("wan_block", shape, "wmfast-kv-in-call" + suffix, "fwd", ours_fwd_kv, flops=flops, dtype=dtype)
            ctx.bench("wan_block", shape, "diffusers" + suffix, "fwd+bwd", diff_fb, flops=3 * flops, dtype=dtype,
                      grad_to_none=grads)
            ctx.bench("wan_block", shape, "wmfast" + suffix, "fwd+bwd", ours_fb, flops=3 * flops, dtype=dtype,
                      grad_to_none=grads)
        del x, text, temb_frame, temb_token


def main(argv=None) -> int:
    return script_main(run, argv, name="wan_block")


if __name__ == "__main__":
    raise SystemExit(main())
