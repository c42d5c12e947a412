"""The training loop: DeepSpeed ZeRO 1/2/3, gradient accumulation, clipping, activation checkpointing,
crash-safe checkpoints, NaN handling, micro-batch search, logging. Model-agnostic: all model knowledge
comes from a `Task` (wmfast.train.task).

Process model: with no launcher (no RANK/WORLD_SIZE in the environment) the loop initialises a 1-rank
process group itself (gloo on CPU, nccl on GPU); under torchrun or the `deepspeed` launcher it joins theirs.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from . import microbatch
from .config import TrainConfig, deepspeed_config, resolve_precision
from .data import StepBatchSampler, val_batches
from .metrics import GpuTelemetry, RunLog, peak_flops, peak_memory_bytes
from .schedule import lr_at, set_lr
from .task import Task, make_task, param_groups

logger = logging.getLogger("wmfast")


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunResult:
    run_dir: str
    checkpoint: str | None
    step: int
    last_loss: float | None
    micro_batch: int
    status: str  # "done" | "nonfinite"


# ---- process group and device ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed() -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, we_created_the_group)."""
    import deepspeed

    created = False
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        # DeepSpeed JIT-builds a shared-memory allreduce op (~26 s of C++ compilation) whenever it wraps a
        # process group on its CPU accelerator; gloo does the job for us, so mark the op unusable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:  # no launcher: a 1-rank group of our own (DeepSpeed needs one)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("LOCAL_RANK", "0")
            # an in-memory store: one rank needs no TCP rendezvous (and no port that another process could take)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
        # kept for the life of the process: DeepSpeed caches the group objects, so a second run in the same
        # process (tests, notebooks) must find the same group rather than a re-created one
        atexit.register(_destroy_group)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world, device, created


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(float_dtype) if float_dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, float_dtype) for v in batch)
    return batch


def enable_activation_checkpointing(blocks: list[torch.nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant torch.utils.checkpoint, which
    also works with ZeRO-3's parameter gathering hooks and keeps dropout masks identical)."""
    from torch.utils.checkpoint import checkpoint

    if not blocks:
        raise ValueError("activation checkpointing requested but the task exposes no blocks")
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward


# ---- engine ------------------------------------------------------------------------------------------------
def build_engine(task: Task, cfg: TrainConfig, micro_batch: int, world: int, device: torch.device,
                 precision: str):
    import deepspeed

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every trial
    model = task.build_model()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(task.blocks(model))
    groups = param_groups(model, task, cfg.weight_decay)
    for g in groups:
        g.pop("names")
    # torch's fused AdamW on GPU (one kernel for all parameters); plain AdamW on CPU. A client optimizer
    # means DeepSpeed builds none of its own ops (its FusedAdam/CPUAdam are JIT-compiled on first use).
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(0, cfg.lr, cfg.warmup_steps, cfg.steps,
                                                                          cfg.lr_schedule),
                                  betas=tuple(cfg.betas), eps=cfg.eps, fused=device.type == "cuda")
    ds_config = deepspeed_config(cfg, micro_batch, world, precision)
    engine, _, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer, config=ds_config)
    return engine, optimizer, ds_config


def destroy_engine(engine) -> None:
    with contextlib.suppress(Exception):
        engine.destroy()
    microbatch.free_memory()


# ---- the step ----------------------------------------------------------------------------------------------
def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


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


def train_step(engine, optimizer, task: Task, batches, cfg: TrainConfig, step: int, device, precision: str):
    """One optimizer step over the accumulation micro-batches. Returns (mean loss, skipped, lr).

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
        stats = _all_reduce(torch.stack([loss.detach().float().nan_to_num(0.0, 0.0, 0.0),
                                         (~torch.isfinite(loss.detach())).float()]))
        acc = stats if acc is None else acc + stats
        # backward always runs (ZeRO's gradient hooks and buckets expect every micro-batch); a bad step's NaN
        # gradients are discarded at the boundary without touching weights or AdamW moments
        engine.backward(loss)
        set_lr(optimizer, lr)
        if i == len(batches) - 1 or engine.is_gradient_accumulation_boundary():
            loss_sum, n_bad = acc.cpu().tolist()  # the step's one host sync
            if n_bad > 0:
                if cfg.nan_policy == "stop":
                    raise NonFiniteLoss(f"non-finite loss at step {step} ({int(n_bad)} of {len(batches) * world} "
                                        "micro-batch losses over the ranks)")
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
    t = _all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device))
    count = len(index_lists) * world
    return {f"val_{k}": float(v) / count for k, v in zip(keys, t.tolist())}


# ---- micro-batch search ------------------------------------------------------------------------------------
def find_micro_batch(task: Task, cfg: TrainConfig, world: int, device, precision: str, run_dir: str,
                     rank: int) -> int:
    """Real fwd+bwd+step trials on fresh engines (the search leaves no state behind: the training model is
    built afterwards from the seed, and the RNG states are restored)."""
    per_rank = cfg.global_batch // world
    candidates = microbatch.divisors(per_rank, cfg.auto_max_micro_batch)
    dataset = task.train_dataset()
    rng = ckpt.rng_state()

    def body(m: int):
        trial_cfg = cfg.replace(global_batch=m * world, micro_batch=m)
        microbatch.free_memory()  # start from an empty cache, so the peak is this trial's alone
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

    def try_fit(m: int) -> microbatch.Trial:
        trial = microbatch.run_trial(m, body, cfg.auto_margin)
        # every rank must agree (the sizes of ZeRO partitions and collectives must match)
        ok = _all_reduce(torch.tensor([1.0 if trial.fits else 0.0], device=device), dist.ReduceOp.MIN)
        trial.fits = bool(ok.item() > 0)
        return trial

    best, trials = microbatch.search(candidates, try_fit)
    ckpt.set_rng_state(rng)
    if rank == 0:
        record = {"micro_batch": best, "grad_accum": cfg.grad_accum(best, world), "world_size": world,
                  "zero_stage": cfg.zero_stage, "activation_checkpointing": cfg.activation_checkpointing,
                  "precision": precision, "margin": cfg.auto_margin, "device": str(device),
                  "trials": microbatch.trials_to_json(trials)}
        with open(os.path.join(run_dir, "micro_batch.json"), "w") as f:
            json.dump(record, f, indent=1)
        print(f"wmfast train: micro-batch auto -> {best} (x{cfg.grad_accum(best, world)} accumulation x {world} "
              f"rank(s) = global batch {cfg.global_batch}); trials in {run_dir}/micro_batch.json", flush=True)
    return best


# ---- the run -----------------------------------------------------------------------------------------------
def check_inputs(cfg: TrainConfig, data_dir: str | None, run_dir: str, resume: bool, task: Task | None) -> None:
    """Fail before any work: bad config, missing data, a run dir that would be overwritten."""
    cfg.validate(world_size_from_env())
    if task is None and (not data_dir or not os.path.isdir(data_dir)):
        raise ValueError(f"data directory {data_dir!r} does not exist")
    if not resume and ckpt.list_checkpoints(os.path.join(run_dir, "checkpoints")):
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                         "another --out")


def train(cfg: TrainConfig, data_dir: str | None, run_dir: str, resume: bool = False, task: Task | None = None,
          progress: bool = True) -> RunResult:
    """Train `cfg` on `data_dir` (or on a given `task`), writing everything under `run_dir`."""
    check_inputs(cfg, data_dir, run_dir, resume, task)
    task = task or make_task(cfg.task, data_dir, cfg.model)
    if hasattr(task, "configure"):  # duck-typed tasks without the hook are fine
        task.configure(cfg)
    rank, world, device, _ = setup_distributed()
    return _run(cfg, task, run_dir, resume, rank, world, device, progress)


def _write_run_config(run_dir: str, cfg: TrainConfig, task: Task, ds_config: dict, world: int) -> None:
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"train": cfg.to_dict(), "model": task.model_config(), "deepspeed": ds_config,
                   "world_size": world}, f, indent=1, default=str)


def _warn_config_drift(state: dict, cfg: TrainConfig, world: int, rank: int) -> None:
    """A resumed run matches the uninterrupted one only with the same batch, seed, schedule and world size."""
    saved = state.get("train_config", {})
    keys = ("global_batch", "seed", "lr", "warmup_steps", "steps", "zero_stage")
    changed = [f"{k}: {saved[k]} -> {getattr(cfg, k)}" for k in keys if k in saved and saved[k] != getattr(cfg, k)]
    if state.get("world_size", world) != world:
        changed.append(f"world_size: {state['world_size']} -> {world}")
    if changed and rank == 0:
        logger.warning("wmfast train: resuming with a different configuration (%s): the run will not match an "
                       "uninterrupted one", "; ".join(changed))


def _run(cfg, task, run_dir, resume, rank, world, device, progress) -> RunResult:
    precision = resolve_precision(cfg.precision, device.type)
    os.makedirs(run_dir, exist_ok=True)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    micro_batch = cfg.micro_batch
    if micro_batch == "auto":
        micro_batch = find_micro_batch(task, cfg, world, device, precision, run_dir, rank)
    engine, optimizer, ds_config = build_engine(task, cfg, micro_batch, world, device, precision)
    if rank == 0:
        _write_run_config(run_dir, cfg, task, ds_config, world)
    # per-rank RNG for dropout (different masks on different ranks); restored from a checkpoint on resume
    torch.manual_seed(cfg.seed * 1000 + rank + 1)
    start_step, last_ckpt = 0, None
    if resume:
        found = ckpt.latest_checkpoint(ckpt_dir)
        if found is None:
            logger.warning("wmfast train: --resume but no complete checkpoint in %s: starting from step 0", ckpt_dir)
        else:
            state = ckpt.load(engine, found[1])
            start_step, last_ckpt = state["step"], found[1]
            _warn_config_drift(state, cfg, world, rank)
            if rank == 0:
                print(f"wmfast train: resumed from {found[1]} (step {start_step})", flush=True)
    try:
        step, loss = _loop(engine, optimizer, task, cfg, micro_batch, rank, world, device, precision, run_dir,
                           start_step, last_ckpt)
        status = "done"
    except NonFiniteLoss as e:
        last = ckpt.latest_checkpoint(ckpt_dir)
        msg = (f"wmfast train: STOPPED: {e}. The last good checkpoint is "
               f"{last[1] if last else '(none written yet)'}; resume from it with --resume (lower the LR, or "
               "set nan_policy='skip' to drop such steps).")
        if rank == 0:
            print(msg, flush=True)
        return RunResult(run_dir, last[1] if last else None, -1, None, micro_batch, "nonfinite")
    finally:
        destroy_engine(engine)
    last = ckpt.latest_checkpoint(ckpt_dir)
    return RunResult(run_dir, last[1] if last else None, step, loss, micro_batch, status)


def _trainer_state(cfg: TrainConfig, task: Task, step: int, world: int, micro_batch: int) -> dict[str, Any]:
    return {"step": step, "data_position": {"step": step, "samples_seen": step * cfg.global_batch},
            "lr_schedule": {"kind": "linear-warmup-linear-decay", "peak": cfg.lr, "warmup_steps": cfg.warmup_steps,
                            "total_steps": cfg.steps,
                            "next_lr": lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule) if step < cfg.steps else 0.0},
            "train_config": cfg.to_dict(), "model_config": task.model_config(), "world_size": world,
            "micro_batch": micro_batch, "time": time.time()}


def _train_record(engine, step, loss, lr, dt, cfg, micro_batch, accum, world, device, flops, tokens, peak,
                  skipped_total) -> dict[str, Any]:
    sps = cfg.global_batch / dt
    gn = engine.get_global_grad_norm()  # the norm before clipping, over all ranks
    return {"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": float(gn) if gn is not None else None,
            "step_time_s": dt, "samples_per_s": sps, "tokens_per_s": sps * tokens,
            "mfu": (sps * flops / (peak * world)) if peak else None,  # see wmfast.train.metrics
            "peak_mem_gb": peak_memory_bytes(device) / 2**30, "skipped_steps": skipped_total,
            "micro_batch": micro_batch, "grad_accum": accum, "world_size": world, "time": time.time()}


def _warn_if_validation_off(task: Task, cfg: TrainConfig, micro_batch: int, world: int, rank: int) -> None:
    """Periodic validation silently doing nothing would look like a run that validates: say so once, on rank 0."""
    if not cfg.val_every or rank != 0:
        return
    dataset = task.val_dataset()
    if dataset is None:
        reason = getattr(task, "val_missing_reason", None) or f"task {task.name!r} has no validation split"
        logger.warning("wmfast train: validation is off (%s); set --val-every 0 to silence this", reason)
    elif len(dataset) < micro_batch * world:
        logger.warning("wmfast train: validation is off: the val split has %d samples, fewer than one micro-batch "
                       "per rank (%d x %d ranks = %d); every rank must evaluate the same number of full batches",
                       len(dataset), micro_batch, world, micro_batch * world)


def _loop(engine, optimizer, task, cfg, micro_batch, rank, world, device, precision, run_dir, start_step, last_ckpt):
    from tqdm.auto import tqdm

    _warn_if_validation_off(task, cfg, micro_batch, world, rank)

    dataset = task.train_dataset()
    accum = cfg.grad_accum(micro_batch, world)
    sampler = StepBatchSampler(len(dataset), cfg.global_batch, micro_batch, rank, world, cfg.seed, start_step,
                               cfg.steps)
    # a private generator: creating the loader's iterator would otherwise draw from the global torch RNG, and a
    # resumed run (which creates it at a later step) would shift every later dropout mask
    loader = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=task.collate, num_workers=cfg.num_workers,
                             pin_memory=device.type == "cuda", persistent_workers=False,
                             generator=torch.Generator().manual_seed(cfg.seed + start_step)))
    log = RunLog(run_dir, enabled=rank == 0, append=start_step > 0)
    telemetry = GpuTelemetry(device)
    peak = peak_flops(device)
    flops, tokens = float(task.flops_per_sample()), task.tokens_per_sample()
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    bar = tqdm(total=cfg.steps, initial=start_step, disable=rank != 0 or os.environ.get("WMFAST_PROGRESS", "1") != "1",
               desc="train", dynamic_ncols=True, mininterval=1.0)
    step, loss, t_last, steps_since, paused = start_step, None, time.perf_counter(), 0, 0.0
    skipped_total = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < cfg.steps:
            batches = [next(loader) for _ in range(accum)]
            loss, skipped, lr = train_step(engine, optimizer, task, batches, cfg, step, device, precision)
            step += 1
            steps_since += 1
            skipped_total += int(skipped)
            if skipped and rank == 0:
                print(f"wmfast train: non-finite loss at step {step - 1}: step skipped (nan_policy=skip)", flush=True)
            ckpt.fault_hook("kill_after_step", step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = (time.perf_counter() - t_last - paused) / steps_since  # validation/checkpoints excluded
                t_last, steps_since, paused = time.perf_counter(), 0, 0.0
                rec = _train_record(engine, step, loss, lr, dt, cfg, micro_batch, accum, world, device, flops, tokens,
                                    peak, skipped_total)
                rec.update(telemetry.read())
                log.write(rec)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{rec['samples_per_s']:.1f}")
            bar.update(1)
            t_pause = time.perf_counter()
            if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                metrics = validate(engine, task, cfg, micro_batch, rank, world, device, precision)
                if metrics:
                    log.write({"kind": "val", "step": step, **metrics, "val_precision": val_precision(precision),
                               "time": time.time()})
                    if rank == 0:
                        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                last_ckpt = ckpt.save(engine, ckpt_dir, step, _trainer_state(cfg, task, step, world, micro_batch),
                                      cfg.keep_checkpoints)
            paused += time.perf_counter() - t_pause
    finally:
        bar.close()
        log.close()
    if rank == 0:
        print(f"wmfast train: done at step {step}; run dir {run_dir}; checkpoint {last_ckpt}; "
              f"metrics {os.path.join(run_dir, 'metrics.jsonl')}", flush=True)
    if loss is not None and math.isnan(loss):
        loss = None
    return step, loss
