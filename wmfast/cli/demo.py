"""The quick start: runs the main job end to end on an embedded synthetic default (no download, no GPU
needed; about 40 s on 2 CPU cores):

  1. kernels   the fused ops (AdaLN-Zero fwd+bwd, temporal attention, cached decode step, ensemble sampler
               step) against their fp32 references; without a GPU they run through Triton's interpreter
  2. data      a synthetic tokenized dataset in the real 1X v2.0 format
  3. train     the tiny ST-Transformer with DeepSpeed (single process), checkpointed
  4. generate  greedy 3-frame generation from the trained checkpoint, with the temporal KV cache and without
  5. raw       a synthetic raw (mp4) dataset in the real 1X format (train split nested, val flat, as published)
  6. lora      LoRA + state AdaLN-Zero post-training of the tiny Wan2.2-architecture world model on it, writing
               the adapter (loadable by stock diffusers and peft) at every checkpoint and at the end
  7. sample    that trained adapter: a batched ensemble sample of the val split, PSNR, a strip PNG
  8. plot      loss and throughput curves of the training run

A second run in the same --out resumes the training runs (finished ones have nothing left to do) instead of
failing on their checkpoints; each stage says which.

Each stage prints what it ran; every output lands under --out.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from wmfast.cli._args import positive_int

STAGES = ("kernels", "data", "train", "generate", "raw", "lora", "sample", "plot")


def add_arguments(p):
    p.add_argument("--out", default="wmfast_demo", help="directory for every output of the demo")
    p.add_argument("--only", choices=STAGES, action="append", help="run only these stages (repeatable)")
    p.add_argument("--train-steps", type=positive_int, default=60, help="optimizer steps of the tiny training run")
    p.add_argument("--lora-steps", type=positive_int, default=30,
                   help="optimizer steps of the tiny LoRA post-training run")


def _kernels_check() -> None:
    """Every fused op against its fp32 reference, on the backend dispatch picks (printed)."""
    import torch

    from wmfast import ops
    from wmfast.kernels.adaln import gated_residual_layernorm_modulate_ref
    from wmfast.kernels.ensemble_sampler import ensemble_euler_step_ref
    from wmfast.kernels.temporal_attention import temporal_attention_ref, temporal_decode_ref
    from wmfast.ops.dispatch import select_backend

    torch.manual_seed(0)
    print(f"backend on cpu tensors: {select_backend('demo', torch.device('cpu'))}")
    B, F, n, D = 2, 3, 5, 61  # odd sizes on purpose: 15 tokens, D not a power of two
    res, x = torch.randn(B, F * n, D), torch.randn(B, F * n, D)
    mod = (torch.randn(B, F, 6, D) * 0.1).requires_grad_()  # per-frame modulation, read as strided views
    shift, scale, gate = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
    y, out = ops.gated_residual_layernorm_modulate(res, x, gate, shift, scale, frame_len=n)
    (y.square().sum() + out.sum()).backward()
    g_fused, mod.grad = mod.grad.clone(), None
    y_r, out_r = gated_residual_layernorm_modulate_ref(res, x, gate, shift, scale, frame_len=n)
    (y_r.square().sum() + out_r.sum()).backward()
    print(f"gated_residual_layernorm_modulate (per-frame, strided): |y - ref| {(y - y_r).abs().max():.1e}, "
          f"|d(mod) - ref| {(g_fused - mod.grad).abs().max():.1e}")

    q, k, v = torch.randn(3, 2, 5, 7, 2, 16).unbind(0)  # [B, T, S, H, Dh] views of one packed tensor
    o = ops.temporal_attention(q, k, v, causal=True)
    print(f"temporal_attention (T=5, S=7, strided q/k/v): |o - ref| "
          f"{(o - temporal_attention_ref(q, k, v)).abs().max():.1e}")
    kc, vc = torch.zeros(2, 7, 2, 8, 16), torch.zeros(2, 7, 2, 8, 16)
    kc_r, vc_r = kc.clone(), vc.clone()
    for t in range(5):  # decode frame by frame with the cache; t is a Python int: no host sync
        o_t = ops.temporal_decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], kc, vc, t)
        r_t = temporal_decode_ref(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], kc_r, vc_r, t)
    print(f"temporal_decode_step (5 cached steps): |o - ref| {(o_t - r_t).abs().max():.1e}, "
          f"last step vs full causal attention {(o_t - o[:, 4:5]).abs().max():.1e}")

    xs, vs, ctx = torch.randn(4, 3, 5, 4, 4), torch.randn(4, 3, 5, 4, 4), torch.randn(1, 3, 2, 4, 4)
    step = ops.ensemble_euler_step(xs, vs, -0.25, ctx)
    print(f"ensemble_euler_step (N=4, context re-imposed): |x' - ref| "
          f"{(step - ensemble_euler_step_ref(xs, vs, -0.25, ctx)).abs().max():.1e}")


def _stage_commands(args) -> dict[str, list[str]]:
    out = args.out
    run_dir, lora_dir = os.path.join(out, "run"), os.path.join(out, "lora_run")
    return {
        # the tiny preset: 8x8 token grids, vocabulary 512 (the real data: 32x32, 64,000)
        "data": ["data", "synth", "--out", os.path.join(out, "tokens"), "--shards", "2", "--frames", "1020",
                 "--grid-size", "8", "--vocab-size", "512"],
        "train": ["train", "--config", "tiny", "--data", os.path.join(out, "tokens"), "--steps",
                  str(args.train_steps), "--out", run_dir],
        "generate": ["generate", "--data", os.path.join(out, "tokens"), "--checkpoint", run_dir, "--preset", "tiny",
                     "--samples", "2", "--json", os.path.join(out, "generate.json")],
        "raw": ["data", "synth", "--raw", "--out", os.path.join(out, "raw"), "--shards", "1", "--frames", "154",
                "--size", "64"],
        "lora": ["train", "--config", "tiny-sampling", "--data", os.path.join(out, "raw"), "--steps",
                 str(args.lora_steps), "--out", lora_dir],
        "sample": ["sample", "--model", "tiny", "--lora", lora_dir, "--data", os.path.join(out, "raw"), "--ensemble",
                   "4", "--steps", "4", "--strip", "--out", os.path.join(out, "sample")],
        "plot": ["plot", run_dir],
    }


# stage -> (the earlier stage, the output of it the stage reads, under --out)
_NEEDS = {"train": ("data", "tokens"), "generate": ("train", "run/checkpoints"), "lora": ("raw", "raw"),
          "sample": ("lora", "lora_run/checkpoints"), "plot": ("train", "run/metrics.jsonl")}


def _check_inputs(args, stages: list[str]) -> None:
    """Each stage whose input an earlier stage writes finds it on disk, or is about to get it in this run."""
    for stage in stages:
        if stage not in _NEEDS:
            continue
        earlier, output = _NEEDS[stage]
        path = os.path.join(args.out, *output.split("/"))
        if earlier not in stages and not os.path.exists(path):
            raise ValueError(f"--only {stage}: needs {path}, which the {earlier} stage writes: run the whole demo "
                             f"once (`wmfast demo --out {args.out}`) or add --only {earlier}")


def _resuming(argv: list[str], command: str = "demo") -> list[str]:
    """A training stage whose run directory already holds a checkpoint (an earlier run of `command`) resumes it."""
    from wmfast.data.checkpoints import latest_checkpoint

    if argv[0] != "train":
        return argv
    run_dir = argv[argv.index("--out") + 1]
    found = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if found is None:
        print(f"{run_dir}: a fresh run")
        return argv
    print(f"{run_dir}: resuming the previous {command} run from its step {found[0]} (delete the directory to start "
          "over)")
    return [*argv, "--resume"]


class StageFailed(Exception):
    """A stage's command failed; it has printed why."""

    def __init__(self, code: int):
        self.code = code


def _run_cli(argv: list[str]) -> None:
    from wmfast.cli import main

    code = main(argv)
    if code:
        print(f"wmfast demo: the stage `wmfast {' '.join(argv)}` exited with {code}", file=sys.stderr)
        raise StageFailed(code)


def run(args) -> int:
    import torch

    from wmfast.cli._args import output_dir

    stages = [s for s in STAGES if s in (args.only or STAGES)]  # in pipeline order, once each
    _check_inputs(args, stages)
    os.makedirs(output_dir(args.out), exist_ok=True)
    commands = _stage_commands(args)
    t_all = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        t0 = time.perf_counter()
        print(f"\n=== [{i}/{len(stages)}] {stage} ===", flush=True)
        if stage == "kernels":
            if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() or "triton" in sys.modules:
                _kernels_check()
            else:  # the interpreter must be chosen before triton is imported: run this stage in a fresh process
                env = dict(os.environ, TRITON_INTERPRET="1")
                print("no GPU: running the Triton kernels on the CPU through Triton's interpreter")
                done = subprocess.run([sys.executable, "-c", "from wmfast.cli.demo import _kernels_check as k; k()"],
                                      check=False, env=env)
                if done.returncode:
                    print(f"wmfast demo: the kernels stage exited with {done.returncode}", file=sys.stderr)
                    return 1  # the kernel check failed: a bug, its traceback is above
        else:
            argv = _resuming(commands[stage])
            print("$ wmfast " + " ".join(argv), flush=True)
            try:
                _run_cli(argv)
            except StageFailed as e:
                return e.code
        print(f"--- {stage}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\nwmfast demo: done in {time.perf_counter() - t_all:.0f} s; outputs under {os.path.abspath(args.out)}")
    return 0
