"""The ring description an experiment script hands to the launcher: one line per ring, in shell words.

    ring FOLDER NETWORKS TRAINING-FLAGS...     a ring of NETWORKS networks whose shared folder (--s) is FOLDER
    after PROGRAM ARGS...                      a command to run once every ring has finished well
                                               (PROGRAM: a script of this repository, e.g. scripts/ensemble.py)
    # ...                                      a comment

The scripts write these lines with the ``ring`` and ``after`` functions of scripts/lib/rings.sh, which
quote every word; ``scripts/<name>.sh --rings`` prints them. The launcher adds ``--s``, ``--num``, ``--i``,
``--device`` and ``--resume auto`` to each network's command itself.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from grafting.errors import UsageError

__all__ = ["RingLine", "AfterLine", "Description", "parse_description", "quote"]


@dataclass(frozen=True)
class RingLine:
    """``ring FOLDER NETWORKS FLAGS...``: FOLDER absolute, FLAGS as written."""

    folder: Path
    num: int
    flags: tuple[str, ...]
    line: int  # 1-based, for messages


@dataclass(frozen=True)
class AfterLine:
    """``after PROGRAM ARGS...``: run in the folder the launcher was started in."""

    argv: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Description:
    """A parsed ring description."""

    rings: tuple[RingLine, ...]
    after: tuple[AfterLine, ...]


def absolute(path: str, cwd: Path) -> Path:
    """``path`` with ``~`` expanded, relative to ``cwd`` (not resolved: symlinked folders keep their names)."""
    expanded = Path(os.path.expanduser(path))
    return Path(os.path.normpath(expanded if expanded.is_absolute() else cwd / expanded))


def parse_description(text: str, cwd: Path, source: str = "the ring description") -> Description:
    """The rings and follow-up commands of ``text``; a malformed line is a :class:`UsageError` naming it."""
    rings, after = [], []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{source}, line {number}"
        try:
            words = shlex.split(line, comments=True)
        except ValueError as err:
            raise UsageError(f"{where}: cannot split it into words ({err}): {line}") from None
        if not words:
            continue
        kind, args = words[0], words[1:]
        if kind == "ring":
            if len(args) < 2:
                raise UsageError(f"{where}: 'ring' needs a folder and a number of networks: {line}")
            if not args[1].isdigit() or int(args[1]) < 1:
                raise UsageError(f"{where}: the number of networks must be a positive whole number, got '{args[1]}'")
            rings.append(RingLine(absolute(args[0], cwd), int(args[1]), tuple(args[2:]), number))
        elif kind == "after":
            if not args:
                raise UsageError(f"{where}: 'after' needs a command")
            after.append(AfterLine(tuple(args), number))
        else:
            raise UsageError(f"{where}: starts with '{kind}'; a line is 'ring FOLDER NETWORKS FLAGS...' or 'after ...'")
    return Description(tuple(rings), tuple(after))


def quote(words: list[str] | tuple[str, ...]) -> str:
    """Shell words on one line, quoted only where the shell would read them differently."""
    return " ".join(
        word if word and all(c.isalnum() or c in "_./:=,@%+-" for c in word) else shlex.quote(word) for word in words
    )
