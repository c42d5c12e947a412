"""Synthetic datasets in exactly the 1X v2.0 tokenized format, with structure a model can learn.

Each segment has its own random token texture (a G x G grid of ids). The robot states drive it:
- linear velocity (state 23) and angular velocity (state 24) are integers in {-2..2}, held for 17 frames
  at a time; they move the texture by 1/8 of a token per frame along x and y (so v tokens per 8-frame
  grid), and every grid shows the texture rolled by the cumulative offset at its last frame;
- left-hand closure (state 21, 0 or 1) paints a patch in the top-left corner with one of two fixed ids.
The other 22 joint angles are smooth random walks (informative of nothing, as distractors). 1% of the
tokens are replaced by random ids (tokenizer noise). A model that copies the previous grid already beats
chance by far; one that reads the velocities from the states and shifts the grid does better still.

Written as published: train_v2.0 in the nested layout, val_v2.0 flat (see `wmfast.data.layout`), with
"query": null in metadata.json like the real data (the generator is named under a wmfast-only key).
"""
from __future__ import annotations

import json
import os

import numpy as np

from wmfast.data.format import GRID_SIZE, HZ, STATE_DIM, VOCAB_SIZE, WINDOW, num_windows
from wmfast.data.layout import FLAT, NESTED, SPLIT_METADATA, make_dirs, shard_paths

LIN_VEL, ANG_VEL, LEFT_HAND = 23, 24, 21
NOISE = 0.01


def _shard_states(rng: np.random.Generator, n: int, first_segment: int):
    """(states [n, 25] float32, segment_idx [n] int32, shift [n, 2] float: cumulative (y, x) token offset)."""
    states = np.zeros((n, STATE_DIM), np.float32)
    seg = np.zeros(n, np.int32)
    shift = np.zeros((n, 2), np.float64)
    f, sid = 0, first_segment
    while f < n:
        length = min(int(rng.integers(4 * WINDOW, 12 * WINDOW)), n - f)
        sl = slice(f, f + length)
        seg[sl] = sid
        joints = np.cumsum(rng.normal(0, 0.02, (length, 23)), axis=0) + rng.normal(0, 0.5, 23)
        states[sl, :23] = joints
        held = -(-length // WINDOW)
        vel = np.repeat(rng.integers(-2, 3, (held, 2)), WINDOW, axis=0)[:length]
        states[sl, LIN_VEL], states[sl, ANG_VEL] = vel[:, 0], vel[:, 1]
        states[sl, LEFT_HAND] = np.repeat(rng.integers(0, 2, held), WINDOW)[:length]
        states[sl, 22] = rng.integers(0, 2)
        # offset at frame f of the segment = sum of the velocities of frames 1..f, 1/8 token per unit
        shift[sl] = np.concatenate([[[0.0, 0.0]], np.cumsum(vel[1:, ::-1], axis=0) / 8.0])
        f, sid = f + length, sid + 1
    return states, seg, shift


def _shard_video(rng, states, seg, shift, grid: int, vocab: int) -> np.ndarray:
    n = states.shape[0]
    video = np.zeros((num_windows(n), 3, grid, grid), np.int32)
    textures = {int(s): rng.integers(0, vocab, (grid, grid), dtype=np.int64) for s in np.unique(seg)}
    hand_ids = rng.integers(0, vocab, 2)
    patch = max(1, grid // 8)
    for w in range(video.shape[0]):
        for g, off in enumerate((0, 8, 16)):  # last frame of grid g's span inside the window
            f = min(w * WINDOW + off, n - 1)
            dy, dx = np.rint(shift[f]).astype(int)
            img = np.roll(textures[int(seg[f])], (dy, dx), axis=(0, 1))
            img[:patch, :patch] = hand_ids[int(states[f, LEFT_HAND])]
            video[w, g] = img
    noise = rng.random(video.shape) < NOISE
    video[noise] = rng.integers(0, vocab, int(noise.sum()))
    return video


def write_split(out_dir: str, shards: int, frames: int, seed: int, *, grid_size: int = GRID_SIZE,
                vocab_size: int = VOCAB_SIZE, first_segment: int = 0, layout: str = FLAT) -> str:
    """Write one split directory (metadata.json + per-shard files, `layout` NESTED or FLAT) and return its
    path."""
    if shards < 1 or frames < 1:
        raise ValueError(f"shards={shards} and frames={frames} must be >= 1")
    if not 2 <= vocab_size <= VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} must be in [2, {VOCAB_SIZE}]")
    make_dirs(out_dir, layout)
    rng = np.random.default_rng(seed)
    for i in range(shards):
        p = shard_paths(out_dir, i, "bin", layout)
        states, seg, shift = _shard_states(rng, frames, first_segment)
        first_segment = int(seg[-1]) + 1
        _shard_video(rng, states, seg, shift, grid_size, vocab_size).tofile(p.video)
        states.tofile(p.states)
        seg.tofile(p.segment_idx)
        with open(p.metadata, "w") as f:
            json.dump({"shard_num_frames": frames, "shard_ind": i}, f)
    meta = {"num_shards": shards, "query": None, "hz": HZ, "num_images": shards * frames,
            "generator": "wmfast synthetic (state-driven token textures)"}
    if grid_size != GRID_SIZE:  # wmfast extension, absent from the real data (see wmfast.data.format)
        meta["grid_size"] = grid_size
    with open(os.path.join(out_dir, SPLIT_METADATA), "w") as f:
        json.dump(meta, f, indent=1)
    return out_dir


def write_synthetic_dataset(out_dir: str, shards: int = 2, frames: int = 2048, seed: int = 0, *,
                            grid_size: int = GRID_SIZE, vocab_size: int = VOCAB_SIZE,
                            val_frames: int | None = None, layout: str = NESTED) -> dict[str, str]:
    """Write `out_dir/train_v2.0` (`shards` shards of `frames` frames, in `layout`: NESTED as published, or
    FLAT) and `out_dir/val_v2.0` (one shard of `val_frames`, default max(frames // 4, 4 * 17), always FLAT as
    published) in the 1X v2.0 tokenized format. Returns {"train": path, "val": path}. Read them back with
    `TokenizedDataset(out_dir, "train")`.

    grid_size / vocab_size < 32 / 64,000 make small sets for CPU tests (match the model config's)."""
    val_frames = val_frames or max(frames // 4, 4 * WINDOW)
    kw = {"grid_size": grid_size, "vocab_size": vocab_size}
    train = write_split(os.path.join(out_dir, "train_v2.0"), shards, frames, seed, layout=layout, **kw)
    val = write_split(os.path.join(out_dir, "val_v2.0"), 1, val_frames, seed + 1_000_003, first_segment=10**6, **kw)
    return {"train": train, "val": val}
