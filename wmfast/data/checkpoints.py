"""The on-disk layout of a training run's checkpoints: `RUN_DIR/checkpoints/step_XXXXXXXX/` directories, each
complete once it holds trainer_state.json (wmfast.train.checkpoint writes them atomically; the model loaders
read them). Naming and finding complete checkpoints lives here, below both."""
from __future__ import annotations

import os
import re

TAG_RE = re.compile(r"^step_(\d{8,})$")
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a checkpoint complete


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
