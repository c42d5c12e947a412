"""ZeRO stage 0 (DeepSpeed's plain data-parallel path: every rank holds the whole model and optimizer, gradients
all-reduced) on one rank with the tiny preset: it trains, checkpoints, resumes exactly, and its checkpoint loads
for evaluation; bf16 weights, which need a ZeRO optimizer's fp32 master copy, are refused before any work."""
import os
import shutil

import pytest
import torch

from wmfast.train import TrainConfig, train
from wmfast.train.runlog import read_jsonl, train_losses

os.environ.setdefault("WMFAST_PROGRESS", "0")


@pytest.mark.requires("deepspeed")
def test_zero0_trains_checkpoints_and_resumes_the_tiny_preset(tmp_path):
    from wmfast.data import write_synthetic_dataset
    from wmfast.models import load_checkpoint

    data = str(tmp_path / "data")
    write_synthetic_dataset(data, shards=1, frames=256, grid_size=8, vocab_size=512)
    # the tiny preset at ZeRO-0; the reference block: the fused block's kernels are slow under the CPU interpreter
    cfg = TrainConfig.from_name("tiny", model="tiny-reference", zero_stage=0, global_batch=4, micro_batch=2,
                                steps=4, ckpt_every=2, val_every=4, val_batches=1)
    ref = train(cfg, data, str(tmp_path / "ref"))
    assert ref.status == "done" and ref.step == 4
    ckpt = os.path.join(ref.run_dir, "checkpoints", "step_00000002")
    # stage 0 keeps the optimizer states in the model states file: no per-rank ZeRO shards
    assert sorted(os.listdir(ckpt)) == ["mp_rank_00_model_states.pt", "rng_rank0.pt", "trainer_state.json"]
    states = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), weights_only=False)
    assert states["ds_config"]["zero_optimization"]["stage"] == 0 and states["optimizer"]["state"]
    records = read_jsonl(os.path.join(ref.run_dir, "metrics.jsonl"))
    assert any(r["kind"] == "val" for r in records)
    assert [r for r in records if r["kind"] == "train"][-1]["grad_norm"] > 0  # stage 0 reports the norm too
    # resuming from step 2 repeats steps 3 and 4 exactly (weights, AdamW moments and data position restored)
    run = tmp_path / "resumed" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copytree(ckpt, run / "step_00000002")
    res = train(cfg, data, str(tmp_path / "resumed"), resume=True)
    assert res.status == "done" and res.step == 4
    torch.testing.assert_close(torch.tensor(train_losses(res.run_dir)), torch.tensor(train_losses(ref.run_dir)[2:]),
                               rtol=1e-6, atol=1e-6)
    model = load_checkpoint(ref.run_dir)  # the newest checkpoint, as generation and evaluation load it
    final = torch.load(os.path.join(ref.checkpoint, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, final[name])


@pytest.mark.requires("deepspeed")
def test_zero0_matches_zero2_step_for_step(tmp_path):
    """Same losses and the same (clipped-at-1.0) gradient norms in the log: stage 0 reports the norm it clips by."""
    from wmfast.tasks.toy import ToyTask

    runs = {}
    for zero in (0, 2):
        cfg = TrainConfig.from_name("tiny", task="toy", steps=3, ckpt_every=0, val_every=0, zero_stage=zero,
                                    grad_clip=0.5)
        result = train(cfg, str(tmp_path), str(tmp_path / f"zero{zero}"), task=ToyTask())
        runs[zero] = [(r["loss"], r["grad_norm"]) for r in read_jsonl(os.path.join(result.run_dir, "metrics.jsonl"))
                      if r["kind"] == "train"]
    assert len(runs[0]) == 3 and all(gn is not None and gn > 0 for _, gn in runs[0])
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[2]), rtol=1e-5, atol=1e-6)


def test_zero0_refuses_bf16_weights():
    with pytest.raises(ValueError, match="needs zero_stage >= 1.*autocast-bf16"):
        TrainConfig.from_name("tiny", zero_stage=0, precision="bf16").validate(1)
    TrainConfig.from_name("tiny", zero_stage=0, precision="autocast-bf16").validate(1)
    TrainConfig.from_name("tiny", zero_stage=1, precision="bf16").validate(1)


def test_zero3_engine_leaves_torch_linear_alone(tmp_path):
    """DeepSpeed's ZeRO-3 memory_efficient_linear replaces torch.nn.functional.linear for the whole process (and
    keeps it after the engine is gone), which changed the numerics of every later model in the process: wmfast's
    config turns it off, and destroy_engine undoes a user override's replacement."""
    import torch.nn.functional as F

    from wmfast.tasks.toy import ToyTask
    from wmfast.train.config import TrainConfig, deepspeed_config
    from wmfast.train.distributed import setup_distributed
    from wmfast.train.engine import build_engine, destroy_engine

    assert deepspeed_config(TrainConfig(zero_stage=3), 1, 1, "fp32")["zero_optimization"]["memory_efficient_linear"] \
        is False
    setup_distributed()
    task = ToyTask()
    for override in ({}, {"zero_optimization": {"memory_efficient_linear": True}}):
        cfg = TrainConfig(task="toy", zero_stage=3, global_batch=1, micro_batch=1, precision="fp32",
                          deepspeed_override=override)
        engine, _, _ = build_engine(task, cfg, 1, 1, torch.device("cpu"), "fp32")
        destroy_engine(engine)
        assert F.linear is torch._C._nn.linear, override
