"""Value types of the tools' command-line flags: numbers within bounds, with argparse's one-line errors."""

from __future__ import annotations

import argparse
from typing import Callable, TypeVar

__all__ = ["bounded"]

N = TypeVar("N", int, float)


def bounded(
    convert: Callable[[str], N], low: N, high: N | None = None, what: str = "a whole number"
) -> Callable[[str], N]:
    """An argparse ``type``: ``convert(text)`` from ``low`` to ``high`` (None: no upper bound); ``what`` names
    the kind of value in the error ('x' is not <what>)."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
        if not low <= value or (high is not None and value > high):  # `not low <= value` also refuses NaN
            raise argparse.ArgumentTypeError(
                f"{value:g} must be at least {low:g}" if high is None else f"{value:g} must lie in {low:g}..{high:g}"
            )
        return value

    return parse
