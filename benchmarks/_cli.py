"""Command-line checks shared by the benchmark scripts.

A bad value stops a script before it builds or times anything, with argparse's usage line
and a message that names the option (exit code 2), rather than a traceback minutes later or
a run that quietly measures something else.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

Number = TypeVar("Number", int, float)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, where it has one its help does not state, and keeps the
    description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _at_least(
    kind: str, convert: Callable[[str], Number], lowest: Number
) -> Callable[[str], Number]:
    """A parser of ``kind`` (``convert`` of the text), finite and ``>= lowest``."""

    def parse(text: str) -> Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        # An int is always finite (and may be too large for math.isfinite's float).
        if not ((isinstance(value, int) or math.isfinite(value)) and value >= lowest):
            raise argparse.ArgumentTypeError(f"expected {kind} >= {lowest}, got {text}")
        return value

    return parse


positive_int = _at_least("an integer", int, 1)
non_negative_int = _at_least("an integer", int, 0)


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1, at least one, no empty entries."""
    entries = [entry.strip() for entry in text.split(",")]
    if not text.strip() or any(not entry for entry in entries):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return [positive_int(entry) for entry in entries]


def output_file(text: str) -> str:
    """A path a file can be written to: its folder exists (``""``: no file)."""
    if not text:
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file name")
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no writable folder {folder}")
    return text


def float_at_least(lowest: float) -> Callable[[str], float]:
    """A parser of finite floats ``>= lowest``."""
    return _at_least("a finite number", float, lowest)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--threads``, as the timing scripts take them."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="of all"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads (set_num_threads)"
    )


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Stop with a usage error if ``device`` is a CUDA device this machine does not have."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA device here")


def select(
    parser: argparse.ArgumentParser,
    option: str,
    text: str,
    names: Iterable[str],
    groups: Mapping[str, Iterable[str]] | None = None,
) -> list[str]:
    """The names picked by ``text``: ``;``-separated names, groups, or beginnings of names.

    An empty ``text`` picks every name. Empty entries (a trailing ``;``) are ignored; an entry
    that picks nothing stops the script, naming the entry, so that a typo next to a good entry
    does not go unnoticed.
    """
    names = list(names)
    groups = dict(groups or {})
    entries = [entry.strip() for entry in text.split(";") if entry.strip()]
    if not entries:
        return names
    picked: set[str] = set()
    for entry in entries:
        if entry in groups:
            found = set(groups[entry])
        elif entry in names:  # a full name picks itself, not the longer names it begins
            found = {entry}
        else:
            found = {name for name in names if name.startswith(entry)}
        if not found:
            known = ", ".join([*groups, *names])
            parser.error(f"{option}: {entry!r} picks nothing; known: {known}")
        picked |= found
    return [name for name in names if name in picked]
