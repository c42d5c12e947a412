"""1X raw-format reader and synthetic writer: partial decode is exact, samples stay in one segment, states
drive the pictures, corrupt and truncated files raise RawDataError."""
import os
import shutil

import numpy as np
import pytest
import torch

from wmfast.data.raw import (
    SAMPLE_FRAMES,
    RawDataError,
    RawVideoDataset,
    decode_frames,
    render_frames,
    sample_starts,
    write_synthetic_raw_dataset,
)


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    pytest.importorskip("av", reason="the raw 1X videos are written and read with PyAV, which cannot be imported here")
    root = str(tmp_path_factory.mktemp("raw"))
    write_synthetic_raw_dataset(root, shards=1, frames=300, size=64, val_frames=231)
    return root


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def test_layout_and_sample_index(raw_root):
    split = os.path.join(raw_root, "train_v2.0_raw")
    assert sorted(os.listdir(split)) == ["metadata.json", "metadata_0.json", "segment_idx_0.bin",
                                         "states_0.bin", "video_0.mp4"]
    ds = RawVideoDataset(raw_root, "train", hop=16)
    seg = np.asarray(ds.shards[0].segment_idx)
    assert len(ds) > 0
    for _, start in ds.index:  # every sample inside one segment
        assert len(np.unique(seg[start:start + SAMPLE_FRAMES])) == 1


def test_sample_starts_respect_segments():
    seg = np.array([0] * 100 + [1] * 80 + [2] * 50, np.int32)
    assert sample_starts(seg, 77, 10).tolist() == [0, 10, 20, 100]


def test_partial_decode_matches_full_decode_and_render(raw_root):
    """Seeking + decoding only the needed frames gives exactly the frames a full sequential decode gives at
    those indices, and they are the rendered frames (H.264 at crf 12, 4:2:0 chroma on 64x64 shapes: > 25 dB)."""
    ds = RawVideoDataset(raw_root, "train", frame_offsets=[4, 7, 16, 19, 76], hop=16)
    shard = ds.shards[0]
    full = decode_frames(shard.video, list(range(shard.num_frames)))
    ref = render_frames(np.asarray(shard.states), np.asarray(shard.segment_idx), 64, seed=0)
    for i in (0, len(ds) - 1):
        item = ds[i]
        idx = [item["start"] + o for o in ds.frame_offsets]
        got = item["frames"].permute(0, 2, 3, 1).numpy()
        assert item["frames"].dtype == torch.uint8 and item["frames"].shape == (5, 3, 64, 64)
        np.testing.assert_array_equal(got, full[idx])
        assert min(_psnr(got[k], ref[j]) for k, j in enumerate(idx)) > 25
        torch.testing.assert_close(item["states"], torch.from_numpy(np.array(shard.states[item["start"]:item["start"] + 77])))


def test_resize_while_converting(raw_root):
    ds = RawVideoDataset(raw_root, "val", frame_offsets=[16, 76], size=(32, 32))
    assert ds[0]["frames"].shape == (2, 3, 32, 32)


def test_states_drive_the_square():
    """The square is red with the hand open (state 21 = 0) and green when closed."""
    states = np.zeros((2, 25), np.float32)
    states[1, 21] = 1
    imgs = render_frames(states, np.zeros(2, np.int32), 64)
    frac_red = [np.mean((im[..., 0] > 200) & (im[..., 1] < 80)) for im in imgs]
    frac_green = [np.mean((im[..., 1] > 200) & (im[..., 0] < 80)) for im in imgs]
    assert frac_red[0] > 0.01 and frac_red[1] == 0 and frac_green[1] > 0.01


def test_corrupt_video_raises(raw_root, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(os.path.join(raw_root, "val_v2.0_raw"), bad)
    video = os.path.join(bad, "video_0.mp4")
    with open(video, "r+b") as f:  # garbage over the header: not a video any more
        f.write(os.urandom(4096))
    ds = RawVideoDataset(bad, frame_offsets=[0, 76])
    with pytest.raises(RawDataError, match="video_0.mp4"):
        ds[0]


def test_truncated_video_raises(raw_root, tmp_path):
    bad = str(tmp_path / "trunc")
    shutil.copytree(os.path.join(raw_root, "val_v2.0_raw"), bad)
    video = os.path.join(bad, "video_0.mp4")
    os.truncate(video, os.path.getsize(video) // 3)
    ds = RawVideoDataset(bad, frame_offsets=[0, 76])
    with pytest.raises(RawDataError, match="video_0.mp4"):
        ds[len(ds) - 1]


def test_bad_sizes_raise(raw_root, tmp_path):
    bad = str(tmp_path / "size")
    shutil.copytree(os.path.join(raw_root, "val_v2.0_raw"), bad)
    with open(os.path.join(bad, "states_0.bin"), "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(RawDataError, match="states_0.bin"):
        RawVideoDataset(bad)
    with pytest.raises(RawDataError, match="no split"):
        RawVideoDataset(raw_root, "test")
