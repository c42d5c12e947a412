"""Memory-mapped reader of the 1X v2.0 tokenized set (see `wmfast.data.format`).

A split is read in either layout of `wmfast.data.layout`, detected from the directory: flat (the public
val_v2.0: `video_{i}.bin` beside `metadata.json`) or nested (the public train_v2.0: `videos/video_{i}.bin`,
`robot_states/states_{i}.bin`, `segment_indices/segment_idx_{i}.bin`, `metadata/metadata_{i}.json`).

Nothing is loaded whole: `video_{i}.bin` and `states_{i}.bin` are `np.memmap`s opened lazily in each
process (so DataLoader workers each map the files themselves instead of pickling maps); only
`segment_idx_{i}.bin` (4 bytes a frame) is read once to find the valid samples. Every problem raises
`DataFormatError` naming the file (full path), the field and the bad value; no sample is silently skipped. When
the dataset opens, the checks of `wmfast.data.layout` that read only metadata and sizes run (metadata.json and
every metadata_{i}.json with their integer fields, num_shards >= 1, num_images equal to the sum of
shard_num_frames, every shard file present and sized by shard_num_frames), and the segment ids, read anyway,
must be >= 0 and never decrease; token ranges and NaN states are checked when a sample is read (or for the
whole split with `validate()`, which shares its chunked scans with `wmfast data check`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from wmfast.data.format import GRID_SIZE, GRIDS_PER_WINDOW, SAMPLE_FRAMES, STATE_DIM, VOCAB_SIZE, WINDOW, num_windows
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
    token_problem,
)


def resolve_split_dir(root: str, split: str | None) -> str:
    """The directory of `split` under `root`: `root/{split}_v2.0` (the official name), `root/{split}`, or
    `root` itself when split is None."""
    candidates = [root] if split is None else [os.path.join(root, f"{split}_v2.0"), os.path.join(root, split)]
    for c in candidates:
        if os.path.isfile(os.path.join(c, SPLIT_METADATA)):
            return c
    raise DataFormatError(f"no metadata.json for split {split!r} under {root} (looked in {', '.join(candidates)})")


@dataclass(frozen=True)
class Shard:
    index: int
    num_frames: int
    video: str
    states: str
    segment_idx: str


def valid_windows(segment_idx: np.ndarray) -> np.ndarray:
    """Start windows j such that windows j and j+1 are complete (34 frames) and lie in one segment."""
    n = segment_idx.shape[0]
    full = n // WINDOW
    if full < 2:
        return np.zeros(0, dtype=np.int64)
    # changes[f] = number of segment changes among frames 0..f; the 34 frames of window j lie in one segment
    # iff no change happens between frame 17j and frame 17j + 33.
    changes = np.concatenate([[0], np.cumsum(segment_idx[1:] != segment_idx[:-1])])
    starts = np.arange(full - 1, dtype=np.int64) * WINDOW
    return (starts[changes[starts + SAMPLE_FRAMES - 1] == changes[starts]] // WINDOW).astype(np.int64)


class TokenizedDataset(torch.utils.data.Dataset):
    """Compression samples of one split.

    sample = {"tokens": int64 [6, G, G] (3 context + 3 future grids), "states": float32 [34, 25],
    "index": int}; see `wmfast.data.format` for how the 34 frames map to the 6 grids.
    """

    def __init__(self, root: str, split: str | None = "train", *, vocab_size: int = VOCAB_SIZE):
        self.dir = resolve_split_dir(root, split)
        self.vocab_size = vocab_size
        self.layout = detect_layout(self.dir)
        top = os.path.join(self.dir, SPLIT_METADATA)
        meta = read_split_metadata(top)
        self.grid_size = grid_size_of(top, meta)
        self.hz = meta.get("hz")
        self.shards = [self._open_shard(i) for i in range(meta["num_shards"])]
        total = sum(s.num_frames for s in self.shards)
        if total != meta["num_images"]:
            raise DataFormatError(f"{top}: num_images={meta['num_images']} but the shards' metadata sum to {total}")
        shard_ids, windows = [], []
        for k, s in enumerate(self.shards):
            seg = np.fromfile(s.segment_idx, dtype=np.int32)
            problem = segment_problem(s.segment_idx, seg)
            if problem:
                raise DataFormatError(problem)
            w = valid_windows(seg)
            shard_ids.append(np.full(w.shape, k, dtype=np.int64))
            windows.append(w)
        self._shard_of = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int64)
        self._window_of = np.concatenate(windows) if windows else np.zeros(0, np.int64)
        self._maps: dict | None = None
        self._pid = None

    def _open_shard(self, i: int) -> Shard:
        p = shard_paths(self.dir, i, "bin", self.layout)
        problem = missing_files_problem(p)
        if problem:
            raise DataFormatError(problem)
        n = read_shard_metadata(p.metadata, i)
        for path, shape, dtype in shard_file_shapes(p, n, self.grid_size):
            check_size(path, shape, dtype)
        return Shard(i, n, p.video, p.states, p.segment_idx)

    def __len__(self) -> int:
        return int(self._window_of.shape[0])

    def __getstate__(self):  # workers map the files themselves (np.memmap does not pickle as a map)
        state = self.__dict__.copy()
        state["_maps"], state["_pid"] = None, None
        return state

    def _map(self, k: int):
        if self._maps is None or self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            s, g = self.shards[k], self.grid_size
            video = np.memmap(s.video, dtype=np.int32, mode="r", shape=(num_windows(s.num_frames), 3, g, g))
            states = np.memmap(s.states, dtype=np.float32, mode="r", shape=(s.num_frames, STATE_DIM))
            self._maps[k] = (video, states)
        return self._maps[k]

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples in {self.dir}")
        k, j = int(self._shard_of[idx]), int(self._window_of[idx])
        video, states = self._map(k)
        tokens = np.array(video[j: j + 2]).reshape(2 * GRIDS_PER_WINDOW, self.grid_size, self.grid_size)
        st = np.array(states[j * WINDOW: j * WINDOW + SAMPLE_FRAMES])
        self._check_sample(k, j, tokens, st)
        return {"tokens": torch.from_numpy(tokens.astype(np.int64)), "states": torch.from_numpy(st), "index": idx}

    def _check_sample(self, k: int, j: int, tokens: np.ndarray, states: np.ndarray) -> None:
        s = self.shards[k]
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise DataFormatError(f"{s.video}: windows {j}-{j + 1} hold token ids in [{lo}, {hi}], outside the "
                                  f"vocabulary [0, {self.vocab_size})")
        bad = ~np.isfinite(states)
        if bad.any():
            f = j * WINDOW + int(np.argwhere(bad)[0, 0])
            raise DataFormatError(f"{s.states}: non-finite state (NaN or inf) at frame {f}")

    def validate(self, chunk_frames: int = 1 << 16, progress: bool = False) -> None:
        """Scan every shard in chunks: token ids inside the vocabulary, states finite. Raises on the first
        problem (naming the file and the row); reads each file once, `chunk_frames` frames at a time."""
        from tqdm import tqdm

        for k in tqdm(range(len(self.shards)), desc="validate", disable=not progress):
            s = self.shards[k]
            video, states = self._map(k)
            problem = (token_problem(s.video, video, self.vocab_size, max(1, chunk_frames // WINDOW))
                       or state_problem(s.states, states, chunk_frames))
            if problem:
                raise DataFormatError(problem)


def grid_size_of(path: str, meta: dict) -> int:
    """The token grid side of a split: metadata.json's "grid_size" (a wmfast extension), else 32."""
    g = meta.get("grid_size", GRID_SIZE)
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise DataFormatError(f"{path}: grid_size={g!r} is not a positive integer")
    return g


def shard_file_shapes(p, n: int, grid_size: int) -> list[tuple[str, tuple[int, ...], type]]:
    """(path, shape, dtype) of the three binary files of a shard of `n` frames (`p`: its `ShardPaths`)."""
    return [(p.video, (num_windows(n), GRIDS_PER_WINDOW, grid_size, grid_size), np.int32),
            (p.states, (n, STATE_DIM), np.float32), (p.segment_idx, (n,), np.int32)]


def make_dataloader(dataset, batch_size: int, *, shuffle: bool = True, num_workers: int = 0, distributed=False,
                    seed: int = 0, drop_last: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset`; distributed=True shards it with a DistributedSampler over the initialised
    process group (call `loader.sampler.set_epoch(e)` each epoch)."""
    sampler = None
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       num_workers=num_workers, drop_last=drop_last, generator=generator,
                                       persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
