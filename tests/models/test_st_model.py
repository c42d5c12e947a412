"""wmfast.models.st_transformer: config presets, parameter count, layout, causality, and that it learns."""
import pytest
import torch

from wmfast.data import TokenizedDataset, write_synthetic_dataset
from wmfast.models import STTransformer, STTransformerConfig, compression_loss, flops_per_sample, param_count


def test_1x_compression_preset_parameter_count():
    c = STTransformerConfig.from_name("1x-compression")
    assert (c.num_layers, c.num_heads, c.d_model, c.num_frames, c.seq_len, c.vocab_size) == (24, 8, 512, 5, 1024,
                                                                                              64000)
    assert c.dropout == 0.1 and c.qk_norm and c.attention == "factorized"
    with torch.device("meta"):
        model = STTransformer(c)
    n = sum(p.numel() for p in model.parameters())  # tied head: the embedding is counted once
    assert n == param_count(c)
    assert 133e6 < n < 138e6, n  # the team's ~136M: 24 blocks ~101M + tied 64,000 x 512 embedding ~33M
    blocks = sum(p.numel() for p in model.blocks.parameters())
    assert 100e6 < blocks < 102e6 and model.tok_emb.weight.numel() == 64000 * 512


def test_flops_per_sample_formula():
    c = STTransformerConfig.from_name("1x-compression")
    # by hand: per token-layer 2*(2*4 + 2*4)*512^2 + 4*1024*512 + 4*5*512 = 10,496,000; x 24 x 5120 tokens,
    # + head 2*512*64000 x 3072 future tokens; x 3 for forward + backward
    fwd = 24 * 5120 * 10_496_000 + 2 * 512 * 64000 * 3072
    assert flops_per_sample(c, training=False) == fwd
    assert flops_per_sample(c) == 3 * fwd and 4.4e12 < 3 * fwd < 4.5e12
    full = STTransformerConfig.from_name("1x-compression", attention="full")
    assert flops_per_sample(full) > flops_per_sample(c)


def test_from_name_rejects_unknown():
    with pytest.raises(ValueError, match="unknown preset"):
        STTransformerConfig.from_name("nope")
    with pytest.raises(ValueError, match="unknown config fields"):
        STTransformerConfig.from_name("tiny", layers=3)
    with pytest.raises(ValueError, match="attention="):
        STTransformerConfig.from_name("tiny", attention="sparse")


def test_init_and_weight_decay_groups():
    c = STTransformerConfig.from_name("tiny", d_model=128, mlp_ratio=4)
    m = STTransformer(c)
    w = torch.cat([p.flatten() for n, p in m.named_parameters() if n.endswith("weight") and p.ndim == 2])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert all((p == 0).all() for n, p in m.named_parameters() if n.endswith("bias"))
    no_wd = m.no_weight_decay_names()
    assert "pos_s" in no_wd and "state_encoder.pos" in no_wd and "blocks.0.ln1.weight" in no_wd
    assert "blocks.0.attn1.qkv.weight" not in no_wd and "tok_emb.weight" not in no_wd


def test_attention_sees_bthd_layout(monkeypatch):
    from wmfast import ops

    c = STTransformerConfig.from_name("tiny")
    seen = []
    for name in ("spatial_attention", "temporal_attention"):
        fn = getattr(ops, name)

        def spy(q, k, v, *a, _fn=fn, _name=name, **kw):
            seen.append((_name, tuple(q.shape), q.stride(-1), k.stride(-1), v.stride(-1)))
            return _fn(q, k, v, *a, **kw)
        monkeypatch.setattr(ops, name, spy)
    m = STTransformer(c)
    m(torch.randint(0, 512, (2, 5, 8, 8)), torch.randn(2, 34, 25))
    assert len(seen) == 2 * c.num_layers
    for name, shape, *strides in seen:
        assert shape == (2, 5, 64, 2, 32), (name, shape)
        assert strides == [1, 1, 1]  # head dim contiguous; v is a strided view of the qkv projection


@pytest.mark.parametrize("attention", ["factorized", "full", "full-eager"])
def test_causal_in_time(attention):
    impl = "eager" if attention.endswith("eager") else "sdpa"
    c = STTransformerConfig.from_name("tiny", attention=attention.split("-")[0], full_attention_impl=impl)
    m = STTransformer(c).eval()
    x = torch.randint(0, 512, (1, 5, 8, 8))
    s = torch.randn(1, 34, 25)
    y = x.clone()
    y[:, 3] = torch.randint(0, 512, (8, 8))
    a, b = m(x, s), m(y, s)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])
    if impl == "eager":  # same weights, same function as the SDPA path
        sdpa = STTransformer(STTransformerConfig.from_name("tiny", attention="full")).eval()
        sdpa.load_state_dict(m.state_dict())
        torch.testing.assert_close(sdpa(x, s), a, atol=1e-5, rtol=1e-5)


def test_states_reach_the_predictions():
    c = STTransformerConfig.from_name("tiny")
    m = STTransformer(c).eval()
    x = torch.randint(0, 512, (1, 5, 8, 8))
    s = torch.randn(1, 34, 25)
    s2 = s.clone()
    s2[:, 30:] += 1.0  # frames of grid 5: position 4 predicts it, so its logits change
    a, b = m(x, s), m(x, s2)
    assert not torch.allclose(a[:, 4], b[:, 4])
    torch.testing.assert_close(a[:, :3], b[:, :3])  # grids 1..3 lie far from frames 30+ (conv reaches 1 frame)


def test_loss_rejects_bad_batch():
    m = STTransformer(STTransformerConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="batch\\['tokens'\\]"):
        compression_loss(m, {"tokens": torch.zeros(1, 5, 8, 8, dtype=torch.long), "states": torch.zeros(1, 34, 25)})
    with pytest.raises(ValueError, match="states"):
        compression_loss(m, {"tokens": torch.zeros(1, 6, 8, 8, dtype=torch.long), "states": torch.zeros(1, 33, 25)})


def _train(model, loader, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    while len(losses) < steps:
        for batch in loader:
            loss, _ = compression_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


def test_tiny_model_learns_synthetic_data(tmp_path, monkeypatch):
    # the torch reference attention: 40 steps through the Triton interpreter would take minutes on 2 cores;
    # the kernels' own training path is compared with it in test_kernel_and_reference_train_alike
    monkeypatch.setenv("WMFAST_BACKEND", "torch")
    write_synthetic_dataset(str(tmp_path), shards=1, frames=1200, seed=0, grid_size=8, vocab_size=512)
    ds = TokenizedDataset(str(tmp_path), "train", vocab_size=512)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    losses = _train(STTransformer(STTransformerConfig.from_name("tiny")), loader, 40)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 5.5  # ~log(512) = 6.24 at init
    assert last < first - 1.5, losses


def test_kernel_and_reference_train_alike(tmp_path, monkeypatch):
    """A few AdamW steps with the default backend (the Triton kernels, interpreted on CPU) and with the torch
    reference from the same init and data: the loss curves agree."""
    write_synthetic_dataset(str(tmp_path), shards=1, frames=400, seed=0, grid_size=8, vocab_size=512)
    ds = TokenizedDataset(str(tmp_path), "train", vocab_size=512)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    curves = []
    for backend in ("", "torch"):
        monkeypatch.setenv("WMFAST_BACKEND", backend)
        torch.manual_seed(0)
        curves.append(_train(STTransformer(STTransformerConfig.from_name("tiny")), loader, 3))
    assert curves[0] == pytest.approx(curves[1], abs=2e-4), curves


def test_training_loss_leaves_the_id_check_to_the_data_reader():
    """compression_loss does not check the token ids on the device again (a host sync a step): a target id outside
    the vocabulary gives a NaN loss there, while the op itself, called on its own, refuses it."""
    from wmfast.ops import linear_cross_entropy, use_backend

    model = STTransformer(STTransformerConfig.from_name("tiny"))
    tokens = torch.randint(0, 512, (1, 6, 8, 8))
    tokens[0, 5, 0, 0] = 512  # a target-only grid: the embedding lookup of the inputs never sees it
    for backend in (None, "torch"):  # the kernel and the reference agree: NaN, not an index error
        with use_backend(backend):
            loss, _ = compression_loss(model, {"tokens": tokens, "states": torch.randn(1, 34, 25)})
        assert torch.isnan(loss), backend
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(torch.randn(4, 64), model.tok_emb.weight, torch.tensor([0, 1, 2, 512]))


@pytest.mark.gpu
def test_bf16_training_step_cuda():
    model = STTransformer(STTransformerConfig.from_name("tiny")).cuda()
    batch = {"tokens": torch.randint(0, 512, (4, 6, 8, 8)), "states": torch.randn(4, 34, 25)}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, metrics = compression_loss(model, batch)
    loss.backward()
    assert set(metrics) >= {"loss", "accuracy", "ce_future_2"}
    assert torch.isfinite(loss) and 5.5 < loss.item() < 7.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
