"""`--micro-batch auto`: the largest micro-batch that fits, found with real forward+backward+step trials.

Candidates are the divisors of the per-rank batch (so the global batch stays exact through gradient
accumulation), capped by `auto_max_micro_batch`. The search gallops upwards (1, 2, 4, ... in candidate
index) until a trial fails, then bisects between the last success and the first failure: O(log n) trials.
A trial fails on an out-of-memory error (caught; once the exception is released the trial's objects are
dropped, `gc.collect()` and `torch.cuda.empty_cache()` return the memory) or when its peak memory exceeds
(1 - margin) x capacity: the margin leaves room for what the trial does not see (allocator fragmentation over a long run, the
validation pass, checkpoint buffers). Monotonicity (bigger never fits when smaller does not) is assumed. `find_micro_batch` runs the search for a
training run (the trials are real engines and steps, every rank agreeing on each result).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from wmfast.tasks import Task

from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import all_reduce, free_memory
from .engine import build_engine, destroy_engine
from .runlog import peak_memory_bytes
from .step import train_step

logger = logging.getLogger("wmfast")


@dataclass
class Trial:
    micro_batch: int
    fits: bool
    peak_bytes: int | None = None
    capacity_bytes: int | None = None
    error: str | None = None


def divisors(n: int, cap: int | None = None) -> list[int]:
    out = [d for d in range(1, n + 1) if n % d == 0]
    return [d for d in out if cap is None or cap <= 0 or d <= cap]


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_trial(micro_batch: int, body: Callable[[int], tuple[int | None, int | None]], margin: float) -> Trial:
    """Run `body(micro_batch) -> (peak_bytes, capacity_bytes)`; OOM -> a failed trial with memory freed."""
    oom = False
    try:
        peak, capacity = body(micro_batch)
    except Exception as exc:
        if not is_oom(exc):
            raise
        oom = True
    # freed only here, after the except block: inside it the exception being handled (sys.exc_info) keeps the
    # traceback alive, and its frames keep the failed trial's activations, so empty_cache() would return nothing
    # and the next trial's peak would start near capacity
    free_memory()
    if oom:
        return Trial(micro_batch, False, error="out of memory")
    if peak is not None and capacity:
        limit = (1.0 - margin) * capacity
        if peak > limit:
            return Trial(micro_batch, False, peak, capacity,
                         error=f"peak {peak / 2**30:.2f} GiB > {limit / 2**30:.2f} GiB ({1 - margin:.0%} of capacity)")
    return Trial(micro_batch, True, peak, capacity)


def search(candidates: list[int], try_fit: Callable[[int], Trial]) -> tuple[int, list[Trial]]:
    """Largest candidate for which `try_fit(c).fits` (candidates ascending). Raises if none fits."""
    if not candidates:
        raise ValueError("no micro-batch candidates to search")
    trials: list[Trial] = []

    def fits(i: int) -> bool:
        t = try_fit(candidates[i])
        trials.append(t)
        logger.info("micro-batch %d: %s", t.micro_batch, "fits" if t.fits else f"does not fit ({t.error})")
        return t.fits

    good, bad, step = -1, len(candidates), 1
    i = 0
    while i < len(candidates):  # gallop: indices 0, 1, 3, 7, ...
        if not fits(i):
            bad = i
            break
        good = i
        i += step
        step *= 2
    if good < 0:
        raise RuntimeError(f"micro-batch search: even {candidates[0]} does not fit ({trials[0].error})")
    if bad == len(candidates) and good < len(candidates) - 1:
        # the gallop stepped past the end without a failure: the last candidate is still untried
        if fits(len(candidates) - 1):
            return candidates[-1], trials
        bad = len(candidates) - 1
    while bad - good > 1:  # bisect
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return candidates[good], trials


def trials_to_json(trials: list[Trial]) -> list[dict]:
    return [asdict(t) for t in trials]


def find_micro_batch(task: Task, cfg: TrainConfig, world: int, device, precision: str, run_dir: str,
                     rank: int) -> int:
    """Real fwd+bwd+step trials on fresh engines (the search leaves no state behind: the training model is
    built afterwards from the seed, and the RNG states are restored)."""
    per_rank = cfg.global_batch // world
    candidates = divisors(per_rank, cfg.auto_max_micro_batch)
    dataset = task.train_dataset()
    rng = ckpt.rng_state()

    def body(m: int):
        # eager trials, also for a --compile run (as benchmarks/bench_train.py searches): a compilation per trial
        # and per size would cost far more than the trial, and the compiled run then trains at the size found
        trial_cfg = cfg.replace(global_batch=m * world, micro_batch=m, compile=False)
        free_memory()  # start from an empty cache, so the peak is this trial's alone
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        engine = optimizer = None
        try:
            engine, optimizer, _ = build_engine(task, trial_cfg, m, world, device, precision)
            batch = task.collate([dataset[i % len(dataset)] for i in range(m)])
            for _ in range(2):  # the second step has the optimizer states allocated
                train_step(engine, optimizer, task, [batch], trial_cfg, 0, device, precision)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                return torch.cuda.max_memory_reserved(device), torch.cuda.mem_get_info(device)[1]
            return peak_memory_bytes(device), None
        finally:
            if engine is not None:
                destroy_engine(engine)
            del engine, optimizer

    def try_fit(m: int) -> Trial:
        trial = run_trial(m, body, cfg.auto_margin)
        # every rank must agree (the sizes of ZeRO partitions and collectives must match)
        ok = all_reduce(torch.tensor([1.0 if trial.fits else 0.0], device=device), dist.ReduceOp.MIN)
        trial.fits = bool(ok.item() > 0)
        return trial

    best, trials = search(candidates, try_fit)
    ckpt.set_rng_state(rng)
    if rank == 0:
        record = {"micro_batch": best, "grad_accum": cfg.grad_accum(best, world), "world_size": world,
                  "zero_stage": cfg.zero_stage, "activation_checkpointing": cfg.activation_checkpointing,
                  "searched_eager": True, "compile": cfg.compile,
                  "precision": precision, "margin": cfg.auto_margin, "device": str(device),
                  "trials": trials_to_json(trials)}
        with open(os.path.join(run_dir, "micro_batch.json"), "w") as f:
            json.dump(record, f, indent=1)
        print(f"wmfast train: micro-batch auto -> {best} (x{cfg.grad_accum(best, world)} accumulation x {world} "
              f"rank(s) = global batch {cfg.global_batch}); trials in {run_dir}/micro_batch.json", flush=True)
    return best
