"""The on-disk layout of a training run's checkpoints: `RUN_DIR/checkpoints/step_XXXXXXXX/` directories, each
complete once it holds trainer_state.json (wmfast.train.checkpoint writes them atomically; the model loaders
read them), and `RUN_DIR/checkpoints/.tmp/`, where checkpoints are written and deleted. Naming, finding and
checking complete checkpoints lives here, below both."""
from __future__ import annotations

import json
import os
import re
import zipfile

TAG_RE = re.compile(r"^step_(\d{8,})$")
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a checkpoint complete
TMP_DIR = ".tmp"  # checkpoints being written or deleted: never read, emptied at the start of every run
MANIFEST_KEY = "files"  # trainer_state.json: {relative path: size in bytes} of every other file of the checkpoint
OPTIONAL_RE = re.compile(r"^rng_rank\d+\.pt$")  # a resume goes on without it (dropout masks then differ)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (default) zip format; a legacy pickle starts otherwise


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str) -> tuple[int, str] | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def incomplete_checkpoints(ckpt_dir: str) -> list[str]:
    """`step_*` directories without trainer_state.json (left by a deletion killed half-way in place)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir)
                  if TAG_RE.match(n) and not os.path.isfile(os.path.join(ckpt_dir, n, TRAINER_STATE)))


def file_sizes(root: str, skip: str = TRAINER_STATE) -> dict[str, int]:
    """{path relative to root ('/'-separated): size} of every file under root but `skip` (the manifest)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != skip:
                out[rel] = os.path.getsize(os.path.join(dirpath, name))
    return dict(sorted(out.items()))


def checkpoint_problem(path: str) -> str | None:
    """Why the complete checkpoint `path` would not load, naming the file, or None when nothing is seen: a file
    the manifest lists that is missing (but an optional RNG state) or of another size (e.g. cut by a full disk
    or a partial copy), or a zip archive (torch.save's format) without its central directory (a cut file written
    before manifests)."""
    state_file = os.path.join(path, TRAINER_STATE)
    try:
        with open(state_file) as f:
            manifest = json.load(f).get(MANIFEST_KEY) or {}
    except (OSError, ValueError, AttributeError) as e:
        return f"{state_file} is unreadable ({type(e).__name__}: {e})"
    for rel, size in manifest.items():
        file = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(file):
            if OPTIONAL_RE.match(os.path.basename(file)):
                continue
            return f"{file} is missing"
        actual = os.path.getsize(file)
        if actual != size:
            return f"{file} has {actual} bytes, {size} were written"
    for dirpath, _, files in os.walk(path):
        for name in sorted(files):
            if name.endswith(".pt"):
                problem = _zip_problem(os.path.join(dirpath, name))
                if problem:
                    return problem
    return None


def _zip_problem(file: str) -> str | None:
    with open(file, "rb") as f:
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return None
    try:
        zipfile.ZipFile(file).close()  # reads the central directory at the end of the file only
    except (zipfile.BadZipFile, OSError) as e:
        return f"{file} is truncated or damaged (its zip archive has no end: {e})"
    return None
