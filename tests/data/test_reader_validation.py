"""Every malformed split is refused when a reader opens it, with one line naming the file, the field and the bad
value, and `wmfast data check` reports the same line instead of a traceback; the synthetic writers refuse
unusable arguments (naming the flag on the command line), replace a split they wrote whole, and never touch a
directory they did not write."""
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from wmfast.cli import main
from wmfast.data import DataFormatError, TokenizedDataset, write_split, write_synthetic_dataset
from wmfast.data.check import check_split, find_splits
from wmfast.data.layout import ArgumentValueError, shard_paths

G, V = 4, 64
TOKENIZED, RAW = "tokenized", "raw"


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """One good split of each kind: tokenized (2 shards of 68 frames), raw (1 shard of 77 frames, 32x32)."""
    root = tmp_path_factory.mktemp("good")
    out = {TOKENIZED: write_split(str(root / TOKENIZED), 2, 68, seed=0, grid_size=G, vocab_size=V)}
    if importlib.util.find_spec("av") is not None:  # the raw tests are marked requires("av")
        from wmfast.data.raw_synthetic import write_raw_split

        out[RAW] = write_raw_split(str(root / RAW), 1, 77, seed=0, size=32)
    return out


NEEDS_AV = pytest.mark.requires("av")  # the raw 1X videos are written and read with PyAV


def _open(kind, d):
    if kind == TOKENIZED:
        return TokenizedDataset(d, None, vocab_size=V)
    from wmfast.data.raw import RawVideoDataset

    return RawVideoDataset(d)


def _edit(path, **fields):
    with open(path) as f:
        meta = json.load(f)
    meta.update(fields)
    for k in [k for k, v in fields.items() if v is KeyError]:
        del meta[k]
    with open(path, "w") as f:
        json.dump(meta, f)


def _segments(path, ids):
    assert os.path.getsize(path) == 4 * len(ids)
    np.asarray(ids, np.int32).tofile(path)


def _runs(n, *runs):
    """segment ids: `runs` = (id, length), ..., the last run filling up to n frames."""
    ids = np.concatenate([np.full(length, sid) for sid, length in runs[:-1]] or [np.zeros(0)])
    return np.concatenate([ids, np.full(n - len(ids), runs[-1][0])]).astype(np.int32)


def _corrupt(d, kind, what):
    """Damage split `d`; returns the error line the reader must raise (and check must report)."""
    p = shard_paths(d, 0, "bin" if kind == TOKENIZED else "mp4")
    top = os.path.join(d, "metadata.json")
    n = 68 if kind == TOKENIZED else 77
    if what == "segments_decrease":
        _segments(p.segment_idx, _runs(n, (5, 40), (2, 0)))
        return (f"{p.segment_idx}: segment id decreases from 5 to 2 at frame 40; segment ids must not decrease along "
                "a shard")
    if what == "segments_a_b_a":
        _segments(p.segment_idx, _runs(n, (0, 20), (1, 20), (0, 0)))
        return (f"{p.segment_idx}: segment 0 resumes at frame 40 after segment 1 (it ended at frame 19); segment ids "
                "must not decrease along a shard")
    if what == "segments_negative":
        _segments(p.segment_idx, _runs(n, (0, 10), (-3, 0)))
        return (f"{p.segment_idx}: segment id -3 at frame 10 is negative ({n - 10} of {n} frames); segment ids must "
                "be >= 0")
    if what in ("num_shards_0", "num_shards_-1"):
        v = int(what.rsplit("_", 1)[1])
        _edit(top, num_shards=v)
        return f"{top}: num_shards={v} " + ("must be >= 1 (a split has at least one shard)" if v == 0
                                            else "is not a non-negative integer")
    if what == "num_shards_missing":
        _edit(top, num_shards=KeyError)
        return f"{top}: missing key 'num_shards'"
    if what == "metadata_not_json":
        text = '{"num_shards": 1,'
        with open(top, "w") as f:
            f.write(text)
        with pytest.raises(json.JSONDecodeError) as e:
            json.loads(text)
        return f"{top}: not valid JSON ({e.value})"
    if what in ("frames_text", "frames_fraction"):
        v = "abc" if what == "frames_text" else 1023.7
        _edit(p.metadata, shard_num_frames=v)
        return f"{p.metadata}: shard_num_frames={v!r} is not a non-negative integer"
    if what == "shard_ind":
        _edit(p.metadata, shard_ind=3)
        return f"{p.metadata}: shard_ind=3, expected 0"
    if what == "shard_metadata_missing":
        os.remove(p.metadata)
        return f"{p.metadata}: missing"
    if what == "num_images":
        _edit(top, num_images=7)
        total = 2 * n if kind == TOKENIZED else n
        return f"{top}: num_images=7 but the shards' metadata sum to {total}"
    if what == "states_longer_than_metadata":  # 3 frames more states than the metadata says
        with open(p.states, "ab") as f:
            f.write(np.zeros((3, 25), np.float32).tobytes())
        return (f"{p.states}: too long: {(n + 3) * 100} bytes, expected {n * 100} for float32 ({n}, 25) (from the "
                "shard's metadata)")
    if what == "grid_size_0":
        _edit(top, grid_size=0)
        return f"{top}: grid_size=0 is not a positive integer"
    raise AssertionError(what)


BOTH = ["segments_decrease", "segments_a_b_a", "segments_negative", "num_shards_0", "num_shards_-1",
        "num_shards_missing", "metadata_not_json", "frames_text", "frames_fraction", "shard_ind",
        "shard_metadata_missing", "num_images", "states_longer_than_metadata"]
CASES = ([pytest.param(TOKENIZED, w, id=f"tokenized-{w}") for w in BOTH + ["grid_size_0"]]
         + [pytest.param(RAW, w, id=f"raw-{w}", marks=NEEDS_AV) for w in BOTH])


@pytest.mark.parametrize("kind, what", CASES)
def test_a_malformed_split_is_refused_at_open_and_reported_by_check(splits, tmp_path, kind, what):
    d = shutil.copytree(splits[kind], str(tmp_path / kind))
    expected = _corrupt(d, kind, what)
    with pytest.raises(DataFormatError) as raised:
        _open(kind, d)
    assert str(raised.value) == expected and "\n" not in expected
    if kind == RAW:
        from wmfast.data.raw import RawDataError

        assert isinstance(raised.value, RawDataError)
    assert expected in check_split(d, vocab_size=V).problems


def test_data_check_prints_the_line_and_exits_1(splits, tmp_path, capsys):
    d = shutil.copytree(splits[TOKENIZED], str(tmp_path / "split"))
    expected = _corrupt(d, TOKENIZED, "segments_a_b_a")
    assert main(["data", "check", d, "--vocab-size", str(V)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == expected and out[1].endswith(": 1 problem")


def test_a_good_split_opens_and_checks_clean(splits):
    for kind, d in splits.items():
        assert len(_open(kind, d)) > 0 and check_split(d, vocab_size=V).ok, kind


@NEEDS_AV
def test_raw_nan_states_are_refused_when_read_and_by_validate(splits, tmp_path):
    from wmfast.data.raw import RawDataError, RawVideoDataset

    d = shutil.copytree(splits[RAW], str(tmp_path / "raw"))
    p = shard_paths(d, 0, "mp4")
    s = np.memmap(p.states, np.float32, "r+")
    s[30 * 25 + 4] = np.nan
    s.flush()
    ds = RawVideoDataset(d, frame_offsets=[0])
    with pytest.raises(RawDataError, match=re.escape(f"{p.states}: non-finite state (NaN or inf) at frame 30")):
        ds[0]
    with pytest.raises(RawDataError, match=re.escape(f"{p.states}: non-finite state (NaN or inf) at frame 30 (1 of")):
        ds.validate(chunk_frames=16)


# ------------------------------------------------------------------------------------------------ writers
def _synth(capsys, out, *args):
    rc = main(["data", "synth", "--out", str(out), "--grid-size", str(G), "--vocab-size", str(V), *args])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, message", [
    pytest.param(["--frames", "10"], "--frames 10 must be an integer >= 34 (one sample: two 17-frame windows)",
                 id="frames"),
    pytest.param(["--shards", "0"], "--shards 0 must be an integer >= 1", id="shards"),
    pytest.param(["--frames", "40", "--seed", "-1"], "--seed -1 must be an integer >= 0", id="seed"),
    pytest.param(["--frames", "10", "--raw", "--size", "32"], "--frames 10 must be an integer >= 77 (the frames of one "
                 "sample)", id="raw-frames"),
    pytest.param(["--frames", "77", "--raw", "--size", "48"], "--size 48 must be a multiple of 32 (the Wan VAE and "
                 "H.264 need it)", id="raw-size"),
])
def test_synth_refuses_unusable_arguments_naming_the_flag(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert _synth(capsys, out, *args) == (2, f"wmfast data synth: error: {message}")
    assert not out.exists()  # checked before anything is written


def test_writers_name_the_parameter():
    with pytest.raises(ArgumentValueError, match=r"^frames=33 must be an integer >= 34") as raised:
        write_synthetic_dataset("unused", frames=33)
    assert raised.value.param == "frames"
    with pytest.raises(ArgumentValueError, match=r"^val_frames=20 must be an integer >= 34"):
        write_synthetic_dataset("unused", frames=40, val_frames=20)


def test_synth_out_must_be_a_directory(tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    assert _synth(capsys, afile) == (2, f"wmfast data synth: error: --out {afile} is a file, not a directory")
    assert _synth(capsys, afile / "sub") == (
        2, f"wmfast data synth: error: --out {afile / 'sub'} cannot be created: {afile} is a file, not a directory")
    assert afile.read_text() == "keep me"


def _listing(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, files in os.walk(d) for f in files)


def test_synth_again_replaces_the_splits_whole(tmp_path, capsys):
    out = tmp_path / "out"
    assert _synth(capsys, out, "--shards", "3", "--frames", "40")[0] == 0
    assert len(os.listdir(out / "train_v2.0" / "videos")) == 3
    assert _synth(capsys, out, "--shards", "2", "--frames", "40")[0] == 0
    assert sorted(os.listdir(out)) == ["train_v2.0", "val_v2.0"]  # no temporary or old copy left beside them
    assert sorted(os.listdir(out / "train_v2.0" / "videos")) == ["video_0.bin", "video_1.bin"]
    assert check_split(str(out / "train_v2.0"), vocab_size=V).ok
    assert len(TokenizedDataset(str(out), "train", vocab_size=V)) > 0


def test_what_a_killed_write_left_is_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a process that has ended: its pid
    gone.wait()
    d = tmp_path / "split"
    for suffix in ("partial", "old"):  # killed mid-write, and between the two renames
        (tmp_path / f".split.{gone.pid}-ab12.{suffix}").mkdir()
    (tmp_path / f".split.{os.getpid()}-cd34.partial").mkdir()  # a live writer's: left alone
    write_split(str(d), 1, 40, seed=0, grid_size=G, vocab_size=V)
    assert sorted(os.listdir(tmp_path)) == [f".split.{os.getpid()}-cd34.partial", "split"]


def _contents(d):
    return {f: (Path(d) / f).read_bytes() for f in _listing(d)}


def test_a_failed_write_leaves_the_old_split_untouched(tmp_path, monkeypatch):
    from wmfast.data import synthetic

    d = str(tmp_path / "split")
    write_split(d, 2, 40, seed=0, grid_size=G, vocab_size=V)
    before = _contents(d)

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_shard_video", killed)
    with pytest.raises(KeyboardInterrupt):
        write_split(d, 1, 40, seed=1, grid_size=G, vocab_size=V)
    assert os.listdir(tmp_path) == ["split"]
    assert _contents(d) == before


@pytest.mark.parametrize("raw", [False, pytest.param(True, marks=NEEDS_AV)], ids=["tokenized", "raw"])
def test_synth_never_replaces_a_directory_it_did_not_write(tmp_path, capsys, raw):
    out = tmp_path / "out"
    real = out / ("val_v2.0_raw" if raw else "val_v2.0")
    real.mkdir(parents=True)
    (real / "metadata.json").write_text('{"num_shards": 1, "num_images": 5, "query": null, "hz": 30}')
    args = ["--raw", "--size", "32", "--frames", "77"] if raw else ["--frames", "40"]
    rc, err = _synth(capsys, out, *args)
    assert rc == 2 and err == (f"wmfast data synth: error: --out {out} would replace {real}, which is not a split "
                               'wmfast wrote (no metadata.json with "generator": "wmfast synthetic ..."): not '
                               "replacing it; remove it or choose another directory")
    assert os.listdir(out) == [real.name] and os.listdir(real) == ["metadata.json"]  # nothing written, nothing lost


@NEEDS_AV
def test_raw_synth_again_replaces_the_splits_whole(tmp_path):
    from wmfast.data.raw import RawVideoDataset
    from wmfast.data.raw_synthetic import write_raw_split

    d = str(tmp_path / "raw")
    write_raw_split(d, 2, 77, seed=0, size=32, layout="nested")
    write_raw_split(d, 1, 77, seed=1, size=32)  # flat over nested: the subfolders go too
    assert _listing(d) == ["metadata.json", "metadata_0.json", "segment_idx_0.bin", "states_0.bin", "video_0.mp4"]
    assert len(RawVideoDataset(d)) == 1 and os.listdir(tmp_path) == ["raw"]


def test_check_skips_hidden_directories(splits, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(splits[TOKENIZED], str(root / "val_v2.0"))
    shutil.copytree(splits[TOKENIZED], str(root / ".val_v2.0.123-abcd.old"))  # a writer's copy left by a kill
    assert find_splits(str(root)) == [str(root / "val_v2.0")]
