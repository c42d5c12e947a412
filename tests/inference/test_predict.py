"""predict_sample's phases (Prediction.timings), the batched VAE decode and the VAE's decode tiling, on the tiny
world model (random weights, 64x64, CPU). WMFAST_BACKEND=torch: the split and the decode are under test, not the
kernels (the sampler's kernels have their own tests)."""
import pytest
import torch

from wmfast.inference.ensemble import EnsembleConfig
from wmfast.inference.predict import (
    PHASES,
    PhaseTimer,
    average_frames,
    decode_members,
    predict_sample,
    set_vae_tiling,
    vae_tile_sizes,
)

pytestmark = pytest.mark.requires("diffusers")


@pytest.fixture(scope="module")
def tiny():
    from wmfast.models.wan import build_world_model

    torch.manual_seed(0)
    return build_world_model("tiny", vae=True).eval()  # 0.2 s on the CPU, random VAE included


@pytest.fixture
def inputs(tiny):
    g = torch.Generator().manual_seed(1)
    c = tiny.schedule.context_count
    return (torch.randint(0, 256, (c, 3, 64, 64), dtype=torch.uint8, generator=g),
            torch.randn(77, 25, generator=g))


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("WMFAST_BACKEND", "torch")


def _cfg(n=3, steps=2):
    return EnsembleConfig(n=n, steps=steps, progress=False)


def test_timings_split_the_whole_call_into_its_phases(tiny, inputs):
    pred = predict_sample(tiny, *inputs, _cfg())
    t = pred.timings
    assert list(t) == [*PHASES, "total"]
    assert all(t[k] > 0 for k in t), t
    phases = sum(t[k] for k in PHASES)
    assert 0.9 * t["total"] < phases <= t["total"], t  # nothing but host glue between the phases
    assert pred.denoise_s == t["denoise"]  # eval-psnr's seconds_per_sample reads denoise_s
    assert pred.peak_memory == {}  # CUDA only


def test_latent_averaging_alone_still_times_its_one_decode(tiny, inputs):
    pred = predict_sample(tiny, *inputs, _cfg(), modes=("latent",))
    assert pred.frames.members is None and pred.frames.latent_mean.shape == (3, 64, 64)
    assert pred.timings["decode"] > 0 and pred.timings["average"] > 0


def test_decode_batch_does_not_change_the_frames(tiny, inputs):
    one = predict_sample(tiny, *inputs, _cfg(n=4), decode_batch=1)
    for batch in (3, None):  # a ragged last batch, and all four at once
        other = predict_sample(tiny, *inputs, _cfg(n=4), decode_batch=batch)
        assert torch.equal(one.latents, other.latents)
        # the VAE decodes members independently; oneDNN's convolutions round differently per batch size on the
        # CPU (measured: 3e-6 at most), so equal up to float rounding rather than bit for bit
        for name in ("members", "pixel_mean", "pixel_std", "latent_mean"):
            torch.testing.assert_close(getattr(other.frames, name), getattr(one.frames, name), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="decode_batch"):
        decode_members(one.latents, lambda z: z, 0)


def test_an_out_of_memory_decode_is_retried_with_half_the_batch():
    calls = []

    def decode_frame(z):
        calls.append(z.shape[0])
        if z.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("fake: does not fit")
        return z[:, :3, -1] * 2

    latents = torch.randn(5, 4, 2, 3, 3)
    out = decode_members(latents, decode_frame)
    assert calls == [5, 3, 2, 2, 1]  # 5 fails, 3 fails, then batches of 2 (members decoded before are kept)
    torch.testing.assert_close(out, latents[:, :3, -1] * 2)

    def never_fits(z):
        raise torch.cuda.OutOfMemoryError("fake: not even one member")

    with pytest.raises(torch.cuda.OutOfMemoryError):  # at batch 1 there is nothing left to halve
        decode_members(latents, never_fits)


def test_average_frames_reports_its_decode_and_average_phases_to_a_timer():
    timer = PhaseTimer()
    frames = average_frames(torch.randn(3, 2, 2, 4, 4), lambda z: z[:, :, -1].tanh(), timer=timer)
    assert frames.pixel_mean.shape == (2, 4, 4)
    assert timer.seconds["decode"] > 0 and timer.seconds["average"] > 0
    assert timer.seconds["conditioning"] == timer.seconds["denoise"] == 0


def test_tile_sizes_make_two_by_two_overlapping_tiles():
    assert vae_tile_sizes(512, 512) == ((320, 320), (256, 256))  # 20 latents every 16: blended over 4 latents
    assert vae_tile_sizes(64, 64) == ((48, 48), (32, 32))
    (th, tw), (sh, sw) = vae_tile_sizes(480, 640)
    assert (th % 16, tw % 16, sh % 16, sw % 16) == (0, 0, 0, 0) and sh < th < 480 and sw < tw < 640


def test_tiled_decode_is_each_tile_decoded_alone_then_blended(tiny):
    """What diffusers' tiling does to the Wan VAE (64x64 frames: 2x2 tiles of 3x3 latents every 2 latents, blended
    over 16 px): outside the blend zones the tiled decode IS the untiled decode of that tile's latent window, and
    inside them each pixel lies between the two windows' decodes (a linear blend, clamped). Against the whole-frame
    decode it differs everywhere on these random weights (mean |diff| 0.07 of the [0, 1] range): every tile's
    convolutions see zero padding at its border and the decoder's mid-block attention sees the tile only."""
    z = torch.randn(2, 48, 7, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny.decode_latents(z)  # [2, 25, 3, 64, 64]
        w00, w01, w11 = (tiny.decode_latents(z[..., r, c]) for r, c in
                         ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(2, 4)), (slice(2, 4), slice(2, 4))))
        assert set_vae_tiling(tiny) == ((48, 48), (32, 32))
        try:
            tiled = tiny.decode_latents(z)
            context = torch.randint(0, 256, (1, 5, 3, 64, 64), dtype=torch.uint8)
            encoded_tiled = tiny.encode_frames(context)
        finally:
            assert set_vae_tiling(tiny, False) is None
        assert torch.equal(tiny.decode_latents(z), whole)  # off again
    assert torch.equal(tiled[..., :32, :32], w00[..., :32, :32])
    assert torch.equal(tiled[..., :32, 48:], w01[..., :32, 16:])
    assert torch.equal(tiled[..., 48:, 48:], w11[..., 16:, 16:])
    a, b, blend = w00[..., :32, 32:48], w01[..., :32, :16], tiled[..., :32, 32:48]
    assert ((blend >= torch.minimum(a, b) - 1e-6) & (blend <= torch.maximum(a, b) + 1e-6)).all()
    assert not torch.equal(tiled, whole)
    assert torch.equal(encoded_tiled, tiny.encode_frames(context))  # the encode is never tiled at these sizes


def test_tiling_needs_a_vae():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="no VAE"):
        set_vae_tiling(SimpleNamespace(vae=None))


def test_out_of_memory_halves_the_batch_and_keeps_what_was_done(caplog):
    """halving_on_oom (the sampler's micro-batches and the VAE decode): a batch that runs out of CUDA memory is
    halved (rounded up) and retried, members decoded before are kept, batch 1 failing raises."""
    import logging

    from wmfast.inference.ensemble import halving_on_oom

    seen, cleaned = [], []

    def attempt(batch):
        seen.append(batch)
        if batch > 2:
            raise torch.cuda.OutOfMemoryError("fake")
        return batch

    with caplog.at_level(logging.INFO, logger="wmfast"):
        assert halving_on_oom(attempt, 7, "the thing", lambda: cleaned.append(1)) == 2
    assert seen == [7, 4, 2] and len(cleaned) == 2
    assert "the thing does not fit; retrying with micro-batches of 2" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):
        halving_on_oom(lambda b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("fake")), 1, "x")

    latents = torch.randn(5, 3)
    calls = []

    def decode(z):  # 5 fails; at 3 the first 3 decode and the last 2 fail once; at 2 they decode, the 3 kept
        calls.append(z.shape[0])
        if z.shape[0] > 3 or (z.shape[0] == 2 and len(calls) == 3):
            raise torch.cuda.OutOfMemoryError("fake")
        return z * 2

    out = decode_members(latents, decode)
    torch.testing.assert_close(out, latents * 2)
    assert calls == [5, 3, 2, 2]
