"""The tiny preset's VAE weights: an AutoencoderKLWan of the tiny config (479k parameters) fitted to the frames of
wmfast's synthetic raw generator, shipped with the package (`assets/tiny_vae.safetensors`, 1.9 MB).

Why fitted weights: the sampling track scores decoded pixels. A VAE with random weights decodes any latent to
noise (about 10 dB against the true frame whatever the latent), so a tiny world model's PSNR, and what an ensemble
does to it, would say nothing. The real track uses Wan2.2's pretrained VAE; the tiny world plays the same part
with this one. Its per-channel latent mean and std (measured on held-out frames, stored in the file's metadata)
become the config's latents_mean / latents_std, so normalised latents have unit scale like Wan's.

Fitting (`python -m wmfast.models.wan.tiny_vae` rewrites the asset, about 10 minutes on 2 CPU cores; seeded, equal
up to the float rounding of the machine's kernels): 3,000 frames of the synthetic raw generator at 64x64 (about 10
segments, each with its background colour) with the uncertain-mode wanderer (every object any synthetic set shows),
clips of 5 frames at the frame schedule's stride 3 (latent 0 alone + one 4-frame latent), batches of 4, 3,000 steps
of AdamW with a cosine decay, loss = pixel MSE + 1e-6 x KL (reconstruct the posterior mode, which is what
`vae_encode` uses); the latent statistics are measured on 25-frame clips, the sampling schedule's length. It
prints the reconstruction PSNR of held-out clips. `wmfast reproduce` measures the VAE's ceiling on its own val
samples (frame 76 of the true future encoded and decoded) beside every sampling-track PSNR.
"""
from __future__ import annotations

import json
import math
import os

import torch

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_vae.safetensors")
FIT_SEED = 0
CLIP_FRAMES, CLIP_STRIDE = 5, 3
KL_WEIGHT = 1e-6


def tiny_vae_config(base: dict) -> dict:
    """The tiny VAE config with the asset's latent statistics (base's when there is no asset)."""
    if not os.path.exists(ASSET):
        return base
    from safetensors import safe_open

    with safe_open(ASSET, "pt") as f:
        meta = f.metadata() or {}
    stats = {k: json.loads(meta[k]) for k in ("latents_mean", "latents_std") if k in meta}
    return {**base, **stats}


def load_tiny_vae_weights(vae) -> bool:
    """Load the shipped weights into a tiny-config AutoencoderKLWan; False when the asset is absent."""
    if not os.path.exists(ASSET):
        return False
    from safetensors.torch import load_file

    vae.load_state_dict(load_file(ASSET))
    return True


def synthetic_frames(num_frames: int, seed: int, size: int = 64) -> torch.Tensor:
    """uint8 [n, 3, size, size]: frames of the synthetic raw generator (uncertain mode; a background colour per
    segment of 231..462 frames, so n sets how many colours the fit sees)."""
    import numpy as np

    from wmfast.data.raw_synthetic import _synthetic_states, render_frames

    states, seg = _synthetic_states(np.random.default_rng(seed), num_frames, 0)
    return torch.from_numpy(render_frames(states, seg, size, seed, uncertain=True)).permute(0, 3, 1, 2)


def clips(frames: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """float [count, 3, CLIP_FRAMES, H, W] in [-1, 1]: clips of CLIP_FRAMES frames CLIP_STRIDE apart, at random
    starts of uint8 `frames` [n, 3, H, W]."""
    span = (CLIP_FRAMES - 1) * CLIP_STRIDE + 1
    starts = torch.randint(0, frames.shape[0] - span + 1, (count,), generator=generator)
    picked = torch.stack([frames[s: s + span: CLIP_STRIDE] for s in starts.tolist()]).permute(0, 2, 1, 3, 4)
    return picked.float() / 127.5 - 1


def reconstruction_psnr(vae, x: torch.Tensor) -> float:
    """Mean per-clip PSNR (dB, range [-1, 1] as 2) of decode(mode(encode(x)))."""
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((y - x) / 2).square().flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def fit(steps: int = 3000, batch: int = 4, lr: float = 3e-3, progress: bool = True):
    """Fit the tiny VAE (module docstring); returns (vae, latents_mean, latents_std, held-out PSNR)."""
    from diffusers import AutoencoderKLWan
    from tqdm.auto import tqdm

    from wmfast.models.wan.presets import TINY_VAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FIT_SEED)
        vae = AutoencoderKLWan(**TINY_VAE)
    train, held_out = synthetic_frames(3000, FIT_SEED), synthetic_frames(600, FIT_SEED + 1)
    g = torch.Generator().manual_seed(FIT_SEED)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    bar = tqdm(range(steps), desc="fit tiny VAE", disable=not progress)
    for _ in bar:
        x = clips(train, batch, g)
        post = vae.encode(x).latent_dist
        loss = (vae.decode(post.mode()).sample - x).square().mean() + KL_WEIGHT * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    test = clips(held_out, 64, torch.Generator().manual_seed(FIT_SEED + 1))
    mean, std = latent_stats(vae, held_out)
    return vae, mean, std, reconstruction_psnr(vae, test)


def latent_stats(vae, frames: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mode over clips as long as the sampling schedule's (25 frames at
    stride 3: 7 latents, most of them made through the causal cache) cut from uint8 `frames` [n, 3, H, W]."""
    span = 24 * CLIP_STRIDE + 1
    starts = range(0, frames.shape[0] - span + 1, span)
    long_clips = torch.stack([frames[s: s + span: CLIP_STRIDE] for s in starts]).permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        z = torch.cat([vae.encode(c[None].float() / 127.5 - 1).latent_dist.mode() for c in long_clips])
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3).tolist()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description="fit the tiny preset's VAE and write " + ASSET)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", default=ASSET)
    args = p.parse_args(argv)
    vae, mean, std, value = fit(args.steps)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"latents_mean": json.dumps(mean), "latents_std": json.dumps(std), "steps": str(args.steps),
            "held_out_psnr_db": f"{value:.2f}"}
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, args.out, metadata=meta)
    os.chmod(args.out, 0o644)  # package data: readable by everyone who installs it
    print(f"wrote {args.out}: held-out reconstruction PSNR {value:.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
