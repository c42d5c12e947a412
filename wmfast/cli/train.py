"""Train a model with DeepSpeed ZeRO (single process by default; torchrun / the deepspeed launcher for more).

    wmfast train --config 1x-compression --data DIR [--zero 1|2|3] [--micro-batch N|auto] [--steps N] [--resume]
    deepspeed --num_gpus 8 --module wmfast.train --config 1x-compression --data DIR
    torchrun --nproc_per_node 8 -m wmfast.train --config 1x-compression --data DIR
"""
from __future__ import annotations

import argparse

from wmfast.cli._args import blame, fields_as_flags, output_dir


def _micro_batch(value: str):
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a positive integer or 'auto'")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training preset (1x-compression, tiny, ...)")
    p.add_argument("--data", help="dataset directory (for the compression task: the tokenized 1X split root)")
    p.add_argument("--out", help="run directory (default runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--task", help="override the preset's task: a registered name or 'package.module:factory'")
    p.add_argument("--model", help="override the task's model preset; sampling task: a local Wan2.2-TI2V-5B diffusers "
                   "directory (1x-sampling needs one), 'tiny' or 'ti2v-5b'")
    p.add_argument("--random-weights", action="store_true", default=None,
                   help="allow a real-size model without pretrained weights (random init; 1x-sampling: ~20 GB)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--micro-batch", type=_micro_batch, help="per-rank micro-batch, or 'auto' (largest that fits)")
    p.add_argument("--global-batch", type=int, help="samples per optimizer step over all ranks")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--precision", choices=("auto", "autocast-bf16", "bf16", "fp32"))
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in the backward pass")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block on its own (regional compilation; the first step compiles)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (and always at the end)")
    p.add_argument("--keep", type=int, help="checkpoints to keep")
    p.add_argument("--val-every", type=int, help="validate every N steps (0: never)")
    p.add_argument("--log-every", type=int, help="log every N steps")
    p.add_argument("--nan", choices=("stop", "skip"), help="on a NaN/Inf loss: stop (default) or skip the step")
    p.add_argument("--nan-skip-limit", type=int, metavar="N",
                   help="with --nan skip: the most consecutive steps skipped; one more stops the run (default 3)")
    p.add_argument("--loss-reduction", choices=("mean", "sum"),
                   help="loss over the future grids: mean CE (default) or the per-grid CEs summed (3x)")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    p.add_argument("--deepspeed-config", help="JSON file merged over the generated DeepSpeed config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


_FIELDS = {"task": "task", "model": "model", "random_weights": "random_weights", "zero": "zero_stage",
           "micro_batch": "micro_batch", "global_batch": "global_batch", "steps": "steps", "lr": "lr",
           "warmup": "warmup_steps", "precision": "precision", "activation_checkpointing": "activation_checkpointing",
           "compile": "compile", "ckpt_every": "ckpt_every", "keep": "keep_checkpoints", "val_every": "val_every",
           "log_every": "log_every", "nan": "nan_policy", "nan_skip_limit": "nan_skip_limit",
           "loss_reduction": "loss_reduction", "seed": "seed", "num_workers": "num_workers"}


_UNKNOWN = {"unknown training preset": "--config", "unknown task": "--task", "unknown preset": "--model"}


def config_from_args(args):
    from wmfast.train import TrainConfig
    from wmfast.train.config import load_override

    overrides = {field: getattr(args, arg) for arg, field in _FIELDS.items() if getattr(args, arg) is not None}
    if args.deepspeed_config is not None:
        with blame("--deepspeed-config", args.deepspeed_config):
            overrides["deepspeed_override"] = load_override(args.deepspeed_config)
    return TrainConfig.from_name(args.config, **overrides)


def run(args) -> int:
    """The config's messages name its fields (`lr=-1.0 must be > 0`): they are shown naming the flags."""
    try:
        with fields_as_flags({field: "--" + arg.replace("_", "-") for arg, field in _FIELDS.items()}):
            return _run(args)
    except ValueError as e:
        flag = next((f for start, f in _UNKNOWN.items() if str(e).startswith(start)), None)
        if flag is None:
            raise
        raise ValueError(f"{flag}: {e}") from e


def _run(args) -> int:
    import os

    from wmfast.cli import EXIT_STOPPED
    from wmfast.train import train

    cfg = config_from_args(args)
    out = output_dir(args.out or os.path.join("runs", cfg.name))
    if args.data is not None and not os.path.isdir(args.data):
        raise ValueError(f"--data {args.data}: " + ("is a file, not a directory" if os.path.exists(args.data)
                                                    else "does not exist"))
    result = train(cfg, args.data, out, resume=args.resume)
    return 0 if result.status == "done" else EXIT_STOPPED
