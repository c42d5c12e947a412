"""`wmfast` command line. Each subcommand lives in `wmfast/commands/<name>.py` with
`add_arguments(parser)` and `run(args) -> int`, imported only when used (fast start-up)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# name -> (module under wmfast.commands, one-line help)
COMMANDS = {
    "demo": ("demo", "the quick start: runs the main job on the embedded synthetic default"),
    "env": ("env", "versions, GPU, and which backends are usable and why not"),
    "data": ("data", "write synthetic datasets in the real 1X formats; encode VAE latents"),
    "train": ("train", "train a model with DeepSpeed ZeRO"),
    "generate": ("generate", "greedy token generation with the ST-Transformer"),
    "sample": ("sample", "ensemble sampling with the Wan2.2 world model"),
    "eval-psnr": ("eval_psnr", "PSNR against ensemble size and steps over a split"),
    "plot": ("plot", "draw loss and throughput curves of a run directory"),
    "bench": ("bench", "benchmark suites with roofline ceilings"),
}


def _available():
    return {name: (mod, help_) for name, (mod, help_) in COMMANDS.items()
            if importlib.util.find_spec(f"wmfast.commands.{mod}") is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmfast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, help_) in _available().items():
        module = importlib.import_module(f"wmfast.commands.{mod}")
        p = sub.add_parser(name, help=help_, description=(module.__doc__ or help_).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
