"""Training configuration, LR schedule, weight-decay grouping, micro-batch search logic, data sharding, CLI
errors: fast unit tests (no DeepSpeed engine)."""
import gc
import json
import weakref

import pytest
import torch

from wmfast.tasks.toy import ToyTask
from wmfast.train import TrainConfig, deepspeed_config, lr_at, microbatch, param_groups
from wmfast.train.sampler import StepBatchSampler, val_batches


def test_lr_schedule_values():
    # 1x-compression recipe: peak 8e-4, 2000 warm-up steps, linear decay to 0 at the last step
    cfg = TrainConfig.from_name("1x-compression")
    assert (cfg.lr, cfg.warmup_steps) == (8e-4, 2000)
    peak, w, n = cfg.lr, cfg.warmup_steps, cfg.steps
    assert lr_at(0, peak, w, n) == pytest.approx(8e-4 / 2000)
    assert lr_at(999, peak, w, n) == pytest.approx(8e-4 * 1000 / 2000)
    assert lr_at(1999, peak, w, n) == pytest.approx(8e-4)
    assert lr_at(2000, peak, w, n) == pytest.approx(8e-4)
    mid = w + (n - w) // 2
    assert lr_at(mid, peak, w, n) == pytest.approx(8e-4 * (n - mid) / (n - w))
    assert lr_at(n - 1, peak, w, n) == pytest.approx(8e-4 / (n - w))
    assert lr_at(n, peak, w, n) == 0.0
    # small exact table
    assert [lr_at(s, 1.0, 2, 6) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        lr_at(-1, 1.0, 2, 6)


def test_weight_decay_groups_exact():
    task = ToyTask()
    model = task.build_model()
    decay, no_decay = param_groups(model, task, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # matrices decay (the tied embedding/head appears once); biases, norm gains, position embeddings do not
    assert sorted(decay["names"]) == sorted(
        ["tok_emb.weight"] + [f"blocks.{i}.{fc}.weight" for i in range(2) for fc in ("fc1", "fc2")])
    assert sorted(no_decay["names"]) == sorted(
        ["pos_emb", "norm.weight", "norm.bias"]
        + [f"blocks.{i}.{n}" for i in range(2) for n in ("norm.weight", "norm.bias", "fc1.bias", "fc2.bias")])
    n_params = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_presets_and_registry():
    cfg = TrainConfig.from_name("1x-compression")
    assert cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.05 and cfg.global_batch == 160
    assert TrainConfig.from_name("tiny", steps=3).steps == 3
    with pytest.raises(ValueError, match="unknown training preset 'nope'.*1x-compression"):
        TrainConfig.from_name("nope")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_name("tiny", stepz=3)
    d = cfg.to_dict()
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize("changes,world,match", [
    ({"global_batch": 8, "micro_batch": 3}, 1, "does not divide the per-rank batch 8"),
    ({"global_batch": 8, "micro_batch": 4}, 3, "multiple of the world size 3"),
    ({"global_batch": 8, "micro_batch": 3}, 2, "does not divide the per-rank batch 4"),
    ({"zero_stage": 4}, 1, "zero_stage"),
    ({"precision": "fp8"}, 1, "precision"),
    ({"nan_policy": "ignore"}, 1, "nan_policy"),
    ({"micro_batch": 0}, 1, "micro_batch"),
], ids=["mb-not-dividing", "world", "mb-per-rank", "zero", "precision", "nan", "mb-zero"])
def test_bad_config(changes, world, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_name("tiny", **changes).validate(world)


def test_deepspeed_json_from_dataclass_and_override():
    cfg = TrainConfig.from_name("1x-compression", zero_stage=3, deepspeed_override={
        "zero_optimization": {"stage3_param_persistence_threshold": 0}, "gradient_clipping": 0.5})
    ds = deepspeed_config(cfg, micro_batch=10, world_size=8, precision="bf16")
    assert ds["train_batch_size"] == 160 and ds["train_micro_batch_size_per_gpu"] == 10
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3  # kept from the generated config
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # merged from the override
    assert ds["gradient_clipping"] == 0.5  # the user's value wins
    assert ds["bf16"] == {"enabled": True}
    assert "optimizer" not in ds and "scheduler" not in ds  # client torch AdamW + our schedule: no JIT ops
    assert "bf16" not in deepspeed_config(cfg, 10, 8, "fp32")


def _fake_trial(limit, calls, capacity=10_000):
    def body(m):
        calls.append(m)
        if m > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return m * 100, capacity  # peak bytes grow with m
    return body


@pytest.mark.parametrize("limit,expected", [(5, 4), (1, 1), (12, 12), (7, 6)])
def test_microbatch_search_with_injected_oom(limit, expected):
    calls = []
    body = _fake_trial(limit, calls)
    cands = microbatch.divisors(12)  # [1, 2, 3, 4, 6, 12]
    found, trials = microbatch.search(cands, lambda m: microbatch.run_trial(m, body, margin=0.0))
    assert found == expected
    assert any(not t.fits and t.error == "out of memory" for t in trials) == (limit < 12)
    assert len(calls) <= 5  # gallop + bisect, not a linear scan


def test_microbatch_search_margin_and_errors():
    # peak = 100 m bytes of 1000: with a 30% margin the limit is 700 bytes -> 6 fits (600), 12 does not
    found, trials = microbatch.search(microbatch.divisors(12),
                                      lambda m: microbatch.run_trial(m, _fake_trial(99, [], 1000), margin=0.3))
    assert found == 6 and any(t.micro_batch == 12 and "capacity" in t.error for t in trials)
    with pytest.raises(RuntimeError, match="even 1 does not fit"):
        microbatch.search([1, 2], lambda m: microbatch.run_trial(m, _fake_trial(0, []), 0.0))

    def broken(m):
        raise RuntimeError("shape mismatch")  # not an OOM: must surface, not be taken as "does not fit"
    with pytest.raises(RuntimeError, match="shape mismatch"):
        microbatch.run_trial(1, broken, 0.0)


def test_microbatch_oom_memory_is_freed_after_the_exception_is_released(monkeypatch):
    # on a GPU, empty_cache() can only return the failed trial's activations once nothing references them; the
    # exception being handled keeps its traceback (and the trial's frames) alive for the whole except block
    refs, seen = [], []

    def body(m):
        activations = torch.zeros(1000)
        refs.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def recording_free():
        gc.collect()
        seen.append(refs[-1]() is None)

    monkeypatch.setattr(microbatch, "free_memory", recording_free)
    trial = microbatch.run_trial(4, body, 0.0)
    assert not trial.fits and trial.error == "out of memory"
    assert seen == [True], "free_memory ran while the failed trial's tensors were still referenced"


def test_step_sampler_is_deterministic_and_shards():
    s0 = StepBatchSampler(50, global_batch=8, micro_batch=2, rank=0, world_size=2, seed=3, start_step=0, steps=20)
    s1 = StepBatchSampler(50, global_batch=8, micro_batch=2, rank=1, world_size=2, seed=3, start_step=0, steps=20)
    steps0, steps1 = [s0.step_indices(s) for s in range(20)], [s1.step_indices(s) for s in range(20)]
    # ranks get disjoint samples; an epoch (50 samples) covers every index once
    flat = [i for st in zip(steps0, steps1) for r in st for mb in r for i in mb]
    assert sorted(flat[:48]) == sorted(set(flat[:48])) and set(flat[:50]) == set(range(50))
    # resuming at step 7 yields exactly the micro-batches of the uninterrupted order
    resumed = StepBatchSampler(50, 8, 2, 0, 2, 3, start_step=7, steps=20)
    assert list(resumed) == [mb for st in steps0[7:] for mb in st]
    # the samples of a step do not depend on the micro-batch size
    other = StepBatchSampler(50, 8, 4, 0, 2, 3, 0, 20)
    assert [[i for mb in st for i in mb] for st in (other.step_indices(s) for s in range(20))] == \
        [[i for mb in st for i in mb] for st in steps0]
    assert val_batches(10, 2, 1, 2, 9) == [[2, 3], [6, 7]]


def test_cli_bad_config_fails_before_work(tmp_path, capsys):
    from wmfast.cli import main

    out = tmp_path / "run"
    cases = [(["--config", "nope", "--data", str(tmp_path)], "unknown training preset"),
             (["--config", "tiny", "--data", str(tmp_path / "missing")], "does not exist"),
             (["--config", "tiny", "--data", str(tmp_path), "--micro-batch", "3"], "does not divide"),
             (["--config", "tiny", "--data", str(tmp_path), "--task", "nope"], "unknown task")]
    for args, message in cases:
        assert main(["train", *args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()  # nothing was started


def test_compression_task_groups_match_the_model(tmp_path):
    # the real ST-Transformer: decay exactly on the matrices the model does not list as no-decay
    from wmfast.data import write_synthetic_dataset
    from wmfast.tasks.compression import CompressionTask

    write_synthetic_dataset(str(tmp_path), shards=1, frames=256, grid_size=8, vocab_size=512)
    task = CompressionTask(str(tmp_path), "tiny")
    model = task.build_model()
    decay, no_decay = param_groups(model, task, 0.05)
    assert set(no_decay["names"]) == model.no_weight_decay_names()
    assert {"pos_s", "pos_t", "tok_emb.weight"} & set(decay["names"]) == {"tok_emb.weight"}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert task.flops_per_sample() > 0 and task.tokens_per_sample() == 5 * 64
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    assert torch.isfinite(task.loss(model, batch))
    metrics = task.evaluate(model.eval(), batch)
    assert set(metrics) == {"ce", "top500_ce"} and all(0 < v < 20 for v in metrics.values())
    with pytest.raises(ValueError, match="8x8 token grids but the model preset '1x-compression' expects 32x32"):
        CompressionTask(str(tmp_path), "1x-compression")


def test_validation_off_is_warned_once_on_rank_0(tmp_path, caplog):
    import logging
    import shutil

    from wmfast.data import write_synthetic_dataset
    from wmfast.tasks.compression import CompressionTask
    from wmfast.train.loop import _warn_if_validation_off

    cfg = TrainConfig.from_name("tiny", task="toy", val_every=3)
    task = ToyTask()  # 64 val samples
    with caplog.at_level(logging.WARNING, logger="wmfast"):
        _warn_if_validation_off(task, cfg, micro_batch=4, world=2, rank=0)
        assert not caplog.records  # 64 >= 4 x 2: validation runs, nothing to say
        _warn_if_validation_off(task, cfg, micro_batch=40, world=2, rank=1)
        assert not caplog.records  # rank 0 speaks for everyone
        _warn_if_validation_off(task, cfg, micro_batch=40, world=2, rank=0)
        assert len(caplog.records) == 1 and "validation is off" in caplog.text and "64 samples" in caplog.text
        _warn_if_validation_off(task, cfg.replace(val_every=0), micro_batch=40, world=2, rank=0)
        assert len(caplog.records) == 1  # the user turned validation off: no warning
        caplog.clear()
        paths = write_synthetic_dataset(str(tmp_path), shards=1, frames=256, grid_size=8, vocab_size=512)
        shutil.rmtree(paths["val"])
        no_val = CompressionTask(str(tmp_path), "tiny")
        assert no_val.val_dataset() is None
        _warn_if_validation_off(no_val, cfg, micro_batch=1, world=1, rank=0)
        assert len(caplog.records) == 1 and "no val split" in caplog.text


def test_mfu_is_against_the_datasheet_peak(monkeypatch):
    from wmfast.train.runlog import PEAK_ENV, mfu

    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert mfu(1e12, torch.device("cpu")) is None  # no datasheet peak for a CPU: no MFU rather than a wrong one
    monkeypatch.setenv(PEAK_ENV, "400")
    assert mfu(100e12, torch.device("cpu")) == pytest.approx(0.25)
    assert mfu(100e12, torch.device("cpu"), devices=2) == pytest.approx(0.125)


def test_loss_reduction_mean_or_sum_over_future_grids(tmp_path):
    import argparse

    from wmfast.cli.train import add_arguments, config_from_args
    from wmfast.data import write_synthetic_dataset
    from wmfast.models import compression_loss
    from wmfast.tasks.compression import CompressionTask

    write_synthetic_dataset(str(tmp_path), shards=1, frames=256, grid_size=8, vocab_size=512)
    task = CompressionTask(str(tmp_path), "tiny")
    torch.manual_seed(0)
    model = task.build_model().eval()
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    grads = {}
    for reduction in ("mean", "sum"):
        task.configure(TrainConfig.from_name("tiny", loss_reduction=reduction))
        model.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        grads[reduction] = (float(loss.detach()), model.tok_emb.weight.grad.clone())
    # "sum" = the 3 future grids' mean CEs summed: 3x "mean" (each grid has the same number of tokens)
    _, metrics = compression_loss(model, batch)
    per_grid = [float(metrics[f"ce_future_{i}"]) for i in range(3)]
    assert grads["mean"][0] == pytest.approx(sum(per_grid) / 3, rel=1e-5)
    assert grads["sum"][0] == pytest.approx(sum(per_grid), rel=1e-5)
    torch.testing.assert_close(grads["sum"][1], 3 * grads["mean"][1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="loss_reduction"):
        TrainConfig.from_name("tiny", loss_reduction="max").validate(1)
    with pytest.raises(ValueError, match="future_reduction"):
        compression_loss(model, batch, future_reduction="max")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--config", "tiny", "--loss-reduction", "sum"])
    assert config_from_args(args).loss_reduction == "sum"
    assert TrainConfig.from_name("1x-compression").loss_reduction == "mean"
