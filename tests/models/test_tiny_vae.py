"""The tiny preset's VAE: the fitted weights shipped with the package load, reconstruct the synthetic generator's
frames far better than random weights do, and give latents of about unit scale (its stored latent statistics)."""
import pytest

pytest.importorskip("diffusers", reason="the Wan VAE is diffusers' AutoencoderKLWan")

import os

import torch
from diffusers import AutoencoderKLWan

from wmfast.models.wan import build_vae, get_preset, vae_decode, vae_encode
from wmfast.models.wan.presets import TINY_VAE
from wmfast.models.wan.tiny_vae import ASSET, reconstruction_psnr, synthetic_frames, tiny_vae_config


@pytest.fixture(scope="module")
def clip():
    frames = synthetic_frames(120, seed=11)  # frames the fit never saw (its seeds are 0 and 1)
    return frames[40:65:3][None].permute(0, 2, 1, 3, 4).float() / 127.5 - 1  # [1, 3, 9, 64, 64] in [-1, 1]


def test_the_asset_ships_and_loads():
    assert os.path.isfile(ASSET), "the fitted tiny VAE is missing: `python -m wmfast.models.wan.tiny_vae` writes it"
    vae = build_vae(get_preset("tiny"))
    cfg = tiny_vae_config(TINY_VAE)
    assert list(vae.config.latents_std) == pytest.approx(cfg["latents_std"]) and cfg["latents_std"] != [1.0] * 48


def test_fitted_weights_reconstruct(clip):
    fitted = reconstruction_psnr(build_vae(get_preset("tiny")), clip)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random = reconstruction_psnr(AutoencoderKLWan(**TINY_VAE).eval(), clip)
    assert fitted > 16.0 and fitted > random + 5.0, (fitted, random)  # measured: 17.6 against 10.7


def test_normalised_latents_have_unit_scale(clip):
    vae = build_vae(get_preset("tiny"))
    frames = ((clip[0].permute(1, 0, 2, 3) + 1) * 127.5).round().to(torch.uint8)[None]  # [1, 9, 3, 64, 64]
    z = vae_encode(vae, frames)
    assert z.shape == (1, 48, 3, 4, 4)
    assert 0.3 < float(z.std()) < 3.0 and abs(float(z.mean())) < 1.0
    back = vae_decode(vae, z)
    assert back.shape == (1, 9, 3, 64, 64) and 0 <= float(back.min()) and float(back.max()) <= 1
