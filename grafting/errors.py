"""Errors a user can cause and fix. Each message is one line that says what to do, in the caller's words
(:class:`Wording`): a library user reads the library's arguments and methods, a training script's user
its flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Wording",
    "LIBRARY",
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
    """The ring predecessor's exchange file did not appear within the peer timeout (``peer_timeout``)."""


class PeerMismatchError(GraftingError):
    """A peer's exchange file does not fit this network (model, classes, ring size, grafting settings)."""


class LockError(GraftingError):
    """Another live process already trains this network in this shared directory."""


class UsageError(GraftingError):
    """A setting has an impossible value, or a method is called out of order (the scripts: exit code 2,
    nothing written)."""


@dataclass(frozen=True)
class Wording:
    """How messages name the settings and the ways on, so that one message serves every caller.

    The library's checks and the ring's messages take the caller's wording: :data:`LIBRARY` (the
    default) names the keyword arguments of :class:`grafting.Grafter` and its methods; the training
    scripts pass theirs (``grafting.train.config.SCRIPT_WORDING``), which names their flags.

    Attributes:
        names: how a setting is spelled (``"rule"`` -> ``"--graft-rule"``); a setting not listed is
            spelled by its own name, the keyword argument.
        flags: values follow their name as on a command line (``--num 2``), not as keywords (``num=2``).
        folder: the shared folder (``--s``, or the Grafter's ``root`` folder).
        resume: how a stopped network continues, after "restart it"; ``{ring}`` is the ring's identity.
        intact: said before "restart it ... as well" when waiting for a peer timed out.
        same_epochs: added to the advice for restarting a peer that is not running.
        extend: added where peers disagree on ``epochs``: how to extend a finished ring.
        move_ring: what to do when the folder names another ring than the resumed network's
            (``{ring}`` is the resumed network's ring).
    """

    names: Mapping[str, str] = field(default_factory=dict)
    flags: bool = False
    folder: str = "root folder"
    resume: str = "from its last checkpoint with Grafter(..., ring={ring})"
    intact: str = ""
    same_epochs: str = ""
    extend: str = ""
    move_ring: str = (
        "continue ring {ring} in a root folder of its own: move its exchange files there and give each "
        "network's Grafter ring={ring}"
    )

    def name(self, setting: str) -> str:
        """How messages spell ``setting`` (``--graft-rule`` or ``rule``)."""
        return self.names.get(setting, setting)

    def value(self, setting: str, value: object) -> str:
        """``setting`` with a value, as the caller writes it: ``--graft-rule module`` or ``rule='module'``."""
        return f"{self.name(setting)} {value}" if self.flags else f"{self.name(setting)}={value!r}"

    def restart(self, ring: str | None) -> str:
        """How a stopped network continues ("with --resume"), for "restart it ..."."""
        return self.resume.format(ring=_ring_text(ring))

    def other_ring(self, ring: str | None, files: Sequence[Path] = ()) -> str:
        """What to do when the folder now names another ring than ``ring``, the resumed network's; ``files``
        are its exchange files still in the folder, which the move must take along."""
        advice = self.move_ring.format(ring=_ring_text(ring))
        if not files:
            return advice
        # A network one epoch behind its predecessor grafts a file the predecessor will not publish again.
        return f"{advice}; copy its exchange files {' '.join(path.name for path in files)} into the new folder too"


def _ring_text(ring: str | None) -> str:
    return repr(ring) if ring else "<the grafter.ring it saved>"


# The library's own words: keyword arguments and methods.
LIBRARY = Wording(names={"ring": "the Grafter's ring="})


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (or its type's name when it has none), for one-line errors
    that quote a library's multi-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
