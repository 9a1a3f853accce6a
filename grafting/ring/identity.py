"""A ring's identity: one random name that every network of one run shares, so that files another run
left in the same shared folder are never taken for this ring's.

The first network that starts in a shared folder creates ``<s>/ring.json`` (exclusively: of several
networks that start at once, one creates it and the others read it); the others join the ring it
names. Each network writes the identity into every exchange file it publishes and into its
``config.json``, so a resumed network knows its ring even if ``ring.json`` was deleted, and a peer file
of another ring is refused before any weights are mixed (:meth:`grafting.ring.exchange.Exchange.load`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import stat
import time

from grafting.checkpoint import read_json_file
from grafting.errors import GraftingError
from grafting.ring.layout import SharedFolder

__all__ = ["join_ring", "new_ring_name", "RING_FORMAT"]

log = logging.getLogger(__name__)

RING_FORMAT = "filter-grafting-ring/1"
# How long a reader waits for a ring.json that another network is writing at this moment.
_WRITE_GRACE_S = 2.0


def new_ring_name() -> str:
    """A fresh random identity (12 hex digits)."""
    return secrets.token_hex(6)


def _create(folder: SharedFolder, name: str) -> bool:
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
            f"cannot create {path}: {err.strerror or err}; use a writable shared folder (--s)"
        ) from None
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _read(folder: SharedFolder) -> str | None:
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
                f"move it away (a resumed network writes it again), or start the ring in a new --s"
            )
        time.sleep(0.05)


def join_ring(folder: SharedFolder, expected: str | None = None) -> str:
    """The identity of the ring in ``folder``: the one ``ring.json`` names, created when it is missing.

    ``expected`` is the identity a resumed network recorded in its config.json: a ``ring.json`` that
    names another ring is a :class:`GraftingError` (the folder was reused by another run), a missing
    one is written again. With ``expected=None`` (a fresh start) the network joins whatever ring the
    file names, or creates a new one.
    """
    for _ in range(3):  # created or read; a file deleted between the two is retried
        found = _read(folder)
        if found is None:
            name = expected or new_ring_name()
            if _create(folder, name):
                log.debug("created ring %s in %s", name, folder.root)
                return name
            continue
        if expected is not None and found != expected:
            raise GraftingError(
                f"this network belongs to ring {expected} (its config.json) but {folder.ring} names ring {found}: "
                f"another run has used {folder.root} since; resume the ring in a shared folder of its own: copy "
                f"its networks' net<i> folders into a new --s and resume each network there"
            )
        return found
    raise GraftingError(f"{folder.ring} keeps disappearing; does another process delete it? use a new --s")
