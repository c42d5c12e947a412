"""The training run: DeepSpeed ZeRO 1/2/3, gradient accumulation, clipping, activation checkpointing,
crash-safe checkpoints, NaN handling, micro-batch search, logging. Model-agnostic: all model knowledge comes
from a `Task` (wmfast.tasks). The parts live beside this file: distributed (process group), engine, step
(the optimizer step and validation), microbatch (the search), checkpoint, sampler, schedule, runlog.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from wmfast.data.checkpoints import TRAINER_STATE, latest_checkpoint, list_checkpoints
from wmfast.tasks import Task, make_task

from . import checkpoint as ckpt
from .config import TrainConfig, resolve_precision
from .distributed import setup_distributed, world_size_from_env
from .engine import build_engine, compile_fullgraph, destroy_engine
from .microbatch import find_micro_batch
from .runlog import GpuTelemetry, RunLog, peak_flops, peak_memory_bytes
from .sampler import StepBatchSampler
from .schedule import lr_at
from .step import NonFiniteLoss, train_step, val_precision, validate

logger = logging.getLogger("wmfast")


@dataclass
class RunResult:
    run_dir: str
    checkpoint: str | None
    step: int
    last_loss: float | None
    micro_batch: int
    status: str  # "done" | "nonfinite" (nan_policy "stop", or "skip" past nan_skip_limit)


def check_inputs(cfg: TrainConfig, data_dir: str | None, run_dir: str, resume: bool, task: Task | None) -> None:
    """Fail before any work: bad config, missing data, a run dir that would be overwritten."""
    cfg.validate(world_size_from_env())
    if task is None and not data_dir:
        raise ValueError(f"--data: the {cfg.task} task of {cfg.name} needs a data directory")
    if task is None and not os.path.isdir(data_dir):
        raise ValueError(f"data directory {data_dir!r} does not exist")
    if not resume and list_checkpoints(os.path.join(run_dir, "checkpoints")):
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                         "another --out")


def train(cfg: TrainConfig, data_dir: str | None, run_dir: str, resume: bool = False, task: Task | None = None,
          progress: bool = True) -> RunResult:
    """Train `cfg` on `data_dir` (or on a given `task`), writing everything under `run_dir`."""
    check_inputs(cfg, data_dir, run_dir, resume, task)
    task = task or make_task(cfg.task, data_dir, cfg.model)
    if resume:
        check_same_model(cfg, task, run_dir)
    if hasattr(task, "configure"):  # duck-typed tasks without the hook are fine
        task.configure(cfg)
    rank, world, device, _ = setup_distributed()
    return _run(cfg, task, run_dir, resume, rank, world, device, progress)


def _describe(train_config: dict) -> str:
    return (f"{train_config.get('name', '?')} (task {train_config.get('task', '?')}, "
            f"model {train_config.get('model', '?')})")


# model config keys that change how the same weights run (or where they were read from), not the weights
_EXECUTION_ONLY = frozenset({"block", "recompute", "dropout", "full_attention_impl", "init_std", "pretrained"})


def check_same_model(cfg: TrainConfig, task: Task, run_dir: str) -> None:
    """A resume into a run of another task or model fails here, in one line, before any weight is read (and
    before the run's config.json is rewritten): DeepSpeed's own error lists every state-dict key."""
    for _, path in reversed(list_checkpoints(os.path.join(run_dir, "checkpoints"))):
        try:
            with open(os.path.join(path, TRAINER_STATE)) as f:
                state = json.load(f)
            break
        except (OSError, ValueError):  # unreadable: the resume itself reports it and tries the previous one
            continue
    else:
        return
    saved_cfg, saved_model = state.get("train_config") or {}, state.get("model_config")
    model = json.loads(json.dumps(task.model_config(), default=str))  # as saved: tuples become lists
    if saved_model is None:
        return
    # keys on both sides (a field added since the save is not a mismatch) that shape the weights
    shared = (set(saved_model) & set(model)) - _EXECUTION_ONLY
    if "d_model" in shared:  # the sizes are spelled out: presets naming the same weights (tiny, tiny-reference) mix
        shared.discard("preset")
    diff = [f"{k} {saved_model.get(k)!r} vs {model.get(k)!r}" for k in sorted(shared)
            if saved_model.get(k) != model.get(k)]
    if not diff and saved_cfg.get("task", cfg.task) == cfg.task:
        return
    if saved_cfg.get("task", cfg.task) != cfg.task:
        diff.insert(0, f"task {saved_cfg.get('task')!r} vs {cfg.task!r}")
    raise ValueError(f"{run_dir} holds a checkpoint of {_describe(saved_cfg)}; this run is {_describe(cfg.to_dict())}"
                     f" ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}) (use another --out, or the same "
                     "--config)")


def _write_run_config(run_dir: str, cfg: TrainConfig, task: Task, ds_config: dict, world: int) -> None:
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"train": cfg.to_dict(), "model": task.model_config(), "deepspeed": ds_config,
                   "world_size": world}, f, indent=1, default=str)


def _warn_config_drift(state: dict, cfg: TrainConfig, world: int, rank: int) -> None:
    """A resumed run matches the uninterrupted one only with the same batch, seed, schedule and world size."""
    saved = state.get("train_config", {})
    keys = ("name", "global_batch", "seed", "lr", "warmup_steps", "steps", "zero_stage")
    changed = [f"{k}: {saved[k]} -> {getattr(cfg, k)}" for k in keys if k in saved and saved[k] != getattr(cfg, k)]
    if state.get("world_size", world) != world:
        changed.append(f"world_size: {state['world_size']} -> {world}")
    if changed and rank == 0:
        logger.warning("wmfast train: resuming with a different configuration (%s): the run will not match an "
                       "uninterrupted one", "; ".join(changed))


def _log_compiled(cfg: TrainConfig, task: Task, engine) -> None:
    graph = ("one graph each (fullgraph)" if compile_fullgraph(cfg.zero_stage) else
             "with graph breaks at ZeRO-3's parameter-gathering hooks")
    print(f"wmfast train: torch.compile: {len(task.blocks(engine.module))} blocks compiled on their own, {graph}"
          f"{', activation checkpointing inside' if cfg.activation_checkpointing else ''}; the first step (and the "
          "first validation) include the compilation", flush=True)


def _run(cfg, task, run_dir, resume, rank, world, device, progress) -> RunResult:
    precision = resolve_precision(cfg.precision, device.type)
    os.makedirs(run_dir, exist_ok=True)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if rank == 0:
        removed = ckpt.remove_leftovers(ckpt_dir)
        if removed:
            logger.info("wmfast train: removed what killed saves or deletions left: %s", ", ".join(removed))
    ckpt.barrier()
    micro_batch = cfg.micro_batch
    if micro_batch == "auto":
        micro_batch = find_micro_batch(task, cfg, world, device, precision, run_dir, rank)
    engine, optimizer, ds_config = build_engine(task, cfg, micro_batch, world, device, precision)
    if rank == 0:
        _write_run_config(run_dir, cfg, task, ds_config, world)
        if cfg.compile:
            _log_compiled(cfg, task, engine)
    # per-rank RNG for dropout (different masks on different ranks); restored from a checkpoint on resume
    torch.manual_seed(cfg.seed * 1000 + rank + 1)
    try:
        start_step, last_ckpt, skips = _resume(engine, cfg, ckpt_dir, world, rank) if resume else (0, None, 0)
        step, loss = _loop(engine, optimizer, task, cfg, micro_batch, rank, world, device, precision, run_dir,
                           start_step, last_ckpt, skips)
        status = "done"
    except NonFiniteLoss as e:
        last = latest_checkpoint(ckpt_dir)
        remedy = "raise nan_skip_limit" if e.limit_reached else "set nan_policy='skip' to drop such steps"
        msg = (f"wmfast train: STOPPED: {e}. The last good checkpoint is "
               f"{last[1] if last else '(none written yet)'}; resume from it with --resume (lower the LR, or "
               f"{remedy}).")
        if rank == 0:
            print(msg, flush=True)
        return RunResult(run_dir, last[1] if last else None, -1, None, micro_batch, "nonfinite")
    finally:
        destroy_engine(engine)
    last = latest_checkpoint(ckpt_dir)
    return RunResult(run_dir, last[1] if last else None, step, loss, micro_batch, status)


def _resume(engine, cfg: TrainConfig, ckpt_dir: str, world: int, rank: int) -> tuple[int, str | None, int]:
    """Load the newest checkpoint that loads; (its step, its path, the steps skipped in a row before it), or
    (0, None, 0) without one."""
    found = ckpt.load_newest(engine, ckpt_dir)
    if found is None:
        logger.warning("wmfast train: --resume but no complete checkpoint in %s: starting from step 0", ckpt_dir)
        return 0, None, 0
    state, path = found
    _warn_config_drift(state, cfg, world, rank)
    if rank == 0:
        ckpt.prune(ckpt_dir, cfg.keep_checkpoints, protect=path)  # a kill may have come between a save and this
        print(f"wmfast train: resumed from {path} (step {state['step']})", flush=True)
    return state["step"], path, int(state.get("nan_skipped_in_a_row", 0))


def _trainer_state(cfg: TrainConfig, task: Task, step: int, world: int, micro_batch: int,
                   skipped_in_a_row: int = 0) -> dict[str, Any]:
    return {"step": step, "nan_skipped_in_a_row": skipped_in_a_row,
            "data_position": {"step": step, "samples_seen": step * cfg.global_batch},
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
            "mfu": (sps * flops / (peak * world)) if peak else None,  # see wmfast.train.runlog
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


def _exporter(task: Task, engine, rank: int, step: int):
    """The checkpoint's export callback: the task's files into `<checkpoint>/<task.export_dir>` (every rank)."""
    name = getattr(task, "export_dir", None)
    if not name:
        return None
    return lambda tmp: task.export(engine.module, os.path.join(tmp, name), is_main_process=rank == 0, step=step)


def _loop(engine, optimizer, task, cfg, micro_batch, rank, world, device, precision, run_dir, start_step, last_ckpt,
          skipped_in_a_row: int = 0):
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
    skipped_total = 0  # skipped_in_a_row carries over a resume: the cap counts as in the uninterrupted run
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < cfg.steps:
            batches = [next(loader) for _ in range(accum)]
            loss, skipped, lr = train_step(engine, optimizer, task, batches, cfg, step, device, precision,
                                           skipped_in_a_row=skipped_in_a_row)
            step += 1
            steps_since += 1
            skipped_total += int(skipped)
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
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
                last_ckpt = ckpt.save(engine, ckpt_dir, step,
                                      _trainer_state(cfg, task, step, world, micro_batch, skipped_in_a_row),
                                      cfg.keep_checkpoints, _exporter(task, engine, rank, step))
            paused += time.perf_counter() - t_pause
    finally:
        bar.close()
        log.close()
    if rank == 0:
        name = getattr(task, "export_dir", None)
        exported = ckpt.publish_export(last_ckpt, run_dir, name) if last_ckpt and name else None
        print(f"wmfast train: done at step {step}; run dir {run_dir}; checkpoint {last_ckpt}; "
              f"{f'{name} {exported}; ' if exported else ''}"
              f"metrics {os.path.join(run_dir, 'metrics.jsonl')}", flush=True)
    if loss is not None and math.isnan(loss):
        loss = None
    return step, loss
