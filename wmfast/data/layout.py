"""Where the files of a 1X split live, and the checks of one file that the readers and `wmfast data check` share.

A split directory holds `metadata.json` at its root and, per shard `i`, four files in one of two layouts:
- flat (the public val splits): `metadata_{i}.json`, `video_{i}.bin` (tokenized) or `video_{i}.mp4` (raw),
  `states_{i}.bin`, `segment_idx_{i}.bin`, all at the root;
- nested (the public train splits): `metadata/metadata_{i}.json`, `videos/video_{i}.bin|.mp4`,
  `robot_states/states_{i}.bin`, `segment_indices/segment_idx_{i}.bin`.
The layout is detected from the directory, never chosen by a flag: a split is nested as soon as one of the
four subfolders exists, so a half-copied nested split reports its missing files inside their subfolders.
"""
from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

import numpy as np

FLAT, NESTED = "flat", "nested"
SPLIT_METADATA = "metadata.json"
SUBDIRS = {"metadata": "metadata", "video": "videos", "states": "robot_states", "segment_idx": "segment_indices"}
VIDEO_EXT = {"tokenized": "bin", "raw": "mp4"}


class DataFormatError(ValueError):
    """Data on disk does not match the 1X v2.0 format (the message names the file and what is wrong)."""


class ShardPaths(NamedTuple):
    metadata: str
    video: str
    states: str
    segment_idx: str


def detect_layout(split_dir: str) -> str:
    """NESTED when `split_dir` has one of the subfolders metadata/, videos/, robot_states/, segment_indices/;
    FLAT otherwise."""
    return NESTED if any(os.path.isdir(os.path.join(split_dir, d)) for d in SUBDIRS.values()) else FLAT


def files_dir(split_dir: str, what: str, layout: str | None = None) -> str:
    """The directory of the `what` files ("metadata", "video", "states" or "segment_idx") of a split."""
    layout = layout or detect_layout(split_dir)
    return os.path.join(split_dir, SUBDIRS[what]) if layout == NESTED else split_dir


def shard_paths(split_dir: str, i: int, ext: str = "bin", layout: str | None = None) -> ShardPaths:
    """The four files of shard `i`; `ext` is the video's extension ("bin" tokenized, "mp4" raw)."""
    layout = layout or detect_layout(split_dir)
    names = {"metadata": f"metadata_{i}.json", "video": f"video_{i}.{ext}", "states": f"states_{i}.bin",
             "segment_idx": f"segment_idx_{i}.bin"}
    return ShardPaths(**{k: os.path.join(files_dir(split_dir, k, layout), n) for k, n in names.items()})


def make_dirs(split_dir: str, layout: str) -> None:
    """Create the split directory (and its subfolders when `layout` is NESTED), for the writers. Refuses to
    write FLAT over a nested split: its subfolders would still decide the layout and hide the new files."""
    if layout not in (FLAT, NESTED):
        raise ValueError(f"layout={layout!r} must be {NESTED!r} or {FLAT!r}")
    if layout == FLAT and detect_layout(split_dir) == NESTED:
        raise ValueError(f"{split_dir} holds a nested split (subfolders {', '.join(SUBDIRS.values())}): remove it "
                         f"before writing a flat one there")
    os.makedirs(split_dir, exist_ok=True)
    if layout == NESTED:
        for d in SUBDIRS.values():
            os.makedirs(os.path.join(split_dir, d), exist_ok=True)


def video_exts(split_dir: str, layout: str | None = None) -> set[str]:
    """Extensions of the `video_{i}.*` files present ({"bin"}: tokenized, {"mp4"}: raw)."""
    d = files_dir(split_dir, "video", layout)
    names = os.listdir(d) if os.path.isdir(d) else []
    return {m.group(1) for m in map(re.compile(r"video_\d+\.(bin|mp4)$").match, names) if m}


def count_shard_metadata(split_dir: str, layout: str | None = None) -> int:
    """How many `metadata_{i}.json` files are present (the shard count when metadata.json cannot say)."""
    d = files_dir(split_dir, "metadata", layout)
    return sum(bool(re.match(r"metadata_\d+\.json$", n)) for n in (os.listdir(d) if os.path.isdir(d) else []))


# ------------------------------------------------------------------------------------------- file checks
def read_metadata(path: str, keys: tuple[str, ...], *, error: type[Exception] = DataFormatError) -> dict:
    """The JSON object in `path`, with `keys` present and each a non-negative integer; raises `error` naming
    the file otherwise. Other keys are not looked at ("query" is null in the real data)."""
    if not os.path.isfile(path):
        raise error(f"{path}: missing")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise error(f"{path}: not a JSON object")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise error(f"{path}: missing keys {missing}")
    for k in keys:
        v = meta[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise error(f"{path}: {k}={v!r} is not a non-negative integer")
    return meta


def check_size(path: str, shape: tuple[int, ...], dtype, *, error: type[Exception] = DataFormatError) -> None:
    """`path` exists and holds exactly `shape` of `dtype`; raises `error` naming the file otherwise."""
    if not os.path.isfile(path):
        raise error(f"{path}: missing")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    actual = os.path.getsize(path)
    if actual != expected:
        kind = "truncated" if actual < expected else "too long"
        raise error(f"{path}: {kind}: {actual} bytes, expected {expected} for {np.dtype(dtype).name} {shape} "
                    f"(from the shard's metadata)")


def token_problem(path: str, video: np.ndarray, vocab_size: int, chunk_rows: int) -> str | None:
    """Scan `video` [W, 3, G, G] (a memmap of `path`), `chunk_rows` windows at a time: None when every id is in
    [0, vocab_size), else one line naming the first bad window and how many windows are bad."""
    first, bad_rows = None, 0
    for r in range(0, video.shape[0], chunk_rows):
        v = np.asarray(video[r: r + chunk_rows])
        v = v.reshape(v.shape[0], -1)
        bad = ((v < 0) | (v >= vocab_size)).any(axis=1)
        if bad.any():
            if first is None:
                k = int(np.argmax(bad))
                first = (r + k, int(v[k].min()), int(v[k].max()))
            bad_rows += int(bad.sum())
    if first is None:
        return None
    row, lo, hi = first
    return (f"{path}: window {row} holds token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size}) "
            f"({bad_rows} of {video.shape[0]} windows are bad)")


def state_problem(path: str, states: np.ndarray, chunk_frames: int) -> str | None:
    """Scan `states` [N, 25] (a memmap of `path`), `chunk_frames` frames at a time: None when all are finite,
    else one line naming the first frame with a NaN or inf and how many frames have one."""
    first, bad_frames = None, 0
    for f in range(0, states.shape[0], chunk_frames):
        bad = ~np.isfinite(np.asarray(states[f: f + chunk_frames])).all(axis=1)
        if bad.any():
            first = f + int(np.argmax(bad)) if first is None else first
            bad_frames += int(bad.sum())
    if first is None:
        return None
    return f"{path}: non-finite state (NaN or inf) at frame {first} ({bad_frames} of {states.shape[0]} frames)"
