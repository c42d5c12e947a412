"""The ensemble strip of `wmfast sample --strip`: one labelled figure of an ensemble prediction.

Top row: the last context frame, the averaged predictions (pixel mean, latent mean), the per-pixel std over the
members (the uncertainty map, with its colour bar) and the ground truth; below, the members (up to max_members),
in rows of at most MEMBERS_PER_ROW. Predictions carry their PSNR against the ground truth. Tensors in, PNG out:
no model is needed to draw it.
"""
from __future__ import annotations

import math

import torch

from wmfast.cli._sampling import SPREAD_FULL_SCALE

MAX_MEMBERS = 16  # members drawn at most (the first ones); the title gives N
MEMBERS_PER_ROW = 8
PANEL_INCHES = 2.0  # width of one panel; 64x64 frames are drawn large, wide frames keep their aspect


def strip_title(index: int, split: str, n: int, steps: int, solver: str, max_members: int = MAX_MEMBERS) -> str:
    """"sample <index> of the <split> split: N=<n> members (first <max_members> shown), <steps> <solver> steps"."""
    members = f"N={n} members" + (f" (first {max_members} shown)" if n > max_members else "")
    return f"sample {index} of the {split} split: {members}, {steps} {solver} steps"


def strip_panels(last_context: torch.Tensor, frames, target: torch.Tensor, max_members: int = MAX_MEMBERS):
    """(summary, members): lists of (label, [3, H, W] uint8) in drawing order; the std panel is (label, [H, W]
    float std over the members, averaged over the channels, [0, 1] pixel units). frames: an EnsembleFrames
    (wmfast.inference.predict); panels it did not compute are left out."""
    from wmfast.metrics.psnr import psnr, to_uint8

    def scored(label: str, image: torch.Tensor):
        img = to_uint8(image).cpu()
        return f"{label}\n{psnr(img, target.cpu()):.2f} dB", img

    summary = [("context (last frame)", last_context.cpu())]
    for label, img in (("pixel mean", frames.pixel_mean), ("latent mean", frames.latent_mean)):
        if img is not None:
            summary.append(scored(label, img))
    if frames.pixel_std is not None:
        summary.append(("std (uncertainty)", frames.pixel_std.float().mean(0).cpu()))
    summary.append(("ground truth", target.cpu()))
    members = [] if frames.members is None else [scored(f"member {i + 1}", m)
                                                 for i, m in enumerate(frames.members[:max_members])]
    return summary, members


def draw_strip(last_context: torch.Tensor, frames, target: torch.Tensor, *, title: str, max_members: int = MAX_MEMBERS):
    """The strip as a matplotlib Figure (not saved). last_context, target: [3, H, W] uint8; frames: EnsembleFrames
    with [3, H, W] (members [N, 3, H, W]) tensors in [0, 1]. The std map uses a fixed scale (0 to
    SPREAD_FULL_SCALE) so that strips of different samples compare by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, members = strip_panels(last_context, frames, target, max_members)
    cols = max(len(summary), min(len(members), MEMBERS_PER_ROW))
    rows = 1 + math.ceil(len(members) / cols)
    height, width = target.shape[-2:]
    panel_h = PANEL_INCHES * height / width + 0.45  # room for a two-line label
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES + 0.8, rows * panel_h + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (label, img) in zip(axes[0], summary):
        if img.dim() == 2:  # the std map
            im = ax.imshow(img.numpy(), cmap="magma", vmin=0.0, vmax=SPREAD_FULL_SCALE)
            bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            bar.set_label("std over members (0-1 pixel scale)", fontsize=8)
            bar.ax.tick_params(labelsize=7)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(label, fontsize=9)
    for i, (label, img) in enumerate(members):
        ax = axes[1 + i // cols][i % cols]
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_strip(path: str, last_context: torch.Tensor, frames, target: torch.Tensor, *, title: str,
               max_members: int = MAX_MEMBERS, dpi: int = 100) -> str:
    """Draw the strip (draw_strip) to `path` as PNG; returns the path."""
    import matplotlib.pyplot as plt

    fig = draw_strip(last_context, frames, target, title=title, max_members=max_members)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
