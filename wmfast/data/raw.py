"""The 1X raw format (sampling track): the reader (the synthetic writer is `wmfast.data.raw_synthetic`).

Per shard `i` of a split directory:
- `video_{i}.mp4`: H.264, 512x512, 30 Hz, `shard_num_frames` frames;
- `states_{i}.bin`: float32 (shard_num_frames, 25); `segment_idx_{i}.bin`: int32 (shard_num_frames,);
- `metadata_{i}.json` {"shard_num_frames", "shard_ind"}; the split has `metadata.json`
  {"num_shards", "query", "hz", "num_images"} ("query" is null in the real data).
Either layout of `wmfast.data.layout`, detected from the directory: flat (the public val_v2.0_raw: all files
beside metadata.json) or nested (the public train_v2.0_raw: `videos/video_{i}.mp4`,
`robot_states/states_{i}.bin`, `segment_indices/segment_idx_{i}.bin`, `metadata/metadata_{i}.json`).

Opening a split checks what is cheap to read (`wmfast.data.layout`'s field checks, shared with the tokenized
reader and `wmfast data check`): metadata.json and every metadata_{i}.json present with their integer fields,
num_images equal to the sum of shard_num_frames, every shard file present, states and segment_idx sized by
shard_num_frames, segment ids >= 0 and never decreasing. The mp4 is not decoded then (`check_video` and
`wmfast data check` do); a sample's states are checked finite when it is read, every state by `validate()`.
Every problem raises RawDataError naming the file and the field.

A sample is 77 consecutive frames inside one segment (17 context + up to the 77th, the scored one) and
their 77 states. The reader decodes only the frames the sample needs (`frame_offsets`, e.g. the stride-3
schedule of wmfast.models.wan.schedule needs 25 of the 77).

Decoder: PyAV. torchvision is not a dependency here (and its video API is deprecated in favour of
TorchCodec); PyAV gives what the reader needs directly: seek to the keyframe before the first needed frame,
decode forward, convert (and resize, in swscale) only the needed frames to RGB, and stop after the last
one. With a GOP of g frames a sample costs at most g - 1 + 77 decoded frames, not the shard.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from wmfast.data.format import STATE_DIM
from wmfast.data.layout import (
    SPLIT_METADATA,
    DataFormatError,
    check_size,
    detect_layout,
    missing_files_problem,
    read_shard_metadata,
    read_split_metadata,
    segment_problem,
    shard_paths,
    state_problem,
)

HZ = 30
SAMPLE_FRAMES = 77


class RawDataError(DataFormatError):
    """A raw-format file is missing, has the wrong size, or cannot be decoded (the message names it)."""


@dataclass
class RawShard:
    index: int
    video: str
    states: np.ndarray        # [N, 25] float32 (memmap)
    segment_idx: np.ndarray   # [N] int32 (memmap)
    states_file: str = ""     # the path of `states`, for the messages

    @property
    def num_frames(self) -> int:
        return int(self.states.shape[0])


def resolve_split_dir(root: str, split: str | None) -> str:
    if split is None:
        return root
    for name in (split, f"{split}_v2.0_raw", f"{split}_v2.0"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise RawDataError(f"no split {split!r} under {root} (tried {split}, {split}_v2.0_raw, {split}_v2.0)")


def _memmap(path: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """`path` mapped read-only as `shape` (its size already checked); an empty file gives an empty array (a
    memory map of 0 bytes cannot be made)."""
    if not shape[0]:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def load_shards(split_dir: str) -> list[RawShard]:
    """The shards of a raw split (either layout), with every field check of the module docstring: states and
    segments memory-mapped, the segment ids read once. Raises RawDataError naming the file and the field."""
    top = os.path.join(split_dir, SPLIT_METADATA)
    meta = read_split_metadata(top, error=RawDataError)
    layout = detect_layout(split_dir)
    shards = []
    for i in range(meta["num_shards"]):
        p = shard_paths(split_dir, i, "mp4", layout)
        problem = missing_files_problem(p)
        if problem:
            raise RawDataError(problem)
        n = read_shard_metadata(p.metadata, i, error=RawDataError)
        check_size(p.states, (n, STATE_DIM), np.float32, error=RawDataError)
        check_size(p.segment_idx, (n,), np.int32, error=RawDataError)
        if os.path.getsize(p.video) == 0:
            raise RawDataError(f"{p.video}: empty")
        seg = _memmap(p.segment_idx, np.int32, (n,))
        problem = segment_problem(p.segment_idx, seg)
        if problem:
            raise RawDataError(problem)
        shards.append(RawShard(i, p.video, _memmap(p.states, np.float32, (n, STATE_DIM)), seg, p.states))
    total = sum(s.num_frames for s in shards)
    if total != meta["num_images"]:
        raise RawDataError(f"{top}: num_images={meta['num_images']} but the shards' metadata sum to {total}")
    return shards


def check_video(path: str, num_frames: int) -> None:
    """`path` is a non-empty video PyAV opens, whose frame count (from the stream metadata, when the container
    records it) is `num_frames` and whose first frame decodes. Decodes one frame, not the shard (real shards
    are hours long). Raises RawDataError naming the file."""
    import av

    if not os.path.isfile(path):
        raise RawDataError(f"{path}: missing")
    if os.path.getsize(path) == 0:
        raise RawDataError(f"{path}: empty")
    try:
        with av.open(path) as container:
            stream = _video_stream(container, path)
            if stream.frames and stream.frames != num_frames:
                raise RawDataError(f"{path}: {stream.frames} frames, expected shard_num_frames={num_frames}")
            if next(container.decode(stream), None) is None:
                raise RawDataError(f"{path}: no frame decodes")
    except (av.error.FFmpegError, OSError) as e:
        raise RawDataError(f"{path}: cannot open or decode with PyAV ({e})") from e


def sample_starts(seg: np.ndarray, length: int, hop: int) -> np.ndarray:
    """Start frames s (multiples of `hop` inside each segment) with frames s..s+length-1 in one segment."""
    starts = []
    bounds = np.flatnonzero(np.diff(seg)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(seg)]):
        starts.extend(range(int(a), int(b) - length + 1, hop))
    return np.asarray(starts, dtype=np.int64)


def _video_stream(container, path: str):
    """The first video stream of an opened container (a damaged file can open with none)."""
    if not container.streams.video:
        raise RawDataError(f"{path}: no video stream")
    return container.streams.video[0]


def decode_frames(path: str, indices: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
    """Frames `indices` (sorted, 0-based, constant frame rate) of an mp4 -> uint8 [n, H, W, 3] (RGB).
    Seeks to the keyframe before indices[0] and stops after indices[-1]; `size` = (H, W) resizes."""
    import av

    want = {int(i): k for k, i in enumerate(indices)}
    first, last = min(want), max(want)
    out: list = [None] * len(indices)
    try:
        with av.open(path) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or HZ)
            tb = float(stream.time_base)
            start = stream.start_time or 0
            container.seek(start + int(first / fps / tb), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                idx = round((frame.pts - start) * tb * fps)
                if idx > last:
                    break
                if idx in want:
                    kw = {"width": size[1], "height": size[0]} if size else {}
                    out[want[idx]] = frame.to_ndarray(format="rgb24", **kw)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise RawDataError(f"cannot decode frames {first}..{last} of {path}: {e}") from e
    missing = [i for i, k in want.items() if out[k] is None]
    if missing:
        raise RawDataError(f"{path}: frames {missing[:5]}{'...' if len(missing) > 5 else ''} not found "
                           f"(truncated or corrupt video?)")
    return np.stack(out)


class RawVideoDataset(Dataset):
    """Samples of the 1X raw format.

    item: {"frames": uint8 [len(frame_offsets), 3, H, W] (RGB), "states": float32 [77, 25],
           "frame_offsets": long [len(frame_offsets)], "shard": int, "start": int}
    frame_offsets: which of the sample's 77 frames to decode (default all); hop: distance between sample
    starts (default 77: disjoint samples); size: (H, W) to resize to while converting (default native)."""

    def __init__(self, root: str, split: str | None = None, *, frame_offsets=None, hop: int = SAMPLE_FRAMES,
                 size: tuple[int, int] | None = None, max_samples: int | None = None):
        self.dir = resolve_split_dir(root, split)
        self.shards = load_shards(self.dir)
        self.frame_offsets = sorted(frame_offsets) if frame_offsets is not None else list(range(SAMPLE_FRAMES))
        if self.frame_offsets[0] < 0 or self.frame_offsets[-1] >= SAMPLE_FRAMES:
            raise ValueError(f"frame_offsets must lie in [0, {SAMPLE_FRAMES}), got {self.frame_offsets}")
        self.size = size
        index = [(s.index, int(st)) for s in self.shards for st in sample_starts(np.asarray(s.segment_idx),
                                                                                   SAMPLE_FRAMES, hop)]
        self.index = index[:max_samples] if max_samples else index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        shard_id, start = self.index[i]
        shard = self.shards[shard_id]
        states = np.array(shard.states[start:start + SAMPLE_FRAMES], dtype=np.float32)
        bad = ~np.isfinite(states)
        if bad.any():
            f = start + int(np.argwhere(bad)[0, 0])
            raise RawDataError(f"{shard.states_file}: non-finite state (NaN or inf) at frame {f}")
        frames = decode_frames(shard.video, [start + o for o in self.frame_offsets], self.size)
        return {"frames": torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(),
                "states": torch.from_numpy(states),
                "frame_offsets": torch.tensor(self.frame_offsets), "shard": shard_id, "start": start}

    def validate(self, chunk_frames: int = 1 << 16) -> None:
        """Scan every shard's states in chunks of `chunk_frames` frames: all finite, else RawDataError naming the
        file and the first bad frame (the videos are checked by `check_video` / `wmfast data check`)."""
        for s in self.shards:
            problem = state_problem(s.states_file, s.states, chunk_frames)
            if problem:
                raise RawDataError(problem)
