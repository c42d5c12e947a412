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
    .tmp/step_00000060/       a checkpoint being written
    .tmp/discard-step_00000020/  a checkpoint being deleted
    (everything under .tmp is ignored on resume and removed at the start of every run)

Writing: every rank writes into `.tmp/<tag>`; the ranks agree that every write succeeded; rank 0 writes
trainer_state.json with the size of every other file (the manifest a resume checks), fsyncs every file and the
directory, renames `.tmp/<tag>` -> `<tag>` (atomic on POSIX within one filesystem) and fsyncs the parent.
Deleting (pruning beyond `keep`, replacing, dropping a checkpoint that does not load): rename `<tag>` into
`.tmp` (atomic), fsync the parent, then remove it there. A directory named `step_*` therefore always holds a
complete checkpoint, whatever moment a kill comes (naming, finding and checking them: wmfast.data.checkpoints).
A run starts by emptying `.tmp`, removing any `step_*` directory without trainer_state.json (older versions
deleted in place) and, once resumed, pruning to `keep` (a kill between a save and its pruning leaves one more).
A write that fails for an operating-system reason (a full disk, a read-only or forbidden directory) removes the
partial checkpoint and raises CheckpointWriteError (an OSError with that errno).
Multi-node runs need a shared filesystem for the checkpoint directory (the usual DeepSpeed set-up).
"""
from __future__ import annotations

import contextlib
import errno
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

from wmfast.data.checkpoints import (
    MANIFEST_KEY,
    TMP_DIR,
    TRAINER_STATE,
    checkpoint_problem,
    file_sizes,
    incomplete_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    tag_of,
)

logger = logging.getLogger("wmfast")
FAULT_ENV = "WMFAST_TRAIN_FAULT"  # test hook: "kill_in_checkpoint:STEP", "kill_after_step:STEP", "kill_in_prune:STEP"


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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _has_frozen(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


class CheckpointWriteError(OSError):
    """A checkpoint could not be written for an operating-system reason (`errno`: ENOSPC, EROFS, EACCES, ...).
    The partial checkpoint is removed; the previous complete one (`last`, or None) is intact. str() is one line
    naming the cause, the checkpoint, the directory and the last complete checkpoint."""

    def __init__(self, code: int, tag: str, ckpt_dir: str, last: str | None):
        super().__init__(code, os.strerror(code), ckpt_dir)
        self.tag, self.last = tag, last
        kept = (f"the last complete checkpoint {os.path.basename(last)} is intact" if last
                else "no complete checkpoint was written before it")
        self.message = (f"{os.strerror(code).lower()} ({errno.errorcode.get(code, code)}) while writing checkpoint "
                        f"{tag} to {ckpt_dir} ({kept})")

    def __str__(self) -> str:
        return self.message


def _open_for_write(path: str):
    return open(path, "wb")


def _torch_save(obj: Any, path: str, **kwargs) -> None:
    """torch.save through a Python file: given a path, torch's C++ writer reports a failed write (a full disk) as
    "unexpected pos A vs B" with no errno; through a file object the OSError stays attached to that RuntimeError
    as its __context__ (and a failed open or close raises it directly)."""
    with _open_for_write(path) as f:
        torch.save(obj, f, **kwargs)


@contextlib.contextmanager
def _errno_preserving_saves(engine):
    """DeepSpeed's torch checkpoint engine, saving through `_torch_save` for the duration (other engines as
    they are)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce).__name__ != "TorchCheckpointEngine":
        yield
        return
    ce.save = lambda state_dict, path: _torch_save(state_dict, path,
                                                   _use_new_zipfile_serialization=ce.zipfile_serialization)
    try:
        yield
    finally:
        del ce.save


def _os_errno(exc: BaseException) -> int:
    """The errno of the first OSError in `exc`'s chain (cause, then context), or 0."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno:
            return cur.errno
        cur = cur.__cause__ or cur.__context__
    return 0


def _errno_of(failure: list[BaseException]) -> int:
    return _os_errno(failure[0]) if failure else 0


def _max_over_ranks(code: int) -> int:
    """Every rank's view of whether its writes failed (a collective: also the barrier after the writes)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        codes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(codes, code)
        return max(codes)
    return code


@contextlib.contextmanager
def _os_failure(failure: list[BaseException]):
    """Run the block; an exception with an errno in its chain is recorded in `failure`, any other propagates."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not _os_errno(e):
            raise
        failure.append(e)


def save(engine, ckpt_dir: str, step: int, trainer_state: dict[str, Any], keep: int,
         export: Callable[[str], None] | None = None) -> str:
    """Write checkpoint `step` atomically (collective: every rank calls it), then prune to the newest `keep`.
    `export(tmp_checkpoint_dir)`, called on every rank, adds the task's own files (an adapter) inside it before it
    becomes visible. Returns the final path; raises CheckpointWriteError when the filesystem refuses a write."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_of(step)
    tmp, final = os.path.join(ckpt_dir, TMP_DIR, tag), os.path.join(ckpt_dir, tag)
    failure: list[BaseException] = []
    if rank == 0:
        with _os_failure(failure):
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a save that was killed
            os.makedirs(tmp)  # here, not in DeepSpeed (which logs a refused makedirs and goes on)
    code = _max_over_ranks(_errno_of(failure))
    if not code:
        with _os_failure(failure), _errno_preserving_saves(engine):
            # frozen parameters (e.g. a pretrained base under LoRA) are rebuilt by the task, not checkpointed
            engine.save_checkpoint(os.path.dirname(tmp), tag=tag, save_latest=False,
                                   exclude_frozen_parameters=_has_frozen(engine))
        if failure and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # DeepSpeed's save ends in a barrier, which a rank whose write failed never reached
        if not failure:
            with _os_failure(failure), _errno_preserving_saves(engine):
                _torch_save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
                if export is not None:
                    export(tmp)
        code = _max_over_ranks(_errno_of(failure))  # also the barrier: every rank's files are written
    if not code and rank == 0:
        with _os_failure(failure), open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump({**trainer_state, MANIFEST_KEY: file_sizes(tmp)}, f, indent=1)
    fault_hook("kill_in_checkpoint", step)
    if not code and not failure and rank == 0:
        with _os_failure(failure):
            _fsync_tree(tmp)
            trash = None
            if os.path.exists(final):  # re-saving a step: the old copy goes first, whole, into the temporary area
                trash = _to_trash(ckpt_dir, final)
            os.rename(tmp, final)
            _fsync_path(ckpt_dir)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
    code = _max_over_ranks(code or _errno_of(failure))
    if code:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(code, tag, ckpt_dir, _last_complete(ckpt_dir)) from (failure[0] if failure else None)
    if rank == 0:
        prune(ckpt_dir, keep, protect=final, step=step)
    barrier()
    return final


def _last_complete(ckpt_dir: str) -> str | None:
    found = latest_checkpoint(ckpt_dir)
    return found[1] if found else None


# ---- deleting ----------------------------------------------------------------------------------------------
def _to_trash(ckpt_dir: str, path: str) -> str:
    """Move the checkpoint directory `path` into the temporary area in one atomic rename (made durable), so that
    its removal, however it is interrupted, never leaves a partial `step_*` directory. Returns the new path."""
    trash = os.path.join(ckpt_dir, TMP_DIR, f"discard-{os.path.basename(path.rstrip(os.sep))}")
    shutil.rmtree(trash, ignore_errors=True)
    os.makedirs(os.path.dirname(trash), exist_ok=True)
    os.rename(path, trash)
    _fsync_path(ckpt_dir)
    return trash


def discard(ckpt_dir: str, path: str) -> None:
    """Delete a checkpoint directory: renamed into the temporary area, then removed there (rank 0 only)."""
    shutil.rmtree(_to_trash(ckpt_dir, path), ignore_errors=True)


def prune(ckpt_dir: str, keep: int, protect: str | None = None, step: int = -1) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (never `protect`, the one just written); returns the
    deleted paths. A filesystem that refuses a deletion is reported and the run goes on (rank 0 only)."""
    deleted = []
    for _, old in list_checkpoints(ckpt_dir)[:-keep]:
        if old == protect:
            continue
        try:
            trash = _to_trash(ckpt_dir, old)
            fault_hook("kill_in_prune", step)
            shutil.rmtree(trash, ignore_errors=True)
        except OSError as e:
            logger.warning("wmfast train: could not delete the old checkpoint %s (%s): it stays", old, e)
            continue
        deleted.append(old)
    return deleted


def remove_leftovers(ckpt_dir: str) -> list[str]:
    """What a killed save or deletion left: everything in the temporary area and every `step_*` directory
    without trainer_state.json. Run at the start of every run, before anything reads the directory (rank 0);
    returns what was removed."""
    removed = []
    tmp_root = os.path.join(ckpt_dir, TMP_DIR)
    if os.path.isdir(tmp_root):
        # DeepSpeed copies its recovery scripts (zero_to_fp32.py, ...) beside every save: expected, not reported
        removed += [os.path.join(tmp_root, name) for name in sorted(os.listdir(tmp_root))
                    if not (name.startswith("zero_to_") and name.endswith(".py"))]
        shutil.rmtree(tmp_root, ignore_errors=True)
    for path in incomplete_checkpoints(ckpt_dir):
        try:
            discard(ckpt_dir, path)
        except OSError as e:  # e.g. a read-only directory: the first save reports it
            logger.warning("wmfast train: could not remove the incomplete checkpoint %s (%s)", path, e)
            continue
        removed.append(path)
    return removed


# ---- loading -----------------------------------------------------------------------------------------------
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


def _first_problem(problem: str | None) -> str | None:
    """The first rank's problem with a checkpoint, on every rank (a collective): all ranks resume from the same."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        problems: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p), None)
    return problem


def load_newest(engine, ckpt_dir: str) -> tuple[dict[str, Any], str] | None:
    """Load the newest checkpoint that loads (collective): (trainer_state, path), or None when there is none.
    One that does not is skipped with one warning naming the file. One found damaged on disk (a file missing or
    cut short, per the manifest; an archive without its end) is deleted once an older one has loaded: the run
    rewrites those steps, and the next resume or a model loader would otherwise pick it again. One that only
    failed to load (an I/O error, out of memory: perhaps passing) is kept. Raises a ValueError naming every
    problem when none loads."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    problems: list[tuple[str, str, bool]] = []  # (path, problem, damaged on disk)
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        problem, state = _first_problem(checkpoint_problem(path)), None
        damaged = problem is not None
        if problem is None:
            try:
                state = load(engine, path)
            except Exception as e:  # noqa: BLE001 - whatever fails, the previous checkpoint is tried
                problem = f"{path} does not load ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]})"
            problem = _first_problem(problem)
        if problem is not None:
            problems.append((path, problem, damaged))
            continue
        if problems and rank == 0:
            logger.warning("wmfast train: the newest checkpoint(s) do not load: %s; resuming from %s instead%s",
                           "; ".join(p for _, p, _ in problems), path,
                           ", and deleting the damaged ones" if any(d for *_, d in problems) else "")
            for bad, _, bad_on_disk in problems:
                if bad_on_disk:
                    try:
                        discard(ckpt_dir, bad)
                    except OSError as e:  # e.g. a read-only directory: the run goes on, as for pruning
                        logger.warning("wmfast train: could not delete the damaged checkpoint %s (%s)", bad, e)
        return state, path
    if problems:
        raise ValueError(f"no checkpoint in {ckpt_dir} loads: {'; '.join(p for _, p, _ in problems)} (delete or repair "
                         "them to resume from an older one, or train into another --out)")
    return None


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
