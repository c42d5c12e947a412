"""The `wmfast` command line: this entry point and one module per command (`wmfast/cli/<name>.py`, each with
`add_arguments(parser)` and `run(args) -> int`). Only the module of the command being run is imported, so
`wmfast env` does not pay for the imports of `wmfast train`; `wmfast --help` imports none of them.

Every command shares one error path (`run_command`): a user error (a ValueError, a missing or misplaced path)
prints one line `wmfast CMD: error: ...` and exits 2; the disk or the device failing under the run (no space
left, a read-only or forbidden path, out of memory) prints one line and exits 4; anything else is a bug and
keeps its traceback. `--debug` shows the traceback of every error.

Exit codes: 0 success; 1 a bug (traceback), or a check that found problems (`data check`, `bench`); 2 a user
error; 3 training stopped early (a NaN/Inf loss, see `wmfast train --nan`); 4 the disk or device failed;
130 interrupted (Ctrl-C)."""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import warnings

EXIT_USAGE, EXIT_STOPPED, EXIT_RESOURCE, EXIT_INTERRUPTED = 2, 3, 4, 130
# the disk or the machine failing under a run, not a wrong argument
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO}
_MESSAGE_LIMIT = 600  # characters of one error line

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
    "reproduce": ("reproduce", "the seed's four findings reproduced at small scale (trained models, CPU)"),
    "bench": ("bench", "benchmark suites with roofline ceilings"),
}


_EPILOG = """start here:
  wmfast demo                  every stage end to end on a small synthetic dataset (CPU: about a minute)
  wmfast env                   what this machine can run (GPU, Triton, CUDA extension) and why not

a typical run (compression track):
  wmfast data synth --out DATA          (or the real 1X dataset; `wmfast data check DATA` checks it)
  wmfast train --config 1x-compression --data DATA --out RUN
  wmfast generate --data DATA --checkpoint RUN
  wmfast plot RUN

sampling track (a local Wan2.2-TI2V-5B diffusers directory WAN; nothing is downloaded):
  wmfast data synth --raw --out RAW     (or the real raw 1X dataset)
  wmfast train --config 1x-sampling --model WAN --data RAW --out LORA
  wmfast sample --model WAN --lora LORA --data RAW --out OUT

exit codes: 0 success; 1 a bug (with its traceback) or a check that found problems; 2 a wrong argument or
input (one line naming it); 3 training stopped early (a NaN/Inf loss); 4 the disk or device failed (no space,
read-only, out of memory); 130 interrupted. --debug shows the traceback of any error."""


def command_module(name: str):
    """The module of command `name` (imported now)."""
    return importlib.import_module(f"wmfast.cli.{COMMANDS[name][0]}")


def _command_of(argv) -> str | None:
    """The command named in argv: its first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


class Parser(argparse.ArgumentParser):
    """argparse's parser, answering a bad argument with one line (no usage block above it)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command`'s subparser gets its full arguments (importing that one module), the others only
    their name and help, enough for `wmfast --help` and to name an unknown command."""
    parser = Parser(prog="wmfast", description="Fast kernels, training and inference for video world "
                    "models (1X World Model Challenge): `wmfast COMMAND --help` for each command.", epilog=_EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of every error (and debug "
                        "logging)")
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


def error_line(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) of an error that is the user's or the machine's, None for a bug. wmfast
    raises ValueError for bad input, naming it; one raised outside wmfast says where, in case it is a bug."""
    if isinstance(exc, OSError) and exc.errno is not None and (exc.strerror or exc.filename):
        code = EXIT_RESOURCE if exc.errno in _RESOURCE_ERRNOS else EXIT_USAGE
        text = str(exc) if type(exc).__str__ is not OSError.__str__ else exc.strerror or str(exc)
        if exc.filename and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
        return code, text
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        first = (str(exc).splitlines() or [""])[0]
        return EXIT_RESOURCE, f"out of device memory ({first[:200]}): try a smaller batch"
    if isinstance(exc, ValueError):
        origin = _innermost_module(exc)
        if origin.startswith(("wmfast", "argparse")):
            return EXIT_USAGE, str(exc)
        return EXIT_USAGE, f"{exc} (raised in {origin}: `--debug` shows the traceback)"
    return None


def _innermost_module(exc: BaseException) -> str:
    tb, name = exc.__traceback__, ""
    while tb is not None:
        name, tb = tb.tb_frame.f_globals.get("__name__", ""), tb.tb_next
    return name


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def run_command(prog: str, fn, args, *, debug: bool = False) -> int:
    """fn(args) as exit code, through the shared error path (see the module docstring)."""
    if debug:
        return int(fn(args) or 0)
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        found = error_line(e)
        if found is None:
            raise
        code, message = found
        print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
        return code


def quiet_libraries() -> None:
    """Keep third-party chatter out of a user's terminal: deprecation notices of the libraries (their authors'
    business, not the user's). (DeepSpeed's guess of the accelerator is answered where training starts.)"""
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|deepspeed|diffusers|peft|transformers|"
                                r"accelerate|triton|huggingface_hub)(\.|$)")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    try:
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, its line printed): the code, as for any error
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    setup_logging(args.verbose or args.debug)
    if not (args.verbose or args.debug):
        quiet_libraries()
    prog = " ".join(["wmfast", args.command, *([args.data_command] if getattr(args, "data_command", None) else [])])
    return run_command(prog, args._run, args, debug=args.debug)
