"""The training loop in this process (1-rank gloo group, DeepSpeed on its CPU accelerator) on the toy task:
training, checkpoints, NaN stop/skip, micro-batch search with an injected OOM, activation checkpointing."""
import json
import math
import os
import shutil

import pytest
import torch

from wmfast.data.checkpoints import list_checkpoints
from wmfast.tasks.toy import ToyTask
from wmfast.train import TrainConfig, train
from wmfast.train.checkpoint import FAULT_ENV
from wmfast.train.runlog import read_jsonl, train_losses

os.environ.setdefault("WMFAST_PROGRESS", "0")


def _cfg(**kw):
    base = {"task": "toy", "steps": 6, "ckpt_every": 3, "val_every": 3, "log_every": 1, "warmup_steps": 2, "lr": 3e-3}
    base.update(kw)
    return TrainConfig.from_name("tiny", **base)


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.requires("deepspeed")
def test_trains_checkpoints_and_logs(tmp_path):
    run = str(tmp_path / "run")
    result = train(_cfg(steps=12, ckpt_every=5, keep_checkpoints=2), str(tmp_path), run, task=ToyTask())
    assert result.status == "done" and result.step == 12
    losses = train_losses(run)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3, losses
    # periodic (5, 10) and final (12) checkpoints, the oldest pruned (keep 2); each complete
    steps = [s for s, _ in list_checkpoints(os.path.join(run, "checkpoints"))]
    assert steps == [10, 12] and result.checkpoint.endswith("step_00000012")
    state = _json(os.path.join(result.checkpoint, "trainer_state.json"))
    assert state["step"] == 12 and state["data_position"]["samples_seen"] == 96
    assert state["lr_schedule"]["peak"] == 3e-3 and state["model_config"]["kind"] == "toy"
    assert os.path.isfile(os.path.join(result.checkpoint, "rng_rank0.pt"))
    records = read_jsonl(os.path.join(run, "metrics.jsonl"))
    train_rec = [r for r in records if r["kind"] == "train"][-1]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb"):
        assert key in train_rec
    assert train_rec["grad_accum"] == 2 and train_rec["grad_norm"] > 0
    assert any(r["kind"] == "val" and "val_loss" in r for r in records)
    # a second run into the same directory without --resume is refused before any work
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_cfg(), str(tmp_path), run, task=ToyTask())


@pytest.mark.requires("deepspeed")
def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "nan_at_step:4")
    run = str(tmp_path / "run")
    result = train(_cfg(), str(tmp_path), run, task=ToyTask())
    assert result.status == "nonfinite"
    assert result.checkpoint.endswith("step_00000003")
    assert [s for s, _ in list_checkpoints(os.path.join(run, "checkpoints"))] == [3]
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "step_00000003" in out


def _weights(run, step):
    path = os.path.join(run, "checkpoints", f"step_{step:08d}", "mp_rank_00_model_states.pt")
    return torch.load(path, weights_only=False)["module"]


@pytest.mark.requires("deepspeed")
def test_nan_skip_policy_leaves_weights_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan_at_step:3")  # step index 3: the 4th optimizer step
    run = str(tmp_path / "run")
    result = train(_cfg(nan_policy="skip", steps=5, ckpt_every=1, keep_checkpoints=9, val_every=0), str(tmp_path),
                   run, task=ToyTask())
    assert result.status == "done" and result.step == 5
    rec = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r["kind"] == "train"]
    assert rec[-1]["skipped_steps"] == 1 and rec[-1]["loss"] == rec[-1]["loss"]  # finite after the skip
    w3, w4, w5 = _weights(run, 3), _weights(run, 4), _weights(run, 5)
    assert all(torch.equal(w3[k], w4[k]) for k in w3)  # the skipped step changed nothing
    assert any(not torch.equal(w4[k], w5[k]) for k in w4)  # and training went on
    optim = torch.load(os.path.join(run, "checkpoints", "step_00000004", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                       weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
    assert all(int(st["step"]) == 3 for st in optim.values())  # AdamW did not count the skipped step


class _OOMAbove(ToyTask):
    """Raises the error CUDA raises when a micro-batch larger than `limit` runs (the injected OOM)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, []

    def loss(self, model, batch):
        n = batch["tokens"].shape[0]
        self.seen.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: micro-batch {n} > {self.limit})")
        return super().loss(model, batch)


@pytest.mark.requires("deepspeed")
def test_auto_micro_batch_with_injected_oom(tmp_path):
    run = str(tmp_path / "run")
    task = _OOMAbove(limit=2)
    result = train(_cfg(micro_batch="auto", steps=2, val_every=0), str(tmp_path), run, task=task)
    assert result.micro_batch == 2 and result.status == "done"
    record = _json(os.path.join(run, "micro_batch.json"))
    assert record["micro_batch"] == 2 and record["grad_accum"] == 4
    assert {t["micro_batch"]: t["fits"] for t in record["trials"]} == {1: True, 2: True, 4: False, 8: False}
    assert [t["error"] for t in record["trials"] if not t["fits"]] == ["out of memory"] * 2
    assert max(task.seen[-8:]) == 2  # training ran at the found size


@pytest.mark.requires("deepspeed")
def test_activation_checkpointing_matches(tmp_path):
    a = train(_cfg(steps=3, ckpt_every=0, val_every=0), str(tmp_path), str(tmp_path / "a"), task=ToyTask())
    b = train(_cfg(steps=3, ckpt_every=0, val_every=0, activation_checkpointing=True), str(tmp_path),
              str(tmp_path / "b"), task=ToyTask())
    la, lb = train_losses(a.run_dir), train_losses(b.run_dir)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision,zero", [("bf16", 1), ("autocast-bf16", 3)])
@pytest.mark.requires("deepspeed")
def test_bf16_modes_train(tmp_path, precision, zero):
    result = train(_cfg(steps=4, ckpt_every=0, val_every=0, precision=precision, zero_stage=zero), str(tmp_path),
                   str(tmp_path / precision), task=ToyTask())
    losses = train_losses(result.run_dir)
    assert result.status == "done" and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.requires("deepspeed")
def test_gpu_compression_auto_micro_batch_bf16(tmp_path):
    from wmfast.data import write_synthetic_dataset

    write_synthetic_dataset(str(tmp_path / "data"), shards=1, frames=1024, grid_size=8, vocab_size=512)
    run = str(tmp_path / "run")
    result = train(TrainConfig.from_name("tiny", micro_batch="auto", steps=20, val_every=20), str(tmp_path / "data"),
                   run)
    assert result.status == "done"
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 0.2
    rec = [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r["kind"] == "train"][-1]
    assert rec["peak_mem_gb"] > 0 and "gpu_util" in rec and rec["mfu"] is not None
    assert _json(os.path.join(run, "micro_batch.json"))["micro_batch"] >= 1


@pytest.mark.requires("deepspeed")
def test_resume_restores_dropout_rng_and_data_order(tmp_path):
    # the toy model has dropout 0.1: a resume that lost the RNG states or the data position would differ
    ref = train(_cfg(steps=6, ckpt_every=3, val_every=0), str(tmp_path), str(tmp_path / "ref"), task=ToyTask())
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000003")
    res = train(_cfg(steps=6, ckpt_every=3, val_every=0), str(tmp_path), str(run), resume=True, task=ToyTask())
    assert res.step == 6
    la, lb = train_losses(ref.run_dir)[3:], train_losses(str(run))
    assert len(lb) == 3
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-6, atol=1e-6)
    # without the RNG states the resumed losses differ (dropout masks change): the check above is not vacuous
    run2 = tmp_path / "no_rng"
    (run2 / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step_00000003", run2 / "checkpoints" / "step_00000003")
    (run2 / "checkpoints" / "step_00000003" / "rng_rank0.pt").unlink()
    train(_cfg(steps=6, ckpt_every=0, val_every=0), str(tmp_path), str(run2), resume=True, task=ToyTask())
    assert train_losses(str(run2)) != la


class _FrozenFirstBlock(ToyTask):
    """A frozen part (as a pretrained base under LoRA): left out of the optimizer and of checkpoints."""

    def build_model(self):
        model = super().build_model()
        model.blocks[0].requires_grad_(False)
        return model


@pytest.mark.requires("deepspeed")
def test_frozen_parameters_not_trained_nor_checkpointed(tmp_path):
    from wmfast.train import param_groups

    task = _FrozenFirstBlock()
    names = [n for g in param_groups(task.build_model(), task, 0.05) for n in g["names"]]
    assert names and not any(n.startswith("blocks.0.") for n in names)
    run = str(tmp_path / "run")
    train(_cfg(steps=3, ckpt_every=2, val_every=0, keep_checkpoints=5), str(tmp_path), run, task=task)
    w2 = _weights(run, 2)
    assert not any(k.startswith("blocks.0.") for k in w2) and "blocks.1.fc1.weight" in w2
    res = train(_cfg(steps=4, ckpt_every=2, val_every=0), str(tmp_path), run, resume=True, task=task)
    assert res.status == "done" and res.step == 4


class _FakeEngine:
    """The slice of a DeepSpeed engine train_step uses: backward, step and the accumulation boundary."""

    def __init__(self, model, optimizer, accum):
        self.model, self.optimizer, self.accum, self.micro = model, optimizer, accum, 0

    def __call__(self, *args):
        return self.model(*args)

    def backward(self, loss):
        loss.backward()

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.accum == 0

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.micro += 1


class _LinearTask:
    def loss(self, model, batch):
        return (model(batch) ** 2).mean()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_train_step_reads_the_nan_flag_once_per_optimizer_step(monkeypatch, policy):
    from wmfast.train.step import NonFiniteLoss, train_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = _FakeEngine(model, optimizer, accum=4)
    batches = [torch.randn(3, 4) for _ in range(4)]
    cfg = _cfg(nan_policy=policy)
    with torch.no_grad():  # the weights change only at the boundary, after every micro-batch's loss
        expected = sum(float((model(b) ** 2).mean()) for b in batches) / 4
    syncs = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: syncs.append(1) or real_cpu(self, *a, **k))
    loss, skipped, _ = train_step(engine, optimizer, _LinearTask(), batches, cfg, 0, torch.device("cpu"), "fp32")
    assert len(syncs) == 1 and not skipped  # 4 micro-batches, one host read
    assert loss == pytest.approx(expected, rel=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setenv(FAULT_ENV, "nan_at_step:1")
    syncs.clear()
    if policy == "stop":
        with pytest.raises(NonFiniteLoss, match="non-finite loss at step 1"):
            train_step(engine, optimizer, _LinearTask(), batches, cfg, 1, torch.device("cpu"), "fp32")
    else:
        loss, skipped, _ = train_step(engine, optimizer, _LinearTask(), batches, cfg, 1, torch.device("cpu"), "fp32")
        assert skipped and math.isnan(loss)
    assert len(syncs) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update from the bad step


def test_validation_runs_in_fp32_under_bf16_autocast_training():
    from wmfast.train.step import val_precision, validate

    seen = []

    class Recording(ToyTask):
        def evaluate(self, model, batch):
            seen.append(torch.is_autocast_enabled("cpu"))
            seen.append(model(batch["tokens"][:, :-1]).dtype)
            return super().evaluate(model, batch)

    task = Recording()
    model = task.build_model()
    model.eval = model.train = lambda *a: model  # validate toggles the engine's mode
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even inside the training step's autocast
        metrics = validate(model, task, _cfg(val_batches=1), 4, 0, 1, torch.device("cpu"), "autocast-bf16")
    assert seen[0] is False and seen[1] == torch.float32 and "val_loss" in metrics
    assert val_precision("autocast-bf16") == "fp32" and val_precision("bf16") == "bf16"
