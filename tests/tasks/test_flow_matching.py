"""The sampling task's flow-matching loss (wmfast.tasks.sampling.flow_matching_loss) against hand computations,
with a recording stub denoiser (CPU, milliseconds)."""
import pytest
import torch

from wmfast.tasks.sampling import SHIFT, flow_matching_loss, shift_sigma


class RecordingModel:
    """Returns a fixed velocity per call (optionally with garbage on the context frames) and records its inputs."""

    def __init__(self, velocity, garbage_on_context=0.0, num_context=2):
        self.v, self.garbage, self.nc, self.calls = velocity, garbage_on_context, num_context, []

    def prepare_conditioning(self, states):
        return states

    def __call__(self, x_t, timestep, cond):
        self.calls.append((x_t.clone(), timestep.clone()))
        v = self.v.clone()
        v[:, :, : self.nc] += self.garbage
        return v


def _data(B=3, C=4, F=5, H=2, W=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, F, H, W, generator=g), torch.randn(B, 77, 25, generator=g), torch.randn(
        B, C, F, H, W, generator=g)


def test_shift_5_sigma_by_hand():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    expected = torch.tensor([0.0, 1.25 / 2.0, 2.5 / 3.0, 1.0])  # 5 s / (1 + 4 s)
    torch.testing.assert_close(shift_sigma(s), expected)
    assert SHIFT == 5.0


def test_inputs_timesteps_and_loss_by_hand():
    latents, states, v = _data()
    nc = 2
    model = RecordingModel(v, num_context=nc)
    loss = flow_matching_loss(model, latents, states, nc, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, by hand
    s = torch.rand(latents.shape[0], generator=g)
    noise = torch.randn(latents.shape, generator=g)
    sig = (5 * s / (1 + 4 * s)).view(-1, 1, 1, 1, 1)
    x_t, t = model.calls[0]
    torch.testing.assert_close(x_t[:, :, :nc], latents[:, :, :nc], rtol=0, atol=0)  # clean context
    torch.testing.assert_close(x_t[:, :, nc:], ((1 - sig) * latents + sig * noise)[:, :, nc:])
    assert torch.count_nonzero(t[:, :nc]) == 0
    torch.testing.assert_close(t[:, nc:], (1000 * sig.view(-1, 1)).expand(-1, latents.shape[2] - nc))
    expected = (v - (noise - latents))[:, :, nc:].square().mean()
    torch.testing.assert_close(loss, expected)


def test_loss_covers_only_the_future_latents():
    latents, states, v = _data()
    nc = 2

    def loss_of(model, lat):
        return flow_matching_loss(model, lat, states, nc, generator=torch.Generator().manual_seed(3))

    base = loss_of(RecordingModel(v, num_context=nc), latents)
    # Garbage in the predicted velocity of the context frames: not scored.
    assert loss_of(RecordingModel(v, garbage_on_context=100.0, num_context=nc), latents) == base
    # The context part of the target (noise - latents) changed, the model output fixed: loss unchanged.
    moved = latents.clone()
    moved[:, :, :nc] += 5.0
    assert loss_of(RecordingModel(v, num_context=nc), moved) == base
    # ...while a change in a future latent does move it (the check above can fail).
    moved = latents.clone()
    moved[:, :, nc:] += 0.5
    assert loss_of(RecordingModel(v, num_context=nc), moved) != pytest.approx(base.item())


@pytest.mark.requires("deepspeed", "diffusers", "av")
def test_tiny_sampling_trains_on_raw_frames_encoded_on_the_fly(tmp_path, monkeypatch):
    """One process, the tiny-sampling recipe on a raw 1X split (frames VAE-encoded on the fly by the task's
    frozen VAE): the loss is finite and falls. 8 steps, ~15 s on the loaded 2-core machine."""
    from wmfast.data.raw_synthetic import write_synthetic_raw_dataset
    from wmfast.train import TrainConfig, train
    from wmfast.train.runlog import read_jsonl

    monkeypatch.setenv("WMFAST_PROGRESS", "0")
    write_synthetic_raw_dataset(str(tmp_path / "raw"), shards=1, frames=240, size=64, val_frames=231)
    cfg = TrainConfig.from_name("tiny-sampling", steps=8, ckpt_every=8, global_batch=2, micro_batch=2,
                                num_workers=0)
    train(cfg, str(tmp_path / "raw"), str(tmp_path / "run"), progress=False)
    losses = [x["loss"] for x in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if x["kind"] == "train"]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3, losses
