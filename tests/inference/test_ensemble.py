"""Batched ensemble denoising (wmfast.inference.ensemble) with a toy denoiser, and with the tiny Wan model."""
import pytest
import torch

from wmfast import ops
from wmfast.inference.ensemble import (
    EnsembleConfig,
    flow_schedule,
    member_noise,
    run_sequential,
    sample_ensemble,
)
from wmfast.inference.predict import average_frames


class ToyDenoiser:
    """A cheap denoiser with the sampler's interface: channel mixing + a 3x3 spatial conv, modulated per frame
    by the timestep and per sample by the (batch-1, broadcast) conditioning. Records every input it sees."""

    def __init__(self, channels=4):
        g = torch.Generator().manual_seed(1)
        self.mix = torch.randn(channels, channels, generator=g) * 0.5
        self.conv = torch.randn(channels, channels, 1, 3, 3, generator=g) * 0.2
        self.calls = []

    def prepare_conditioning(self, states):
        return states[:, :, : self.mix.shape[0]].mean(1)  # [1, C]

    def velocity(self, latents, timestep_per_frame, cond):
        self.calls.append((latents.clone(), timestep_per_frame.clone()))
        h = torch.einsum("ncfhw,dc->ndfhw", latents, self.mix)
        h = h + torch.nn.functional.conv3d(latents, self.conv, padding=(0, 1, 1))
        t = timestep_per_frame[:, None, :, None, None] / 1000.0
        return torch.tanh(h) * (1 + t) + cond[:, :, None, None, None]


def _setup(n=3, steps=4, C=4, Fc=2, F=5, H=6, W=5):
    model = ToyDenoiser(C)
    context = torch.randn(1, C, Fc, H, W)
    cond = model.prepare_conditioning(torch.randn(1, 9, 25))
    return model, context, cond, F, EnsembleConfig(n=n, steps=steps, progress=False)


def test_schedule_tables():
    t, dt = flow_schedule(4, 5.0, num_frames=5, num_context=2, device="cpu")
    assert t.shape == (4, 5) and dt.shape == (4,)
    assert torch.count_nonzero(t[:, :2]) == 0 and t[0, 2] == 1000.0
    assert torch.all(t[1:, 2] < t[:-1, 2]) and torch.all(dt < 0)
    assert dt.sum().item() == pytest.approx(-1.0, abs=1e-6)  # integrates from noise (1) to data (0)
    s = 0.75  # the shifted s' of linspace point 0.75 with shift 5: 5 * 0.75 / (1 + 4 * 0.75)
    assert t[1, 4].item() == pytest.approx(1000 * 5 * s / (1 + 4 * s), rel=1e-6)


@pytest.mark.parametrize("max_batch", [None, 2, 1])
def test_batched_equals_sequential(max_batch):
    model, context, cond, F, cfg = _setup(n=4, steps=3)
    cfg.max_batch = max_batch
    batched = sample_ensemble(model, context, cond, F, cfg)
    sequential = run_sequential(model, context, cond, F, cfg)
    assert batched.shape == (4, 4, F, 6, 5)
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)
    # Members differ (own seeds) and the same seeds reproduce the same member wherever it runs.
    assert not torch.allclose(batched[0], batched[1])
    torch.testing.assert_close(sample_ensemble(model, context, cond, F, cfg, seeds=[2, 3, 4, 5])[0], batched[2])


def test_step_runners_cached_on_the_model_per_key(monkeypatch):
    """A runner (on a GPU: a captured, verified CUDA graph) is built once per (cond, context, shapes, batch),
    not once per call; a new conditioning replaces the cached runners."""
    from wmfast.inference import ensemble

    built = []

    class CountingRunner(ensemble._StepRunner):
        def __init__(self, *args):
            built.append(args)
            super().__init__(*args)

    monkeypatch.setattr(ensemble, "_StepRunner", CountingRunner)
    model, context, cond, F, cfg = _setup(n=3, steps=2)
    cfg.max_batch = 2  # micro-batches of 2 and 1: two runners
    first = sample_ensemble(model, context, cond, F, cfg)
    assert len(built) == 2
    again = sample_ensemble(model, context, cond, F, cfg)
    assert len(built) == 2  # reused: no second capture / verification
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    sample_ensemble(model, context, cond, F + 1, cfg)  # other shapes: new runners
    assert len(built) == 4
    cond2 = model.prepare_conditioning(torch.randn(1, 9, 25))
    other = sample_ensemble(model, context, cond2, F, cfg)
    assert len(built) == 6 and all(args[1] is cond2 for args in built[4:])
    assert not torch.allclose(other, first)  # the new conditioning is really used


class _SmallMemoryToy(ToyDenoiser):
    """Runs out of (simulated) memory above 2 members per forward."""

    def velocity(self, latents, timestep_per_frame, cond):
        if latents.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("simulated: N * tokens does not fit")
        return super().velocity(latents, timestep_per_frame, cond)


def test_micro_batches_automatically_on_oom(caplog):
    model, context, cond, F, cfg = _setup(n=5)
    small = _SmallMemoryToy()
    with caplog.at_level("INFO", logger="wmfast"):
        out = sample_ensemble(small, context, cond, F, cfg)  # 5 -> 3 -> 2 members per forward
    assert "micro-batches of 3" in caplog.text and "micro-batches of 2" in caplog.text
    assert {latents.shape[0] for latents, _ in small.calls} == {2, 1}  # chunks of 2, 2, 1 (5 and 3 raised)
    torch.testing.assert_close(out, sample_ensemble(model, context, cond, F, cfg), atol=1e-5, rtol=1e-5)


def test_member_noise_independent_of_batch():
    a = member_noise((2, 3), [7, 8, 9], "cpu", torch.float32)
    torch.testing.assert_close(a[1], member_noise((2, 3), [8], "cpu", torch.float32)[0])


def test_context_unchanged_at_every_step_and_timesteps():
    model, context, cond, F, cfg = _setup(n=3, steps=5)
    out = sample_ensemble(model, context, cond, F, cfg)
    assert len(model.calls) == cfg.steps
    expected_t, _ = flow_schedule(cfg.steps, cfg.shift, F, 2, "cpu")
    for i, (latents, t) in enumerate(model.calls):
        assert torch.equal(latents[:, :, :2], context.expand(3, -1, -1, -1, -1)), f"context changed at step {i}"
        assert torch.equal(t, expected_t[i : i + 1])  # batch 1: shared by the members, never copied
    assert torch.equal(out[:, :, :2], context.expand(3, -1, -1, -1, -1))


def test_fused_equals_unfused_update():
    model, context, cond, F, cfg = _setup(n=2)
    fused = sample_ensemble(model, context, cond, F, cfg)
    cfg.fused = False
    torch.testing.assert_close(sample_ensemble(model, context, cond, F, cfg), fused)


def test_sampler_matches_hand_written_euler_loop():
    model, context, cond, F, cfg = _setup(n=2, steps=3)
    out = sample_ensemble(model, context, cond, F, cfg, seeds=[11, 12])
    x = member_noise(out.shape[1:], [11, 12], "cpu", torch.float32)
    x[:, :, :2] = context
    s = torch.linspace(1, 0, 4, dtype=torch.float64)
    s = 5 * s / (1 + 4 * s)
    for i in range(3):
        t = torch.full((2, F), 1000 * float(s[i]))
        t[:, :2] = 0
        x = x + float(s[i + 1] - s[i]) * model.velocity(x, t, cond)
        x[:, :, :2] = context
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_pixel_vs_latent_averaging():
    latents = torch.randn(4, 3, 2, 4, 4)
    proj = torch.randn(3, 3)

    def decode_frame(z):  # a nonlinear "VAE": averaging before or after it differs
        return torch.tanh(torch.einsum("ncfhw,dc->ndhw", z[:, :, -1:], proj)).repeat_interleave(2, -1)

    frames = average_frames(latents, decode_frame, decode_batch=3)
    decoded = decode_frame(latents)
    assert frames.members.shape == (4, 3, 4, 8)
    assert frames.pixel_mean.shape == frames.latent_mean.shape == frames.pixel_std.shape == (3, 4, 8)
    torch.testing.assert_close(frames.members, decoded)
    torch.testing.assert_close(frames.pixel_mean, decoded.mean(0))
    torch.testing.assert_close(frames.pixel_std, decoded.std(0, correction=0))
    torch.testing.assert_close(frames.latent_mean, decode_frame(latents.mean(0, keepdim=True))[0])
    assert not torch.allclose(frames.pixel_mean, frames.latent_mean)
    only_latent = average_frames(latents, decode_frame, modes=("latent",))
    assert only_latent.members is None and only_latent.pixel_mean is None
    with pytest.raises(ValueError, match="modes"):
        average_frames(latents, decode_frame, modes=("median",))


def test_single_member_has_zero_spread():
    frames = average_frames(torch.randn(1, 2, 2, 3, 3), lambda z: z[:, :, 0].tanh())
    assert torch.count_nonzero(frames.pixel_std) == 0
    torch.testing.assert_close(frames.pixel_mean, frames.latent_mean)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_latent_frames": 2}, "num_latent_frames"),
    ({"context": torch.randn(2, 4, 2, 6, 5)}, "context_latents must be"),
    ({"seeds": [1, 2]}, "seeds has 2 entries"),
])
def test_validation(kwargs, match):
    model, context, cond, F, cfg = _setup(n=3)
    args = {"context": context, "num_latent_frames": F, "seeds": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_ensemble(model, args["context"], cond, args["num_latent_frames"], cfg, seeds=args["seeds"])


@pytest.mark.gpu
def test_cuda_graph_equals_eager():
    model, context, cond, F, cfg = _setup(n=4, steps=6)
    model.mix, model.conv = model.mix.cuda(), model.conv.cuda()
    context, cond = context.cuda(), cond.cuda()
    cfg.graph = False
    eager = sample_ensemble(model, context, cond, F, cfg)
    cfg.graph = True
    torch.testing.assert_close(sample_ensemble(model, context, cond, F, cfg), eager, atol=1e-4, rtol=1e-4)
    _ = ops  # the fused op runs inside the captured graph on the GPU


# ------------------------------------------------------------------------------------------ tiny Wan model


@pytest.fixture(scope="module")
def wan_tiny():
    pytest.importorskip("diffusers", reason="the Wan world model is built on diffusers, which cannot be imported here")
    from wmfast.models.wan import build_world_model

    torch.manual_seed(0)
    return build_world_model("tiny", vae=False).eval()


def test_wan_tiny_batched_equals_sequential(wan_tiny):
    sched = wan_tiny.schedule
    context = torch.randn(1, 48, sched.num_context_latents, 4, 4)
    cfg = EnsembleConfig(n=3, steps=2, progress=False)
    with torch.no_grad():
        cond = wan_tiny.prepare_conditioning(torch.randn(1, 77, 25))
        batched = sample_ensemble(wan_tiny, context, cond, sched.num_latents, cfg)
        sequential = run_sequential(wan_tiny, context, cond, sched.num_latents, cfg)
    assert batched.shape == (3, 48, sched.num_latents, 4, 4)
    torch.testing.assert_close(batched, sequential, atol=1e-4, rtol=1e-4)
    assert torch.equal(batched[:, :, : context.shape[2]], context.expand(3, -1, -1, -1, -1))


@pytest.mark.gpu
@pytest.mark.requires("diffusers")
def test_wan_tiny_cuda_graph_equals_eager():
    from wmfast.models.wan import build_world_model

    torch.manual_seed(0)
    model = build_world_model("tiny", vae=False, device="cuda").eval()
    sched = model.schedule
    context = torch.randn(1, 48, sched.num_context_latents, 4, 4, device="cuda")
    cfg = EnsembleConfig(n=4, steps=4, progress=False, graph=False)
    with torch.no_grad():
        cond = model.prepare_conditioning(torch.randn(1, 77, 25, device="cuda"))
        eager = sample_ensemble(model, context, cond, sched.num_latents, cfg)
        cfg.graph = True
        graphed = sample_ensemble(model, context, cond, sched.num_latents, cfg)
    torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- CLI end to end (tiny model)


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    pytest.importorskip("av", reason="the raw 1X videos are written and read with PyAV, which cannot be imported here")
    from wmfast.data.raw_synthetic import write_synthetic_raw_dataset

    root = tmp_path_factory.mktemp("raw")
    write_synthetic_raw_dataset(str(root), shards=1, frames=77, size=64, val_frames=77)  # one val sample
    return str(root)


@pytest.mark.requires("diffusers")
def test_cli_sample_and_eval_psnr(raw_data, tmp_path):
    import csv
    import json

    from PIL import Image

    from wmfast.cli import main

    common = ["--model", "tiny", "--data", raw_data, "--no-progress"]
    out = tmp_path / "sample"
    assert main(["sample", *common, "--ensemble", "2", "--steps", "2", "--strip", "--out", str(out)]) == 0
    report = json.loads((out / "sample.json").read_text())
    assert Image.open(out / "frame76.png").size == (64, 64)
    # strip: a labelled figure (its panels: tests/cli/test_sample_strip.py)
    assert report["strip"] == str(out / "strip.png") and Image.open(out / "strip.png").format == "PNG"
    assert 0 < report["psnr_pixel"] < 100 and 0 < report["psnr_latent"] < 100

    ev = tmp_path / "eval"
    assert main(["eval-psnr", *common, "--ensemble", "1,2", "--steps", "2", "--solver", "euler,unipc",
                 "--out", str(ev)]) == 0
    rows = list(csv.DictReader((ev / "psnr.csv").read_text().splitlines()))
    assert [(r["solver"], r["steps"], r["ensemble"]) for r in rows] == [
        ("euler", "2", "1"), ("euler", "2", "2"), ("unipc", "2", "1"), ("unipc", "2", "2")]
    assert all(float(r["seconds_per_sample"]) > 0 for r in rows)
    assert (ev / "psnr.md").read_text().startswith("| solver | steps | cache threshold |")
    assert (ev / "psnr.png").stat().st_size > 0 and not (ev / "psnr_cache.png").exists()
    # The N=2 ensemble of eval-psnr is the first 2 members of its larger run: the same as `sample --ensemble 2`.
    n2 = rows[1]
    assert float(n2["psnr_pixel"]) == pytest.approx(report["psnr_pixel"], abs=1e-6)
    assert float(n2["psnr_latent"]) == pytest.approx(report["psnr_latent"], abs=1e-6)
    # --solver reaches the sampler: `sample --solver unipc` is the unipc row, and differs from euler.
    assert main(["sample", *common, "--ensemble", "2", "--steps", "2", "--solver", "unipc", "--average", "latent",
                 "--out", str(tmp_path / "unipc")]) == 0
    unipc = json.loads((tmp_path / "unipc" / "sample.json").read_text())
    assert unipc["solver"] == "unipc" and unipc["denoise_s"] > 0
    assert float(rows[3]["psnr_latent"]) == pytest.approx(unipc["psnr_latent"], abs=1e-6)
    assert float(rows[3]["psnr_latent"]) != pytest.approx(float(n2["psnr_latent"]), abs=1e-6)
    # --cache-threshold: a threshold no change reaches skips every step but the first and the last
    cache = tmp_path / "cache"
    assert main(["eval-psnr", *common, "--ensemble", "2", "--steps", "4", "--cache-threshold", "1e9,0",
                 "--out", str(cache)]) == 0
    rows = list(csv.DictReader((cache / "psnr.csv").read_text().splitlines()))
    assert [(r["cache_threshold"], r["skipped_steps"]) for r in rows] == [("0.0", "0"), ("1000000000.0", "2")]
    assert rows[0]["psnr_pixel"] != rows[1]["psnr_pixel"] and (cache / "psnr_cache.png").stat().st_size > 0


@pytest.mark.requires("diffusers")
def test_tiny_base_independent_of_seed_and_equal_to_the_trained_base():
    """--seed seeds the members only: `sample --seed 3` sits on the base a LoRA trained at any seed was trained
    on (SamplingTask.build_model), not on another random base."""
    import argparse

    from wmfast.cli._sampling import load_model
    from wmfast.tasks.sampling import SamplingTask

    def base(seed):
        torch.manual_seed(seed + 100)  # whatever the global RNG holds
        args = argparse.Namespace(model="tiny", lora=None, seed=seed, device="cpu", fp8=False, compile=False)
        return load_model(args).transformer.state_dict()

    a, b = base(0), base(3)
    torch.manual_seed(5)  # a training run's --seed
    trained = {k.replace(".base_layer", ""): v for k, v in SamplingTask(None).build_model().transformer.state_dict()
               .items() if "lora_" not in k}
    base_keys = {k for k in a if "state_" not in k}  # the state modules are trained (zero-initialised in `a`)
    assert a.keys() == b.keys() and base_keys <= trained.keys() and len(base_keys) > 20
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        if k in base_keys:
            torch.testing.assert_close(trained[k], a[k], rtol=0, atol=0)


@pytest.mark.requires("diffusers")
def test_cli_rejects_bad_lists(raw_data, capsys):
    from wmfast.cli import main

    assert main(["eval-psnr", "--model", "tiny", "--data", raw_data, "--ensemble", "0,2"]) == 2
    assert capsys.readouterr().err == "wmfast eval-psnr: error: --ensemble: expected positive integers, got '0,2'\n"
