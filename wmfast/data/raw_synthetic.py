"""The synthetic writer of the 1X raw format (`wmfast data synth --raw`): moving shapes driven by the robot states,
written as H.264 mp4 + states + segments exactly as `wmfast.data.raw` reads them.

The scene of every frame (64 px units, scaled with the frame side):
- a background colour per segment;
- a 16 px square moved by the integrated velocities (x += 2 px * v_lin, y += 2 px * v_ang per frame,
  wrapping), red with the left hand open and green closed;
- a disc placed by the hip joints (sin of states 0 and 1).
These are functions of the context and the states: the future is determined.

`uncertain=True` adds a random choice the context cannot reveal: a blue 14 px square (the "wanderer") shown in
one of 4 fixed slots (the centres of the 4 quadrants), drawn uniformly and independently for every block of 8
frames (frames 8b .. 8b+7 of a shard). The scored frame of a sample (frame 76) lies 60 frames after the newest
context frame (16), so its block is never one the context shows: given everything a model sees, each slot has
probability 1/4. The MSE-optimal prediction of frame 76 is therefore the average of the 4 renders that differ
only in the slot (the wanderer at a quarter of its contrast in every slot: a blur), which `bayes_prediction`
returns; its PSNR against the true frame is the generator's ceiling (`wmfast reproduce` reports it; the H.264
coding noise of the true frame is included). A single sample of a model that knows the scene puts the wanderer in
one slot and is right 1 time in 4: averaging an ensemble of such samples moves towards the ceiling.

Each split's metadata.json names the generator and, under the wmfast-only key "synthetic", the render
parameters ({"seed", "size", "uncertain"}) from which `bayes_prediction` re-derives any frame's scene.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from wmfast.data.format import STATE_DIM
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
from wmfast.data.raw import HZ, SAMPLE_FRAMES, load_shards

LIN_VEL, ANG_VEL, LEFT_HAND = 23, 24, 21
SLOTS = 4  # places the wanderer may be in (uncertain mode)
SLOT_CENTRES = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))  # (x, y) as fractions of the side
BLOCK = 8  # frames the wanderer stays in its slot
WANDERER = (70, 110, 250)


def _synthetic_states(rng, n: int, first_segment: int):
    """states [n, 25], segment_idx [n]: velocities (23, 24) held for 17 frames, hand closure (21) toggling,
    hip joints (0, 1) smooth random walks, other joints small noise."""
    states = np.zeros((n, STATE_DIM), np.float32)
    seg = np.zeros(n, np.int32)
    f, sid = 0, first_segment
    while f < n:
        length = min(int(rng.integers(3 * SAMPLE_FRAMES, 6 * SAMPLE_FRAMES)), n - f)
        sl = slice(f, f + length)
        seg[sl] = sid
        held = -(-length // 17)
        states[sl, LIN_VEL] = np.repeat(rng.uniform(-1, 1, held), 17)[:length]
        states[sl, ANG_VEL] = np.repeat(rng.uniform(-1, 1, held), 17)[:length]
        states[sl, LEFT_HAND] = np.repeat(rng.integers(0, 2, held), 17)[:length]
        states[sl, :2] = np.cumsum(rng.normal(0, 0.04, (length, 2)), axis=0) + rng.uniform(-1, 1, 2)
        states[sl, 2:21] = rng.normal(0, 0.05, (length, 19))
        f, sid = f + length, sid + 1
    return states, seg


@dataclass
class Scene:
    """What every frame of a shard shows, before drawing: background colour [n, 3], square position [n, 2] (x, y
    in pixels), wanderer slot [n] (-1: none), and the states (hand closure, hip joints)."""
    size: int
    background: np.ndarray
    position: np.ndarray
    slot: np.ndarray
    states: np.ndarray


def make_scene(states: np.ndarray, seg: np.ndarray, size: int, seed: int = 0, uncertain: bool = False) -> Scene:
    """The scene of a shard; deterministic in (states, seg, size, seed, uncertain). The slots are drawn after
    everything else, so a shard's other objects are the same with and without `uncertain`."""
    rng = np.random.default_rng(seed)
    n = len(states)
    background, position = np.zeros((n, 3), np.int64), np.zeros((n, 2))
    colours: dict[int, np.ndarray] = {}
    pos = np.zeros(2)
    for f in range(n):
        sid = int(seg[f])
        if sid not in colours:
            colours[sid] = rng.integers(30, 120, 3)
            pos = rng.uniform(0, size, 2)
        else:
            pos = (pos + 2 * size / 64 * states[f, [LIN_VEL, ANG_VEL]]) % size
        background[f], position[f] = colours[sid], pos
    slot = np.full(n, -1, np.int64)
    if uncertain:
        slot = np.repeat(rng.integers(0, SLOTS, -(-n // BLOCK)), BLOCK)[:n]
    return Scene(size, background, position, slot, np.asarray(states, np.float32))


def draw(scene: Scene, f: int, slot: int | None = None) -> np.ndarray:
    """uint8 [size, size, 3]: frame f of the scene, with the wanderer in `slot` (default: the scene's)."""
    size = scene.size
    scale = size / 64
    yy, xx = np.mgrid[:size, :size]
    img = np.broadcast_to(scene.background[f].astype(np.uint8), (size, size, 3)).copy()
    x, y = scene.position[f]
    dx = np.abs(((xx - x) + size / 2) % size - size / 2)
    dy = np.abs(((yy - y) + size / 2) % size - size / 2)
    img[(dx < 8 * scale) & (dy < 8 * scale)] = (40, 220, 60) if scene.states[f, LEFT_HAND] > 0.5 else (230, 50, 40)
    hips = scene.states[f, :2]
    cx, cy = size / 2 * (1 + 0.7 * np.sin(hips[0])), size / 2 * (1 + 0.7 * np.sin(hips[1]))
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < (7 * scale) ** 2] = (240, 240, 90)
    s = int(scene.slot[f]) if slot is None else slot
    if s >= 0:
        sx, sy = SLOT_CENTRES[s][0] * size, SLOT_CENTRES[s][1] * size
        img[(np.abs(xx + 0.5 - sx) < 7 * scale) & (np.abs(yy + 0.5 - sy) < 7 * scale)] = WANDERER
    return img


def render_frames(states: np.ndarray, seg: np.ndarray, size: int, seed: int = 0, uncertain: bool = False) -> np.ndarray:
    """uint8 [n, size, size, 3]: every frame of the scene (module docstring)."""
    scene = make_scene(states, seg, size, seed, uncertain)
    return np.stack([draw(scene, f) for f in range(len(states))]) if len(states) else np.zeros((0, size, size, 3),
                                                                                                  np.uint8)


def bayes_frame(scene: Scene, f: int) -> np.ndarray:
    """float64 [size, size, 3] in [0, 255]: the MSE-optimal prediction of frame f given everything but the slot
    of its block (the mean of the SLOTS equally likely renders); the frame itself when the scene has no wanderer."""
    if scene.slot[f] < 0:
        return draw(scene, f).astype(np.float64)
    return np.mean([draw(scene, f, s).astype(np.float64) for s in range(SLOTS)], axis=0)


def synthetic_params(split_dir: str) -> dict | None:
    """The render parameters {"seed", "size", "uncertain"} a synthetic raw split records, None for other data."""
    try:
        with open(os.path.join(split_dir, SPLIT_METADATA)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    params = meta.get("synthetic") if isinstance(meta, dict) else None
    return params if isinstance(params, dict) and {"seed", "size", "uncertain"} <= set(params) else None


def bayes_prediction(split_dir: str, shard: int, frame: int) -> np.ndarray:
    """`bayes_frame` of frame `frame` of shard `shard` of a synthetic raw split (its scene re-derived from the
    recorded render parameters and the shard's states). Raises ValueError for a split no synthetic writer wrote."""
    params = synthetic_params(split_dir)
    if params is None:
        raise ValueError(f"{split_dir}: not a synthetic raw split (no \"synthetic\" render parameters in "
                         f"{SPLIT_METADATA}): its Bayes-optimal prediction is unknown")
    s = load_shards(split_dir)[shard]
    scene = make_scene(np.asarray(s.states), np.asarray(s.segment_idx), params["size"], params["seed"] + shard,
                       params["uncertain"])
    return bayes_frame(scene, frame)


def write_video(path: str, frames: np.ndarray, fps: int = HZ, gop: int = 30, crf: int = 12) -> None:
    """H.264 mp4 (yuv420p, keyframe every `gop` frames, no B-frames so pts order = decode order)."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "g": str(gop), "bf": "0", "preset": "veryfast"}
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def check_raw_split_args(shards: int, frames: int, seed: int, *, size: int = 512, first_segment: int = 0,
                         frames_param: str = "frames") -> None:
    """Raise ArgumentValueError naming the first unusable argument of `write_raw_split` (`frames_param`: the name
    `frames` goes by in the caller)."""
    require_int("shards", shards, 1)
    require_int(frames_param, frames, SAMPLE_FRAMES, " (the frames of one sample)")
    require_int("seed", seed, 0)
    require_int("first_segment", first_segment, 0)
    require_int("size", size, 32)
    if size % 32:
        raise ArgumentValueError("size", size, "must be a multiple of 32 (the Wan VAE and H.264 need it)")


def write_raw_split(out_dir: str, shards: int, frames: int, seed: int, *, size: int = 512,
                    first_segment: int = 0, progress: bool = False, layout: str = FLAT,
                    uncertain: bool = False) -> str:
    """One split directory in the raw format (the scene of the module docstring), in `layout` (NESTED or FLAT);
    returns its path. An existing split at `out_dir` is replaced whole when a wmfast writer wrote it, else refused
    (see `wmfast.data.layout.replace_split`)."""
    check_raw_split_args(shards, frames, seed, size=size, first_segment=first_segment)
    from tqdm import tqdm

    def write(d: str) -> None:
        make_dirs(d, layout)
        rng = np.random.default_rng(seed)
        segment = first_segment
        for i in tqdm(range(shards), desc=f"raw {os.path.basename(out_dir)}", disable=not progress):
            p = shard_paths(d, i, "mp4", layout)
            states, seg = _synthetic_states(rng, frames, segment)
            segment = int(seg[-1]) + 1
            write_video(p.video, render_frames(states, seg, size, seed + i, uncertain))
            states.tofile(p.states)
            seg.tofile(p.segment_idx)
            with open(p.metadata, "w") as f:
                json.dump({"shard_num_frames": frames, "shard_ind": i}, f)
        kind = "state-driven shapes" + (" and a wanderer in a random slot" if uncertain else "")
        with open(os.path.join(d, SPLIT_METADATA), "w") as f:
            json.dump({"num_shards": shards, "query": None, "hz": HZ, "num_images": shards * frames,
                       "generator": f"{SYNTHETIC_GENERATOR} raw ({kind})",
                       "synthetic": {"seed": seed, "size": size, "uncertain": uncertain}}, f, indent=1)

    return replace_split(out_dir, write)


def write_synthetic_raw_dataset(out_dir: str, shards: int = 1, frames: int = 1024, seed: int = 0, *,
                                size: int = 512, val_frames: int | None = None, progress: bool = False,
                                layout: str = NESTED, uncertain: bool = False) -> dict:
    """`out_dir/train_v2.0_raw` (in `layout`: NESTED as published, or FLAT) and `out_dir/val_v2.0_raw` (always
    FLAT, as published); returns {"train": path, "val": path}. Every argument, and that both splits may be
    replaced, is checked before anything is written (ArgumentValueError naming the argument). `uncertain`: the
    wanderer of the module docstring (a future the context only partly determines)."""
    check_raw_split_args(shards, frames, seed, size=size)
    val_frames = max(frames // 4, 3 * SAMPLE_FRAMES) if val_frames is None else val_frames
    check_raw_split_args(1, val_frames, seed, size=size, frames_param="val_frames")
    check_output_dir(out_dir)
    paths = {"train": os.path.join(out_dir, "train_v2.0_raw"), "val": os.path.join(out_dir, "val_v2.0_raw")}
    for path in paths.values():
        check_replaceable(path, "out_dir", out_dir)
    write_raw_split(paths["train"], shards, frames, seed, size=size, progress=progress, layout=layout,
                    uncertain=uncertain)
    write_raw_split(paths["val"], 1, val_frames, seed + 1_000_003, size=size, first_segment=10**6,
                    progress=progress, uncertain=uncertain)
    return paths
