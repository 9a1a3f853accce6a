"""Errors a user can cause and fix. Each message is one line that says what to do."""

from __future__ import annotations

__all__ = [
    "GraftingError",
    "DatasetNotFoundError",
    "CheckpointError",
    "PeerTimeoutError",
    "PeerMismatchError",
    "LockError",
    "UsageError",
    "first_line",
]


class GraftingError(Exception):
    """A problem the user can fix; ``str(err)`` is one line that says what to do."""


class DatasetNotFoundError(GraftingError):
    """The dataset folder is missing or incomplete."""


class CheckpointError(GraftingError):
    """A checkpoint file is missing, truncated, corrupt or of an unknown layout."""


class PeerTimeoutError(GraftingError):
    """The ring predecessor's checkpoint did not appear within --peer-timeout."""


class PeerMismatchError(GraftingError):
    """A peer's checkpoint does not fit this network (model, classes, --num, grafting settings)."""


class LockError(GraftingError):
    """Another live process already trains this network in this shared directory."""


class UsageError(GraftingError):
    """A flag has an impossible value (exit code 2, nothing written)."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (or its type's name when it has none), for one-line errors
    that quote a library's multi-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
