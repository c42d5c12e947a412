"""The ensemble strip of `wmfast sample --strip` (wmfast.cli.strip): a titled figure whose panels are labelled
(context, averages and members with their PSNR, the std map with its colour bar, the ground truth), members
capped; drawn from tensors, no model."""
import pytest
import torch

from wmfast.cli.strip import draw_strip, save_strip, strip_title
from wmfast.inference.predict import EnsembleFrames
from wmfast.metrics.psnr import psnr, to_uint8

H, W = 12, 20


def ensemble(n: int, *, pixel: bool = True) -> tuple[torch.Tensor, EnsembleFrames, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    members = torch.rand(n, 3, H, W, generator=g)
    frames = EnsembleFrames(members=members if pixel else None, pixel_mean=members.mean(0) if pixel else None,
                            pixel_std=members.std(0) if pixel else None, latent_mean=members.mean(0) * 0.9)
    context = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    target = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    return context, frames, target


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def titled_axes(fig) -> dict[str, object]:
    """The image panels by the first line of their title (the colour bar has no title)."""
    return {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}


def test_strip_title_names_sample_split_members_and_steps():
    assert strip_title(3, "val", 8, 50, "euler") == "sample 3 of the val split: N=8 members, 50 euler steps"
    assert "N=20 members (first 16 shown)" in strip_title(0, "train", 20, 4, "unipc")


def test_strip_panels_are_labelled_with_psnr_and_members_capped(close_figures):
    context, frames, target = ensemble(6)
    fig = draw_strip(context, frames, target, title=strip_title(2, "val", 6, 4, "euler", max_members=4),
                     max_members=4)
    assert fig.get_suptitle() == "sample 2 of the val split: N=6 members (first 4 shown), 4 euler steps"
    panels = titled_axes(fig)
    assert list(panels) == ["context (last frame)", "pixel mean", "latent mean", "std (uncertainty)", "ground truth",
                            "member 1", "member 2", "member 3", "member 4"]
    for name, image in (("pixel mean", frames.pixel_mean), ("latent mean", frames.latent_mean),
                        ("member 3", frames.members[2])):
        drawn = panels[name].get_images()[0].get_array()
        assert torch.equal(torch.from_numpy(drawn.copy()), to_uint8(image).permute(1, 2, 0))
        assert panels[name].get_title().split("\n")[1] == f"{psnr(to_uint8(image), target):.2f} dB"
    truth = panels["ground truth"].get_images()[0].get_array()
    assert torch.equal(torch.from_numpy(truth.copy()), target.permute(1, 2, 0))


def test_std_panel_has_a_fixed_scale_colour_bar(close_figures):
    from wmfast.cli._sampling import SPREAD_FULL_SCALE

    context, frames, target = ensemble(3)
    fig = draw_strip(context, frames, target, title="t")
    im = titled_axes(fig)["std (uncertainty)"].get_images()[0]
    assert im.get_clim() == (0.0, SPREAD_FULL_SCALE) and im.get_cmap().name == "magma"
    assert torch.allclose(torch.from_numpy(im.get_array().data.copy()), frames.pixel_std.mean(0))
    bars = [ax for ax in fig.axes if ax.get_ylabel().startswith("std over members")]
    assert len(bars) == 1 and im.colorbar is not None and im.colorbar.ax is bars[0]


def test_latent_only_frames_leave_panels_out(close_figures, tmp_path):
    context, frames, target = ensemble(3, pixel=False)
    path = save_strip(str(tmp_path / "strip.png"), context, frames, target, title="latent only")
    assert (tmp_path / "strip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("strip.png")
    fig = draw_strip(context, frames, target, title="latent only")
    assert list(titled_axes(fig)) == ["context (last frame)", "latent mean", "ground truth"]
    assert all(not ax.get_ylabel() for ax in fig.axes)  # no std map: no colour bar
