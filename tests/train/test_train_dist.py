"""Two ranks (gloo, torch.distributed.run) training the tiny ST-Transformer on a synthetic 1X set with DeepSpeed
ZeRO-2 and ZeRO-3, and crash safety: a run SIGKILLed while writing a checkpoint resumes from the previous one
and replays the steps after it exactly as they ran before the kill. Each case is a few short multi-process runs
(DeepSpeed's JIT ops are never built: see docs/training.md)."""
import json
import os
import subprocess
import sys

import pytest

from wmfast.data.checkpoints import list_checkpoints
from wmfast.train.checkpoint import FAULT_ENV
from wmfast.train.runlog import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.requires("deepspeed")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from wmfast.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(str(root), shards=1, frames=1024, seed=0, grid_size=8, vocab_size=512)
    return root


def _launch(data_dir, run, *extra, ranks=2, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone",
           "-m", "wmfast.train", "--config", "tiny", "--data", str(data_dir),
           "--out", str(run), "--log-every", "1", *extra]
    full_env = {**os.environ, "WMFAST_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    if FAULT_ENV not in (env or {}):
        full_env.pop(FAULT_ENV, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full_env, check=False)


def _losses(run):
    by_step = {}
    for r in read_jsonl(os.path.join(run, "metrics.jsonl")):
        if r["kind"] == "train":
            by_step[r["step"]] = r["loss"]  # a resumed run logs the replayed steps again: the last one counts
    return [by_step[s] for s in sorted(by_step)]


def test_zero3_two_ranks_loss_falls(tmp_path, data_dir):
    override = tmp_path / "ds.json"  # partition every parameter (tiny ones otherwise stay whole on each rank)
    override.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    run = tmp_path / "z3"
    r = _launch(data_dir, run, "--zero", "3", "--steps", "8", "--val-every", "8", "--deepspeed-config", str(override))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = _losses(run)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2, losses
    with open(run / "config.json") as f:
        cfg = json.load(f)
    assert cfg["world_size"] == 2 and cfg["deepspeed"]["zero_optimization"]["stage"] == 3
    assert cfg["deepspeed"]["gradient_accumulation_steps"] == 1  # 8 = 4 per rank x 2 ranks
    assert "built successfully" not in r.stdout + r.stderr  # no DeepSpeed op was JIT-compiled
    val = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r["kind"] == "val"]
    assert val and {"val_ce", "val_top500_ce"} <= set(val[-1])
    _check_zero3_checkpoint_loads(run, data_dir, val[-1])


def _check_zero3_checkpoint_loads(run, data_dir, last_val):
    """The ZeRO-3 model states file holds empty placeholders: load_checkpoint must rebuild the weights from the
    ranks' fp32 partitions. Proof that they are the engine's weights: the loaded model, evaluated alone on the
    same val batches the 2 ranks used at the last step (the final checkpoint's step), gives the logged val CE."""
    import torch

    from wmfast.models import load_checkpoint
    from wmfast.tasks import make_task
    from wmfast.train.sampler import val_batches

    model = load_checkpoint(str(run)).eval()
    step, ckpt_path = list_checkpoints(str(run / "checkpoints"))[-1]
    assert step == last_val["step"] == 8
    with open(os.path.join(ckpt_path, "trainer_state.json")) as f:
        state = json.load(f)
    task = make_task("compression", str(data_dir), "tiny")
    dataset, cfg = task.val_dataset(), state["train_config"]
    batches = [idx for rank in range(2) for idx in val_batches(len(dataset), state["micro_batch"], rank, 2,
                                                                  cfg["val_batches"])]
    assert batches
    ce = sum(task.evaluate(model, task.collate([dataset[i] for i in idx]))["ce"] for idx in batches) / len(batches)
    assert abs(ce - last_val["val_ce"]) <= 1e-4 * max(1.0, ce), (ce, last_val)
    ctx = torch.stack([dataset[0]["tokens"][:3]])
    generated = model.generate(ctx, torch.stack([dataset[0]["states"]]), num_frames=3)
    assert generated.shape == (1, 3, *ctx.shape[2:])


def test_zero2_two_ranks_kill_and_resume_matches(tmp_path, data_dir):
    args = ("--zero", "2", "--steps", "8", "--ckpt-every", "3", "--keep", "5", "--val-every", "0",
            "--micro-batch", "2")  # 2 ranks x 2 micro-batches of 2 = global batch 8
    run = tmp_path / "killed"
    # every rank SIGKILLs itself after writing the step-6 checkpoint's files but before it is published
    r = _launch(data_dir, run, *args, env={FAULT_ENV: "kill_in_checkpoint:6"})
    assert r.returncode != 0
    ckpt_dir = run / "checkpoints"
    assert [s for s, _ in list_checkpoints(str(ckpt_dir))] == [3]  # the half-written one is not a checkpoint
    assert (ckpt_dir / ".tmp" / "step_00000006").is_dir()
    uninterrupted = _losses(run)  # steps 1-6 ran before the kill, as in a run that is never killed
    assert len(uninterrupted) == 6

    r = _launch(data_dir, run, *args, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step_00000003" in r.stdout
    resumed = _losses(run)  # steps 4-8 recomputed from the step-3 checkpoint replace the killed run's 4-6
    assert len(resumed) == 8 and resumed[-1] < resumed[0] - 0.2, resumed
    for step in range(4, 7):
        a, b = resumed[step - 1], uninterrupted[step - 1]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step}: resumed {a} vs uninterrupted {b}"
    assert [s for s, _ in list_checkpoints(str(ckpt_dir))] == [3, 6, 8]
