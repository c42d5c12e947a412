"""Argument types and checks shared by the commands. Light on purpose (no torch): parsers are built from them.

The types raise argparse.ArgumentTypeError, which argparse reports as `wmfast CMD: error: argument --flag: ...`
(one line, exit 2); `blame` prefixes the errors of a library call with the flag and value that caused them."""
from __future__ import annotations

import argparse
import contextlib
import os
import re

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def positive_int(text: str) -> int:
    """An int >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}")
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:i (whether that device exists is checked by `check_device`, which imports torch)."""
    if not _DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:INDEX")
    return text


def check_device(text: str, flag: str = "--device") -> str:
    """The device a command runs on ('auto' resolved), refusing a CUDA device this machine does not have."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= count:
            raise ValueError(f"{flag} {text}: this machine has {count} CUDA device{'s' * (count != 1)}")
    return text


def output_dir(path: str, flag: str = "--out") -> str:
    """A directory to write into: refused when a file is in the way (made later, by the command)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a file, not a directory")
    return path


def output_file(path: str, flag: str) -> str:
    """A file to write: its directory must exist, and no directory may stand at the path itself."""
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: the directory {parent} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory")
    return path


@contextlib.contextmanager
def fields_as_flags(flags: dict[str, str]):
    """ValueErrors whose message starts `field=VALUE ...` (the library's and the configs' validation messages)
    re-raised naming the command-line flag instead: `--flag VALUE ...`; other ValueErrors unchanged."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        for field, flag in flags.items():
            if text.startswith(f"{field}="):
                raise ValueError(f"{flag} {text[len(field) + 1:]}") from e
        raise


@contextlib.contextmanager
def blame(flag: str, value):
    """ValueErrors raised inside are re-raised naming `flag` and its value (unless they already name the flag)."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        if text.startswith(flag):
            raise
        raise ValueError(f"{flag} {text}" if text.startswith(str(value)) else f"{flag} {value}: {text}") from e
