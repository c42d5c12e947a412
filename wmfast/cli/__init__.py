"""The `wmfast` command line: this entry point and one module per command (`wmfast/cli/<name>.py`, each with
`add_arguments(parser)` and `run(args) -> int`). Only the module of the command being run is imported, so
`wmfast env` does not pay for the imports of `wmfast train`; `wmfast --help` imports none of them."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module under wmfast.cli, one-line help)
COMMANDS = {
    "demo": ("demo", "the quick start: runs the main job on the embedded synthetic default"),
    "env": ("env", "versions, GPU, and which backends are usable and why not"),
    "data": ("data", "synthetic datasets in the real 1X formats; check every split of a dataset; encode VAE latents"),
    "train": ("train", "train a model with DeepSpeed ZeRO"),
    "generate": ("generate", "greedy token generation with the ST-Transformer"),
    "sample": ("sample", "ensemble sampling with the Wan2.2 world model"),
    "eval-psnr": ("eval_psnr", "PSNR against ensemble size and steps over a split"),
    "plot": ("plot", "draw loss and throughput curves of a run directory"),
    "bench": ("bench", "benchmark suites with roofline ceilings"),
}


def command_module(name: str):
    """The module of command `name` (imported now)."""
    return importlib.import_module(f"wmfast.cli.{COMMANDS[name][0]}")


def _command_of(argv) -> str | None:
    """The command named in argv: its first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command`'s subparser gets its full arguments (importing that one module), the others only
    their name and help, enough for `wmfast --help` and to name an unknown command."""
    parser = argparse.ArgumentParser(prog="wmfast", description="Fast kernels, training and inference for video world "
                                     "models (1X World Model Challenge): `wmfast COMMAND --help` for each command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_)
            continue
        module = command_module(name)
        p = sub.add_parser(name, help=help_, description=(module.__doc__ or help_).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return int(args._run(args) or 0)
