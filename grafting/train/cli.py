"""The command line of the training scripts, built from the run configuration's fields, and the
top-level error handling (one line on stderr, exit code 2 for bad input, 1 for failures)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
from typing import Callable, TypeVar

import torch

from grafting.errors import DatasetNotFoundError, GraftingError, UsageError, first_line
from grafting.train.config import RunConfig
from grafting.train.signals import STOPPED_EXIT_CODE, StopRequested, stop_on_signals

__all__ = [
    "ArgumentParser",
    "build_parser",
    "parse_config",
    "given_settings",
    "entry_point",
    "is_out_of_memory",
    "out_of_memory",
]

C = TypeVar("C", bound=RunConfig)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: message (see --help)`` and exit code 2, no usage dump
    (the same form as every other error of the scripts)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``error: message (see --help)`` on stderr and exit with code 2."""
        self.exit(2, f"error: {message} (see --help)\n")


def _default_text(value: object, action: str | None) -> str:
    """How --help shows a default: 'off' for switches, nothing for 'no value'."""
    if action == "store_true":
        return "off"
    if action == "boolean":
        return {True: "on", False: "off"}.get(value, "") if isinstance(value, bool) else ""
    if value is None or value == []:
        return ""
    return str(value)


def build_parser(config_cls: type[RunConfig], prog: str, description: str) -> ArgumentParser:
    """A parser with one flag per field of ``config_cls`` that has flags, grouped as the fields say;
    every help line ends with the default."""
    parser = ArgumentParser(prog=prog, description=description)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in config_cls.settings():
        flags = f.metadata["flags"]
        if not flags:
            continue  # derived by the script
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        kwargs = dict(f.metadata["argparse"])
        action = kwargs.get("action")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = _default_text(default, action)
        help_text = f.metadata["help"] + (
            f" (default: {shown})" if shown and "default:" not in f.metadata["help"] else ""
        )
        if action == "boolean":
            kwargs["action"] = argparse.BooleanOptionalAction
        groups[group_name].add_argument(
            *flags, dest=f.name, default=default, help=help_text.replace("%", "%%"), **kwargs
        )
    return parser


def parse_config(config_cls: type[C], argv: list[str] | None, *, prog: str, description: str) -> C:
    """The checked configuration the flags ``argv`` describe (raises :class:`UsageError`)."""
    namespace = build_parser(config_cls, prog, description).parse_args(argv)
    config = config_cls(**vars(namespace))
    config.check()
    return config


def given_settings(config_cls: type[RunConfig], argv: list[str] | None) -> frozenset[str]:
    """The fields whose flags ``argv`` (None: the command line) gives, whatever their values: a flag given
    with its default value is given all the same."""
    parser = build_parser(config_cls, "", "")
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says the GPU or the host ran out of memory (torch's CPU allocator raises a plain
    RuntimeError for that)."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def out_of_memory(err: BaseException) -> str:
    """What ran out of memory, in a few words, from an error :func:`is_out_of_memory` accepts. torch's CUDA
    message is one long line whose first two sentences say where and how much."""
    text = first_line(err) if str(err).strip() else ""
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    if asked:
        return f"out of memory: tried to allocate {int(asked.group(1)) / 2**30:.2f} GiB"
    return ". ".join(text.split(". ")[:2]).rstrip(".") if text else "out of memory"


def entry_point(main: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], None]:
    """Wrap a script's main: a GraftingError becomes one line on stderr and an exit code
    (2 for bad flags or a missing dataset, 1 for failures during the run); Ctrl-C exits 130; SIGUSR1
    and SIGTERM stop at once and exit with STOPPED_EXIT_CODE (grafting.train.signals)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> None:
        try:
            with stop_on_signals():
                main(argv)
        except StopRequested as stop:
            print(f"{stop} (exit {STOPPED_EXIT_CODE})", file=sys.stderr, flush=True)
            sys.exit(STOPPED_EXIT_CODE)
        except (UsageError, DatasetNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except GraftingError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(1)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            print(
                f"error: {out_of_memory(err)}; lower the batch size (or the image size, or the workers), or free the "
                f"memory other processes hold",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted; restart with --resume to continue from the last finished epoch", file=sys.stderr)
            sys.exit(130)

    return wrapper
