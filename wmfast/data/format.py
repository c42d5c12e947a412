"""The 1X World Model Challenge v2.0 tokenized format: names, dtypes, shapes, and how frames map to grids.

Per shard `i` of a split directory:
- `video_{i}.bin`: int32, (ceil(shard_num_frames / 17), 3, G, G) with G = 32: every 17-frame window is
  tokenized on its own by the Cosmos DV 8x8x8 tokenizer (FSQ levels [8,8,8,5,5,5] -> vocabulary 64,000).
- `states_{i}.bin`: float32, (shard_num_frames, 25); `segment_idx_{i}.bin`: int32, (shard_num_frames,).
- `metadata_{i}.json`: {"shard_num_frames", "shard_ind"}; the split has `metadata.json`
  {"num_shards", "query", "hz", "num_images"} ("query" is null in the real data).
Where these files sit (flat, as in the public val_v2.0, or nested in `metadata/`, `videos/`, `robot_states/`,
`segment_indices/`, as in train_v2.0) is `wmfast.data.layout`'s business.

wmfast extension: `metadata.json` may carry "grid_size" (default 32) so small synthetic sets for CPU tests
can use 8x8 or 16x16 grids; the real data never has the key and reads with G = 32.

Frames -> grids (Cosmos causal temporal compression 8x): a 17-frame window yields 1 + 16 / 8 = 3 grids;
grid 0 encodes frame 0 alone, grid 1 frames 1-8, grid 2 frames 9-16. A sample is two consecutive windows
(34 frames -> 6 grids), so `GRID_OF_FRAME[f]` below gives the grid of each of the 34 frames.
"""
from __future__ import annotations

WINDOW = 17  # frames per tokenized window
GRIDS_PER_WINDOW = 3  # 1 + (17 - 1) / 8: Cosmos DV 8x8x8 is causal in time
SAMPLE_WINDOWS = 2  # a compression sample: 3 context grids + 3 future grids
SAMPLE_FRAMES = WINDOW * SAMPLE_WINDOWS  # 34
SAMPLE_GRIDS = GRIDS_PER_WINDOW * SAMPLE_WINDOWS  # 6
CONTEXT_GRIDS = 3
STATE_DIM = 25
VOCAB_SIZE = 64_000  # FSQ levels 8*8*8*5*5*5
GRID_SIZE = 32
HZ = 30


def _grid_of_frame() -> tuple[int, ...]:
    out = []
    for w in range(SAMPLE_WINDOWS):
        base = w * GRIDS_PER_WINDOW
        out += [base] + [base + 1] * 8 + [base + 2] * 8
    return tuple(out)


GRID_OF_FRAME = _grid_of_frame()  # len 34: [0, 1 x8, 2 x8, 3, 4 x8, 5 x8]


def num_windows(shard_num_frames: int) -> int:
    """Rows of video_{i}.bin: ceil(frames / 17) (a partial last window is tokenized too)."""
    return -(-shard_num_frames // WINDOW)
