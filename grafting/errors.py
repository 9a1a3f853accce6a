"""Errors a user can cause and fix. Each message is one line that says what to do."""


class GraftingError(Exception):
    """A problem the user can fix; ``str(err)`` is one line that says what to do."""


class DatasetNotFoundError(GraftingError):
    """The dataset folder is missing or incomplete."""


class CheckpointError(GraftingError):
    """A checkpoint file is missing, truncated, corrupt or of an unknown layout."""


class PeerTimeoutError(GraftingError):
    """The ring predecessor's checkpoint did not appear within --peer-timeout."""


class PeerMismatchError(GraftingError):
    """A peer's checkpoint does not fit this network (model, classes, --num)."""


class LockError(GraftingError):
    """Another live process already trains this network in this shared directory."""


class UsageError(GraftingError):
    """A flag has an impossible value (exit code 2, nothing written)."""
