"""One optimizer step (gradient accumulation, one host sync, NaN policy) and one validation pass."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from wmfast.tasks import Task

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import all_reduce, to_device
from .sampler import val_batches
from .schedule import lr_at, set_lr


class NonFiniteLoss(RuntimeError):
    """A non-finite loss under nan_policy="stop", or under "skip" once nan_skip_limit steps in a row were skipped
    (`limit_reached`): the run ends, keeping the last good checkpoint."""

    def __init__(self, message: str, limit_reached: bool = False):
        super().__init__(message)
        self.limit_reached = limit_reached


@contextlib.contextmanager
def _no_update(optimizer):
    """Make the client optimizer's step a no-op: ZeRO still clears the gradients and copies its (unchanged)
    fp32 master partitions back into the model, so weights and optimizer states stay as they were."""
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del optimizer.step


def _fault_nan(step: int) -> bool:
    return os.environ.get(ckpt.FAULT_ENV, "") == f"nan_at_step:{step}"


def train_step(engine, optimizer, task: Task, batches, cfg: TrainConfig, step: int, device, precision: str,
               skipped_in_a_row: int = 0):
    """One optimizer step over the accumulation micro-batches. Returns (mean loss, skipped, lr).
    `skipped_in_a_row`: the steps just before this one that nan_policy "skip" dropped; at cfg.nan_skip_limit a
    non-finite loss stops the run as under "stop" (NonFiniteLoss) rather than dropping one more step.

    The loss and a "non-finite" count are all-reduced per micro-batch but stay on the device, summed over the
    step: the host reads them once, just before the optimizer update (a .cpu() per micro-batch would stall the
    GPU pipeline gradient_accumulation times per step). A non-finite loss therefore stops the run (or skips the
    step) at the accumulation boundary, after the backward passes and before any weight or moment changes."""
    lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "autocast-bf16"
                else contextlib.nullcontext())
    float_dtype = torch.bfloat16 if precision == "bf16" else None
    world = dist.get_world_size() if dist.is_initialized() else 1
    acc, mean_loss, skipped = None, float("nan"), False
    for i, batch in enumerate(batches):
        batch = to_device(batch, device, float_dtype)
        with autocast:
            loss = task.loss(engine, batch)
        if _fault_nan(step):
            loss = loss * float("nan")
        # one collective per micro-batch gives every rank the summed loss and whether any rank saw a non-finite
        # one, so all ranks take the same branch (ZeRO's backward hooks are collective)
        stats = all_reduce(torch.stack([loss.detach().float().nan_to_num(0.0, 0.0, 0.0),
                                         (~torch.isfinite(loss.detach())).float()]))
        acc = stats if acc is None else acc + stats
        # backward always runs (ZeRO's gradient hooks and buckets expect every micro-batch); a bad step's NaN
        # gradients are discarded at the boundary without touching weights or AdamW moments
        engine.backward(loss)
        set_lr(optimizer, lr)
        if i == len(batches) - 1 or engine.is_gradient_accumulation_boundary():
            loss_sum, n_bad = acc.cpu().tolist()  # the step's one host sync
            if n_bad > 0:
                what = (f"non-finite loss at step {step} ({int(n_bad)} of {len(batches) * world} micro-batch "
                        "losses over the ranks)")
                if cfg.nan_policy == "stop":
                    raise NonFiniteLoss(what)
                if skipped_in_a_row >= cfg.nan_skip_limit:
                    raise NonFiniteLoss(f"{what} after {skipped_in_a_row} skipped steps in a row: the limit "
                                        f"nan_skip_limit={cfg.nan_skip_limit} is reached", limit_reached=True)
                skipped = True
            else:
                mean_loss = loss_sum / (world * len(batches))
        if skipped and engine.is_gradient_accumulation_boundary():
            with _no_update(optimizer):
                engine.step()
        else:
            engine.step()
    return mean_loss, skipped, lr


# ---- validation --------------------------------------------------------------------------------------------
def val_precision(precision: str) -> str:
    """What validation computes in: fp32, as the recipe infers ("degraded in bf16"), even when training uses
    bf16 autocast; a run whose weights themselves are bf16 (precision "bf16") can only validate in bf16."""
    return "bf16" if precision == "bf16" else "fp32"


@torch.no_grad()
def validate(engine, task: Task, cfg: TrainConfig, micro_batch: int, rank: int, world: int, device,
             precision: str) -> dict[str, float]:
    dataset = task.val_dataset()
    if dataset is None:
        return {}
    index_lists = val_batches(len(dataset), micro_batch, rank, world, cfg.val_batches)
    if not index_lists:
        return {}
    engine.eval()
    sums: dict[str, float] = {}
    float_dtype = torch.bfloat16 if val_precision(precision) == "bf16" else None
    for idx in index_lists:
        batch = to_device(task.collate([dataset[i] for i in idx]), device, float_dtype)
        with torch.autocast(device.type, enabled=False):  # fp32 weights stay fp32: no bf16 autocast here
            metrics = task.evaluate(engine, batch)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    engine.train()
    keys = sorted(sums)
    t = all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device))
    count = len(index_lists) * world
    return {f"val_{k}": float(v) / count for k, v in zip(keys, t.tolist())}
