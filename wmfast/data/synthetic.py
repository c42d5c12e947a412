"""Synthetic datasets in exactly the 1X v2.0 tokenized format, with structure a model can learn.

Each segment has its own random token texture (a G x G grid of ids). The robot states drive it:
- linear velocity (state 23) and angular velocity (state 24) are integers in {-2..2}, held for 17 frames
  at a time; they move the texture by 1/8 of a token per frame along x and y (so v tokens per 8-frame
  grid), and every grid shows the texture rolled by the cumulative offset at its last frame;
- left-hand closure (state 21, 0 or 1) paints a patch in the top-left corner with one of two fixed ids.
The other 22 joint angles are smooth random walks (informative of nothing, as distractors). 1% of the
tokens are replaced by random ids (tokenizer noise). A model that copies the previous grid already beats
chance by far; one that reads the velocities from the states and shifts the grid does better still.

`uncertain=True` makes the set more like real tokens and adds a random choice no context reveals: texture ids
follow a skewed marginal (`token_marginal`, shared by all splits, as a real tokenizer uses its codebook unevenly),
and a patch in the bottom-right corner (max(1, G // 2) tokens a side: a quarter of the grid, like a screen in view)
shows one of 4 fixed ids, drawn uniformly and independently for every grid. The best a model can do there is
spread its probability over the 4 ids. `future_token_law` gives the distribution of a future token for
an oracle that knows the clean scene, from which `wmfast reproduce` computes the generator's ceiling (the lowest
expected CE and Top-k CE, the highest greedy accuracy); a real model also has to infer the clean texture from noisy
context grids, so the ceiling is a bound, not a target.

Written as published: train_v2.0 in the nested layout, val_v2.0 flat (see `wmfast.data.layout`), with
"query": null in metadata.json like the real data (the generator is named under a wmfast-only key, the mark
that lets a later write replace the split). Each split is written beside its directory and swapped in whole
(`wmfast.data.layout.replace_split`): no file of an earlier split survives, and a directory wmfast did not
write is never replaced.
"""
from __future__ import annotations

import json
import os

import numpy as np

from wmfast.data.format import GRID_SIZE, HZ, SAMPLE_FRAMES, STATE_DIM, VOCAB_SIZE, WINDOW, num_windows
from wmfast.data.layout import (
    FLAT,
    NESTED,
    SPLIT_METADATA,
    SYNTHETIC_GENERATOR,
    ArgumentValueError,
    check_output_dir,
    check_replaceable,
    make_dirs,
    replace_split,
    require_int,
    shard_paths,
)

LIN_VEL, ANG_VEL, LEFT_HAND = 23, 24, 21
NOISE = 0.01
BLINK_CHOICES = 4  # ids the uncertain corner patch may show


def token_marginal(vocab_size: int) -> np.ndarray:
    """float64 [V]: the uncertain mode's probability of each texture id: Zipf-like (1 / (rank + 10)) over a
    permutation of the vocabulary that depends on V only, so train and val share it."""
    ranks = np.random.default_rng(vocab_size).permutation(vocab_size)
    weights = 1.0 / (ranks + 10.0)
    return weights / weights.sum()


def blink_patch(grid: int) -> int:
    """Side (tokens) of the uncertain mode's corner patch: a quarter of the grid's tokens."""
    return max(1, grid // 2)


def future_token_law(grid_size: int, vocab_size: int, uncertain: bool) -> list[tuple[float, int, float, float]]:
    """The distribution of a token of a future grid for an oracle that knows the clean scene, as classes
    (share of a grid's tokens, named ids, probability of each named id, probability of each other id): a
    determined token is its clean id (kept with probability 1 - NOISE, else a uniform id, which may be it again);
    with `uncertain`, a corner-patch token is one of BLINK_CHOICES ids."""
    rest = NOISE / vocab_size
    share = blink_patch(grid_size) ** 2 / grid_size**2 if uncertain else 0.0
    law = [(1.0 - share, 1, 1.0 - NOISE + rest, rest)]
    if share:
        law.append((share, BLINK_CHOICES, (1.0 - NOISE) / BLINK_CHOICES + rest, rest))
    return law


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


def _shard_video(rng, states, seg, shift, grid: int, vocab: int, uncertain: bool = False) -> np.ndarray:
    n = states.shape[0]
    video = np.zeros((num_windows(n), 3, grid, grid), np.int32)
    if uncertain:  # ids by a skewed marginal, the same in every split (codebook usage, as a real tokenizer's)
        usage = token_marginal(vocab)
        textures = {int(s): rng.choice(vocab, (grid, grid), p=usage) for s in np.unique(seg)}
    else:
        textures = {int(s): rng.integers(0, vocab, (grid, grid), dtype=np.int64) for s in np.unique(seg)}
    hand_ids = rng.integers(0, vocab, 2)
    patch = max(1, grid // 8)
    if uncertain:  # the corner patch's ids and its choice for every grid
        blink_ids = rng.choice(vocab, BLINK_CHOICES, replace=False)
        blinks = blink_ids[rng.integers(0, BLINK_CHOICES, video.shape[:2])]
        bp = blink_patch(grid)
    for w in range(video.shape[0]):
        for g, off in enumerate((0, 8, 16)):  # last frame of grid g's span inside the window
            f = min(w * WINDOW + off, n - 1)
            dy, dx = np.rint(shift[f]).astype(int)
            img = np.roll(textures[int(seg[f])], (dy, dx), axis=(0, 1))
            img[:patch, :patch] = hand_ids[int(states[f, LEFT_HAND])]
            if uncertain:
                img[-bp:, -bp:] = blinks[w, g]
            video[w, g] = img
    noise = rng.random(video.shape) < NOISE
    video[noise] = rng.integers(0, vocab, int(noise.sum()))
    return video


def check_split_args(shards: int, frames: int, seed: int, *, grid_size: int = GRID_SIZE,
                     vocab_size: int = VOCAB_SIZE, first_segment: int = 0, frames_param: str = "frames",
                     uncertain: bool = False) -> None:
    """Raise ArgumentValueError naming the first unusable argument of `write_split` (`frames_param`: the name
    `frames` goes by in the caller)."""
    require_int("shards", shards, 1)
    require_int(frames_param, frames, SAMPLE_FRAMES, f" (one sample: two {WINDOW}-frame windows)")
    require_int("seed", seed, 0)
    require_int("grid_size", grid_size, 1)
    require_int("first_segment", first_segment, 0)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 2 <= vocab_size <= VOCAB_SIZE:
        raise ArgumentValueError("vocab_size", vocab_size, f"must be an integer in [2, {VOCAB_SIZE}]")
    if uncertain and vocab_size <= BLINK_CHOICES:
        raise ArgumentValueError("vocab_size", vocab_size, f"must be > {BLINK_CHOICES} with uncertain (the corner "
                                 f"patch shows one of {BLINK_CHOICES} distinct ids)")


def write_split(out_dir: str, shards: int, frames: int, seed: int, *, grid_size: int = GRID_SIZE,
                vocab_size: int = VOCAB_SIZE, first_segment: int = 0, layout: str = FLAT,
                uncertain: bool = False) -> str:
    """Write one split directory (metadata.json + per-shard files, `layout` NESTED or FLAT) and return its
    path. An existing split at `out_dir` is replaced whole when a wmfast writer wrote it, else refused."""
    check_split_args(shards, frames, seed, grid_size=grid_size, vocab_size=vocab_size, first_segment=first_segment,
                     uncertain=uncertain)

    def write(d: str) -> None:
        make_dirs(d, layout)
        rng = np.random.default_rng(seed)
        segment = first_segment
        for i in range(shards):
            p = shard_paths(d, i, "bin", layout)
            states, seg, shift = _shard_states(rng, frames, segment)
            segment = int(seg[-1]) + 1
            _shard_video(rng, states, seg, shift, grid_size, vocab_size, uncertain).tofile(p.video)
            states.tofile(p.states)
            seg.tofile(p.segment_idx)
            with open(p.metadata, "w") as f:
                json.dump({"shard_num_frames": frames, "shard_ind": i}, f)
        meta = {"num_shards": shards, "query": None, "hz": HZ, "num_images": shards * frames,
                "generator": f"{SYNTHETIC_GENERATOR} (state-driven token textures"
                             f"{', a random corner patch' if uncertain else ''})",
                "synthetic": {"seed": seed, "uncertain": uncertain}}
        if grid_size != GRID_SIZE:  # wmfast extension, absent from the real data (see wmfast.data.format)
            meta["grid_size"] = grid_size
        with open(os.path.join(d, SPLIT_METADATA), "w") as f:
            json.dump(meta, f, indent=1)

    return replace_split(out_dir, write)


def write_synthetic_dataset(out_dir: str, shards: int = 2, frames: int = 2048, seed: int = 0, *,
                            grid_size: int = GRID_SIZE, vocab_size: int = VOCAB_SIZE,
                            val_frames: int | None = None, layout: str = NESTED,
                            uncertain: bool = False) -> dict[str, str]:
    """Write `out_dir/train_v2.0` (`shards` shards of `frames` frames, in `layout`: NESTED as published, or
    FLAT) and `out_dir/val_v2.0` (one shard of `val_frames`, default max(frames // 4, 4 * 17), always FLAT as
    published) in the 1X v2.0 tokenized format. Returns {"train": path, "val": path}. Read them back with
    `TokenizedDataset(out_dir, "train")`. Every argument, and that both splits may be replaced, is checked
    before anything is written (ArgumentValueError naming the argument).

    grid_size / vocab_size < 32 / 64,000 make small sets for CPU tests (match the model config's). `uncertain`:
    the random corner patch of the module docstring."""
    kw = {"grid_size": grid_size, "vocab_size": vocab_size}
    check_split_args(shards, frames, seed, uncertain=uncertain, **kw)
    val_frames = max(frames // 4, 4 * WINDOW) if val_frames is None else val_frames
    check_split_args(1, val_frames, seed, frames_param="val_frames", uncertain=uncertain, **kw)
    check_output_dir(out_dir)
    paths = {"train": os.path.join(out_dir, "train_v2.0"), "val": os.path.join(out_dir, "val_v2.0")}
    for path in paths.values():
        check_replaceable(path, "out_dir", out_dir)
    write_split(paths["train"], shards, frames, seed, layout=layout, uncertain=uncertain, **kw)
    write_split(paths["val"], 1, val_frames, seed + 1_000_003, first_segment=10**6, uncertain=uncertain, **kw)
    return paths
