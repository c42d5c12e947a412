"""Precomputed VAE latents of a raw 1X dataset (the output of `wmfast data encode`): per split a directory with
latents.npy [N, C, F', H', W'] fp32, states.npy [N, 77, 25] and latents.json; the dataset that reads one and
the loop that writes one from any frame encoder."""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

LATENTS_META = "latents.json"


def is_latent_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, LATENTS_META))


class LatentDataset(Dataset):
    """`wmfast data encode` output: latents.npy [N, C, F', H', W'] (memmap) + states.npy [N, 77, 25]."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, LATENTS_META)) as f:
            self.meta = json.load(f)
        self.latents = np.load(os.path.join(directory, "latents.npy"), mmap_mode="r")
        self.states = np.load(os.path.join(directory, "states.npy"), mmap_mode="r")
        if len(self.latents) != len(self.states):
            raise ValueError(f"{directory}: {len(self.latents)} latents but {len(self.states)} state rows")

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": torch.from_numpy(np.array(self.latents[i], dtype=np.float32)),
                "states": torch.from_numpy(np.array(self.states[i], dtype=np.float32))}


def write_latents(ds, split_dir: str, encode: Callable[[torch.Tensor], torch.Tensor], meta: dict, *,
                  max_samples: int | None = None, batch: int = 1, device: str = "cpu", desc: str = "encode",
                  progress: bool = True) -> str:
    """Encode the frames of `ds` (items {"frames": uint8 [F, 3, H, W], "states": [F_states, 25]}) batch by batch with
    `encode` ([B, F, 3, H, W] -> latents [B, C, F', H', W']) into `split_dir`; `meta` goes into latents.json
    (with the count and the latent shape added). Returns split_dir."""
    from tqdm import tqdm

    n = min(len(ds), max_samples) if max_samples else len(ds)
    os.makedirs(split_dir, exist_ok=True)
    lat = states = None
    for a in tqdm(range(0, n, batch), desc=desc, disable=not progress):
        items = [ds[i] for i in range(a, min(a + batch, n))]
        z = encode(torch.stack([it["frames"] for it in items]).to(device)).float().cpu().numpy()
        if lat is None:
            lat = np.lib.format.open_memmap(os.path.join(split_dir, "latents.npy"), mode="w+",
                                            dtype=np.float32, shape=(n, *z.shape[1:]))
            states = np.zeros((n, *items[0]["states"].shape), np.float32)
        lat[a:a + len(items)] = z
        states[a:a + len(items)] = np.stack([it["states"].numpy() for it in items])
    lat.flush()
    np.save(os.path.join(split_dir, "states.npy"), states)
    with open(os.path.join(split_dir, LATENTS_META), "w") as f:
        json.dump({**meta, "count": n, "shape": list(lat.shape[1:])}, f, indent=1)
    return split_dir
