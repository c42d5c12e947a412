"""wmfast.data: the 1X v2.0 tokenized reader on synthetic shards (flat and nested layouts) and on corrupted
ones."""
import json
import os
import re

import numpy as np
import pytest
import torch

from wmfast.data import DataFormatError, TokenizedDataset, make_dataloader, write_split, write_synthetic_dataset
from wmfast.data.format import GRID_OF_FRAME, num_windows
from wmfast.data.layout import FLAT, NESTED, detect_layout, shard_paths
from wmfast.data.tokenized import valid_windows

G, V = 8, 512


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    write_synthetic_dataset(root, shards=2, frames=400, seed=0, grid_size=G, vocab_size=V)
    return root


def _split(tmp_path, frames=200, layout=FLAT):
    d = str(tmp_path / "split")
    write_split(d, 1, frames, seed=1, grid_size=G, vocab_size=V, layout=layout)
    return d


def _listing(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, files in os.walk(d) for f in files)


def test_synthetic_train_is_nested_and_val_flat_as_published(synth):
    assert _listing(os.path.join(synth, "train_v2.0")) == [
        "metadata.json", "metadata/metadata_0.json", "metadata/metadata_1.json", "robot_states/states_0.bin",
        "robot_states/states_1.bin", "segment_indices/segment_idx_0.bin", "segment_indices/segment_idx_1.bin",
        "videos/video_0.bin", "videos/video_1.bin"]
    assert _listing(os.path.join(synth, "val_v2.0")) == [
        "metadata.json", "metadata_0.json", "segment_idx_0.bin", "states_0.bin", "video_0.bin"]
    for split, layout in (("train_v2.0", NESTED), ("val_v2.0", FLAT)):
        assert detect_layout(os.path.join(synth, split)) == layout
        with open(os.path.join(synth, split, "metadata.json")) as f:
            meta = json.load(f)
        assert meta["query"] is None and meta["hz"] == 30  # as in the real data


def test_nested_and_flat_layouts_read_the_same_samples(tmp_path):
    ds = {}
    for layout in (NESTED, FLAT):
        d = str(tmp_path / layout)
        write_split(d, 2, 120, seed=3, grid_size=G, vocab_size=V, layout=layout)
        ds[layout] = TokenizedDataset(d, None, vocab_size=V)
        assert ds[layout].layout == layout
        ds[layout].validate()
    assert len(ds[NESTED]) == len(ds[FLAT]) > 0
    for i in range(len(ds[FLAT])):
        a, b = ds[NESTED][i], ds[FLAT][i]
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["states"], b["states"])


def test_grid_of_frame_is_cosmos_8x_causal():
    assert GRID_OF_FRAME[:17] == (0,) + (1,) * 8 + (2,) * 8
    assert GRID_OF_FRAME[17:] == tuple(g + 3 for g in GRID_OF_FRAME[:17])
    assert num_windows(17) == 1 and num_windows(18) == 2 and num_windows(0) == 0


def test_valid_windows_stay_inside_one_segment():
    seg = np.zeros(17 * 6 + 5, np.int32)
    seg[40:] = 1  # segment change inside window 2 -> windows 0-1 ok, 1-2 and 2-3 cross it
    seg[17 * 5:] = 2  # change at the start of window 5: windows 3-4 ok, 4-5 crosses
    assert valid_windows(seg).tolist() == [0, 3]
    assert valid_windows(np.zeros(33, np.int32)).tolist() == []


def test_samples_match_the_files(synth):
    ds = TokenizedDataset(synth, "train", vocab_size=V)
    assert len(ds) > 20 and ds.grid_size == G
    d = ds.dir
    for idx in (0, len(ds) // 2, len(ds) - 1):
        s = ds[idx]
        assert s["tokens"].shape == (6, G, G) and s["tokens"].dtype == torch.int64
        assert s["states"].shape == (34, 25) and s["states"].dtype == torch.float32
        k, j = int(ds._shard_of[idx]), int(ds._window_of[idx])
        n = ds.shards[k].num_frames
        p = shard_paths(d, k)
        video = np.fromfile(p.video, np.int32).reshape(-1, 3, G, G)
        states = np.fromfile(p.states, np.float32).reshape(n, 25)
        seg = np.fromfile(p.segment_idx, np.int32)
        np.testing.assert_array_equal(s["tokens"].numpy(), video[j: j + 2].reshape(6, G, G))
        np.testing.assert_array_equal(s["states"].numpy(), states[17 * j: 17 * j + 34])
        assert len(set(seg[17 * j: 17 * j + 34].tolist())) == 1
    assert len(TokenizedDataset(synth, "val", vocab_size=V)) > 0
    ds.validate()


def test_synthetic_structure_follows_the_states(synth):
    # grid t+1 is grid t rolled by the velocities of its frames: check the shift predicted from the states
    # explains most tokens (beyond the 1% noise and the hand patch), far above chance (1/512)
    ds = TokenizedDataset(synth, "train", vocab_size=V)
    hits = []
    for idx in range(0, len(ds), 5):
        s = ds[idx]
        tok, st = s["tokens"].numpy(), s["states"].numpy()
        for g0, f0, f1 in ((0, 0, 8), (1, 8, 16), (3, 17, 25), (4, 25, 33)):
            vy, vx = st[f0 + 1: f1 + 1, 24].sum() / 8, st[f0 + 1: f1 + 1, 23].sum() / 8
            pred = np.roll(tok[g0], (int(np.rint(vy)), int(np.rint(vx))), axis=(0, 1))
            hits.append((pred[2:, 2:] == tok[g0 + 1][2:, 2:]).mean())
    assert np.mean(hits) > 0.8, np.mean(hits)


def test_real_grid_size_default_format(tmp_path):
    d = str(tmp_path / "real")
    write_split(d, 1, 17 * 5 + 3, seed=0)  # 32x32 grids, vocab 64000, partial last window
    with open(os.path.join(d, "metadata.json")) as f:
        assert "grid_size" not in json.load(f)
    assert os.path.getsize(os.path.join(d, "video_0.bin")) == 6 * 3 * 32 * 32 * 4
    ds = TokenizedDataset(d, None)
    assert ds[0]["tokens"].shape == (6, 32, 32)


def test_dataloader_workers_and_distributed_sampler(synth):
    ds = TokenizedDataset(synth, "train", vocab_size=V)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0,
                                                     drop_last=True)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
        ids = torch.cat([b["index"] for b in loader]).tolist()
        assert len(ids) == len(sampler)
        seen.append(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 2 * (len(ds) // 2)
    batch = next(iter(make_dataloader(ds, 3, num_workers=0)))
    assert batch["tokens"].shape == (3, 6, G, G) and batch["states"].shape == (3, 34, 25)


def _corrupt(d, what):
    """Damage shard 0 of split `d` (either layout); returns the pattern of the error, naming the full path."""
    p = shard_paths(d, 0)
    if what == "missing_video":
        os.remove(p.video)
        return re.escape(p.video) + ": missing"
    if what == "truncated_states":
        os.truncate(p.states, os.path.getsize(p.states) - 4)
        return re.escape(p.states) + ": truncated"
    if what == "metadata_frames":
        with open(p.metadata, "w") as f:
            json.dump({"shard_num_frames": 150, "shard_ind": 0}, f)
        return re.escape(p.video) + ": too long"
    if what == "num_images":
        top = os.path.join(d, "metadata.json")
        with open(top) as f:
            meta = json.load(f)
        meta["num_images"] += 1
        with open(top, "w") as f:
            json.dump(meta, f)
        return re.escape(top) + ": num_images"
    if what == "missing_metadata":
        os.remove(p.metadata)
        return re.escape(p.metadata) + ": missing"
    if what == "float_frames":
        with open(p.metadata, "w") as f:
            json.dump({"shard_num_frames": 200.0, "shard_ind": 0}, f)
        return re.escape(p.metadata) + r": shard_num_frames=200.0 is not a non-negative integer"
    raise AssertionError(what)


CORRUPTIONS = ["missing_video", "truncated_states", "metadata_frames", "num_images", "missing_metadata",
               "float_frames"]


@pytest.mark.parametrize("layout", [FLAT, NESTED])
@pytest.mark.parametrize("what", CORRUPTIONS)
def test_corrupted_files_name_the_file(tmp_path, what, layout):
    d = _split(tmp_path, layout=layout)
    expected = _corrupt(d, what)
    with pytest.raises(DataFormatError, match=expected):
        TokenizedDataset(d, None, vocab_size=V)


@pytest.mark.parametrize("layout", [FLAT, NESTED])
@pytest.mark.parametrize("what", ["token_range", "nan_state"])
def test_corrupted_values_name_the_file(tmp_path, what, layout):
    d = _split(tmp_path, layout=layout)
    p = shard_paths(d, 0)
    if what == "token_range":
        v = np.memmap(p.video, np.int32, "r+")
        v[3 * G * G + 5] = V  # window 1: one id past the vocabulary
        v.flush()
        path, pattern = p.video, ": window 1 holds token ids"
    else:
        s = np.memmap(p.states, np.float32, "r+")
        s[20 * 25 + 7] = np.nan  # frame 20
        s.flush()
        path, pattern = p.states, r": non-finite state .* at frame 20"
    ds = TokenizedDataset(d, None, vocab_size=V)  # opens: sizes are right
    with pytest.raises(DataFormatError, match=re.escape(path) + pattern):
        ds.validate(chunk_frames=40)
    bad = [i for i in range(len(ds)) if int(ds._window_of[i]) in (0, 1)]
    assert bad, "the corrupted window must belong to some sample"
    with pytest.raises(DataFormatError, match=re.escape(path)):
        ds[bad[0]]


def test_missing_split(tmp_path):
    with pytest.raises(DataFormatError, match="no metadata.json for split 'train'"):
        TokenizedDataset(str(tmp_path), "train")


def test_cli_synth_and_check(tmp_path, capsys):
    from wmfast.cli import main

    out = str(tmp_path / "cli")
    assert main(["data", "synth", "--out", out, "--shards", "1", "--frames", "120", "--grid-size", "8",
                 "--vocab-size", "512"]) == 0
    assert "train:" in capsys.readouterr().out
    assert main(["data", "check", out, "--split", "val", "--vocab-size", "512"]) == 0
    assert capsys.readouterr().out == f"{out}/val_v2.0: tokenized, flat, 1 shards, 68 frames, 3 samples: ok\n"
    train = os.path.join(out, "train_v2.0")
    write_split(train, 1, 120, seed=0, grid_size=G, vocab_size=V, layout=FLAT)  # replaces the nested split whole
    assert detect_layout(train) == FLAT and _listing(train) == [
        "metadata.json", "metadata_0.json", "segment_idx_0.bin", "states_0.bin", "video_0.bin"]
    flat = str(tmp_path / "flat")
    assert main(["data", "synth", "--out", flat, "--shards", "1", "--frames", "120", "--grid-size", "8",
                 "--vocab-size", "512", "--flat"]) == 0
    assert detect_layout(os.path.join(flat, "train_v2.0")) == FLAT


def test_pickles_without_its_maps(synth):
    import pickle

    ds = TokenizedDataset(synth, "train", vocab_size=V)
    first = ds[0]  # maps the first shard in this process
    assert ds._maps
    clone = pickle.loads(pickle.dumps(ds))  # what spawn-started DataLoader workers receive
    assert clone._maps is None
    assert torch.equal(clone[0]["tokens"], first["tokens"])
