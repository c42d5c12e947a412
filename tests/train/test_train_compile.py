"""Regional torch.compile (`wmfast train --compile`): each block compiled on its own, with no graph break, composed
with activation checkpointing and every ZeRO stage, checkpoint keys unchanged, and the tiny preset end to end."""
import functools
import json
import os

import pytest
import torch

from wmfast.modules.compile import compile_blocks
from wmfast.tasks.toy import ToyLM, ToyTask
from wmfast.train import TrainConfig, train
from wmfast.train import engine as engine_mod
from wmfast.train.engine import compile_fullgraph, enable_activation_checkpointing
from wmfast.train.runlog import train_losses

os.environ.setdefault("WMFAST_PROGRESS", "0")


@pytest.mark.parametrize("ac", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("block", ["fused", "reference"])
def test_st_block_compiles_as_one_graph(block, ac):
    """torch.compile(fullgraph=True) raises on any graph break. aot_eager traces the same forward and backward
    graphs as Inductor without its (slow on 2 CPU cores) code generation; Inductor runs in the end-to-end test."""
    from wmfast.models.st_transformer.config import STTransformerConfig
    from wmfast.models.st_transformer.model import Block

    torch._dynamo.reset()
    c = STTransformerConfig.from_name("tiny", block=block)
    model = Block(c)
    if ac:
        enable_activation_checkpointing([model])
    x = torch.randn(2, c.num_frames, c.seq_len, c.d_model, requires_grad=True)
    ref = model(x)
    g_ref = torch.autograd.grad(ref.sum(), [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    g = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_compiled_blocks_keep_their_parameter_names():
    eager, compiled = ToyLM(), ToyLM()
    compile_blocks(list(compiled.blocks), backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod." anywhere
    assert compiled.load_state_dict(eager.state_dict()) is not None
    with pytest.raises(ValueError, match="no blocks"):
        compile_blocks([])
    assert compile_fullgraph(2) and not compile_fullgraph(3)


class _NoDropout(ToyTask):
    """Compiled and eager runs compared step by step: no dropout, whose masks the two draw differently."""

    def build_model(self):
        return ToyLM(self.vocab, self.seq, self.d, dropout=0.0)


@pytest.mark.requires("deepspeed")
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_compile_composes_with_activation_checkpointing_and_zero(tmp_path, monkeypatch, capsys, zero):
    """The compiled blocks (checkpoint traced inside them) train like the eager ones at every ZeRO stage (ZeRO-3
    compiles with graph breaks at its parameter-gathering hooks), and a compiled run checkpoints and resumes."""
    torch._dynamo.reset()
    monkeypatch.setattr(engine_mod, "compile_blocks", functools.partial(compile_blocks, backend="aot_eager"))
    cfg = TrainConfig.from_name("tiny", task="toy", steps=3, ckpt_every=2, val_every=0, warmup_steps=2, lr=3e-3,
                                zero_stage=zero, activation_checkpointing=True)
    eager = train(cfg, str(tmp_path), str(tmp_path / "eager"), task=_NoDropout())
    capsys.readouterr()
    compiled = train(cfg.replace(compile=True), str(tmp_path), str(tmp_path / "compiled"), task=_NoDropout())
    out = capsys.readouterr().out
    assert "torch.compile: 2 blocks compiled on their own" in out and "activation checkpointing inside" in out
    assert ("one graph each" in out) == (zero < 3)
    torch.testing.assert_close(torch.tensor(train_losses(compiled.run_dir)), torch.tensor(train_losses(eager.run_dir)),
                               rtol=1e-4, atol=1e-5)
    resumed = train(cfg.replace(compile=True, steps=4), str(tmp_path), str(tmp_path / "compiled"), resume=True,
                    task=_NoDropout())
    assert resumed.status == "done" and resumed.step == 4
    torch._dynamo.reset()


@pytest.mark.requires("deepspeed")
def test_micro_batch_search_runs_eager_before_a_compiled_run(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(engine_mod, "compile_blocks", lambda blocks, **kw: compiled.append(len(blocks)))
    cfg = TrainConfig.from_name("tiny", task="toy", steps=1, ckpt_every=0, val_every=0, micro_batch="auto",
                                compile=True)
    result = train(cfg, str(tmp_path), str(tmp_path / "run"), task=_NoDropout())
    assert result.status == "done" and compiled == [2]  # the training engine only, not the trials
    with open(tmp_path / "run" / "micro_batch.json") as f:
        record = json.load(f)
    assert record["searched_eager"] and record["compile"] and len(record["trials"]) >= 2


@pytest.mark.requires("deepspeed")
def test_cli_compile_trains_the_tiny_preset_end_to_end(tmp_path, capsys):
    """`wmfast train --config tiny --compile` with Inductor on the CPU: 3 steps, one startup line, checkpoint keys
    those of the eager model (no "_orig_mod."), and the checkpoint loads for generation/evaluation. The model is
    the tiny preset's reference block ("tiny-reference"): the fused block's Triton kernels run ~5x slower under
    the CPU interpreter, and its compilation is checked above."""
    from wmfast.cli import main
    from wmfast.data import write_synthetic_dataset
    from wmfast.models import STTransformer, STTransformerConfig, load_checkpoint

    torch._dynamo.reset()
    data, run = tmp_path / "data", tmp_path / "run"
    write_synthetic_dataset(str(data), shards=1, frames=256, grid_size=8, vocab_size=512)
    args = ["train", "--config", "tiny", "--model", "tiny-reference", "--data", str(data), "--out", str(run),
            "--global-batch", "2", "--micro-batch", "1", "--val-every", "0", "--compile"]
    assert main([*args, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile: 2 blocks compiled on their own, one graph each (fullgraph)" in out
    losses = train_losses(str(run))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    with open(run / "config.json") as f:
        assert json.load(f)["train"]["compile"] is True
    ckpt = run / "checkpoints" / "step_00000003"
    saved = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    eager = STTransformer(STTransformerConfig.from_name("tiny-reference"))
    assert sorted(saved) == sorted(eager.state_dict())
    model = load_checkpoint(str(ckpt))
    assert model.config.block == "reference"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name].to(tensor.dtype))
    assert main([*args, "--steps", "4", "--resume"]) == 0  # and a compiled run resumes from it
    assert len(train_losses(str(run))) == 4
    torch._dynamo.reset()
