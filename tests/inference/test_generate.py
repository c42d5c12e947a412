"""wmfast.inference: greedy generation with the temporal KV cache vs recomputing every frame."""
import pytest
import torch

from wmfast.inference import TemporalKVCache, generate
from wmfast.models import STTransformer, STTransformerConfig


def _model(**kw):
    torch.manual_seed(0)
    return STTransformer(STTransformerConfig.from_name("tiny", **kw))


def _inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (B, 3, 8, 8), generator=g), torch.randn(B, 34, 25, generator=g)


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_cache_matches_recompute(monkeypatch, backend):
    if backend == "torch":
        monkeypatch.setenv("WMFAST_BACKEND", "torch")
    model = _model()
    ctx, states = _inputs()
    tok_c, log_c = model.generate(ctx, states, num_frames=3, use_cache=True, return_logits=True)
    tok_r, log_r = model.generate(ctx, states, num_frames=3, use_cache=False, return_logits=True)
    assert tok_c.shape == (2, 3, 8, 8) and log_c.shape == (2, 3, 64, 512)
    assert torch.equal(tok_c, tok_r)  # fp32: identical greedy tokens
    torch.testing.assert_close(log_c, log_r, atol=1e-4, rtol=1e-4)
    # and both equal one teacher-forced pass over context + the generated grids
    full = model.eval()(torch.cat([ctx, tok_c[:, :2]], 1), states)  # [B, 5, S, V]
    torch.testing.assert_close(log_c, full[:, 2:], atol=1e-4, rtol=1e-4)
    assert torch.equal(tok_c.flatten(2), full[:, 2:].argmax(-1))


def test_generate_restores_mode_and_is_deterministic():
    model = _model(dropout=0.1).train()
    ctx, states = _inputs(B=1)
    a = generate(model, ctx, states)
    b = generate(model, ctx, states)
    assert model.training and torch.equal(a, b) and a.shape == (1, 3, 8, 8)


def test_fewer_frames_and_flat_layout():
    model = _model()
    ctx, states = _inputs(B=1)
    three = model.generate(ctx, states)
    one = model.generate(ctx.flatten(2), states, num_frames=1)
    assert one.shape == (1, 1, 64) and torch.equal(one.view(1, 1, 8, 8), three[:, :1])


def test_full_attention_generates_without_cache():
    model = _model(attention="full")
    ctx, states = _inputs(B=1)
    assert model.generate(ctx, states, use_cache=False).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="use_cache=True needs attention='factorized'"):
        model.generate(ctx, states, use_cache=True)


def test_bad_arguments():
    model = _model()
    ctx, states = _inputs(B=1)
    with pytest.raises(ValueError, match="C \\+ num_frames - 1 must be <= 5"):
        model.generate(ctx, states, num_frames=4)
    with pytest.raises(ValueError, match="context_tokens"):
        model.generate(torch.zeros(1, 3, 7, 7, dtype=torch.long), states)
    with pytest.raises(ValueError, match="states"):
        model.generate(ctx, states[:, :, :3].expand(2, -1, -1))


def test_kv_cache_layout():
    model = _model()
    cache = TemporalKVCache.for_model(model, 3)
    c = model.config
    assert len(cache) == c.num_layers
    assert cache[0][0].shape == (3, c.seq_len, c.num_heads, c.num_frames, c.head_dim)
    assert cache.nbytes == 2 * c.num_layers * 3 * c.seq_len * c.num_frames * c.d_model * 4


@pytest.mark.slow
def test_compiled_step_traces_and_matches_eager():
    """torch.compile(fullgraph=True, dynamic=False) of the decode step (CUDA graphs on GPU; on the CPU it
    checks the step traces without a graph break and gives the same tokens). ~15 s of compilation."""
    model = _model(num_layers=1)
    ctx, states = _inputs(B=1)
    eager = model.generate(ctx, states)
    for _ in range(2):  # the second call reuses the compiled graphs
        assert torch.equal(model.generate(ctx, states, compile_step=True), eager)


@pytest.mark.gpu
def test_cuda_graph_step_no_host_sync():
    """Once compiled and recorded, a compiled-step generate replays CUDA graphs without one host sync.
    Compilation itself syncs (Inductor's pattern initialisation does), so it happens before the check."""
    model = _model().cuda()
    ctx, states = (x.cuda() for x in _inputs())
    eager = model.generate(ctx, states)
    for _ in range(2):  # compile, then the CUDA-graph warm-up and recording runs
        model.generate(ctx, states, compile_step=True)
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside generate raises
    try:
        for _ in range(2):
            compiled = model.generate(ctx, states, compile_step=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(compiled, eager)


def test_checkpoint_round_trip(tmp_path):
    import json

    from wmfast.models import load_checkpoint

    model = _model(num_layers=1)
    ctx, states = _inputs(B=1)
    expected = model.generate(ctx, states)
    # a torch.save file with config, and a training-checkpoint directory (DeepSpeed weights under "module",
    # names as a compiled, activation-checkpointed model has them)
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, tmp_path / "m.pt")
    d = tmp_path / "step_00000010"
    d.mkdir()
    wrapped = {k.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module."): v for k, v in model.state_dict().items()}
    torch.save({"module": {f"_orig_mod.{k}": v for k, v in wrapped.items()}}, d / "mp_rank_00_model_states.pt")
    (d / "trainer_state.json").write_text(json.dumps({"step": 10, "model_config": model.config.to_dict()}))
    for path in (tmp_path / "m.pt", d):
        loaded = load_checkpoint(str(path))
        assert loaded.config == model.config and torch.equal(loaded.generate(ctx, states), expected)
    # a run directory resolves to its newest complete checkpoint: an older one with other weights and a newer,
    # incomplete one (no trainer_state.json: killed mid-write) must both be passed over
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    d.rename(run / "checkpoints" / "step_00000010")
    old = run / "checkpoints" / "step_00000005"
    old.mkdir()
    torch.save({"module": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}},
               old / "mp_rank_00_model_states.pt")
    (old / "trainer_state.json").write_text(json.dumps({"step": 5, "model_config": model.config.to_dict()}))
    (run / "checkpoints" / "step_00000020").mkdir()
    assert torch.equal(load_checkpoint(str(run)).generate(ctx, states), expected)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        (run / "checkpoints" / "step_00000010" / "trainer_state.json").unlink()
        (old / "trainer_state.json").unlink()
        load_checkpoint(str(run))
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="no model config"):
        load_checkpoint(str(tmp_path / "bare.pt"))
    with pytest.raises(RuntimeError, match="Missing key"):  # the tiny preset has 2 layers, the weights 1
        load_checkpoint(str(tmp_path / "bare.pt"), preset="tiny")


def test_generate_cli(tmp_path, capsys):
    import json

    from wmfast.cli import main
    from wmfast.data import write_synthetic_dataset

    write_synthetic_dataset(str(tmp_path / "d"), shards=1, frames=200, seed=0, grid_size=8, vocab_size=512)
    out = tmp_path / "summary.json"
    assert main(["generate", "--data", str(tmp_path / "d"), "--preset", "tiny", "--samples", "2",
                 "--batch-size", "2", "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["samples"] == 2 and len(s["greedy_accuracy_per_frame"]) == 3
    assert 5.0 < s["cross_entropy"] < 8.0 and 0 < s["top500_cross_entropy"] <= s["cross_entropy"] + 1e-4
    assert "top500_cross_entropy" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_kernels_cache_matches_recompute():
    model = _model().cuda()
    ctx, states = (x.cuda() for x in _inputs(B=4))
    tok_c, log_c = model.generate(ctx, states, return_logits=True)
    tok_r, log_r = model.generate(ctx, states, use_cache=False, return_logits=True)
    assert torch.equal(tok_c, tok_r)
    torch.testing.assert_close(log_c, log_r, atol=1e-4, rtol=1e-4)
