"""1X raw-format reader and synthetic writer: partial decode is exact, samples stay in one segment, states
drive the pictures, corrupt and truncated files raise RawDataError naming the file, in the flat and the nested
layout alike."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from wmfast.data.layout import FLAT, NESTED, detect_layout, shard_paths
from wmfast.data.raw import SAMPLE_FRAMES, RawDataError, RawVideoDataset, decode_frames, sample_starts
from wmfast.data.raw_synthetic import render_frames, write_raw_split, write_synthetic_raw_dataset

SPLITS = ["train_v2.0_raw", "val_v2.0_raw"]  # nested and flat, as published


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    pytest.importorskip("av", reason="the raw 1X videos are written and read with PyAV, which cannot be imported here")
    root = str(tmp_path_factory.mktemp("raw"))
    write_synthetic_raw_dataset(root, shards=1, frames=300, size=64, val_frames=231)
    return root


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def _listing(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, files in os.walk(d) for f in files)


def _copy(raw_root, split, dst):
    shutil.copytree(os.path.join(raw_root, split), dst)
    return dst, shard_paths(dst, 0, "mp4")


def test_layout_and_sample_index(raw_root):
    split = os.path.join(raw_root, "train_v2.0_raw")
    assert _listing(split) == ["metadata.json", "metadata/metadata_0.json", "robot_states/states_0.bin",
                               "segment_indices/segment_idx_0.bin", "videos/video_0.mp4"]
    assert _listing(os.path.join(raw_root, "val_v2.0_raw")) == [
        "metadata.json", "metadata_0.json", "segment_idx_0.bin", "states_0.bin", "video_0.mp4"]
    for name, layout in zip(SPLITS, (NESTED, FLAT)):
        assert detect_layout(os.path.join(raw_root, name)) == layout
        with open(os.path.join(raw_root, name, "metadata.json")) as f:
            assert json.load(f)["query"] is None  # as in the real data
    ds = RawVideoDataset(raw_root, "train", hop=16)
    seg = np.asarray(ds.shards[0].segment_idx)
    assert len(ds) > 0
    for _, start in ds.index:  # every sample inside one segment
        assert len(np.unique(seg[start:start + SAMPLE_FRAMES])) == 1


def test_nested_and_flat_layouts_read_the_same_items(tmp_path):
    pytest.importorskip("av", reason="the raw 1X videos are written and read with PyAV, which cannot be imported here")
    ds = {}
    for layout in (NESTED, FLAT):
        d = write_raw_split(str(tmp_path / layout), 1, 160, seed=5, size=64, layout=layout)
        ds[layout] = RawVideoDataset(d, frame_offsets=[0, 16, 76], hop=40)
    assert [len(ds[NESTED].shards), len(ds[NESTED])] == [len(ds[FLAT].shards), len(ds[FLAT])] == [1, 3]
    for i in range(len(ds[FLAT])):
        a, b = ds[NESTED][i], ds[FLAT][i]
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["states"], b["states"])


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


@pytest.mark.parametrize("split", SPLITS)
def test_corrupt_video_raises(raw_root, tmp_path, split):
    bad, p = _copy(raw_root, split, str(tmp_path / "bad"))
    with open(p.video, "r+b") as f:  # garbage over the header: not a video any more
        f.write(os.urandom(4096))
    ds = RawVideoDataset(bad, frame_offsets=[0, 76])
    with pytest.raises(RawDataError, match=re.escape(p.video)):
        ds[0]


@pytest.mark.parametrize("split", SPLITS)
def test_truncated_video_raises(raw_root, tmp_path, split):
    bad, p = _copy(raw_root, split, str(tmp_path / "trunc"))
    os.truncate(p.video, os.path.getsize(p.video) // 3)
    ds = RawVideoDataset(bad, frame_offsets=[0, 76])
    with pytest.raises(RawDataError, match=re.escape(p.video)):
        ds[len(ds) - 1]


@pytest.mark.parametrize("split", SPLITS)
def test_bad_sizes_and_missing_files_raise(raw_root, tmp_path, split):
    bad, p = _copy(raw_root, split, str(tmp_path / "size"))
    with open(p.states, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(RawDataError, match=re.escape(p.states)):
        RawVideoDataset(bad)
    os.remove(p.states)
    with pytest.raises(RawDataError, match=re.escape(p.states)):
        RawVideoDataset(bad)
    with pytest.raises(RawDataError, match="no split"):
        RawVideoDataset(raw_root, "test")
