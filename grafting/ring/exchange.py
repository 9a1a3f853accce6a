"""The shared folder through which the networks of a ring hand each other their weights.

N processes (network i = 1..N, one per process) train at once and talk only through files in one
shared folder ``root`` (the ``--s`` flag), which may live on NFS. After epoch e network i writes its
pre-graft weights and then reads those of its ring predecessor (network i-1; network 1 reads network N).
The file names are :class:`grafting.ring.layout.SharedFolder`'s.

Files in ``root``:

- ``ring.json``: the ring's identity (:mod:`grafting.ring.identity`), created by the first network.
- ``net{i}_epoch{e}.tensors``: network i's weights after epoch e (e starts at 1), before grafting, in
  the flat format of :mod:`grafting.ring.exchange_file` (no pickle: read with one read and viewed).
  Written via ``net{i}_epoch{e}.tensors.tmp-<pid>`` and a rename, so a reader that sees the name sees the
  complete file, also when the writer is killed (SIGKILL included) halfway. The header's meta holds
  ``net``, ``num``, ``epoch``, ``ring`` and whatever the caller adds (the model, ``num_classes``, the
  grafting settings), and lets a reader refuse a file of another run or of a network that trains
  something else. Versions before this format wrote ``net{i}_epoch{e}.pt`` (a ``torch.save`` pickle):
  a reader that finds one says so and stops instead of waiting or reading it. A publish may run in the
  background (:meth:`Exchange.publish`): the weights are copied at once and written by a thread, and
  this process neither grafts nor exits before the file is complete.
- ``net{i}.lock``: held with ``flock`` by the one process that trains network i; it contains
  ``pid hostname start-time`` for the error message a second process gets. The kernel drops the lock
  when its owner dies, even by SIGKILL: processes forked from the owner (DataLoader workers) close
  their copy of the descriptor at once, so a worker that outlives its killed parent for a few seconds
  does not keep the lock.
- ``net{i}.alive``: rewritten every few seconds by network i. A waiting peer says within seconds which
  file it waits for and whether network i has not started yet (no heartbeat file), runs, or has
  stopped (a stale heartbeat). The period (10 s) and the age that counts as stale (120 s) can be
  changed without new flags through the environment variables ``GRAFTING_HEARTBEAT_S`` and
  ``GRAFTING_STALE_S`` (seconds), e.g. to test a dead peer quickly; explicit constructor arguments
  win over them.

Which files exist when (the protocol; :meth:`Exchange.cleanup`, :meth:`Exchange.finish` and
:meth:`grafting.ring.grafter.Grafter.finish` implement it):

- While training, network i keeps its last N+1 published epochs: every reader that may still need one
  of them, also after a kill and a resume from its previous checkpoint, finds it.
- A network that starts at epoch s (1 for a fresh start) first deletes its own files of epochs >= s,
  newest first: they belong to an interrupted attempt and are published again.
- A file that is gone while its network has already published a later epoch will never come back
  (deleted by hand, e.g. after it was found corrupt): the reader skips grafting that epoch, with a
  warning, instead of waiting forever.
- When network i finishes, it deletes its predecessor's files (it was their only reader), its heartbeat
  and its lock; its own files are deleted by its successor when that one finishes. With
  ``--graft-source average`` every network reads every file: a finishing network deletes the epochs all
  networks have read, and the last one to finish deletes the rest.

Nothing else is shared: no sockets, no process groups. On NFS, a client may cache "no such file" for a
few seconds (the attribute cache); mounting with ``lookupcache=positive`` makes a peer's new file
visible at once.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import math
import operator
import os
import shlex
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from grafting.checkpoint import remove_temp_files, weights_problem
from grafting.errors import (
    LIBRARY,
    CheckpointError,
    GraftingError,
    LockError,
    PeerMismatchError,
    PeerTimeoutError,
    UsageError,
    Wording,
)
from grafting.ring.exchange_file import Packed, pack, read
from grafting.ring.identity import join_ring
from grafting.ring.layout import SharedFolder

logger = logging.getLogger(__name__)

__all__ = [
    "Exchange",
    "EpochGone",
    "check_ring_position",
    "check_epoch",
    "format_duration",
    "seconds_from_env",
    "stale_after_s",
    "heartbeat_age",
    "folder_clock_offset",
    "say",
]


def say(level: int, message: str) -> None:
    """Log ``message``; where nothing is set up to show log records (a user's own loop that never
    configured logging), print it on stderr instead, so waiting is never silent."""
    if logger.hasHandlers():
        logger.log(level, message)
    elif level >= logging.INFO:
        print(f"grafting: {message}", file=sys.stderr, flush=True)


def check_epoch(epoch: Any) -> int:
    """``epoch`` as an int; :class:`UsageError` unless it is a whole number >= 1 (epochs start at 1)."""
    try:
        value = operator.index(epoch) if not isinstance(epoch, bool) else None
    except TypeError:
        value = None
    if value is None or value < 1:
        raise UsageError(f"epoch must be a whole number >= 1 (epochs start at 1), got {epoch!r}")
    return value


class EpochGone(Exception):
    """A peer's file of an epoch is gone and the peer has moved on, so it will never appear again."""

    def __init__(self, net: int, epoch: int, later: int, path: Path) -> None:
        super().__init__(
            f"network {net}'s file of epoch {epoch} ({path}) is gone and network {net} has moved on "
            f"to epoch {later}: epoch {epoch} is not grafted"
        )
        self.net, self.epoch, self.later, self.path = net, epoch, later, path


# Lock descriptors this process holds. A forked child (a DataLoader worker) closes its copies at once,
# so that the lock dies with the process that took it (flock belongs to the open file, which a fork
# shares); fork+exec children never see them (the descriptors are close-on-exec).
_HELD_LOCK_FDS: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in _HELD_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)


def check_ring_position(net: int, num: int, words: Wording = LIBRARY) -> None:
    """Raise :class:`UsageError` unless ``1 <= net <= num`` (whole numbers): network ``net`` of a ring of ``num``
    (the message in ``words``)."""
    n_net, n_num = words.name("net"), words.name("num")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise UsageError(f"{n_num} must be a whole number >= 1 (1 = baseline), got {num!r}")
    if isinstance(net, bool) or not isinstance(net, int) or not 1 <= net <= num:
        raise UsageError(
            f"{n_net} must be between 1 and {n_num} ({num}), got {net!r}; networks are numbered 1 to {n_num}"
        )


def format_duration(seconds: float) -> str:
    """Seconds as ``45s``, ``2m00s`` or ``1h05m09s`` for log lines."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class _BackgroundWrite:
    """One file written by a thread; :meth:`join` waits for it and raises what the write raised.

    Not a daemon thread: a process whose main thread ends (or fails) still completes the write before
    it exits. A process killed meanwhile leaves only the temporary file, which no reader opens.
    """

    def __init__(self, packed: Packed, target: Path, net: int) -> None:
        self.target = target
        self.error: BaseException | None = None
        self.seconds = 0.0  # how long the write and its fsync took
        self.thread = threading.Thread(
            target=self._run, args=(packed,), name=f"grafting-publish-net{net}", daemon=False
        )
        self.thread.start()

    def _run(self, packed: Packed) -> None:
        started = time.perf_counter()
        try:
            packed.write(self.target)
        except BaseException as err:  # handed to the thread that joins
            self.error = err
        self.seconds = time.perf_counter() - started

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


HEARTBEAT_ENV = "GRAFTING_HEARTBEAT_S"
STALE_ENV = "GRAFTING_STALE_S"


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name``, or ``default`` when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise GraftingError(f"{name}={text!r} is not a positive number of seconds; fix or unset it")
    return value


def stale_after_s() -> float:
    """How old a heartbeat may be before its network counts as stopped: ``GRAFTING_STALE_S``, else 2 minutes."""
    return seconds_from_env(STALE_ENV, 120.0)


# Per folder: when its clock offset was measured (this machine's time) and the offset itself.
_CLOCK_OFFSETS: dict[str, tuple[float, float]] = {}
_CLOCK_REFRESH_S = 60.0


def folder_clock_offset(folder: Path) -> float:
    """Seconds by which the clock that stamps the files of ``folder`` runs ahead of this machine's (a network
    file system's server stamps them with its own): measured by creating and removing a file there, at most
    once a minute per folder; 0 where nothing can be created there."""
    key = os.path.abspath(folder)
    measured = _CLOCK_OFFSETS.get(key)
    if measured is not None and time.time() - measured[0] < _CLOCK_REFRESH_S:
        return measured[1]
    offset = 0.0
    probe = os.path.join(key, f".clock-probe-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}")
    try:
        before = time.time()
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            stamped = os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(probe)
        offset = stamped - (before + time.time()) / 2
    except OSError:
        pass  # a folder this reader may not write to: its own clock is all there is
    _CLOCK_OFFSETS[key] = (time.time(), offset)
    return offset


def heartbeat_age(path: Path) -> float | None:
    """Seconds since the heartbeat file ``path`` was last touched, or None if there is none; by the clock
    that stamped it (:func:`folder_clock_offset`), so a reader whose clock is off does not take a live
    network for a stopped one."""
    try:
        modified = os.stat(path).st_mtime
    except OSError:
        return None
    return max(0.0, time.time() + folder_clock_offset(path.parent) - modified)


class Exchange:
    """Network ``net`` of a ring of ``num`` networks, talking to the others through the folder ``root``.

    Typical use, once per training process::

        with Exchange(root, net, num) as exchange:
            for epoch in ...:
                exchange.publish(epoch, model.state_dict(), meta)
                exchange.cleanup(epoch)
                exchange.wait_for(exchange.predecessor, epoch, timeout)
                peer_state, peer_meta = exchange.load(exchange.predecessor, epoch, expect=meta_subset)
            exchange.finish()

    ``ring`` is the identity a resumed network recorded (None: join the folder's ring or create it).
    ``wording`` names the settings and the ways on in messages (the library's arguments by default).
    """

    def __init__(
        self,
        root: str | Path,
        net: int,
        num: int,
        *,
        ring: str | None = None,
        keep_all: bool = False,
        poll_interval: float = 0.1,
        heartbeat_interval: float | None = None,
        stale_after: float | None = None,
        notice_after: float = 5.0,
        log_every: float = 60.0,
        wording: Wording = LIBRARY,
    ) -> None:
        if heartbeat_interval is None:
            heartbeat_interval = seconds_from_env(HEARTBEAT_ENV, 10.0)
        if stale_after is None:
            stale_after = stale_after_s()
        check_ring_position(net, num, wording)
        self.wording = wording
        self.folder = SharedFolder(Path(root))
        self.root = self.folder.root
        self.net = net
        self.num = num
        self.ring = ring
        self.keep_all = keep_all
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.notice_after = notice_after
        self.log_every = log_every
        self._lock_fd: int | None = None
        self._lock_pid = 0
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._heartbeat_failed = False
        self._packed: Packed | None = None  # the last publish's snapshot, whose buffer the next one reuses
        self._writing: _BackgroundWrite | None = None

    def _make_root(self) -> None:
        """Create the shared folder (when this network first writes to it)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GraftingError(
                f"cannot create the shared directory {self.root} ({self.wording.folder}): {err.strerror or err}; "
                f"choose a writable folder"
            ) from err
        if not self.root.is_dir():
            raise GraftingError(
                f"the shared directory {self.root} ({self.wording.folder}) is not a folder; "
                f"choose another {self.wording.folder}"
            )

    @property
    def predecessor(self) -> int:
        """The network whose weights this one grafts: net-1, and num for network 1."""
        return self.num if self.net == 1 else self.net - 1

    @property
    def lock_path(self) -> Path:
        """This network's lock file."""
        return self.folder.lock(self.net)

    def alive_path(self, net: int) -> Path:
        """Network ``net``'s heartbeat file."""
        return self.folder.alive(net)

    def path(self, net: int, epoch: int) -> Path:
        """The exchange file of network ``net`` after epoch ``epoch``."""
        return self.folder.exchange(net, epoch)

    # ---------------------------------------------------------------- lock and heartbeat

    def acquire(self) -> None:
        """Take this network's lock (or raise :class:`LockError`), join the ring (``ring.json``) and
        start the heartbeat thread.

        Calling it again while holding the lock does nothing.
        """
        if self._lock_fd is not None:
            return
        self._make_root()
        fd = self._lock_file()
        self._lock_fd, self._lock_pid = fd, os.getpid()
        _HELD_LOCK_FDS.add(fd)
        try:
            self.ring = join_ring(self.folder, self.ring, self.wording)
        except BaseException:
            self.release()
            raise
        start = datetime.datetime.now().isoformat(timespec="seconds")
        record = f"{os.getpid()} {socket.gethostname()} {start}\n".encode()
        with contextlib.suppress(OSError):
            # The owner record only feeds an error message; a full disk must not stop training.
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        remove_temp_files(self.root, self.folder.exchange_pattern(self.net))
        self._beat()
        self._heartbeat_stop.clear()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"grafting-heartbeat-net{self.net}", daemon=True
        )
        self._heartbeat_thread.start()

    def _lock_file(self) -> int:
        """Open and lock this network's lock file; returns the descriptor.

        A finished network deletes its lock file while still holding the lock: a process that opened the
        old file just before then locks a file that no longer has a name, sees that, and tries again.
        """
        path = self.lock_path
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
            except OSError as err:
                what = "is a directory" if err.errno == errno.EISDIR else (err.strerror or str(err))
                raise LockError(
                    f"cannot use {path} as network {self.net}'s lock file: {what}; "
                    f"{'move it away' if err.errno == errno.EISDIR else f'choose a writable {self.wording.folder}'}"
                ) from None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise LockError(
                        f"{path} is not a regular file (it should be network {self.net}'s lock file); move it away"
                    )
                os.set_blocking(fd, True)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                owner = self._read_owner(fd)
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise LockError(
                        f"cannot lock {path}: {err.strerror or err}; "
                        f"use a shared directory ({self.wording.folder}) on a file system that supports locks"
                    ) from err
                raise LockError(
                    f"network {self.net} in {self.root} is already being trained by {owner}; "
                    f"stop that process or use another {self.wording.folder}"
                ) from err
            except BaseException:
                os.close(fd)
                raise
            try:
                named = os.stat(path)
            except FileNotFoundError:
                named = None
            if named is not None and (named.st_dev, named.st_ino) == (info.st_dev, info.st_ino):
                return fd
            os.close(fd)  # the file was deleted (and maybe created anew) after we opened it
        raise LockError(
            f"{path} keeps being replaced while network {self.net} tries to lock it; "
            f"is another process deleting it? use another {self.wording.folder}"
        )

    def release(self) -> None:
        """Stop the heartbeat and drop the lock; safe to call more than once.

        The heartbeat file is left behind on purpose: a peer still waiting for this network then sees
        it grow stale and says so (:meth:`finish` removes it when the run is over). A publish still being
        written is completed first; if it fails, that is logged (the caller may be handling another error).
        """
        try:
            self.wait_published()
        except GraftingError as err:
            say(logging.WARNING, f"net {self.net}: {err}")
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5.0)
            self._heartbeat_thread = None
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            _HELD_LOCK_FDS.discard(fd)
            if self._lock_pid != os.getpid():
                return  # a forked child: its copy was closed at the fork
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def finish_heartbeat(self) -> None:
        """Stop the heartbeat and delete its file: this network has finished (a peer waiting for it then
        reads "not running" rather than "stopped")."""
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5.0)
            self._heartbeat_thread = None
        if self._lock_fd is not None:  # only the owner deletes it
            with contextlib.suppress(OSError):
                self.alive_path(self.net).unlink()

    def finish(self) -> None:
        """This network's run is over: delete its heartbeat and lock files and release the lock.

        The lock file is deleted while still locked (see :meth:`_lock_file` for the other side).
        """
        self.finish_heartbeat()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
        self.release()

    def __enter__(self) -> Exchange:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    @staticmethod
    def _read_owner(fd: int) -> str:
        """'pid P on host H' from a lock file, or a vaguer phrase if the owner has not written it yet."""
        try:
            fields = os.pread(fd, 512, 0).decode(errors="replace").split()
        except OSError:
            fields = []
        if len(fields) >= 2:
            return f"pid {fields[0]} on host {fields[1]}"
        return "another process"

    def _beat(self) -> None:
        """Rewrite the heartbeat file; its modification time is what peers look at."""
        path = self.alive_path(self.net)
        try:
            # O_NONBLOCK: a FIFO in its place must not block the heartbeat (or the start) forever.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{time.time():.3f}\n".encode())
            finally:
                os.close(fd)
        except OSError as err:
            if not self._heartbeat_failed:
                say(logging.WARNING, f"could not update {path}: {err.strerror or err}")
                self._heartbeat_failed = True

    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.wait(self.heartbeat_interval):
            self._beat()

    def heartbeat_age(self, net: int) -> float | None:
        """Seconds since network ``net`` last touched its heartbeat file, or None if it has none."""
        return heartbeat_age(self.alive_path(net))

    def peer_state(self, net: int) -> tuple[str, str]:
        """What network ``net``'s heartbeat says: ``(kind, sentence)`` with kind ``running``, ``stopped``
        (stale heartbeat), ``not running`` (no heartbeat but a run folder: it finished or stopped cleanly)
        or ``not started`` (neither)."""
        alive = self.alive_path(net)
        age = self.heartbeat_age(net)
        if age is None:
            if self.folder.network(net).folder.is_dir():
                return "not running", (
                    f"network {net} is not running (no heartbeat file {alive}; it finished or "
                    f"stopped): restart it {self.wording.restart(self.ring)}{self.wording.same_epochs}"
                )
            return "not started", f"network {net} has not started yet (no heartbeat file {alive})"
        if age > self.stale_after:
            return "stopped", (
                f"network {net} has stopped: its heartbeat {alive} is {format_duration(age)} old; "
                f"check its log and restart it {self.wording.restart(self.ring)}"
            )
        return "running", f"network {net} is running (heartbeat {format_duration(age)} ago)"

    # ---------------------------------------------------------------- exchange files

    def publish(
        self, epoch: int, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], *, background: bool = False
    ) -> Path:
        """Write this network's weights after ``epoch`` atomically and return the file's path.

        ``meta`` should name the model and ``num_classes`` (plain JSON values: str, int, float, bool);
        ``net``, ``num``, ``epoch`` and ``ring`` are filled in here. With ``background`` the weights are
        copied now (from a GPU: asynchronously, into pinned memory) and a thread writes and fsyncs the
        file: the caller may change the weights at once, and :meth:`wait_published` (called by the next
        publish and by :meth:`release`) waits for the file and raises what the write raised.
        """
        epoch = check_epoch(epoch)
        self.wait_published()  # one write at a time: the next snapshot reuses the buffer
        full_meta = {**meta, "net": self.net, "num": self.num, "epoch": epoch}
        if self.ring is not None:
            full_meta["ring"] = self.ring
        target = self.path(self.net, epoch)
        self._make_root()
        self._packed = pack(state_dict, full_meta, reuse=self._packed)
        if background:
            self._writing = _BackgroundWrite(self._packed, target, self.net)
        else:
            self._packed.write(target)
        return target

    def wait_published(self) -> float:
        """Wait until the file a background :meth:`publish` writes is complete (at once when there is none);
        raise :class:`CheckpointError` if writing it failed. Returns the seconds the write took (0.0: none)."""
        writing, self._writing = self._writing, None
        if writing is None:
            return 0.0
        writing.join()
        return writing.seconds

    def _later_epoch(self, net: int, epoch: int) -> int | None:
        """The newest epoch after ``epoch`` that network ``net`` has published, if any."""
        later = [e for n, e, _ in self.folder.exchange_files() if n == net and e > epoch]
        return max(later) if later else None

    def wait_for(self, net: int, epoch: int, timeout: float | None) -> float:
        """Block until network ``net``'s file of ``epoch`` exists; return the seconds waited.

        Polls every ``poll_interval`` seconds. After ``notice_after`` seconds, and then every ``log_every``
        seconds, it says which file it waits for and what the peer's heartbeat says; a peer that stops
        is reported at once. Raises :class:`EpochGone` when the file is missing although the peer has
        published a later epoch (it will never appear), and :class:`PeerTimeoutError` after ``timeout``
        seconds (None waits forever).
        """
        epoch = check_epoch(epoch)
        target = self.path(net, epoch)
        start = time.monotonic()
        next_notice = start + self.notice_after
        next_scan = start
        reported_kind = "running"
        while True:
            if os.path.exists(target):
                return time.monotonic() - start
            now = time.monotonic()
            waited = now - start
            if now >= next_scan:  # a listing costs more than a stat: once a second
                self._refuse_older_version(net, epoch)
                later = self._later_epoch(net, epoch)
                if later is not None and not os.path.exists(target):
                    raise EpochGone(net, epoch, later, target)
                next_scan = now + 1.0
            kind, state = self.peer_state(net)
            if timeout is not None and waited >= timeout:
                raise PeerTimeoutError(
                    f"network {net} did not write epoch {epoch} within {timeout:g} s ({target}); {state}; "
                    f"{self.wording.intact}restart it {self.wording.restart(self.ring)} as well"
                )
            newly_stopped = kind == "stopped" and reported_kind != "stopped"
            if now >= next_notice or newly_stopped:
                level = logging.INFO if kind in ("running", "not started") else logging.WARNING
                say(
                    level,
                    f"net {self.net}: waiting for network {net}'s epoch {epoch} ({target}) for "
                    f"{format_duration(waited)}; {state}",
                )
                reported_kind = kind
                if now >= next_notice:
                    next_notice = now + self.log_every
            pause = self.poll_interval
            if timeout is not None:
                pause = min(pause, max(0.0, timeout - waited))
            time.sleep(pause)

    def _refuse_older_version(self, net: int, epoch: int) -> None:
        """Raise :class:`PeerMismatchError` when network ``net`` wrote ``epoch`` in an older version's
        format (``.pt``): the file this version waits for would never come."""
        legacy = self.folder.legacy_exchange(net, epoch)
        if os.path.exists(legacy):
            raise PeerMismatchError(
                f"network {net}'s file {legacy} was written by an older version of filter-grafting, whose exchange "
                f"files this version does not read; run every network of the ring with the same version: stop the "
                f"older ones, delete the old exchange files (rm {shlex.quote(str(self.root))}/net*_epoch*.pt) and "
                f"restart every network {self.wording.restart(self.ring)} (an epoch whose file is gone is not grafted)"
            )

    def load(
        self, net: int, epoch: int, expect: dict[str, Any] | None = None, *, pin_memory: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Read network ``net``'s weights of ``epoch``; return ``(state_dict, meta)``.

        The tensors are views into one CPU buffer (pinned with ``pin_memory``: for a model on a GPU).
        With ``expect`` (what the Grafter always passes) the file must carry the meta this project
        writes: this ring's identity, the network and epoch its name says, and every entry of
        ``expect``; otherwise :class:`PeerMismatchError` names what differs. Weights that are NaN or
        infinite raise :class:`CheckpointError`: grafted in, they would spoil this network and the
        checkpoint it saves next. Nothing is read from a file that fails a check.
        """
        state_dict, meta = self.read_unchecked(net, epoch, expect, pin_memory=pin_memory)
        problem = weights_problem(state_dict)
        if problem:
            raise CheckpointError(f"network {net}'s file {self.path(net, epoch)} {problem}; {self.repair_advice(net)}")
        return state_dict, meta

    def read_unchecked(
        self, net: int, epoch: int, expect: dict[str, Any] | None = None, *, pin_memory: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """:meth:`load` without the check of the values (the caller checks them, e.g. against its own)."""
        epoch = check_epoch(epoch)
        target = self.path(net, epoch)
        fix = self.repair_advice(net)
        state_dict, meta = read(target, advice=fix, pin_memory=pin_memory)
        if expect is not None:
            self._check_meta(net, epoch, target, meta, expect, fix)
        return state_dict, meta

    def repair_advice(self, net: int) -> str:
        """What to do about a bad file of network ``net`` (it is never used): the advice works, as a file
        that is gone after its network has moved on is skipped (:class:`EpochGone`)."""
        return (
            f"nothing from it was used: delete it and restart this network {self.wording.restart(self.ring)} "
            f"(an epoch whose file is gone after network {net} has moved on is not grafted)"
        )

    def _check_meta(self, net: int, epoch: int, target: Path, meta: Any, expect: dict[str, Any], fix: str) -> None:
        """Raise :class:`PeerMismatchError` unless ``meta`` is what network ``net`` of this ring writes
        for ``epoch`` and agrees with ``expect``."""
        if not meta:
            raise PeerMismatchError(
                f"network {net}'s file {target} has no metadata, so this project did not write it; {fix}"
            )
        if self.ring is not None and meta.get("ring") != self.ring:
            raise PeerMismatchError(
                f"network {net}'s file {target} belongs to another run (ring {meta.get('ring')}, this ring is "
                f"{self.ring}): move it away and restart this network {self.wording.restart(self.ring)}, or start "
                f"this ring in a new {self.wording.folder}"
            )
        if meta.get("net") != net or meta.get("epoch") != epoch:
            raise PeerMismatchError(
                f"network {net}'s file {target} says it holds network {meta.get('net')}'s epoch "
                f"{meta.get('epoch')}: it was renamed or copied by hand; {fix}"
            )
        for key, wanted in expect.items():
            if key not in meta:
                found = f"no '{key}' entry"
            elif meta[key] != wanted:
                found = f"{key}={meta[key]}"
            else:
                continue
            hint = self.wording.extend if key == "epochs" else ""
            raise PeerMismatchError(
                f"network {net}'s file {target} has {found}, this network has {key}={wanted}; "
                f"all networks of a ring must use the same {key}{hint}"
            )

    def _remove(self, paths: list[Path]) -> list[Path]:
        """Delete ``paths`` in the order given; return those removed (missing ones are skipped)."""
        removed = []
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as err:
                say(logging.WARNING, f"could not remove {path}: {err.strerror or err}")
                continue
            removed.append(path)
        return removed

    def remove_files(self, net: int, *, first: int = 1, last: int | None = None) -> list[Path]:
        """Delete network ``net``'s exchange files of epochs ``first..last`` (no bound: None), newest first,
        so that a reader never sees an epoch missing while a later one is still there; return them."""
        chosen = [
            (e, path)
            for n, e, path in self.folder.exchange_files()
            if n == net and e >= first and (last is None or e <= last)
        ]
        return self._remove([path for _, path in sorted(chosen, reverse=True)])

    def cleanup(self, epoch: int) -> list[Path]:
        """After publishing ``epoch``, delete this network's files no peer can still need; return them.

        Only network i+1 reads network i's files. Network i can only be at epoch e after grafting epoch
        e-1 from i-1, which needed i-2 at e-2, and so on around the ring: i+1 (= i-(N-1)) has published
        at least epoch e-N+1, so it has saved its checkpoint of epoch e-N and the one before, e-N-1.
        Resumed from either, it reads network i's epochs from e-N on: files of epochs <= e-N-1 go.
        With one network nothing is exchanged; with keep_all nothing is removed.
        """
        if self.keep_all or self.num == 1:
            return []
        last_unneeded = epoch - self.num - 1
        if last_unneeded < 1:
            return []
        return self.remove_files(self.net, last=last_unneeded)[::-1]
