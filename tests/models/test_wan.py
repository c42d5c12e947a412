"""Wan world model (tiny configs, CPU): init parity with diffusers, fused vs unfused parity (forward and
backward), batch-1 conditioning broadcast, text K/V cache, VAE frame mapping, input validation."""
import pytest
import torch

pytest.importorskip("diffusers", reason="the Wan world model is built on diffusers, which cannot be imported here")

from diffusers import WanTransformer3DModel

from wmfast.models.wan import WanConditioning, build_world_model, get_preset
from wmfast.models.wan.blocks import FusedWanTransformerBlock
from wmfast.models.wan.schedule import FrameSchedule, num_latent_frames


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_world_model("tiny", vae=False)


def _inputs(model, B=2, Bc=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = model.schedule.num_latents
    lat = torch.randn(B, 48, n, 4, 6, generator=g)  # 2x3 tokens per frame: H' != W' on purpose
    t = torch.rand(B, n, generator=g) * 1000
    t[:, : model.num_context_latents] = 0
    states = torch.randn(Bc or B, 77, 25, generator=g)
    return lat, t, states


def _randomize_state_modules(transformer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "state_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _plain_diffusers(model):
    base = WanTransformer3DModel(**get_preset("tiny").transformer)
    sd = {k: v for k, v in model.transformer.state_dict().items() if "state_" not in k}
    base.load_state_dict(sd, strict=True)
    return base


def test_parameter_names_unchanged(model):
    base = WanTransformer3DModel(**get_preset("tiny").transformer)
    ours = {k for k in model.transformer.state_dict() if "state_" not in k}
    assert ours == set(base.state_dict())
    assert all(isinstance(b, FusedWanTransformerBlock) for b in model.transformer.blocks)


def test_init_bit_identical_to_base(model):
    """Zero-initialised state projections: the world model (unfused path) equals diffusers bit for bit."""
    lat, t, states = _inputs(model)
    base = _plain_diffusers(model)
    frame_len = 6
    with torch.no_grad():
        ref = base(lat, t.repeat_interleave(frame_len, 1), model.empty_text.expand(2, -1, -1), return_dict=False)[0]
        cond = model.prepare_conditioning(states)
        assert all(torch.count_nonzero(s) == 0 for s in cond.state_temb)
        ours = model.velocity(lat, t, cond, fused=False)
        fused = model.velocity(lat, t, cond, fused=True)
        no_state = WanConditioning([torch.zeros_like(s) for s in cond.state_temb], cond.text_kv, cond.text)
        fused_no_state = model.velocity(lat, t, no_state, fused=True)
    assert torch.equal(ours, ref)
    assert torch.equal(fused, fused_no_state)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_state_conditioning_changes_output():
    torch.manual_seed(0)
    m = build_world_model("tiny", vae=False)
    _randomize_state_modules(m.transformer)
    lat, t, states = _inputs(m)
    with torch.no_grad():
        a = m.velocity(lat, t, m.prepare_conditioning(states))
        b = m.velocity(lat, t, m.prepare_conditioning(states + 1))
    assert (a - b).abs().max() > 1e-4


def _grads(transformer):
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def _velocity_and_grads(m, lat, t, states, fused):
    m.transformer.zero_grad(set_to_none=True)
    x = lat.clone().requires_grad_(True)
    v = m.velocity(x, t, m.prepare_conditioning(states), fused=fused)
    (v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum().backward()
    return v.detach(), {**_grads(m.transformer), "latents": x.grad}


@pytest.mark.parametrize("ckpt", [False, True], ids=["eager", "grad-ckpt"])
def test_fused_matches_unfused_fwd_bwd(ckpt):
    """fp32, non-zero state modules: fused per-frame path vs diffusers' per-token blocks, for the output and the
    gradients of every parameter (base, state modules) and of the input latents, by the suite's 2x rule: the fused
    fp32 error against an fp64 run of diffusers' path is at most twice diffusers' own fp32 error + the fp32 floor.
    (An elementwise 1e-5 bound flaked: gradients like patch_embedding.weight are long fp32 sums with cancellation,
    whose last bits move with the summation order.)"""
    import copy

    from wmfast.testing import assert_2x_rule

    torch.manual_seed(0)
    m = build_world_model("tiny", vae=False)
    _randomize_state_modules(m.transformer)
    if ckpt:
        m.transformer.enable_gradient_checkpointing()
    m64 = copy.deepcopy(m).double()
    lat, t, states = _inputs(m)
    v_fused, g_fused = _velocity_and_grads(m, lat, t, states, fused=True)
    v_plain, g_plain = _velocity_and_grads(m, lat, t, states, fused=False)
    v_ref, g_ref = _velocity_and_grads(m64, lat.double(), t.double(), states.double(), fused=False)
    assert_2x_rule(v_fused, v_ref, v_plain, name="velocity", dtype=torch.float32)
    assert g_fused.keys() == g_plain.keys() == g_ref.keys() and len(g_fused) > 20
    for name in g_ref:
        assert_2x_rule(g_fused[name], g_ref[name], g_plain[name], name=f"d {name}", dtype=torch.float32)
    assert g_fused["state_embedder.fc1.weight"].abs().max() > 0


def test_fused_vs_plain_diffusers_grads(model):
    """The patched model vs an unpatched diffusers transformer with the same weights (state at init)."""
    lat, t, states = _inputs(model, seed=3)
    base = _plain_diffusers(model)
    vb = base(lat, t.repeat_interleave(6, 1), model.empty_text.expand(2, -1, -1), return_dict=False)[0]
    vb.square().mean().backward()
    model.transformer.zero_grad(set_to_none=True)
    v = model.velocity(lat, t, model.prepare_conditioning(states), fused=True)
    v.square().mean().backward()
    torch.testing.assert_close(v, vb, rtol=1e-5, atol=1e-5)
    ours = dict(model.transformer.named_parameters())
    for name, p in base.named_parameters():
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    model.transformer.zero_grad(set_to_none=True)


def test_batch1_conditioning_broadcasts(model):
    """cond and timestep with batch 1, latents with batch N: equals the per-sample results."""
    lat, t, states = _inputs(model, B=3, Bc=1)
    with torch.no_grad():
        cond1 = model.prepare_conditioning(states)
        v = model.velocity(lat, t[:1], cond1)
        ref = torch.cat([model.velocity(lat[i:i + 1], t[:1], cond1, fused=False) for i in range(3)])
        condN = model.prepare_conditioning(states.expand(3, -1, -1))
        vN = model.velocity(lat, t[:1].expand(3, -1), condN)
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, vN, rtol=1e-5, atol=1e-5)
    assert cond1.batch == 1 and cond1.text_kv[0][0].shape[0] == 1


def test_text_kv_cached_once_and_invalidated(model):
    _, _, states = _inputs(model)
    with torch.no_grad():
        a = model.prepare_conditioning(states).text_kv
        b = model.prepare_conditioning(states).text_kv
        assert a is b  # computed once, reused across steps and samples
        model.transformer.blocks[0].attn2.to_k.weight.add_(0.1)  # an optimizer step would bump the version
        c = model.prepare_conditioning(states).text_kv
        model.transformer.blocks[0].attn2.to_k.weight.sub_(0.1)
    assert c is not a and not torch.equal(c[0][0], a[0][0])
    d = model.prepare_conditioning(states).text_kv  # grad enabled: recomputed with autograd, not cached
    assert d[0][0].requires_grad


def _alias_into_flat_buffer(params):
    """What DeepSpeed ZeRO-1/2 does to trainable parameters: each .data becomes a view of one flat buffer,
    and the optimizer later writes into the buffer (bumping its version counter, not the parameters')."""
    flat = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def test_text_kv_cache_sees_writes_through_a_flat_buffer():
    torch.manual_seed(0)
    model = build_world_model("tiny", vae=False)
    kv_params = [p for n, p in model.transformer.named_parameters() if ".attn2.to_k" in n or ".attn2.to_v" in n]
    flat = _alias_into_flat_buffer(kv_params)
    lat, t, states = _inputs(model)
    with torch.no_grad():
        v_old = model.velocity(lat, t, model.prepare_conditioning(states))   # caches the K/V
        versions = [p._version for p in kv_params]
        flat.add_(0.05 * torch.randn(flat.shape, generator=torch.Generator().manual_seed(3)))  # the "optimizer step"
        assert [p._version for p in kv_params] == versions  # the parameters' versions did not move: the bug's premise
        v_new = model.velocity(lat, t, model.prepare_conditioning(states))
        model.clear_cache()
        v_fresh = model.velocity(lat, t, model.prepare_conditioning(states))
    assert not torch.allclose(v_new, v_old)
    torch.testing.assert_close(v_new, v_fresh, rtol=0, atol=0)


def test_train_and_eval_drop_the_text_kv_cache():
    torch.manual_seed(0)
    model = build_world_model("tiny", vae=False).requires_grad_(False)  # frozen: no fingerprint in the key
    _, _, states = _inputs(model)
    with torch.no_grad():
        a = model.prepare_conditioning(states).text_kv
        model.train()
        model.eval()
        b = model.prepare_conditioning(states).text_kv
    assert b is not a  # recomputed after the mode switch (engine.eval() around validation reaches here)
    torch.testing.assert_close(b[0][0], a[0][0], rtol=0, atol=0)


def test_bad_inputs_raise(model):
    lat, t, states = _inputs(model)
    cond = model.prepare_conditioning(states)
    with pytest.raises(ValueError, match="timestep"):
        model.velocity(lat, t[:, :3], cond)
    with pytest.raises(ValueError, match="cond"):
        model.velocity(lat[:, :, :3], t[:, :3], cond)
    with pytest.raises(ValueError, match="states"):
        model.prepare_conditioning(states[..., :7])
    with pytest.raises(ValueError, match="no VAE"):
        model.encode_frames(torch.zeros(1, 5, 3, 64, 64, dtype=torch.uint8))


def test_schedule_maps_context_and_target():
    for stride, n_lat, n_ctx in [(1, 20, 5), (3, 7, 2)]:
        s = FrameSchedule(stride)
        idx = s.frame_indices
        assert idx[-1] == 76 and 16 in idx and len(idx) % 4 == 1
        assert (s.num_latents, s.num_context_latents) == (n_lat, n_ctx)
        assert num_latent_frames(s.context_count) == n_ctx and idx[s.context_count - 1] == 16
        assert s.latent_end_frames()[-1] == 76 and s.latent_end_frames()[n_ctx - 1] == 16
    with pytest.raises(ValueError, match="stride"):
        FrameSchedule(2)


def test_vae_causal_context_latents_are_clean():
    """Encoding the context frames alone gives exactly the first latents of encoding all frames, so the
    context latents can be held clean; decode returns 4(F'-1)+1 frames in [0, 1]."""
    torch.manual_seed(0)
    m = build_world_model("tiny")
    frames = torch.randint(0, 256, (1, 9, 3, 32, 32), dtype=torch.uint8)
    z_all = m.encode_frames(frames)
    z_ctx = m.encode_frames(frames[:, :5])
    assert z_all.shape == (1, 48, 3, 2, 2) and z_ctx.shape[2] == 2
    torch.testing.assert_close(z_ctx, z_all[:, :, :2], rtol=1e-4, atol=1e-5)
    out = m.decode_latents(z_all)
    assert out.shape == (1, 9, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_ti2v_5b_counts_on_meta():
    m = build_world_model("ti2v-5b", device="meta")
    base = sum(p.numel() for n, p in m.transformer.named_parameters() if "state_" not in n)
    assert abs(base - 4_999_800_000) < 1e6, base
    assert 700e6 < sum(p.numel() for p in m.vae.parameters()) < 710e6


def test_backend_torch_turns_the_patch_off(model, monkeypatch):
    lat, t, states = _inputs(model)
    with torch.no_grad():
        cond = model.prepare_conditioning(states)
        ref = model.velocity(lat, t, cond, fused=False)
        monkeypatch.setenv("WMFAST_BACKEND", "torch")
        off = model.velocity(lat, t, cond)
    assert torch.equal(off, ref)


@pytest.mark.gpu
def test_gpu_real_block_bf16_2x_rule_and_compile():
    """One real-size block (D = 3072) in bf16 on the GPU: the patched block (Triton ops, per-frame modulation)
    vs diffusers' block in bf16, both against diffusers in fp32 (2x rule); and torch.compile(fullgraph=True)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    from wmfast.models.wan.blocks import patch_blocks, text_kv
    from wmfast.testing import assert_2x_rule

    torch.manual_seed(0)
    ref = WanTransformerBlock(3072, 14336, 24, "rms_norm_across_heads", True, 1e-6).cuda()
    low = WanTransformerBlock(3072, 14336, 24, "rms_norm_across_heads", True, 1e-6).cuda()
    low.load_state_dict(ref.state_dict())
    low.to(torch.bfloat16).scale_shift_table.data = ref.scale_shift_table.data.clone()
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([low])
    B, F, S = 2, 3, 256
    x = torch.randn(B, F * S, 3072, device="cuda")
    text = torch.randn(1, 64, 3072, device="cuda")
    temb = torch.randn(B, F, 6, 3072, device="cuda") * 0.1
    rotary = WanRotaryPosEmbed(128, (1, 2, 2), 1024).cuda()(torch.empty(1, 1, F, 32, 32, device="cuda"))
    args = (text.expand(B, -1, -1), temb.repeat_interleave(S, 1), rotary)
    with torch.no_grad():
        out_ref = ref(x, *args)
        out_low = low(x.bfloat16(), args[0].bfloat16(), args[1].bfloat16(), rotary)
        patch_blocks(holder)
        kv = text_kv(low.attn2, text.bfloat16())
        out_fused = low(x.bfloat16(), None, temb.bfloat16(), rotary, frame_len=S, kv=kv)
        assert_2x_rule(out_fused, out_ref, out_low, "block output")
        compiled = torch.compile(low, fullgraph=True)
        out_c = compiled(x.bfloat16(), None, temb.bfloat16(), rotary, frame_len=S, kv=kv)
    assert_2x_rule(out_c, out_ref, out_low, "compiled block output")


@pytest.fixture
def fake_pretrained(monkeypatch, tmp_path):
    """build_world_model(pretrained=dir) with the tiny transformer standing in for the weights (no download);
    counts the UMT5 runs."""
    from wmfast.models.wan import model as wan_model
    from wmfast.models.wan import text_encoder

    calls = []

    def fake_umt5(path, text_len):
        calls.append(path)
        return torch.randn(1, text_len, get_preset("tiny").transformer["text_dim"])

    real = wan_model.build_transformer
    monkeypatch.setattr(wan_model, "build_transformer", lambda preset, pretrained, device, dtype:
                        real(preset, None, device, dtype))
    monkeypatch.setattr(text_encoder, "_umt5_empty_prompt", fake_umt5)
    return tmp_path, calls


def test_pretrained_without_text_encoder_or_cache_raises(fake_pretrained):
    weights, calls = fake_pretrained
    with pytest.raises(ValueError, match="text_encoder/ and tokenizer/.*text_cache="):
        build_world_model("tiny", pretrained=str(weights), vae=False)
    assert not calls


def test_text_embedding_cached_beside_the_weights_and_reused(fake_pretrained):
    from wmfast.models.wan import default_text_cache

    weights, calls = fake_pretrained
    (weights / "text_encoder").mkdir()
    a = build_world_model("tiny", pretrained=str(weights), vae=False)
    b = build_world_model("tiny", pretrained=str(weights), vae=False)  # a second rank / engine build / sample
    assert len(calls) == 1  # UMT5 ran once
    cache = default_text_cache(str(weights), get_preset("tiny").text_len)
    assert cache.startswith(str(weights))
    torch.testing.assert_close(torch.load(cache), a.empty_text, rtol=0, atol=0)
    torch.testing.assert_close(b.empty_text, a.empty_text, rtol=0, atol=0)
    (weights / "text_encoder").rmdir()  # the cache alone suffices once written
    c = build_world_model("tiny", pretrained=str(weights), vae=False)
    torch.testing.assert_close(c.empty_text, a.empty_text, rtol=0, atol=0)
    assert len(calls) == 1
    torch.save(torch.zeros(1, 3, 4), cache)
    with pytest.raises(ValueError, match="expected"):
        build_world_model("tiny", pretrained=str(weights), vae=False)


def test_unwritable_text_cache_only_warns(fake_pretrained, monkeypatch, caplog):
    from wmfast.models.wan import text_encoder

    weights, calls = fake_pretrained
    (weights / "text_encoder").mkdir()

    def refuse(tensor, path):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(text_encoder, "_save_atomic", refuse)
    model = build_world_model("tiny", pretrained=str(weights), vae=False)
    assert model.empty_text.shape[1] == get_preset("tiny").text_len and len(calls) == 1
    assert "could not write the empty-prompt cache" in caplog.text
