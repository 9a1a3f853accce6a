"""The shared folder of a ring (``--s``): the one place that names its files.

    <s>/ring.json                  the ring's identity, created by the first network that starts
    <s>/net<i>_epoch<e>.tensors    network i's pre-graft weights after epoch e (read by network i+1)
    <s>/net<i>.lock                held (locked) by the one process that trains network i
    <s>/net<i>.alive               network i's heartbeat, rewritten every few seconds
    <s>/net<i>/config.json         network i's settings and ring identity, checked on --resume
    <s>/net<i>/last.pt             everything needed to resume network i after its last finished epoch
    <s>/net<i>/previous.pt         the same one epoch earlier: the fallback when last.pt is unusable
    <s>/net<i>/best.pt             network i's weights of its best test accuracy
    <s>/net<i>/metrics.jsonl       one JSON object per finished epoch
    <s>/tb/net<i>/                 TensorBoard events

Every writer, reader and tool goes through :class:`SharedFolder` and :class:`NetworkFiles`, so a
file name is spelled once. Exchange files are not ``torch.save`` files (:mod:`grafting.ring.exchange_file`
holds their format), hence their own extension; versions before it wrote ``net<i>_epoch<e>.pt``, which a
reader now names as an older version's file (:meth:`SharedFolder.legacy_exchange`) instead of waiting.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SharedFolder", "NetworkFiles", "NETWORK_FOLDER", "CONFIG_NAME", "EXCHANGE_SUFFIX", "EXCHANGE_FILE"]

# A network's own folder, ``net<i>``, and the settings file inside it (what tools look for).
NETWORK_FOLDER = re.compile(r"net(\d+)")
CONFIG_NAME = "config.json"
# The extension of exchange files, and any network's exchange file: group 1 is the network, group 2 the epoch.
EXCHANGE_SUFFIX = ".tensors"
EXCHANGE_FILE = re.compile(rf"net(\d+)_epoch(\d+){re.escape(EXCHANGE_SUFFIX)}")
# What versions before the flat format named the same file (a torch.save pickle): refused, never read.
_LEGACY_EXCHANGE_SUFFIX = ".pt"


@dataclass(frozen=True)
class NetworkFiles:
    """Paths of network ``net``'s own files under the shared folder ``root``."""

    root: Path
    net: int

    @property
    def folder(self) -> Path:
        """This network's own folder, ``<s>/net<i>``."""
        return self.root / f"net{self.net}"

    @property
    def config(self) -> Path:
        """The run's settings, written at the start and checked on --resume."""
        return self.folder / CONFIG_NAME

    @property
    def last(self) -> Path:
        """The resumable checkpoint of the last finished epoch."""
        return self.folder / "last.pt"

    @property
    def previous(self) -> Path:
        """The resumable checkpoint one epoch older than ``last``: the fallback when ``last`` is unusable."""
        return self.folder / "previous.pt"

    def set_aside(self, path: Path) -> Path:
        """Where an unusable checkpoint ``path`` of this network is moved, kept for inspection."""
        return path.with_name(path.name + ".unusable")

    @property
    def best(self) -> Path:
        """The weights of the best test accuracy so far."""
        return self.folder / "best.pt"

    @property
    def metrics(self) -> Path:
        """One JSON object per finished epoch: every number of the epoch line and more."""
        return self.folder / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event folder ``<s>/tb/net<i>``."""
        return self.root / "tb" / f"net{self.net}"


@dataclass(frozen=True)
class SharedFolder:
    """The files the networks of a ring share in ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def ring(self) -> Path:
        """The ring's identity file (grafting.ring.identity)."""
        return self.root / "ring.json"

    def exchange(self, net: int, epoch: int) -> Path:
        """Network ``net``'s pre-graft weights after ``epoch``."""
        return self.root / f"net{net}_epoch{epoch}{EXCHANGE_SUFFIX}"

    def legacy_exchange(self, net: int, epoch: int) -> Path:
        """Where an older version of this project (before the flat format) put the same weights."""
        return self.root / f"net{net}_epoch{epoch}{_LEGACY_EXCHANGE_SUFFIX}"

    @staticmethod
    def exchange_pattern(net: int) -> re.Pattern[str]:
        """Matches the names of network ``net``'s exchange files; group 1 is the epoch."""
        return re.compile(rf"net{net}_epoch(\d+){re.escape(EXCHANGE_SUFFIX)}")

    def exchange_files(self) -> list[tuple[int, int, Path]]:
        """Every exchange file in the folder as ``(net, epoch, path)``, sorted; [] when the folder is missing."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        found = [
            (int(m.group(1)), int(m.group(2)), self.root / name)
            for name in names
            if (m := EXCHANGE_FILE.fullmatch(name))
        ]
        return sorted(found)

    def lock(self, net: int) -> Path:
        """Network ``net``'s lock file."""
        return self.root / f"net{net}.lock"

    def alive(self, net: int) -> Path:
        """Network ``net``'s heartbeat file."""
        return self.root / f"net{net}.alive"

    def network(self, net: int) -> NetworkFiles:
        """Network ``net``'s own files."""
        return NetworkFiles(self.root, net)
