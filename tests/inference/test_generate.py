"""wmfast.inference: greedy generation with the temporal KV cache vs recomputing every frame."""
import pytest
import torch

from wmfast.bench.model_cost import OpCounter
from wmfast.inference import TemporalKVCache, decode_step, generate
from wmfast.models import STTransformer, STTransformerConfig
from wmfast.models.st_transformer.rollout import rollout
from wmfast.ops.dispatch import use_backend


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_cache_matches_recompute(tiny_st, st_inputs, monkeypatch, backend):
    if backend == "torch":
        monkeypatch.setenv("WMFAST_BACKEND", "torch")
    model = tiny_st()
    ctx, states = st_inputs()
    tok_c, log_c = model.generate(ctx, states, num_frames=3, use_cache=True, return_logits=True)
    tok_r, log_r = model.generate(ctx, states, num_frames=3, use_cache=False, return_logits=True)
    assert tok_c.shape == (2, 3, 8, 8) and log_c.shape == (2, 3, 64, 512)
    assert torch.equal(tok_c, tok_r)  # fp32: identical greedy tokens
    torch.testing.assert_close(log_c, log_r, atol=1e-4, rtol=1e-4)
    # and both equal one teacher-forced pass over context + the generated grids
    full = model.eval()(torch.cat([ctx, tok_c[:, :2]], 1), states)  # [B, 5, S, V]
    torch.testing.assert_close(log_c, full[:, 2:], atol=1e-4, rtol=1e-4)
    assert torch.equal(tok_c.flatten(2), full[:, 2:].argmax(-1))
    # without the logits, the greedy head (no [B, S, V] tensor) gives the same tokens on both paths
    assert torch.equal(model.generate(ctx, states), tok_c)
    assert torch.equal(model.generate(ctx, states, use_cache=False), tok_c)


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk-norm", "no-qk-norm"])
def test_inference_blocks_match_training_blocks(tiny_st, st_inputs, qk_norm):
    """Block.infer (eval, no grad: norm_linear, the MLP's add fused into the next block) computes what the training
    path (grad enabled) does, with and without QK-norm."""
    model = tiny_st(qk_norm=qk_norm).eval()
    ctx, states = st_inputs()
    with torch.no_grad():
        fast = model.hidden(ctx, states)
    slow = model.hidden(ctx, states).detach()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    with use_backend("torch"):  # in bf16 on the references the two paths round identically
        model.to(torch.bfloat16)
        with torch.no_grad():
            fast = model.hidden(ctx, states)
        assert torch.equal(fast, model.hidden(ctx, states).detach())


def test_generate_restores_mode_and_is_deterministic(tiny_st, st_inputs):
    model = tiny_st(dropout=0.1).train()
    ctx, states = st_inputs(B=1)
    a = generate(model, ctx, states)
    b = generate(model, ctx, states)
    assert model.training and torch.equal(a, b) and a.shape == (1, 3, 8, 8)


def test_fewer_frames_and_flat_layout(tiny_st, st_inputs):
    model = tiny_st()
    ctx, states = st_inputs(B=1)
    three = model.generate(ctx, states)
    one = model.generate(ctx.flatten(2), states, num_frames=1)
    assert one.shape == (1, 1, 64) and torch.equal(one.view(1, 1, 8, 8), three[:, :1])


def test_full_attention_generates_without_cache(tiny_st, st_inputs):
    model = tiny_st(attention="full")
    ctx, states = st_inputs(B=1)
    assert model.generate(ctx, states, use_cache=False).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="use_cache=True needs attention='factorized'"):
        model.generate(ctx, states, use_cache=True)


def test_bad_arguments(tiny_st, st_inputs):
    model = tiny_st()
    ctx, states = st_inputs(B=1)
    with pytest.raises(ValueError, match="C \\+ num_frames - 1 must be <= 5"):
        model.generate(ctx, states, num_frames=4)
    for bad in (torch.zeros(1, 3, 7, 7, dtype=torch.long), torch.zeros(0, 3, 8, 8, dtype=torch.long),
                torch.zeros(1, 3, 8, 8, dtype=torch.bool), torch.zeros(1, 3, 8, 8)):
        with pytest.raises(ValueError, match="context_tokens: expected integer ids"):
            model.generate(bad, states)
    with pytest.raises(ValueError, match="states"):
        model.generate(ctx, states[:, :, :3].expand(2, -1, -1))


def test_unwritten_cache_slots_are_never_read(tiny_st, st_inputs):
    """The cache is allocated uninitialised: slots after the current position may hold anything (NaN here), and
    the tokens must not change."""
    model = tiny_st().eval()
    ctx, states = st_inputs()
    expected = model.generate(ctx, states)
    with torch.no_grad():
        cache = TemporalKVCache.for_model(model, 2)
        for t in cache.k + cache.v:
            t.fill_(float("nan"))
        tokens, _ = rollout(model, ctx.flatten(2), model.state_encoder(states), 3, cache)
    assert torch.equal(tokens.view_as(expected), expected)


def _decode_ops(layers: int, inference: bool, st_inputs) -> OpCounter:
    torch.manual_seed(0)
    model = STTransformer(STTransformerConfig.from_name("tiny", num_layers=layers)).train(not inference)
    ctx, states = st_inputs(B=1)
    ctx = ctx.flatten(2)
    with torch.no_grad():
        sg = model.state_encoder(states)
        cache = TemporalKVCache.for_model(model, 1)
        model.hidden(ctx, state_grids=sg, kv_cache=cache)
        with OpCounter() as counter:
            decode_step(model, ctx[:, -1:], sg, 3, cache, return_logits=not inference)
    return counter


def test_decode_step_launches_halved(st_inputs):
    """Ops that write memory (a CPU proxy for kernel launches; a custom op counts once) in one eager decode step:
    the inference path (3 norm_linear, 2 attentions, 3 linears a layer; the greedy head) against the training-path
    blocks with full logits (19 a layer). At the 1x-compression depth (24 layers) the count is cut by more than
    half."""
    counts = {}
    for inference in (False, True):
        n1, n2 = (_decode_ops(layers, inference, st_inputs).count for layers in (1, 2))
        counts[inference] = (n2 - n1, n1 + 23 * (n2 - n1))  # per layer, at 24 layers
    assert counts[True][0] == 8, counts
    assert counts[True][1] <= counts[False][1] / 2, counts


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_rollout_without_logits_allocates_no_logit_sized_tensor(tiny_st, monkeypatch, backend):
    """At the real grid (S = 1024) and vocabulary (V = 64,000): no tensor allocated during a rollout that returns
    no logits is larger than a quarter of the [B, S, V] fp32 logits (the greedy head works in vocabulary chunks;
    measured: 3.1 MB on the kernels, 16.6 MB on the torch reference, against 262 MB of logits)."""
    if backend == "torch":
        monkeypatch.setenv("WMFAST_BACKEND", "torch")
    torch.manual_seed(0)
    model = STTransformer(STTransformerConfig.from_name("tiny", num_layers=1, grid_size=32, vocab_size=64000))
    g = torch.Generator().manual_seed(0)
    ctx, states = torch.randint(0, 64000, (1, 3, 32, 32), generator=g), torch.randn(1, 34, 25, generator=g)
    with OpCounter() as counter:
        tokens = model.generate(ctx, states)
    assert tokens.shape == (1, 3, 32, 32)
    assert counter.largest[0] <= 1024 * 64000 * 4 // 4, counter.largest

    model = tiny_st()
    cache = TemporalKVCache.for_model(model, 3)
    c = model.config
    assert len(cache) == c.num_layers
    assert cache[0][0].shape == (3, c.seq_len, c.num_heads, c.num_frames, c.head_dim)
    assert cache.nbytes == 2 * c.num_layers * 3 * c.seq_len * c.num_frames * c.d_model * 4


def test_checkpoint_round_trip(tiny_st, st_inputs, tmp_path):
    import json

    from wmfast.models import load_checkpoint

    model = tiny_st(num_layers=1)
    ctx, states = st_inputs(B=1)
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
    # the tiny preset has 2 layers, the weights 1: one line, not load_state_dict's list of every key
    with pytest.raises(ValueError, match=r"do not fit an ST-Transformer of preset 'tiny' \(\d+ missing, 0 unexpected"):
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
    # the copy-last-grid baseline beside the greedy accuracy, on the same (first and last) samples
    from wmfast.data import TokenizedDataset
    from wmfast.metrics.baselines import copy_last_hits

    ds = TokenizedDataset(str(tmp_path / "d"), "val", vocab_size=512)
    tokens = torch.stack([ds[0]["tokens"], ds[len(ds) - 1]["tokens"]])
    expected = copy_last_hits(tokens, 3).float().mean(dim=(0, 2)).tolist()
    assert s["copy_last_grid_accuracy_per_frame"] == pytest.approx(expected, abs=1e-4)
    assert list(s).index("copy_last_grid_accuracy_per_frame") == list(s).index("greedy_accuracy_per_frame") + 1
    assert 5.0 < s["cross_entropy"] < 8.0 and 0 < s["top500_cross_entropy"] <= s["cross_entropy"] + 1e-4
    assert "top500_cross_entropy" in capsys.readouterr().out
    # several precisions: each scored, and compared with fp32's greedy tokens
    assert main(["generate", "--data", str(tmp_path / "d"), "--preset", "tiny", "--samples", "2",
                 "--dtype", "bf16,fp32", "--json", str(out)]) == 0
    s2 = json.loads(out.read_text())
    assert list(s2["precisions"]) == ["fp32", "bf16"] and s2["cross_entropy"] == pytest.approx(s["cross_entropy"])
    bf16 = s2["precisions"]["bf16"]
    assert 0.5 <= bf16["greedy_agreement_with_fp32"] <= 1 and abs(bf16["cross_entropy"] - s["cross_entropy"]) < 0.05
    assert main(["generate", "--data", str(tmp_path / "d"), "--dtype", "fp64"]) == 2
    assert "--dtype: 'fp64'" in capsys.readouterr().err
    assert main(["generate", "--data", str(tmp_path / "d"), "--preset", "tiny", "--graph", "--device", "cpu"]) == 2
    assert "--graph needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_kernels_cache_matches_recompute(tiny_st, st_inputs):
    model = tiny_st().cuda()
    ctx, states = (x.cuda() for x in st_inputs(B=4))
    tok_c, log_c = model.generate(ctx, states, return_logits=True)
    tok_r, log_r = model.generate(ctx, states, use_cache=False, return_logits=True)
    assert torch.equal(tok_c, tok_r)
    torch.testing.assert_close(log_c, log_r, atol=1e-4, rtol=1e-4)
