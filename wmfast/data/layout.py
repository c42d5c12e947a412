"""Where the files of a 1X split live, and the checks of one file that the readers and `wmfast data check` share.

A split directory holds `metadata.json` at its root and, per shard `i`, four files in one of two layouts:
- flat (the public val splits): `metadata_{i}.json`, `video_{i}.bin` (tokenized) or `video_{i}.mp4` (raw),
  `states_{i}.bin`, `segment_idx_{i}.bin`, all at the root;
- nested (the public train splits): `metadata/metadata_{i}.json`, `videos/video_{i}.bin|.mp4`,
  `robot_states/states_{i}.bin`, `segment_indices/segment_idx_{i}.bin`.
The layout is detected from the directory, never chosen by a flag: a split is nested as soon as one of the
four subfolders exists, so a half-copied nested split reports its missing files inside their subfolders.

The field checks every reader runs when it opens a split (and `wmfast data check` reports) live here too:
`read_split_metadata`, `read_shard_metadata`, `missing_files_problem`, `check_size`, `segment_problem`; the
whole-file scans `token_problem` and `state_problem` run when a sample is read or a split validated. The
writers' side: `check_replaceable` and `replace_split` (a split is written beside its directory and swapped in,
and only a split wmfast wrote is ever replaced), `ArgumentValueError` for an unusable writer argument.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

FLAT, NESTED = "flat", "nested"
SPLIT_METADATA = "metadata.json"
SUBDIRS = {"metadata": "metadata", "video": "videos", "states": "robot_states", "segment_idx": "segment_indices"}
VIDEO_EXT = {"tokenized": "bin", "raw": "mp4"}
# metadata.json's "generator" in every split the synthetic writers write starts with this: the mark of a split
# that a writer may replace (the real data has no "generator" key)
SYNTHETIC_GENERATOR = "wmfast synthetic"


class DataFormatError(ValueError):
    """Data on disk does not match the 1X v2.0 format (the message names the file and what is wrong)."""


class ArgumentValueError(ValueError):
    """A writer's argument `param` has an unusable `value`. str() reads "param=value reason" (the CLI's
    fields_as_flags names the flag instead: "--frames 10 must be ...")."""

    def __init__(self, param: str, value, reason: str):
        self.param, self.value, self.reason = param, value, reason
        super().__init__(f"{param}={value} {reason}")

    def __reduce__(self):  # pickles (e.g. from a worker process) with its three fields
        return type(self), (self.param, self.value, self.reason)


def require_int(param: str, value, minimum: int, why: str = "") -> None:
    """Raise ArgumentValueError unless `value` is an int >= `minimum` (`why` is appended to the reason)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ArgumentValueError(param, value, f"must be an integer >= {minimum}{why}")


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
    """Create the split directory (and its subfolders when `layout` is NESTED), for the writers."""
    if layout not in (FLAT, NESTED):
        raise ArgumentValueError("layout", repr(layout), f"must be {NESTED!r} or {FLAT!r}")
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


# ------------------------------------------------------------------------------------------------ writers
def check_output_dir(path: str, param: str = "out_dir") -> None:
    """Raise ArgumentValueError naming `param` unless `path` is a directory or can be made one (neither it nor a
    parent is a file or a broken symbolic link)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        if os.path.lexists(p):
            raise ArgumentValueError(param, path, f"cannot be created: {p} is a broken symbolic link")
        if os.path.dirname(p) == p:
            return
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        where = "is a file" if p == os.path.abspath(path) else f"cannot be created: {p} is a file"
        raise ArgumentValueError(param, path, f"{where}, not a directory")


def written_by_wmfast(split_dir: str) -> bool:
    """Whether `split_dir`'s metadata.json names a wmfast synthetic writer as its "generator"."""
    try:
        with open(os.path.join(split_dir, SPLIT_METADATA)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("generator", "")).startswith(SYNTHETIC_GENERATOR)


def check_replaceable(split_dir: str, param: str = "out_dir", value: str | None = None) -> None:
    """Raise ArgumentValueError naming `param` (given as `value`, default `split_dir`) unless a split may be written
    at `split_dir`: absent, an empty directory, or a split a wmfast writer wrote. Any other directory is left
    alone: a writer never deletes data it did not write."""
    value = split_dir if value is None else value
    check_output_dir(value, param)
    if not os.path.lexists(split_dir):
        return
    what = "is" if value == split_dir else f"would replace {split_dir}, which is"
    if not os.path.isdir(split_dir):
        raise ArgumentValueError(param, value, f"{what} a file, not a directory")
    if not os.listdir(split_dir) or written_by_wmfast(split_dir):
        return
    raise ArgumentValueError(param, value, f"{what} not a split wmfast wrote (no {SPLIT_METADATA} with "
                             f'"generator": "{SYNTHETIC_GENERATOR} ..."): not replacing it; remove it or choose '
                             "another directory")


def replace_split(split_dir: str, write: Callable[[str], object]) -> str:
    """Write a split with `write(tmp)` into a fresh hidden sibling directory, then swap it in: the old `split_dir`
    (when there is one; `check_replaceable` decides whether it may go) is renamed aside, the new one renamed into
    place, the old one deleted. No file of the old split survives in the new one, and a kill leaves `split_dir`
    either complete (old or new) or absent with both complete beside it under hidden names (`.NAME.*.partial`,
    `.NAME.*.old`), never half written. Returns `split_dir`."""
    check_replaceable(split_dir)
    target = os.path.realpath(split_dir)  # through a symbolic link: the data moves where it lives
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    stem = os.path.join(parent, f".{name}.{os.getpid()}-{secrets.token_hex(4)}")
    tmp = stem + ".partial"
    os.mkdir(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(target):
        os.rename(target, stem + ".old")
        os.rename(tmp, target)
        shutil.rmtree(stem + ".old", ignore_errors=True)
    else:
        os.rename(tmp, target)
    for leftover in _dead_siblings(parent, name):  # what killed earlier writes left beside the split
        shutil.rmtree(leftover, ignore_errors=True)
    return split_dir


def _dead_siblings(parent: str, name: str) -> list[str]:
    """The hidden `.NAME.PID-HEX.partial|.old` directories of `replace_split` calls whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)-[0-9a-f]+\.(partial|old)$")
    out = []
    for entry in os.listdir(parent):
        m = pattern.match(entry)
        if m and not _alive(int(m.group(1))):
            out.append(os.path.join(parent, entry))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from e
    if not isinstance(meta, dict):
        raise error(f"{path}: not a JSON object")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise error(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    for k in keys:
        v = meta[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise error(f"{path}: {k}={v!r} is not a non-negative integer")
    return meta


def read_split_metadata(path: str, *, error: type[Exception] = DataFormatError) -> dict:
    """A split's metadata.json (`path`): "num_shards" an integer >= 1, "num_images" >= 0; raises `error`."""
    meta = read_metadata(path, ("num_shards", "num_images"), error=error)
    if meta["num_shards"] < 1:
        raise error(f"{path}: num_shards={meta['num_shards']} must be >= 1 (a split has at least one shard)")
    return meta


def shard_ind_problem(path: str, meta: dict, i: int) -> str | None:
    """The line saying that metadata_{i}.json (`path`, read as `meta`) gives another "shard_ind" than i, if so."""
    if "shard_ind" in meta and (isinstance(meta["shard_ind"], bool) or meta["shard_ind"] != i):
        return f"{path}: shard_ind={meta['shard_ind']!r}, expected {i}"
    return None


def read_shard_metadata(path: str, i: int, *, error: type[Exception] = DataFormatError) -> int:
    """Shard `i`'s frame count from its metadata_{i}.json (`path`): "shard_num_frames" an integer >= 0, and
    "shard_ind" (when present) equal to i; raises `error` naming the file and the field."""
    meta = read_metadata(path, ("shard_num_frames",), error=error)
    problem = shard_ind_problem(path, meta, i)
    if problem:
        raise error(problem)
    return meta["shard_num_frames"]


def missing_files_problem(p: ShardPaths) -> str | None:
    """One line naming the first missing file of a shard (and the others missing beside it), or None."""
    missing = [f for f in p if not os.path.isfile(f)]
    if not missing:
        return None
    return f"{missing[0]}: missing" + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")


def segment_problem(path: str, seg: np.ndarray) -> str | None:
    """None when the segment ids of a shard (`seg`, read from `path`) are >= 0 and never decrease (a segment is
    one run of frames, the ids increasing along the shard), else one line naming the first bad frame."""
    seg = np.asarray(seg)
    negative = np.flatnonzero(seg < 0)
    if negative.size:
        f = int(negative[0])
        return (f"{path}: segment id {int(seg[f])} at frame {f} is negative ({negative.size} of {seg.size} frames); "
                f"segment ids must be >= 0")
    down = np.flatnonzero(seg[1:] < seg[:-1])
    if not down.size:
        return None
    f = int(down[0]) + 1
    prev, cur = int(seg[f - 1]), int(seg[f])
    if (seg[:f] == cur).any():  # an id seen before this run: a segment split in two (A-B-A)
        last = int(np.flatnonzero(seg[:f] == cur)[-1])
        return (f"{path}: segment {cur} resumes at frame {f} after segment {prev} (it ended at frame {last}); "
                f"segment ids must not decrease along a shard")
    return (f"{path}: segment id decreases from {prev} to {cur} at frame {f}; segment ids must not decrease along a "
            "shard")


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
