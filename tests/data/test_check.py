"""`wmfast data check` and `wmfast.data.check`: every split under a root, tokenized or raw, flat or nested; one
line per problem naming the file, then one summary line per split; exit 0 / 1 / 2."""
import json
import os
import shutil

import numpy as np
import pytest

from wmfast.cli import main
from wmfast.data import TokenizedDataset, write_split, write_synthetic_dataset
from wmfast.data.check import check_split, find_splits
from wmfast.data.layout import shard_paths

G, V = 8, 512
SPLITS = {"train_v2.0": ("tokenized", "nested"), "train_v2.0_raw": ("raw", "nested"),
          "val_v2.0": ("tokenized", "flat"), "val_v2.0_raw": ("raw", "flat")}


@pytest.fixture(scope="module")
def good_root(tmp_path_factory):
    pytest.importorskip("av", reason="the raw 1X videos are written and read with PyAV, which cannot be imported here")
    from wmfast.data.raw_synthetic import write_synthetic_raw_dataset

    root = str(tmp_path_factory.mktemp("check"))
    write_synthetic_dataset(root, shards=2, frames=120, seed=0, grid_size=G, vocab_size=V)
    write_synthetic_raw_dataset(root, shards=2, frames=90, size=64, val_frames=80)
    return root


@pytest.fixture
def root(good_root, tmp_path):
    """A copy of the good root, to damage."""
    return shutil.copytree(good_root, str(tmp_path / "root"))


def _check(capsys, *args):
    rc = main(["data", "check", *args, "--vocab-size", str(V)])
    out = capsys.readouterr().out.splitlines()
    summaries = [line for line in out if any(line.startswith(f"{os.path.join(args[0], s)}: ") for s in SPLITS)]
    return rc, [line for line in out if line not in summaries], summaries


def test_good_root_has_one_ok_line_per_split(good_root, capsys):
    from wmfast.data.raw import RawVideoDataset

    rc, problems, summaries = _check(capsys, good_root)
    assert rc == 0 and problems == []
    n = {s: len(TokenizedDataset(good_root, s[:-5], vocab_size=V)) for s in ("train_v2.0", "val_v2.0")}
    n.update({s: len(RawVideoDataset(good_root, s)) for s in ("train_v2.0_raw", "val_v2.0_raw")})  # disjoint
    assert summaries == [
        f"{good_root}/train_v2.0: tokenized, nested, 2 shards, 240 frames, {n['train_v2.0']} samples: ok",
        f"{good_root}/train_v2.0_raw: raw, nested, 2 shards, 180 frames, {n['train_v2.0_raw']} samples: ok",
        f"{good_root}/val_v2.0: tokenized, flat, 1 shards, 68 frames, {n['val_v2.0']} samples: ok",
        f"{good_root}/val_v2.0_raw: raw, flat, 1 shards, 80 frames, {n['val_v2.0_raw']} samples: ok"]
    assert min(n.values()) > 0


def test_a_split_directory_alone_and_split_names(good_root, capsys):
    split = os.path.join(good_root, "train_v2.0_raw")
    assert main(["data", "check", split]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{split}: raw, nested, 2 shards, 180 frames, 2 samples: ok"]
    assert main(["data", "check", good_root, "--split", "val", "--vocab-size", str(V)]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == [
        f"{good_root}/val_v2.0", f"{good_root}/val_v2.0_raw"]


def test_problems_in_several_shards_and_splits_are_all_reported(root, capsys):
    tok1 = shard_paths(os.path.join(root, "train_v2.0"), 1)  # nested, second shard
    v = np.memmap(tok1.video, np.int32, "r+")
    v[2 * 3 * G * G + 1] = V  # window 2 holds an id past the vocabulary
    v.flush()
    os.truncate(tok1.states, 100)
    raw0 = shard_paths(os.path.join(root, "val_v2.0_raw"), 0, "mp4")  # flat
    with open(raw0.video, "r+b") as f:
        f.write(os.urandom(4096))
    rc, problems, summaries = _check(capsys, root)
    assert rc == 1
    assert len(problems) == 3, problems
    assert problems[0] == (f"{tok1.states}: truncated: 100 bytes, expected 12000 for float32 (120, 25) (from the "
                           "shard's metadata)")
    assert problems[1].startswith(f"{tok1.video}: window 2 holds token ids in [")
    assert problems[1].endswith(f", {V}], outside the vocabulary [0, {V}) (1 of 8 windows are bad)")
    assert problems[2].startswith(f"{raw0.video}: cannot open or decode with PyAV")
    assert [s.rsplit(": ", 1)[1] for s in summaries] == ["2 problems", "ok", "ok", "1 problem"]


@pytest.mark.parametrize("what", ["bad_json", "float_frames", "num_images", "frame_count", "nan_state",
                                  "no_videos", "shard_ind"])
def test_each_check_names_the_file(root, what):
    split = os.path.join(root, "val_v2.0_raw" if what in ("frame_count", "nan_state") else "train_v2.0")
    p = shard_paths(split, 0, "mp4" if split.endswith("raw") else "bin")
    top = os.path.join(split, "metadata.json")
    if what == "bad_json":
        with open(p.metadata, "w") as f:
            f.write("{not json")
        expected = f"{p.metadata}: not valid JSON"
    elif what in ("float_frames", "shard_ind"):
        with open(p.metadata, "w") as f:
            json.dump({"shard_num_frames": 120.0 if what == "float_frames" else 120, "shard_ind": 3}, f)
        expected = (f"{p.metadata}: shard_num_frames=120.0 is not a non-negative integer" if what == "float_frames"
                    else f"{p.metadata}: shard_ind=3, expected 0")
    elif what == "num_images":
        with open(top) as f:
            meta = json.load(f)
        with open(top, "w") as f:
            json.dump({**meta, "num_images": 7}, f)
        expected = f"{top}: num_images=7 but the shards' metadata sum to 240"
    elif what == "frame_count":  # a video of 77 frames where the metadata says 80 (sizes of the rest agree)
        from wmfast.data.raw_synthetic import write_video

        write_video(p.video, np.zeros((77, 64, 64, 3), np.uint8))
        expected = f"{p.video}: 77 frames, expected shard_num_frames=80"
    elif what == "nan_state":
        s = np.memmap(p.states, np.float32, "r+")
        s[33 * 25 + 24] = np.inf
        s.flush()
        expected = f"{p.states}: non-finite state (NaN or inf) at frame 33 (1 of 80 frames)"
    else:
        shutil.rmtree(os.path.dirname(p.video))
        expected = f"{os.path.dirname(p.video)}: no video_{{i}}.bin or video_{{i}}.mp4 files"
    report = check_split(split, vocab_size=V)
    assert len(report.problems) == 1 and report.problems[0].startswith(expected), report.problems


def test_a_missing_or_empty_root_is_a_usage_error(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main(["data", "check", missing]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"wmfast data check: error: argument root: {missing} does not exist\n"
    assert main(["data", "check", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"wmfast data check: error: argument root: {tmp_path} holds no split")
    write_split(str(tmp_path / "train"), 1, 40, seed=0, grid_size=G, vocab_size=V)
    assert find_splits(str(tmp_path)) == [str(tmp_path / "train")]
    assert main(["data", "check", str(tmp_path), "--split", "val"]) == 2
    assert "argument --split: no split 'val'" in capsys.readouterr().err
