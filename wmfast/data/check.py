"""Check a 1X dataset on disk without stopping at the first problem (the engine of `wmfast data check`).

`find_splits(root)` lists the split directories (root itself when it holds metadata.json, else each of its
subdirectories that does, hidden ones aside: a writer's temporary copies); `check_split(dir)` checks one,
tokenized or raw (told apart by the extension of its `video_{i}` files), flat or nested (`wmfast.data.layout`),
and returns a `SplitReport`: one line per problem, each naming the file and what is wrong, collected shard by
shard; every line a reader would raise when it opens the split is among them. What is checked:
- metadata.json and every metadata_{i}.json: present, valid JSON, the keys the readers need, non-negative
  integers (num_shards >= 1); num_images equal to the sum of shard_num_frames; shard_ind equal to i when present;
- each binary file's size against shard_num_frames (video_{i}.bin, states_{i}.bin, segment_idx_{i}.bin; the
  video's only when metadata.json gives the grid size);
- segment ids >= 0 and never decreasing along a shard;
- every state finite, read in chunks (raw and tokenized); tokenized: every token id inside [0, vocab_size)
  (with the scans `TokenizedDataset.validate()` uses);
- raw: video_{i}.mp4 present, non-empty, opened by PyAV, its frame count (when the container records it)
  equal to shard_num_frames, its first frame decodable (only the first: real shards are hours long).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from wmfast.data.format import STATE_DIM, VOCAB_SIZE, WINDOW
from wmfast.data.layout import (
    SPLIT_METADATA,
    VIDEO_EXT,
    DataFormatError,
    check_size,
    count_shard_metadata,
    detect_layout,
    files_dir,
    read_metadata,
    read_split_metadata,
    segment_problem,
    shard_ind_problem,
    shard_paths,
    state_problem,
    token_problem,
    video_exts,
)
from wmfast.data.raw import SAMPLE_FRAMES as RAW_SAMPLE_FRAMES
from wmfast.data.raw import check_video, sample_starts
from wmfast.data.tokenized import grid_size_of, shard_file_shapes, valid_windows

KINDS = {ext: kind for kind, ext in VIDEO_EXT.items()}  # video extension -> kind of split


@dataclass
class SplitReport:
    dir: str
    kind: str = "unknown"  # "tokenized", "raw" or "unknown" (no video files)
    layout: str = "flat"
    shards: int = 0
    frames: int = 0
    samples: int = 0  # tokenized: compression samples; raw: disjoint 77-frame samples
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        n = len(self.problems)
        status = "ok" if self.ok else f"{n} problem{'s' if n > 1 else ''}"
        return (f"{self.dir}: {self.kind}, {self.layout}, {self.shards} shards, {self.frames} frames, "
                f"{self.samples} samples: {status}")


def find_splits(root: str) -> list[str]:
    """`root` when it holds metadata.json, else its subdirectories that do (sorted); [] when none."""
    if os.path.isfile(os.path.join(root, SPLIT_METADATA)):
        return [root]
    if not os.path.isdir(root):
        return []
    subdirs = sorted(os.path.join(root, d) for d in os.listdir(root) if not d.startswith("."))
    return [d for d in subdirs if os.path.isfile(os.path.join(d, SPLIT_METADATA))]


def check_split(split_dir: str, *, vocab_size: int = VOCAB_SIZE, chunk_frames: int = 1 << 16,
                progress: bool = False, on_problem: Callable[[str], None] | None = None) -> SplitReport:
    """Check every file of one split; `on_problem(line)` is called as each problem is found (e.g. to print
    it at once), and the report holds them all."""
    from tqdm import tqdm

    report = SplitReport(split_dir, layout=detect_layout(split_dir))

    def problem(line: str) -> None:
        report.problems.append(line)
        if on_problem is not None:
            on_problem(line)

    top = os.path.join(split_dir, SPLIT_METADATA)
    meta: dict = {}
    grid = None  # unknown until metadata.json says: video_{i}.bin's size is not checked without it
    try:
        meta = read_split_metadata(top)
        report.shards = meta["num_shards"]
        grid = grid_size_of(top, meta)
    except DataFormatError as e:
        problem(str(e))
        report.shards = report.shards or count_shard_metadata(split_dir, report.layout)  # check those present

    exts = video_exts(split_dir, report.layout)
    if len(exts) == 1:
        report.kind = KINDS[exts.pop()]
    else:
        found = "both video_{i}.bin and video_{i}.mp4" if exts else "no video_{i}.bin or video_{i}.mp4"
        problem(f"{files_dir(split_dir, 'video', report.layout)}: {found} files, cannot tell a tokenized split from "
                "a raw one")

    shard_metadata_ok = True
    for i in tqdm(range(report.shards), desc=os.path.basename(split_dir.rstrip(os.sep)), disable=not progress):
        try:
            frames, samples = _check_shard(split_dir, i, report, grid, vocab_size, chunk_frames, problem)
        except OSError as e:  # unreadable file (permissions, a network file system failing): go on
            problem(f"{e.filename or split_dir}: cannot be read ({e.strerror or e})")
            frames, samples = None, 0
        shard_metadata_ok &= frames is not None
        report.frames += frames or 0
        report.samples += samples
    if shard_metadata_ok and "num_images" in meta and meta["num_images"] != report.frames:
        problem(f"{top}: num_images={meta['num_images']} but the shards' metadata sum to {report.frames}")
    return report


def _check_shard(split_dir: str, i: int, report: SplitReport, grid: int | None, vocab_size: int,
                 chunk_frames: int, problem: Callable[[str], None]) -> tuple[int | None, int]:
    """Check shard `i`, reporting each problem; returns (its frames per its metadata, None when that cannot be
    read; its samples)."""
    raw = report.kind == "raw"
    p = shard_paths(split_dir, i, "mp4" if raw else "bin", report.layout)
    try:
        meta = read_metadata(p.metadata, ("shard_num_frames",))
    except DataFormatError as e:
        problem(str(e))
        videos = report.kind != "unknown"  # with no video files at all the split reported it once already
        for path in (p.video, p.states, p.segment_idx) if videos else (p.states, p.segment_idx):
            if not os.path.isfile(path):
                problem(f"{path}: missing")
        return None, 0
    n = meta["shard_num_frames"]
    _report(problem, shard_ind_problem(p.metadata, meta, i))
    # the mp4 is checked by PyAV below; with no video files at all the split reported it once already
    tokenized = report.kind == "tokenized" and grid is not None
    files = [f for f in shard_file_shapes(p, n, grid or 1) if f[0] != p.video or tokenized]
    sized = {}
    for path, shape, dtype in files:
        try:
            check_size(path, shape, dtype)
            sized[path] = (shape, dtype)
        except DataFormatError as e:
            problem(str(e))
    if n and p.video in sized:
        video = np.memmap(p.video, np.int32, "r", shape=sized[p.video][0])
        _report(problem, token_problem(p.video, video, vocab_size, max(1, chunk_frames // WINDOW)))
    if n and p.states in sized:
        states = np.memmap(p.states, np.float32, "r", shape=(n, STATE_DIM))
        _report(problem, state_problem(p.states, states, chunk_frames))
    if raw:
        try:
            check_video(p.video, n)
        except DataFormatError as e:
            problem(str(e))
    samples = 0
    if p.segment_idx in sized:
        seg = np.fromfile(p.segment_idx, np.int32)
        _report(problem, segment_problem(p.segment_idx, seg))
        samples = len(sample_starts(seg, RAW_SAMPLE_FRAMES, RAW_SAMPLE_FRAMES) if raw else valid_windows(seg))
    return n, samples


def _report(problem: Callable[[str], None], line: str | None) -> None:
    if line:
        problem(line)
