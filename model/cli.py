"""Command lines generated from a dataclass, so that every default lives in one place (STYLE.md, Scripts).

    @dataclass
    class Args:
        checkpoint: Path = field(metadata={"help": "checkpoint folder"})         # no default: required
        lr: float | None = field(default=None, metadata={"help": "learning rate"})
        padded: bool = field(default=False, metadata={"help": "pad instead of packing"})   # --padded
        dtype: str = field(default="auto", metadata={"help": "...", "choices": ("auto", "bfloat16")})

    args = parse_dataclass(Args, argv, prog="python -m pkg.mod", description="...")

Each field is a --flag (underscores as dashes), typed by its annotation (X | None takes an X; list[X] | None
is repeatable, its values in order; a metadata "type" overrides the conversion, e.g. for int-or-word
values). A bool field is a switch: --flag when its default is False, --flag / --no-flag when it is True.
A ValueError raised by the dataclass itself (its __post_init__ checks) becomes an argparse error: usage,
the message, exit 2.

Library errors that tell how to get past them name a Python argument (`pass on_bad_record='skip'`,
written by remedy_text); such an error carries .remedy = (argument, value), and cli_message(e) gives
its message as a command-line user should read it, with the flag instead (`pass --on-bad-record skip`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def build_parser(cls: type, *, prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one --flag per init field of the dataclass cls."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        flag = f"--{f.name.replace('_', '-')}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if typing.get_origin(kind) is list:  # a repeatable flag: every value, in order (None when never given)
            parser.add_argument(flag, dest=f.name, type=typing.get_args(kind)[0], action="append", default=None,
                                metavar=f.metadata.get("metavar"), help=f.metadata.get("help", ""))
            continue
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=bool(default), help=help_text)
            continue
        shown = "" if required or default in (None, "") else f" (default: {default})"
        parser.add_argument(flag, dest=f.name, type=f.metadata.get("type", kind), required=required, default=default,
                            choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                            help=help_text + shown)
    return parser


def parse_dataclass(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str,
                    epilog: str | None = None) -> T:
    """cls(**flags) from argv (sys.argv[1:] when None); bad values exit with an argparse error naming the flag."""
    parser = build_parser(cls, prog=prog, description=description, epilog=epilog)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:
        parser.error(str(e))


def remedy_text(argument: str, value: object) -> str:
    """How a library message names the argument that gets past it: "on_bad_record='skip'"."""
    return f"{argument}={value!r}"


def cli_message(error: BaseException) -> str:
    """str(error), with the argument its .remedy names written as the command line's flag ("--on-bad-record skip",
    "--allow-external-files" for True)."""
    message = str(error)
    remedy = getattr(error, "remedy", None)
    if remedy is not None:
        argument, value = remedy
        flag = f"--{argument.replace('_', '-')}" + ("" if value is True else f" {value}")
        message = message.replace(remedy_text(argument, value), flag)
    return message


def check_cuda_device(device: str) -> None:
    """ValueError naming --device unless device is "cuda" or "cuda:N" and this machine has that GPU."""
    import torch

    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device {device}: expected cuda or cuda:N")
    count = torch.cuda.device_count()
    if not count:
        raise ValueError(f"--device {device}: no CUDA GPU is available")
    if torch.device(device).index not in (None, *range(count)):
        raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}")
