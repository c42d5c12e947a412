"""The largest batch that fits a training step of the ST-Transformer (136M preset), full vs factorized
attention at T = 5: the end-to-end consequence of the memory-complexity table.

A trial is one real training step (bf16 autocast forward, backward, fused AdamW step, as wmfast train
does) at batch b; the search is wmfast.train.microbatch's (gallop then bisect, OOM caught and memory
freed), over 1..max_batch. On CUDA a trial fails on out-of-memory; `capacity_bytes` (used by the CPU test,
where nothing runs out of memory) fails a trial whose peak exceeds it, the peak then coming from the
CPU live-bytes estimate.
"""
from __future__ import annotations

import torch

from wmfast.bench.context import BenchContext, BudgetExhausted
from wmfast.bench.memory import LiveBytesTracker
from wmfast.bench.workloads import compression_batch

ROW_OP = "largest-batch"


def _model_and_optimizer(attention: str, preset: str, device: torch.device, overrides: dict):
    from wmfast.models import STTransformer, STTransformerConfig

    config = STTransformerConfig.from_name(preset, attention=attention, **overrides)
    model = STTransformer(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return model, opt


def _train_step(model, opt, batch: dict, device: torch.device) -> None:
    from wmfast.models import compression_loss

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = compression_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def largest_batch(attention: str, *, device, preset: str = "1x-compression", max_batch: int = 1024,
                  capacity_bytes: int | None = None, log=print, before_trial=lambda: None, **overrides):
    """(largest fitting batch, trials, model, optimizer) for STTransformer(preset, attention=attention,
    **overrides). `before_trial()` runs before each trial (a benchmark's budget check raises there)."""
    from wmfast.train import microbatch

    device = torch.device(device)
    model, opt = _model_and_optimizer(attention, preset, device, overrides)
    _train_step(model, opt, compression_batch(model.config, 1, device), device)  # AdamW state exists in every trial

    def body(b: int):
        before_trial()
        opt.zero_grad(set_to_none=True)  # an out-of-memory trial may have left gradients behind
        batch = compression_batch(model.config, b, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            _train_step(model, opt, batch, device)
            torch.cuda.synchronize(device)
            capacity = capacity_bytes or torch.cuda.get_device_properties(device).total_memory
            return torch.cuda.max_memory_allocated(device), capacity
        with LiveBytesTracker() as tracker:
            _train_step(model, opt, batch, device)
        return tracker.peak, capacity_bytes

    best, trials = microbatch.search(list(range(1, max_batch + 1)), lambda b: microbatch.run_trial(b, body, 0.0))
    log(f"largest batch ({preset}, {attention} attention, T={model.config.num_frames}, "
        f"S={model.config.seq_len}): {best} ({len(trials)} trials)")
    return best, trials, model, opt


def run(ctx: BenchContext, *, preset: str = "1x-compression", max_batch: int = 1024) -> dict[str, int]:
    """Both attentions: a row each (op "largest-batch", the step's time and peak memory at that batch)."""
    def check_budget():
        if ctx.time_left() <= 0:
            raise BudgetExhausted("the budget ran out during the largest-batch search")

    found = {}
    for attention in ("full", "factorized"):
        best, _, model, opt = largest_batch(attention, device=ctx.device, preset=preset, max_batch=max_batch,
                                            log=ctx.log, before_trial=check_budget)
        _write_step_row(ctx, model, opt, best, preset, attention)
        found[attention] = best
        del model, opt
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return found


def _write_step_row(ctx: BenchContext, model, opt, b: int, preset: str, attention: str) -> None:
    """Time the training step at the largest batch and write its row (peak memory included). The timing adds
    its own buffers (do_bench's 256 MB cache flush): at a batch that only just fitted it can run out of memory
    (seen on an H200: full attention fitted 41 in the search, and its timing did not); then the row is timed
    at the next smaller batches, down to 90% of the largest, and says which batch it timed."""
    c = model.config
    for timed in range(b, max(1, int(0.9 * b)) - 1, -1):
        batch = compression_batch(c, timed, ctx.device)
        try:
            m = ctx.measure(lambda batch=batch: _train_step(model, opt, batch, ctx.device))
        except torch.OutOfMemoryError:
            del batch
            opt.zero_grad(set_to_none=True)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            ctx.log(f"largest batch ({attention}): timing at B={timed} ran out of memory; trying B={timed - 1}")
            continue
        note = "" if timed == b else f" (timed at B={timed})"
        ctx.writer.add(ROW_OP, f"{preset} B={b}{note} T={c.num_frames} S={c.seq_len} bf16-autocast",
                       f"st-transformer-{attention}", "train-step", m)
        return
    ctx.log(f"largest batch ({attention}): B={b} fits a step, but no batch down to 90% of it could be timed")
