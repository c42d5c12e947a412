"""Crash-safe checkpoints: a kill at any moment leaves the previous checkpoint intact.

Layout of `RUN_DIR/checkpoints/`:
    step_00000040/            one complete checkpoint (a DeepSpeed tag directory plus ours)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (every rank writes its ZeRO shard;
                              under ZeRO-3 the model states are zero_pp_rank_R_mp_rank_00_model_states.pt
                              with empty placeholders: wmfast.models.load_checkpoint rebuilds the fp32
                              weights from the optimizer shards with deepspeed.utils.zero_to_fp32)
        trainer_state.json    step, data position, LR schedule, TrainConfig, model config, world size
        rng_rank{r}.pt        python/numpy/torch(/cuda) RNG states of rank r
        adapter/              what the task exports (Task.export_dir; the sampling task: its LoRA adapter)
    .tmp/step_00000060/       a checkpoint being written (ignored on resume, removed by the next save)

Protocol: every rank writes into `.tmp/<tag>`; barrier; rank 0 fsyncs every file and the directory, then
renames `.tmp/<tag>` -> `<tag>` (atomic on POSIX within one filesystem) and fsyncs the parent. A directory
named `step_*` therefore always holds a complete checkpoint (naming and finding them: wmfast.data.checkpoints).
Multi-node runs need a shared filesystem for the checkpoint directory (the usual DeepSpeed set-up).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from wmfast.data.checkpoints import TRAINER_STATE, list_checkpoints, tag_of

logger = logging.getLogger("wmfast")
FAULT_ENV = "WMFAST_TRAIN_FAULT"  # test hook: "kill_in_checkpoint:STEP" or "kill_after_step:STEP"


def fault_hook(where: str, step: int) -> None:
    """SIGKILL this process at a chosen point (crash-safety tests): WMFAST_TRAIN_FAULT=<where>:<step>."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _has_frozen(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def save(engine, ckpt_dir: str, step: int, trainer_state: dict[str, Any], keep: int,
         export: Callable[[str], None] | None = None) -> str:
    """Write checkpoint `step` atomically (collective: every rank calls it). `export(tmp_checkpoint_dir)`, called
    on every rank, adds the task's own files (an adapter) inside it before it becomes visible. Returns the final
    path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp_root = os.path.join(ckpt_dir, ".tmp")
    tag = tag_of(step)
    tmp = os.path.join(tmp_root, tag)
    final = os.path.join(ckpt_dir, tag)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a save that was killed
        os.makedirs(tmp_root, exist_ok=True)
    _barrier()
    # frozen parameters (e.g. a pretrained base under LoRA) are rebuilt by the task, not checkpointed
    engine.save_checkpoint(tmp_root, tag=tag, save_latest=False, exclude_frozen_parameters=_has_frozen(engine))
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if export is not None:
        export(tmp)
    if rank == 0:
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump(trainer_state, f, indent=1)
    _barrier()
    fault_hook("kill_in_checkpoint", step)
    if rank == 0:
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving the same step (e.g. final == periodic): replace atomically-ish
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(ckpt_dir)
        for _, old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(engine, path: str) -> dict[str, Any]:
    """Load DeepSpeed state, this rank's RNG states, and return trainer_state (collective)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt_dir, tag = os.path.split(path.rstrip("/"))
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False, load_module_strict=not _has_frozen(engine))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    with open(os.path.join(path, TRAINER_STATE)) as f:
        state = json.load(f)
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:  # e.g. resuming on more ranks than were saved: training continues, but not bit-for-bit
        logger.warning("wmfast train: %s has no RNG state for rank %d: dropout masks will differ from the "
                       "uninterrupted run", path, rank)
    return state


def publish_export(checkpoint: str, run_dir: str, name: str) -> str | None:
    """Copy `<checkpoint>/<name>` to `<run_dir>/<name>`, replacing the previous copy only once the new one is
    complete (copied beside it, then two renames: a kill leaves the old or the new copy whole, or, between the
    renames, `<name>.old` and `<name>.tmp` whole and the checkpoint's own copy). Rank 0 only."""
    src, dst = os.path.join(checkpoint, name), os.path.join(run_dir, name)
    if not os.path.isdir(src):
        return None
    tmp, old = f"{dst}.tmp", f"{dst}.old"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(src, tmp)
    _fsync_tree(tmp)
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_path(run_dir)
    return dst
