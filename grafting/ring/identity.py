"""A ring's identity: one random name that every network of one run shares, so that files another run
left in the same shared folder are never taken for this ring's.

The first network that starts in a shared folder creates ``<s>/ring.json`` (exclusively: of several
networks that start at once, one creates it and the others read it); the others join the ring it
names. Each network writes the identity into every exchange file it publishes and into its
``config.json``, so a resumed network knows its ring even if ``ring.json`` was deleted, and a peer file
of another ring is refused before any weights are mixed (:meth:`grafting.ring.exchange.Exchange.load`).

An identity alone cannot tell a ring's own files from those another run left in the same folder under
the same ``ring.json``: a network that starts afresh also checks the exchange files it finds
(:func:`foreign_exchange_files`). A network can only be a few epochs ahead of one that has just
started, and only a member of this ring (a running network, or one whose run records name this ring)
writes this ring's files; anything else is another run's, and the fresh start is refused before any
weights are mixed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

from grafting.checkpoint import read_json_file
from grafting.errors import LIBRARY, CheckpointError, GraftingError, Wording
from grafting.ring.exchange_file import read_meta
from grafting.ring.layout import SharedFolder

__all__ = [
    "join_ring",
    "read_ring",
    "new_ring_name",
    "foreign_exchange_files",
    "ring_files",
    "describe_files",
    "RING_FORMAT",
]

log = logging.getLogger(__name__)

RING_FORMAT = "filter-grafting-ring/1"
# How long a reader waits for a ring.json that another network is writing at this moment.
_WRITE_GRACE_S = 2.0


def new_ring_name() -> str:
    """A fresh random identity (12 hex digits)."""
    return secrets.token_hex(6)


def _create(folder: SharedFolder, name: str, words: Wording) -> bool:
    """Write ``ring.json`` naming ``name`` unless it exists; True when this call created it."""
    path = folder.ring
    text = (
        json.dumps(
            {"format": RING_FORMAT, "ring": name, "created": datetime.datetime.now().isoformat(timespec="seconds")}
        )
        + "\n"
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as err:
        raise GraftingError(
            f"cannot create {path}: {err.strerror or err}; use a writable shared folder ({words.folder})"
        ) from None
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def read_ring(folder: SharedFolder, words: Wording = LIBRARY) -> str | None:
    """The identity ``ring.json`` names; None when it does not exist. A file that another network is
    writing right now is waited for briefly; one that stays unreadable raises GraftingError."""
    path = folder.ring
    deadline = time.monotonic() + _WRITE_GRACE_S
    while True:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise GraftingError(f"cannot read {path}: {err.strerror or err}; fix its permissions") from None
        if not stat.S_ISREG(info.st_mode):
            raise GraftingError(f"{path} is not a file (it should hold the ring's identity); move it away")
        problem = ""
        try:
            saved = read_json_file(path)
            name = saved.get("ring") if isinstance(saved, dict) else None
            if isinstance(name, str) and name:
                return name
            problem = "no 'ring' entry"
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            problem = str(err)
        if time.monotonic() > deadline:
            raise GraftingError(
                f"{path} is unreadable ({problem}); it names the ring of this shared folder: "
                f"move it away (a resumed network writes it again), or start the ring in a new {words.folder}"
            )
        time.sleep(0.05)


def join_ring(folder: SharedFolder, expected: str | None = None, words: Wording = LIBRARY) -> str:
    """The identity of the ring in ``folder``: the one ``ring.json`` names, created when it is missing.

    ``expected`` is the identity a resumed network recorded in its config.json: a ``ring.json`` that
    names another ring is a :class:`GraftingError` (the folder was reused by another run), a missing
    one is written again. With ``expected=None`` (a fresh start) the network joins whatever ring the
    file names, or creates a new one. Messages are in ``words``.
    """
    for _ in range(3):  # created or read; a file deleted between the two is retried
        found = read_ring(folder, words)
        if found is None:
            name = expected or new_ring_name()
            if _create(folder, name, words):
                log.debug("created ring %s in %s", name, folder.root)
                return name
            continue
        if expected is not None and found != expected:
            advice = words.other_ring(expected, ring_files(folder, expected))
            raise GraftingError(
                f"this network belongs to ring {expected} ({words.name('ring')}) but {folder.ring} names ring "
                f"{found}: another run has used {folder.root} since; {advice}"
            )
        return found
    raise GraftingError(f"{folder.ring} keeps disappearing; does another process delete it? use a new {words.folder}")


def foreign_exchange_files(
    folder: SharedFolder,
    net: int,
    num: int,
    *,
    fresh: bool,
    published: int,
    member: Callable[[int], str | None],
) -> list[tuple[Path, str]]:
    """The exchange files in ``folder`` that the ring of network ``net`` (of ``num``) cannot have written,
    each with the reason, in name order.

    ``member(j)`` says why network ``j`` is not a member of this ring (None when it is): the files of a
    network that is not are another run's. At a ``fresh`` start this network has published at most
    ``published`` epochs (0, or 1 where an earlier attempt that saved nothing may have published its
    first), so network ``net + d`` cannot be more than ``published + d`` epochs along: a file further
    ahead, this network's own included, is another run's. When resuming, this network's own files are
    not looked at (those of the epochs to come are replaced at the start).
    """
    foreign = []
    for peer, epoch, path in folder.exchange_files():
        if peer > num or (peer == net and not fresh):
            continue  # never read by this ring
        if peer != net:
            why = member(peer)
            if why is not None:
                foreign.append((path, why))
                continue
        if fresh and epoch > published + (peer - net) % num:
            if peer == net and not published:
                foreign.append((path, f"network {net} has published nothing since it started"))
            else:
                why = f"network {peer} cannot be at epoch {epoch} before network {net} has finished epoch {published}"
                foreign.append((path, why))
    return foreign


def ring_files(folder: SharedFolder, ring: str) -> list[Path]:
    """The exchange files in ``folder`` that ring ``ring`` wrote (their headers name it), in name order: what
    its networks still need when they continue elsewhere (a network one epoch behind its predecessor grafts
    a file the predecessor will not publish again). Unreadable files are no ring's."""
    found = []
    for _, _, path in folder.exchange_files():
        try:
            if read_meta(path).get("ring") == ring:
                found.append(path)
        except CheckpointError:
            continue
    return sorted(found)


def describe_files(found: list[tuple[Path, str]]) -> str:
    """``'a.pt, b.pt (reason); c.pt (other reason)'`` for a list of (file, reason), at most eight names."""
    by_reason: dict[str, list[str]] = {}
    for path, why in found[:8]:
        by_reason.setdefault(why, []).append(path.name)
    more = f"; and {len(found) - 8} more" if len(found) > 8 else ""
    return "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items()) + more
