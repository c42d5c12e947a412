"""Checkpoint faults, in this process on the toy task unless a real SIGKILL is needed: deletion that a kill cannot
leave half-done, leftovers and an unpruned checkpoint cleaned at the start of a run, a full or read-only disk
reported with its errno, a damaged newest checkpoint skipped for the previous one, a resume into a run of
another model refused, nan_policy "skip" capped by nan_skip_limit, and numeric config fields checked by name."""
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from wmfast.data.checkpoints import checkpoint_problem, incomplete_checkpoints, list_checkpoints
from wmfast.tasks.toy import ToyTask
from wmfast.train import TrainConfig, train
from wmfast.train import checkpoint as ckpt
from wmfast.train.checkpoint import FAULT_ENV, CheckpointWriteError
from wmfast.train.runlog import train_losses

os.environ.setdefault("WMFAST_PROGRESS", "0")
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def _cfg(**kw):
    base = {"task": "toy", "steps": 6, "ckpt_every": 2, "keep_checkpoints": 3, "val_every": 0, "log_every": 1,
            "warmup_steps": 2, "lr": 3e-3}
    base.update(kw)
    return TrainConfig.from_name("tiny", **base)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """An uninterrupted run: checkpoints at steps 2, 4 and 6, and the loss of every step."""
    root = tmp_path_factory.mktemp("ref")
    result = train(_cfg(), str(root), str(root / "run"), task=ToyTask())
    assert result.status == "done"
    return {"run": root / "run", "losses": train_losses(str(root / "run"))}


def _copy(ref, run, *steps):
    for step in steps:
        tag = f"step_{step:08d}"
        shutil.copytree(ref["run"] / "checkpoints" / tag, run / "checkpoints" / tag)
    return run / "checkpoints"


def _steps(ckpt_dir):
    return [s for s, _ in list_checkpoints(str(ckpt_dir))]


def _tmp_entries(ckpt_dir):
    """Checkpoints being written or deleted (DeepSpeed also copies its zero_to_fp32.py scripts there)."""
    return sorted(n for n in os.listdir(ckpt_dir / ".tmp") if n.startswith(("step_", "discard-")))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _assert_losses_match(run, ref, first_step):
    got, want = train_losses(str(run)), ref["losses"][first_step:]
    torch.testing.assert_close(torch.tensor(got[-len(want):]), torch.tensor(want), rtol=1e-6, atol=1e-6)


# ---- deletion and leftovers --------------------------------------------------------------------------------
def test_a_deletion_interrupted_half_way_leaves_no_partial_step_directory(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (1, 2):
        d = ckpt_dir / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / MODEL).write_bytes(b"x" * 10)
        (d / "trainer_state.json").write_text("{}")
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *a, **k):  # removes one file, then the process "dies"
        if not os.path.exists(path):
            return
        os.remove(os.path.join(path, MODEL))
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(str(ckpt_dir), keep=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert _steps(ckpt_dir) == [2] and not incomplete_checkpoints(str(ckpt_dir))
    assert os.listdir(ckpt_dir / ".tmp") == ["discard-step_00000001"]  # the half-removed one, out of sight
    assert ckpt.remove_leftovers(str(ckpt_dir)) and not (ckpt_dir / ".tmp").exists()


@pytest.mark.slow  # a process of its own: ~10 s, most of it importing DeepSpeed
@pytest.mark.requires("deepspeed")
def test_kill_while_pruning_then_resume_cleans_up_and_matches(tmp_path, ref):
    """A real SIGKILL after the oldest checkpoint was moved out and before it was removed; the resumed run
    removes it and matches the uninterrupted one."""
    run = tmp_path / "run"
    script = ("import sys; from wmfast.tasks.toy import ToyTask; from wmfast.train import TrainConfig, train; "
              "train(TrainConfig.from_name('tiny', task='toy', steps=6, ckpt_every=2, keep_checkpoints=1, "
              "val_every=0, log_every=1, warmup_steps=2, lr=3e-3), sys.argv[1], sys.argv[2], task=ToyTask())")
    env = {**os.environ, FAULT_ENV: "kill_in_prune:4", "WMFAST_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(run)], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == -9, r.stderr[-3000:]
    ckpt_dir = run / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == [".tmp", "step_00000004"]  # step 2 is out of the listing already
    assert _tmp_entries(ckpt_dir) == ["discard-step_00000002"]
    result = train(_cfg(keep_checkpoints=1), str(tmp_path), str(run), resume=True, task=ToyTask())
    assert result.status == "done" and _steps(ckpt_dir) == [6] and _tmp_entries(ckpt_dir) == []
    _assert_losses_match(run, ref, 4)


@pytest.mark.requires("deepspeed")
def test_resume_removes_leftovers_and_prunes_to_keep(tmp_path, ref):
    """A kill between a save and its pruning leaves keep + 1 checkpoints; killed saves and in-place deletions
    (of earlier versions) leave `.tmp` entries and `step_*` directories without trainer_state.json."""
    run = tmp_path / "run"
    ckpt_dir = _copy(ref, run, 2, 4, 6)
    half_deleted = ckpt_dir / "step_00000008"
    shutil.copytree(ckpt_dir / "step_00000006", half_deleted)
    (half_deleted / "trainer_state.json").unlink()
    (ckpt_dir / ".tmp" / "step_00000008").mkdir(parents=True)
    (ckpt_dir / ".tmp" / "step_00000008" / MODEL).write_bytes(b"partial")
    result = train(_cfg(keep_checkpoints=2), str(tmp_path), str(run), resume=True, task=ToyTask())
    assert result.step == 6 and result.checkpoint.endswith("step_00000006")
    assert sorted(os.listdir(ckpt_dir)) == [".tmp", "step_00000004", "step_00000006"]
    assert _tmp_entries(ckpt_dir) == []


# ---- write errors ------------------------------------------------------------------------------------------
class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (the OSError inside torch's zip writer)."""

    def __init__(self, path, room):
        self.f, self.room = open(path, "wb"), room  # noqa: SIM115 - closed by __exit__

    def write(self, data):
        if self.room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _disk_full_at_step_4(monkeypatch):
    real = ckpt._open_for_write
    monkeypatch.setattr(ckpt, "_open_for_write",
                        lambda p: _FullDisk(p, 4096) if "step_00000004" in p else real(p))


def _read_only_at_step_4(monkeypatch):
    real = os.makedirs

    def makedirs(path, *a, **k):
        if "step_00000004" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt.os, "makedirs", makedirs)


@pytest.mark.parametrize("inject,code,cause,raw", [
    (_disk_full_at_step_4, errno.ENOSPC, "no space left on device (ENOSPC)", "unexpected pos"),  # torch's zip writer
    (_read_only_at_step_4, errno.EROFS, "read-only file system (EROFS)", "Read-only file system"),
], ids=["disk-full-mid-file", "read-only"])
@pytest.mark.requires("deepspeed")
def test_a_refused_write_names_its_cause_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, inject, code, cause,
                                                                       raw):
    inject(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as info:
        train(_cfg(), str(tmp_path), str(run), task=ToyTask())
    ckpt_dir = run / "checkpoints"
    assert isinstance(info.value, OSError) and info.value.errno == code and raw in str(info.value.__cause__)
    assert str(info.value) == (f"{cause} while writing checkpoint step_00000004 to {ckpt_dir} (the last complete "
                               "checkpoint step_00000002 is intact)")
    assert _steps(ckpt_dir) == [2] and checkpoint_problem(str(ckpt_dir / "step_00000002")) is None
    assert _tmp_entries(ckpt_dir) == []  # the partial one is gone


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
@pytest.mark.requires("deepspeed")
def test_a_read_only_checkpoint_directory_is_reported(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match=r"^permission denied \(EACCES\) while writing checkpoint "
                           r"step_00000002 to .* \(no complete checkpoint was written before it\)$"):
            train(_cfg(), str(tmp_path), str(run), task=ToyTask())
    finally:
        (run / "checkpoints").chmod(0o755)


# ---- damaged checkpoints -----------------------------------------------------------------------------------
def _drop_manifest(ckpt_path):
    """trainer_state.json as written before manifests existed."""
    state_file = ckpt_path / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["files"]
    state_file.write_text(json.dumps(state))


def _cut_optimizer_file(ckpt_path):
    _truncate(ckpt_path / OPTIM)
    return f"{ckpt_path / OPTIM} has "


def _optimizer_file_gone_no_manifest(ckpt_path):  # found only by loading it: after the weights were loaded
    _drop_manifest(ckpt_path)
    (ckpt_path / OPTIM).unlink()
    return f"{ckpt_path} does not load (FileNotFoundError: "


@pytest.mark.parametrize("damage", [_cut_optimizer_file, _optimizer_file_gone_no_manifest],
                         ids=["cut-file", "missing-file-found-by-loading"])
@pytest.mark.requires("deepspeed")
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, ref, caplog, damage):
    run = tmp_path / "run"
    ckpt_dir = _copy(ref, run, 2, 4)
    problem = damage(ckpt_dir / "step_00000004")
    with caplog.at_level(logging.WARNING, logger="wmfast"):
        result = train(_cfg(), str(tmp_path), str(run), resume=True, task=ToyTask())
    warnings = [r.getMessage() for r in caplog.records if "do not load" in r.getMessage()]
    assert len(warnings) == 1 and problem in warnings[0], warnings
    assert f"resuming from {ckpt_dir / 'step_00000002'} instead" in warnings[0]
    assert result.status == "done" and _steps(ckpt_dir) == [2, 4, 6]
    assert checkpoint_problem(str(ckpt_dir / "step_00000004")) is None  # rewritten whole
    _assert_losses_match(run, ref, 2)  # bit-for-bit the uninterrupted run from step 3 on


@pytest.mark.requires("deepspeed")
def test_no_loadable_checkpoint_is_a_value_error_naming_the_files(tmp_path, ref):
    run = tmp_path / "run"
    ckpt_dir = _copy(ref, run, 2, 4)
    _truncate(ckpt_dir / "step_00000004" / MODEL)
    _drop_manifest(ckpt_dir / "step_00000002")  # found by its zip archive having no end
    _truncate(ckpt_dir / "step_00000002" / OPTIM)
    with pytest.raises(ValueError, match="no checkpoint in .* loads") as info:
        train(_cfg(), str(tmp_path), str(run), resume=True, task=ToyTask())
    message = str(info.value)
    assert str(ckpt_dir / "step_00000004" / MODEL) in message and str(ckpt_dir / "step_00000002" / OPTIM) in message
    assert "\n" not in message and _steps(ckpt_dir) == [2, 4]  # nothing deleted


@pytest.mark.requires("deepspeed")
def test_resume_with_another_model_is_refused_before_loading(tmp_path, ref):
    run = tmp_path / "run"
    _copy(ref, run, 6)
    (run / "config.json").write_text("{}")
    with pytest.raises(ValueError) as info:
        train(_cfg().replace(name="wide"), str(tmp_path), str(run), resume=True, task=ToyTask(d=48))
    assert str(info.value) == (f"{run} holds a checkpoint of tiny (task toy, model tiny); this run is wide (task toy, "
                               "model tiny) (d 32 vs 48) (use another --out, or the same --config)")
    assert (run / "config.json").read_text() == "{}"  # the run's record is untouched


# ---- NaN skips ---------------------------------------------------------------------------------------------
class _NanFromStep2(ToyTask):
    """Every loss from the 3rd optimizer step on is NaN (2 micro-batches per step)."""

    calls = 0

    def loss(self, model, batch):
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * float("nan") if self.calls > 4 else loss


@pytest.mark.requires("deepspeed")
def test_nan_skip_stops_after_nan_skip_limit_steps_in_a_row(tmp_path, capsys):
    run = tmp_path / "run"
    result = train(_cfg(nan_policy="skip", nan_skip_limit=2), str(tmp_path), str(run), task=_NanFromStep2())
    out = capsys.readouterr().out
    assert result.status == "nonfinite" and out.count("step skipped") == 2  # steps 2 and 3; step 4 stops
    assert "non-finite loss at step 4" in out and "nan_skip_limit=2 is reached" in out and "raise nan_skip_limit" in out
    assert result.checkpoint.endswith("step_00000004")


class _NanAlways(ToyTask):
    def loss(self, model, batch):
        return super().loss(model, batch) * float("nan")


@pytest.mark.requires("deepspeed")
def test_the_skips_in_a_row_carry_over_a_resume(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _cfg(nan_policy="skip", nan_skip_limit=2, ckpt_every=1)
    assert train(cfg.replace(steps=3), str(tmp_path), str(run), task=_NanFromStep2()).status == "done"
    assert capsys.readouterr().out.count("step skipped") == 1  # step 2, the last before the checkpoint
    result = train(cfg, str(tmp_path), str(run), resume=True, task=_NanAlways())
    out = capsys.readouterr().out
    assert result.status == "nonfinite" and out.count("step skipped") == 1  # step 3: the second in a row
    assert "non-finite loss at step 4" in out and "nan_skip_limit=2 is reached" in out


# ---- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,message", [
    ({"lr": -1.0}, "lr=-1.0 must be > 0"),
    ({"lr": float("nan")}, "lr=nan must be finite and > 0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0 must be >= 1"),
    ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
    ({"ckpt_every": -5}, "ckpt_every=-5 must be >= 0"),
    ({"val_every": -1}, "val_every=-1 must be >= 0"),
    ({"log_every": 0}, "log_every=0 must be >= 1"),
    ({"global_batch": 0}, "global_batch=0 must be >= 1"),
    ({"micro_batch": 0}, "micro_batch=0 must be >= 1 or 'auto'"),
    ({"nan_skip_limit": 0}, "nan_skip_limit=0 must be >= 1"),
    ({"steps": 2.5}, "steps=2.5 must be an integer >= 1"),
], ids=["lr-negative", "lr-nan", "keep", "warmup", "ckpt-every", "val-every", "log-every", "global-batch",
        "micro-batch", "nan-skip-limit", "steps-not-int"])
def test_numeric_fields_are_checked_by_name(changes, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TrainConfig.from_name("tiny", **changes).validate(1)
