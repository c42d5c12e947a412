"""Datasets in the real 1X formats: `wmfast data synth --out DIR` writes a synthetic set (v2.0; train nested,
val flat, as published; a split wmfast wrote there before is replaced whole, any other directory in the way is
refused), `wmfast data check ROOT` checks every split under ROOT (tokenized or raw, flat or
nested): one line per problem, naming the file, then one summary line per split; exit 0 when all is well,
1 when a problem was found, 2 when ROOT holds no split."""
from __future__ import annotations

import os

from wmfast.cli._args import fields_as_flags

# sub-subcommand -> (add_arguments, run); other areas add theirs here (e.g. `synth --raw`, `encode`)
SUBCOMMANDS: dict = {}


def _add_synth(p):
    p.add_argument("--out", required=True, help="output directory (gets train_v2.0/ and val_v2.0/)")
    p.add_argument("--shards", type=int, default=2, help="train shards (val always has 1)")
    p.add_argument("--frames", type=int, default=4096, help="frames per train shard (30 Hz)")
    p.add_argument("--val-frames", type=int, default=None,
                   help="frames of the val split's one shard (default: a quarter of --frames, at least 4 windows; "
                        "--raw: at least 3 samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-size", type=int, default=32, help="token grid side (the real data: 32)")
    p.add_argument("--vocab-size", type=int, default=64000, help="token ids drawn from [0, V) (real: 64000)")
    p.add_argument("--raw", action="store_true",
                   help="write the raw format instead (sampling track: video_{i}.mp4 + states + segments, "
                        "train_v2.0_raw/ and val_v2.0_raw/; moving shapes driven by the states)")
    p.add_argument("--size", type=int, default=512, help="--raw: frame side in pixels (real: 512; tiny Wan: 64)")
    p.add_argument("--uncertain", action="store_true",
                   help="a future the context only partly determines: a random choice no context reveals (tokenized: "
                        "a corner patch with one of 4 ids a grid; --raw: a square in one of 4 slots every 8 frames), "
                        "so the best single guess is a blur (wmfast.data.synthetic, wmfast.data.raw_synthetic)")
    p.add_argument("--flat", action="store_true",
                   help="write the train split in the flat layout too (default: nested, as published; val is flat)")


# a writer's parameter -> the flag that sets it, so an unusable value is reported under the flag's name
SYNTH_FLAGS = {"out_dir": "--out", "shards": "--shards", "frames": "--frames", "val_frames": "--val-frames",
               "seed": "--seed", "grid_size": "--grid-size", "vocab_size": "--vocab-size", "size": "--size"}


def _run_synth(args) -> int:
    if args.raw:
        return _run_synth_raw(args)
    from wmfast.data import TokenizedDataset, write_synthetic_dataset

    with fields_as_flags(SYNTH_FLAGS):
        paths = write_synthetic_dataset(args.out, args.shards, args.frames, args.seed, grid_size=args.grid_size,
                                        vocab_size=args.vocab_size, layout=_train_layout(args),
                                        uncertain=args.uncertain, val_frames=args.val_frames)
    for split, path in paths.items():
        n = len(TokenizedDataset(args.out, split, vocab_size=args.vocab_size))
        print(f"{split}: {path} ({n} samples)")
    return 0


def _train_layout(args) -> str:
    from wmfast.data.layout import FLAT, NESTED

    return FLAT if args.flat else NESTED


def _add_check(p):
    p.add_argument("root", help="a split directory (with metadata.json) or a dataset root whose subdirectories "
                                "are splits (train_v2.0/, val_v2.0/, train_v2.0_raw/, val_v2.0_raw/)")
    p.add_argument("--split", default=None,
                   help="check only this split: NAME, NAME_v2.0 or NAME_v2.0_raw under ROOT (default: all)")
    p.add_argument("--vocab-size", type=int, default=64000, help="token ids must lie in [0, V) (real: 64000)")


def _check_error(message: str) -> int:
    import sys

    print(f"wmfast data check: error: {message}", file=sys.stderr)
    return 2


def _run_check(args) -> int:
    from tqdm import tqdm

    from wmfast.data.check import check_split, find_splits

    if not os.path.exists(args.root):
        return _check_error(f"argument root: {args.root} does not exist")
    splits = find_splits(args.root)
    if not splits:
        return _check_error(f"argument root: {args.root} holds no split (no metadata.json in it or in a "
                            f"subdirectory)")
    if args.split is not None:
        names = {args.split, f"{args.split}_v2.0", f"{args.split}_v2.0_raw"}
        chosen = [d for d in splits if os.path.basename(os.path.normpath(d)) in names]
        if not chosen:
            found = ", ".join(os.path.basename(os.path.normpath(d)) for d in splits)
            return _check_error(f"argument --split: no split {args.split!r} under {args.root} (found: {found})")
        splits = chosen
    reports = [check_split(d, vocab_size=args.vocab_size, progress=True, on_problem=tqdm.write) for d in splits]
    for r in reports:
        print(r.summary())
    return 0 if all(r.ok for r in reports) else 1


def _run_synth_raw(args) -> int:
    from wmfast.data.raw import RawVideoDataset
    from wmfast.data.raw_synthetic import write_synthetic_raw_dataset

    with fields_as_flags(SYNTH_FLAGS):
        paths = write_synthetic_raw_dataset(args.out, args.shards, args.frames, args.seed, size=args.size,
                                            progress=True, layout=_train_layout(args), uncertain=args.uncertain,
                                            val_frames=args.val_frames)
    for split, path in paths.items():
        print(f"{split}: {path} ({len(RawVideoDataset(path))} disjoint 77-frame samples)")
    return 0


def _add_encode(p):
    p.add_argument("--data", required=True, help="raw 1X dataset root (train_v2.0_raw/, val_v2.0_raw/)")
    p.add_argument("--out", required=True, help="output directory (gets train/ and val/ with latents.npy)")
    p.add_argument("--model", default="tiny", help="'tiny' or a local Wan2.2-TI2V-5B diffusers directory (its VAE)")
    p.add_argument("--hop", type=int, default=16, help="frames between training sample starts")
    p.add_argument("--max-samples", type=int, default=None, help="encode at most this many samples per split")
    p.add_argument("--batch", type=int, default=1, help="samples per VAE call")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_encode(args) -> int:
    from wmfast.tasks.sampling import encode_dataset

    for split, path in encode_dataset(args.data, args.out, args.model, hop=args.hop, max_samples=args.max_samples,
                                      batch=args.batch, device=args.device).items():
        print(f"{split}: {path}")
    return 0


SUBCOMMANDS["synth"] = (_add_synth, _run_synth, "write a synthetic dataset in the 1X v2.0 format (tokenized or --raw)")
SUBCOMMANDS["check"] = (_add_check, _run_check, "check every split of a dataset, tokenized or raw, flat or nested")
SUBCOMMANDS["encode"] = (_add_encode, _run_encode, "precompute the Wan VAE latents of a raw dataset (sampling track)")


def add_arguments(p):
    sub = p.add_subparsers(dest="data_command", required=True)
    for name, (add, run_, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
        sp.set_defaults(_data_run=run_)


def run(args) -> int:
    return int(args._data_run(args) or 0)
