"""The shared folder through which the networks of a ring hand each other their weights.

N processes (network i = 1..N, one per process) train at once and talk only through files in one
shared folder ``root`` (the ``--s`` flag), which may live on NFS. After epoch e network i writes its
pre-graft weights and then reads those of its ring predecessor (network i-1; network 1 reads network N).

Files in ``root``:

- ``net{i}_epoch{e}.pt``: network i's weights after epoch e (e starts at 1), before grafting. Written
  with :func:`grafting.checkpoint.save_atomic` (via ``net{i}_epoch{e}.pt.tmp-<pid>`` and a rename), so
  a reader that sees the name sees the complete file. Content: ``{'model': state_dict, 'meta': meta}``
  with CPU tensors; ``meta`` holds at least ``net``, ``num``, ``epoch`` and whatever the caller adds
  (the model name and ``num_classes``), and lets a reader refuse a peer that trains another model.
- ``net{i}.lock``: held with ``flock`` by the one process that trains network i; it contains
  ``pid hostname start-time`` for the error message a second process gets. The kernel drops the lock
  when its owner dies, even by SIGKILL, so the file never has to be deleted by hand.
- ``net{i}.alive``: rewritten every few seconds by network i; a waiting peer warns when it goes stale.
  The period (10 s) and the age that counts as stale (120 s) can be changed without new flags through
  the environment variables ``GRAFTING_HEARTBEAT_S`` and ``GRAFTING_STALE_S`` (seconds), e.g. to test a
  dead peer quickly; explicit constructor arguments win over them.

Nothing else is shared: no sockets, no process groups. A killed process is restarted with --resume and
finds the files it needs, because :meth:`Exchange.cleanup` keeps every file a peer may still read.

On NFS, a client may cache "no such file" for a few seconds (the attribute cache); mounting with
``lookupcache=positive`` makes a peer's new file visible at once.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from grafting.checkpoint import extract_state_dict, load_file, remove_temp_files, save_atomic
from grafting.errors import (CheckpointError, GraftingError, LockError, PeerMismatchError, PeerTimeoutError,
                             UsageError)
from grafting.ring.layout import SharedFolder

logger = logging.getLogger(__name__)

__all__ = ["Exchange", "check_ring_position", "format_duration", "seconds_from_env"]


def check_ring_position(net: int, num: int) -> None:
    """Raise :class:`UsageError` unless ``1 <= net <= num`` (whole numbers): network ``net`` of a ring of ``num``."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise UsageError(f"--num must be a whole number >= 1 (1 = baseline), got {num!r}")
    if isinstance(net, bool) or not isinstance(net, int) or not 1 <= net <= num:
        raise UsageError(f"--i must be between 1 and --num ({num}), got {net!r}; networks are numbered 1 to --num")


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


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its own elements, copying only when needed.

    A GPU tensor is copied by ``.cpu()`` anyway. A CPU tensor is saved as is, unless it is a view into a
    larger storage: torch.save writes the whole storage, so such a view is cloned to keep files small.
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.cpu()
    own_bytes = tensor.numel() * tensor.element_size()
    if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != own_bytes:
        return tensor.clone()
    return tensor


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


class Exchange:
    """Network ``net`` of a ring of ``num`` networks, talking to the others through the folder ``root``.

    Typical use, once per training process::

        with Exchange(root, net, num) as exchange:
            for epoch in ...:
                exchange.publish(epoch, model.state_dict(), meta)
                exchange.cleanup(epoch)
                exchange.wait_for(exchange.predecessor, epoch, timeout)
                peer_state, peer_meta = exchange.load(exchange.predecessor, epoch, expect=meta_subset)
    """

    def __init__(
        self,
        root: str | Path,
        net: int,
        num: int,
        *,
        keep_all: bool = False,
        poll_interval: float = 0.1,
        heartbeat_interval: float | None = None,
        stale_after: float | None = None,
        log_every: float = 60.0,
    ) -> None:
        if heartbeat_interval is None:
            heartbeat_interval = seconds_from_env(HEARTBEAT_ENV, 10.0)
        if stale_after is None:
            stale_after = seconds_from_env(STALE_ENV, 120.0)
        check_ring_position(net, num)
        self.folder = SharedFolder(Path(root))
        self.root = self.folder.root
        self.net = net
        self.num = num
        self.keep_all = keep_all
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.log_every = log_every
        self._lock_fd: int | None = None
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._heartbeat_failed = False

    def _make_root(self) -> None:
        """Create the shared folder (when this network first writes to it)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise GraftingError(
                f"cannot create the shared directory {self.root} (--s): {err.strerror or err}; "
                "choose a writable folder"
            ) from err

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
        """Take this network's lock (or raise :class:`LockError`) and start the heartbeat thread.

        Calling it again while holding the lock does nothing.
        """
        if self._lock_fd is not None:
            return
        self._make_root()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = self._read_owner(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise LockError(
                    f"cannot lock {self.lock_path}: {err.strerror or err}; "
                    "use a shared directory (--s) on a file system that supports locks"
                ) from err
            raise LockError(
                f"network {self.net} in {self.root} is already being trained by {owner}; "
                "stop that process or use another --s"
            ) from err
        self._lock_fd = fd
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

    def release(self) -> None:
        """Stop the heartbeat and drop the lock; safe to call more than once.

        The heartbeat file is left behind on purpose: a peer still waiting for this network then sees
        it grow stale and warns.
        """
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5.0)
            self._heartbeat_thread = None
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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
        try:
            self.alive_path(self.net).write_text(f"{time.time():.3f}\n")
        except OSError as err:
            if not self._heartbeat_failed:
                logger.warning("could not update %s: %s", self.alive_path(self.net), err.strerror or err)
                self._heartbeat_failed = True

    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.wait(self.heartbeat_interval):
            self._beat()

    def heartbeat_age(self, net: int) -> float | None:
        """Seconds since network ``net`` last touched its heartbeat file, or None if it has none."""
        try:
            modified = os.stat(self.alive_path(net)).st_mtime
        except OSError:
            return None
        return max(0.0, time.time() - modified)

    # ---------------------------------------------------------------- exchange files

    def publish(self, epoch: int, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        """Write this network's weights after ``epoch`` atomically and return the file's path.

        ``meta`` should name the model and ``num_classes`` (plain values only: str, int, float, bool);
        ``net``, ``num`` and ``epoch`` are filled in here.
        """
        if epoch < 1:
            raise ValueError(f"epochs start at 1, got {epoch}")
        weights = {
            key: _to_cpu(value) if isinstance(value, torch.Tensor) else value for key, value in state_dict.items()
        }
        full_meta = {**meta, "net": self.net, "num": self.num, "epoch": epoch}
        target = self.path(self.net, epoch)
        self._make_root()
        save_atomic({"model": weights, "meta": full_meta}, target)
        return target

    def wait_for(self, net: int, epoch: int, timeout: float | None) -> float:
        """Block until network ``net``'s file of ``epoch`` exists; return the seconds waited.

        Polls every ``poll_interval`` seconds, logs progress every ``log_every`` seconds, warns once if the
        peer's heartbeat is older than ``stale_after``, and raises :class:`PeerTimeoutError` after
        ``timeout`` seconds (None waits forever).
        """
        target = self.path(net, epoch)
        start = time.monotonic()
        next_log = start + self.log_every
        warned_stale = False
        while True:
            if os.path.exists(target):
                return time.monotonic() - start
            now = time.monotonic()
            waited = now - start
            if timeout is not None and waited >= timeout:
                raise PeerTimeoutError(
                    f"network {net} did not write epoch {epoch} within {timeout:g} s ({target}); "
                    "check its log, then restart it with --resume (this network's checkpoints are intact)"
                )
            if now >= next_log:
                logger.info(
                    "net %d: waiting for network %d, epoch %d (%s so far)",
                    self.net, net, epoch, format_duration(waited),
                )
                next_log += self.log_every
            if not warned_stale:
                age = self.heartbeat_age(net)
                if age is not None and age > self.stale_after:
                    logger.warning(
                        "network %d has not updated its heartbeat for %s; it may have died",
                        net, format_duration(age),
                    )
                    warned_stale = True
            pause = self.poll_interval
            if timeout is not None:
                pause = min(pause, max(0.0, timeout - waited))
            time.sleep(pause)

    def load(
        self, net: int, epoch: int, expect: dict[str, Any] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Read network ``net``'s weights of ``epoch``; return ``(state_dict, meta)``.

        Every entry of ``expect`` must equal the file's meta, otherwise :class:`PeerMismatchError` names
        the first field that differs. A file without meta (placed there by a user) is not checked.
        Weights that are NaN or infinite raise :class:`CheckpointError`: grafted in, they would spoil
        this network and the checkpoint it saves next.
        """
        target = self.path(net, epoch)
        payload = load_file(target, weights_only=True)
        state_dict = extract_state_dict(payload, source=str(target))
        for key, value in state_dict.items():
            if value.is_floating_point() and not bool(value.isfinite().all()):
                raise CheckpointError(
                    f"network {net}'s checkpoint {target} holds NaN or infinite values ({key}); "
                    "check that network's log and restart it with --resume"
                )
        meta = payload.get("meta") if isinstance(payload, dict) else None
        if not isinstance(meta, dict):
            return state_dict, {}
        for key, wanted in (expect or {}).items():
            if key not in meta:
                found = f"no '{key}' entry"
            elif meta[key] != wanted:
                found = f"{key}={meta[key]}"
            else:
                continue
            raise PeerMismatchError(
                f"network {net}'s checkpoint {target} has {found}, this network has {key}={wanted}; "
                f"start every network of the ring with the same {key}"
            )
        return state_dict, meta

    def cleanup(self, epoch: int) -> list[Path]:
        """After publishing ``epoch``, delete this network's files no peer can still need; return them.

        Only network i+1 reads network i's files. Network i can only be at epoch e after grafting epoch
        e-1 from i-1, which needed i-2 at e-2, and so on around the ring: i+1 (= i-(N-1)) has published
        at least epoch e-N+1, so it has already read network i's epochs up to e-N. One more epoch is kept
        so that a successor killed right after reading can resume and read again: files of epochs
        <= e-N-1 go. With one network nothing is exchanged; with keep_all nothing is removed.
        """
        if self.keep_all or self.num == 1:
            return []
        last_unneeded = epoch - self.num - 1
        if last_unneeded < 1:
            return []
        pattern = self.folder.exchange_pattern(self.net)
        removed: list[Path] = []
        try:
            names = os.listdir(self.root)
        except OSError as err:
            logger.warning("could not list %s to remove old exchange files: %s", self.root, err.strerror or err)
            return []
        for name in names:
            match = pattern.fullmatch(name)
            if match is None or int(match.group(1)) > last_unneeded:
                continue
            try:
                (self.root / name).unlink()
            except FileNotFoundError:
                continue
            except OSError as err:
                logger.warning("could not remove %s: %s", self.root / name, err.strerror or err)
                continue
            removed.append(self.root / name)
        removed.sort(key=lambda file: int(pattern.fullmatch(file.name).group(1)))
        return removed
