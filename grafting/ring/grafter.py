"""The per-epoch grafting step, as one object any training loop can call (docs/METHOD.md §5).

    with Grafter("runs/r32", net=1, num=2, model=model) as grafter:   # network 1 of 2; a new folder per run
        for epoch in range(1, epochs + 1):
            train_one_epoch(model, ...)
            if epoch < epochs:                        # the last epoch's weights are the result
                report = grafter.step(model, epoch)   # save own -> wait for peer -> graft
                print(report.summary())
        grafter.finish()                              # only a complete run cleans up

docs/examples/own_loop.py is the whole pattern. ``open()`` (``with``) takes the per-network lock and
joins the ring; a fresh start refuses a folder another run left exchange files in (see :meth:`Grafter.open`).

``step`` is ``publish`` (this network's pre-graft weights to the shared folder, atomically)
followed by ``graft`` (wait for the ring predecessor's file of the same epoch, check that it fits,
graft it in). While it waits it says, after a few seconds and then every minute, which file it waits
for and whether that peer runs, has stopped or has not started; without any logging set up (a plain
script) these lines go to stderr. ``finish()`` at the end of a run removes the exchange files no
network needs any more, the heartbeat and the lock (see :mod:`grafting.ring.exchange`). The ``source``
option selects the paper's ablations instead (docs/METHOD.md §9):
``internal`` and ``noise`` change the network's own invalid filters and exchange nothing;
``average`` waits for every network's file and replaces the weights by the plain mean;
``filter-entropy`` waits for every network's file and adds to each low-entropy filter the same filter
of the network that holds it with the highest entropy. A loop may call the two halves apart, e.g.
evaluate in between so the peer's file arrives while this network tests (``publish(model, epoch,
background=True)`` writes this network's own file meanwhile, from a copy of its weights; ``graft`` waits
for that file before it changes a weight). Under torch.distributed only rank 0 touches the folder; the
grafted weights are broadcast to the other ranks.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grafting.checkpoint import weights_problem
from grafting.distributed import broadcast_from_main, is_distributed
from grafting.errors import LIBRARY, CheckpointError, GraftingError, UsageError, Wording
from grafting.method.ablation import (
    ALL_PEERS_SOURCES,
    EXCHANGING_SOURCES,
    average_into_,
    check_source,
    filter_entropy_graft_,
    internal_graft_,
    noise_graft_,
)
from grafting.method.graft import (
    FilterRecord,
    LayerRecord,
    check_bn_blend,
    check_criterion,
    check_peer_state,
    check_rule,
    default_rule,
    fit_problem,
    graft_filters,
    graft_layers,
    unwrap_model,
)
from grafting.method.weighting import DEFAULT_A, DEFAULT_C, check_weighting
from grafting.ring.exchange import EpochGone, Exchange, check_epoch, check_ring_position, say
from grafting.ring.identity import describe_files, foreign_exchange_files, read_ring

__all__ = ["Grafter", "GraftReport", "LEVELS", "check_grafting"]

LEVELS = ("layer", "filter")
# Meta entries that differ between the networks of one ring by design.
_OWN_META = ("net", "epoch")
# The Grafters open in this process, by (shared folder, network): one per network and folder.
_OPEN_HERE: dict[tuple[str, int], Grafter] = {}


@dataclass
class GraftReport:
    """What one grafting step did.

    Attributes:
        epoch: the epoch whose weights were exchanged.
        peer: the network grafted from (None when nothing was grafted, e.g. ``num == 1``).
        waited_s: seconds spent waiting for the peer's file.
        graft_ms: milliseconds spent loading the file and grafting (device work included).
        read_ms, check_ms: the parts of ``graft_ms`` spent reading the peers' files and checking them
            (ring, architecture, keys, shapes, dtypes, finiteness, magnitudes).
        layers: per-coefficient records (layer level) or per-conv records (filter level).
        peer_state: the peer's pre-graft state_dict (CPU), e.g. to use it as a teacher.
        source: where the new weights came from (``external``, ``internal``, ``noise``, ``average``,
            ``filter-entropy``).
        peers: every network whose file was read (``average`` and ``filter-entropy`` read all the others).
        invalid_touched: how many filters ``noise``, ``internal`` or ``filter-entropy`` grafting changed
            (else None).
        grafted: whether the step changed the weights (False for a baseline or an epoch that does not graft).
        skipped: why a grafting step that should have happened did not (a peer's file that is gone for
            good), else None.
    """

    epoch: int
    peer: int | None = None
    waited_s: float = 0.0
    graft_ms: float = 0.0
    read_ms: float = 0.0
    check_ms: float = 0.0
    layers: Sequence[LayerRecord | FilterRecord] = field(default_factory=list)
    peer_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    source: str = "external"
    peers: tuple[int, ...] = ()
    invalid_touched: int | None = None
    grafted: bool = False
    skipped: str | None = None

    @property
    def alphas(self) -> list[float]:
        """The coefficients (layer level) or mean channel weights (filter level), in order."""
        return [r.alpha if isinstance(r, LayerRecord) else r.mean_w for r in self.layers]

    def summary(self) -> str:
        """One short line for logs."""
        if self.skipped is not None:
            return f"epoch {self.epoch}: not grafted ({self.skipped})"
        if self.invalid_touched is not None:
            return f"epoch {self.epoch}: {self.source} grafting touched {self.invalid_touched} invalid filters"
        if self.source == "average" and self.peers:
            return (
                f"epoch {self.epoch}: averaged with networks {', '.join(map(str, self.peers))}, "
                f"waited {self.waited_s:.1f} s, {self.graft_ms:.1f} ms"
            )
        if self.peer is None:
            return f"epoch {self.epoch}: no grafting"
        a = self.alphas
        mean = sum(a) / len(a) if a else float("nan")
        return (
            f"epoch {self.epoch}: grafted network {self.peer} ({len(a)} coefficients, mean {mean:.3f}), "
            f"waited {self.waited_s:.1f} s, {self.graft_ms:.1f} ms"
        )


def check_grafting(
    *,
    net: int,
    num: int,
    a: float,
    c: float,
    level: str,
    rule: str | None,
    criterion: str,
    source: str,
    invalid_threshold: float,
    peer_timeout: float | None,
    bn_blend: str = "per-channel",
    words: Wording = LIBRARY,
) -> None:
    """Raise :class:`UsageError` for the first impossible grafting setting (the one check both the
    :class:`Grafter` and the training scripts' configuration use), named in ``words``. ``rule=None``
    means "chosen from the model"."""
    check_ring_position(net, num, words)
    check_weighting(a, c, words)
    if level not in LEVELS:
        raise UsageError(
            f"unknown grafting level '{level}' ({words.name('level')}); choose one of: {', '.join(LEVELS)}"
        )
    if rule is not None:
        check_rule(rule, words)
    check_criterion(criterion, words)
    check_bn_blend(bn_blend, words)
    if bn_blend != "per-channel" and level != "filter":
        raise UsageError(f"{words.value('bn_blend', bn_blend)} only applies with {words.value('level', 'filter')}")
    check_source(source, words)
    if not 0 <= invalid_threshold < math.inf:
        raise UsageError(f"{words.name('invalid_threshold')} must be >= 0 and finite, got {invalid_threshold}")
    if peer_timeout is not None and not 0 < peer_timeout <= math.inf:
        raise UsageError(f"{words.name('peer_timeout')} must be positive seconds, got {peer_timeout}")
    if source in ALL_PEERS_SOURCES and num < 2:
        raise UsageError(f"{words.value('source', source)} needs {words.value('num', 2)} or more networks")


class Grafter:
    """Owns the shared folder for network ``net`` of ``num`` and performs the per-epoch grafting step.

    Args:
        root: the shared folder all networks of the ring use, one per run (``--s`` of the scripts).
        net, num: this network's number (1-based) and the ring size; ``num == 1`` never grafts.
        model: the network this Grafter grafts. Given here, the rule is chosen and the model checked
            now, before any training; otherwise at the first :meth:`publish` or :meth:`graft`.
        a, c: weighting hyper-parameters (docs/METHOD.md §3).
        level: ``"layer"`` (entropy-weighted per layer) or ``"filter"`` (per channel by BN scale).
        rule: ``"name"`` (published key rule) or ``"module"`` (by module type), for layer level;
            None (the default) chooses it from the model as the training scripts do
            (:func:`grafting.method.graft.default_rule`). A rule that cannot work for the model fails
            as soon as the Grafter sees the model.
        criterion: ``"entropy"`` or ``"l1"``.
        bn_blend: how filter level blends a BatchNorm: ``"per-channel"`` or ``"repeated-whole"`` (the
            published loop); see :func:`grafting.method.graft.graft_filters`.
        source: ``"external"`` (the method: the ring predecessor's weights), ``"internal"`` or
            ``"noise"`` (the network's own invalid filters, no exchange), ``"average"`` (plain mean of
            all ``num`` networks), ``"filter-entropy"`` (low-entropy filters get the other networks'
            highest-entropy ones added); docs/METHOD.md §9.
        invalid_threshold: l1 norm below which a filter counts as invalid (``internal``, ``noise``); for
            ``filter-entropy`` the entropy below which a filter is grafted.
        peer_timeout: seconds to wait for a peer before failing (None: forever).
        keep_all: keep every exchange file instead of removing those no peer still needs.
        meta: facts about this network stored with its files and checked against the peer's
            (``model`` and ``num_classes`` at least, so a ring of mismatched networks fails early).
            Without it a peer of another architecture is still refused: its keys, shapes and dtypes
            must be exactly this network's.
        ring: to resume, the ring's identity this network saved with its checkpoint (:attr:`ring`).
            None (a fresh start): join the folder's ring, or create it, and refuse a folder that holds
            exchange files another run left (:meth:`open`).
        wording: how messages name the settings and the ways on (the library's arguments; the training
            scripts pass their flags').
        check_folder: False when the caller checks the folder for another run's files itself (the
            training scripts do, against their per-network records, before they train).

    Every network calls, for each epoch but the last, ``publish(model, e)`` then ``graft(model, e)``
    (or ``step(model, e)``), between :meth:`open` (or ``with``) and :meth:`finish`; any other order is
    refused at once with :class:`UsageError`.
    """

    def __init__(
        self,
        root: str | Path,
        net: int,
        num: int,
        *,
        model: nn.Module | None = None,
        a: float = DEFAULT_A,
        c: float = DEFAULT_C,
        level: str = "layer",
        rule: str | None = None,
        criterion: str = "entropy",
        source: str = "external",
        invalid_threshold: float = 0.1,
        peer_timeout: float | None = None,
        keep_all: bool = False,
        meta: Mapping[str, Any] | None = None,
        ring: str | None = None,
        bn_blend: str = "per-channel",
        wording: Wording = LIBRARY,
        check_folder: bool = True,
    ) -> None:
        check_grafting(
            net=net,
            num=num,
            a=a,
            c=c,
            level=level,
            rule=rule,
            criterion=criterion,
            source=source,
            invalid_threshold=invalid_threshold,
            peer_timeout=peer_timeout,
            bn_blend=bn_blend,
            words=wording,
        )
        self.net, self.num = net, num
        self.bn_blend = bn_blend
        self.a, self.c, self.level, self.rule, self.criterion = a, c, level, rule, criterion
        self.source, self.invalid_threshold = source, invalid_threshold
        self.peer_timeout = peer_timeout
        self.keep_all = keep_all
        self.words = wording
        self._last_exchanged = 0  # the last epoch whose grafting step ran (grafted or skipped)
        self._published = 0  # the last epoch published (exchanging sources)
        self._state = "new"  # -> "open" <-> "closed"; "finished" at the end
        self._fresh = ring is None and check_folder  # the first open() checks the folder for another run's files
        self._ring = ring
        self._module: nn.Module | None = None  # the model, once seen
        self._keys: list[str] = []
        self._root_key = os.path.realpath(root)
        # What a peer's file must agree on: the grafting settings, and whatever the caller adds
        # (model, classes, recipe). The rule is filled in when the model is known.
        self.meta = {
            "num": num,
            "a": a,
            "c": c,
            "level": level,
            "rule": rule,
            "criterion": criterion,
            "source": source,
            "invalid_threshold": invalid_threshold,
            "bn_blend": bn_blend,
            **dict(meta or {}),
            "net": net,
        }
        self._rank_zero = not is_distributed() or torch.distributed.get_rank() == 0
        # Under DDP only rank 0 touches the shared folder (on other nodes it may not even be mounted).
        self.exchange: Exchange | None = (
            Exchange(root, net, num, keep_all=keep_all, ring=ring, wording=wording) if self._rank_zero else None
        )
        if model is not None:
            self._take_model(model)

    @property
    def ring(self) -> str | None:
        """The ring's identity once :meth:`open` has joined it (on every DDP rank): save it with your
        checkpoints and pass it back as ``ring=`` to resume."""
        return self._ring

    @property
    def _rule(self) -> str:
        """The layer rule, chosen when the model was first seen (before any graft)."""
        assert self.rule is not None, "the rule is chosen when the Grafter first sees the model"
        return self.rule

    @property
    def _shared(self) -> Exchange:
        """Rank 0's exchange (only rank 0 calls this: the others return before touching the folder)."""
        assert self.exchange is not None, "only rank 0 touches the shared folder"
        return self.exchange

    @property
    def active(self) -> bool:
        """Whether this network exchanges weights at all (``num > 1`` and an exchanging source)."""
        return self.num > 1 and self.source in EXCHANGING_SOURCES

    def __enter__(self) -> Grafter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Take this network's lock in the shared folder, join the ring and start the heartbeat (rank 0;
        under torch.distributed every rank calls it and gets rank 0's outcome).

        A fresh start (no ``ring=``) first refuses, with :class:`GraftingError`, a folder that holds
        exchange files this ring cannot have written: files of networks that are not running, or further
        ahead than a ring whose network ``net`` has just started can be. Such files are another run's:
        start this run in a new folder, or continue that one with ``ring=``. A second Grafter for the same
        network and folder is refused too (:class:`UsageError` in this process, :class:`LockError` in
        another one).
        """
        if self._state == "finished":
            raise UsageError(self._after_finish("open"))
        error: GraftingError | None = None
        if self._rank_zero:
            try:
                self._open_folder()
            except GraftingError as err:
                if not is_distributed():
                    raise
                error = err  # raised on every rank, after the others have heard of it
        outcome = broadcast_from_main((str(error) if error else None, self._shared.ring if self._rank_zero else None))
        if error is not None:
            raise error
        if outcome[0] is not None:
            raise GraftingError(outcome[0])
        self._ring = outcome[1]
        self._state = "open"

    def _open_folder(self) -> None:
        """Rank 0's part of :meth:`open`."""
        holder = _OPEN_HERE.get((self._root_key, self.net))
        if holder is not None and holder is not self:
            raise UsageError(
                f"another Grafter of network {self.net} in {self._shared.root} is open in this process: use that "
                f"one, or close() it first (one Grafter per network and folder)"
            )
        if self._fresh and self.active:
            self._refuse_another_runs_files()
        self._shared.acquire()
        _OPEN_HERE[(self._root_key, self.net)] = self
        self._fresh = False  # opened again, it continues the ring it has joined

    def _refuse_another_runs_files(self) -> None:
        """Raise :class:`GraftingError` if the folder holds exchange files this fresh network's ring cannot
        have written (identity.foreign_exchange_files): they are left from another run."""
        exchange = self._shared
        if not exchange.root.is_dir():
            return  # nothing there yet (or not a folder: acquire() says so)
        ring = read_ring(exchange.folder, self.words)

        def member(net: int) -> str | None:
            if ring is None:
                return f"no {exchange.folder.ring.name} names their ring"
            return None if self._runs(net) else f"network {net} is not running"

        found = foreign_exchange_files(exchange.folder, self.net, self.num, fresh=True, published=0, member=member)
        if found:
            raise GraftingError(
                f"{exchange.root} holds exchange files this Grafter did not write: {describe_files(found)}; "
                f"they are another run's{f' (ring {ring})' if ring else ''}: start this run in a new "
                f"{self.words.folder}, or continue that run: restart this network {self.words.restart(ring)}"
            )

    def _runs(self, net: int) -> bool:
        """Whether network ``net`` of this folder is running now: its heartbeat is fresh and its lock's owner,
        when it is a process of this machine, still exists (a heartbeat stays fresh for minutes after a
        kill or a close())."""
        if self._shared.peer_state(net)[0] != "running":
            return False
        try:
            fields = self._shared.folder.lock(net).read_text(errors="replace").split()
        except OSError:
            return True
        if len(fields) < 2 or fields[1] != socket.gethostname() or not fields[0].isdigit():
            return True  # another machine's, or not written yet: the heartbeat decides
        pid = int(fields[0])
        if pid == os.getpid():
            return (self._root_key, net) in _OPEN_HERE
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # it exists (owned by another user)
        return True

    def close(self) -> None:
        """Release the lock; safe to call twice. The heartbeat file stays, so a waiting peer sees it go stale."""
        if self._rank_zero:
            self._shared.release()
            if _OPEN_HERE.get((self._root_key, self.net)) is self:
                del _OPEN_HERE[(self._root_key, self.net)]
        if self._state == "open":
            self._state = "closed"

    def _check_open(self, method: str) -> None:
        """Raise :class:`UsageError` unless the Grafter is open (between open() and finish())."""
        if self._state == "finished":
            raise UsageError(self._after_finish(method))
        if self._state != "open":
            raise UsageError(
                f"Grafter.{method}() before open(): use `with Grafter(...) as grafter:` or call grafter.open() "
                f"first (it takes network {self.net}'s lock and joins the ring)"
            )

    def _after_finish(self, method: str) -> str:
        return (
            f"Grafter.{method}() after finish(): this network's run is over; a new run needs a new Grafter in a "
            f"new {self.words.folder}"
        )

    def _take_model(self, model: nn.Module) -> nn.Module:
        """The plain module inside ``model``; the first time, choose the rule and check that the model can be
        grafted with it; later, check that it is still the same network."""
        module = unwrap_model(model)
        if module is self._module:
            return module
        keys = list(module.state_dict())
        if self._module is not None:
            if keys != self._keys:
                raise UsageError(
                    f"this Grafter grafts a model with {len(self._keys)} state_dict entries, not this one with "
                    f"{len(keys)}: give each network's Grafter always the same model"
                )
            self._module = module
            return module
        rule = self.rule if self.rule is not None else default_rule(module)
        grafts = self.active or self.source in ("internal", "noise")
        problem = fit_problem(module, level=self.level, rule=rule) if grafts else None
        if problem is not None:
            fix = self.words.value("level", "layer") if self.level == "filter" else self.words.value("rule", "module")
            raise UsageError(f"{problem}; use {fix}")
        self.rule = self.meta["rule"] = rule
        self._module, self._keys = module, keys
        return module

    def discard_from(self, epoch: int) -> list[Path]:
        """Delete this network's exchange files of epochs >= ``epoch``, newest first; return them.

        Call it once when a network (re)starts at ``epoch``: such files belong to an interrupted attempt
        and are published again, and a reader must not take the old ones for the new.
        """
        epoch = check_epoch(epoch)
        self._check_open("discard_from")
        if not self._rank_zero:
            return []
        return self._shared.remove_files(self.net, first=epoch)

    def finish(self) -> None:
        """The run is over: delete the exchange files no network needs any more, this network's heartbeat
        and its lock file, and release the lock (rank 0; with ``keep_all`` the exchange files stay).
        Call it once, after the last epoch, only when the run is complete (not when it failed: an
        interrupted run is continued from these files); a second call does nothing.

        This network was the only reader of its predecessor's files, so those go; its own go when its
        successor finishes, or now if the successor has finished already. With ``source="average"`` (or
        ``filter-entropy``) every network reads every file: the epochs all networks have read (and could need
        after a resume from their previous checkpoint) go now, the rest when the last network finishes (no
        other heartbeat left).
        """
        if self._state == "finished":
            return
        self._check_open("finish")
        self._state = "finished"
        if not self._rank_zero:
            return
        exchange = self._shared
        exchange.wait_published()
        if self.active and not self.keep_all:
            exchange.finish_heartbeat()
            if self.source in ALL_PEERS_SOURCES:
                others_done = all(exchange.heartbeat_age(n) is None for n in range(1, self.num + 1) if n != self.net)
                for net in range(1, self.num + 1):
                    exchange.remove_files(net, last=None if others_done else self._last_exchanged - 2)
            else:
                exchange.remove_files(exchange.predecessor)
                successor = self.net % self.num + 1
                if exchange.heartbeat_age(successor) is None:
                    # It finished first (only finish() removes a heartbeat): nobody reads this network's files
                    # again, also not one published again by a resume after the successor had read it.
                    exchange.remove_files(self.net)
        exchange.finish()
        if _OPEN_HERE.get((self._root_key, self.net)) is self:
            del _OPEN_HERE[(self._root_key, self.net)]

    def publish(self, model: nn.Module, epoch: int, *, background: bool = False) -> Path | None:
        """Save this network's pre-graft weights of ``epoch`` for its successor (atomic). Epochs are published
        in increasing order, each grafted (:meth:`graft`) before the next is published.

        With ``background`` the weights are copied at once and written and fsynced by a thread while the
        caller goes on (e.g. tests the network): :meth:`graft` waits for the file before it starts, and
        :meth:`finish` and :meth:`close` before they return, so the graft never overlaps the write and
        the process never ends before the file is complete.
        """
        epoch = check_epoch(epoch)
        self._check_open("publish")
        module = self._take_model(model)
        if self.active:
            if epoch <= self._published:
                raise UsageError(
                    f"publish(model, {epoch}) after epoch {self._published}: each epoch is published once, "
                    f"in increasing order"
                )
            if self._published > self._last_exchanged:
                raise UsageError(
                    f"publish(model, {epoch}) before graft(model, {self._published}): graft each published "
                    f"epoch before publishing the next (or call step(model, epoch) once per epoch)"
                )
            self._published = epoch
        if not self.active or not self._rank_zero:
            return None
        state = module.state_dict()
        path = self._shared.publish(epoch, state, {**self.meta, "epoch": epoch}, background=background)
        self._shared.cleanup(epoch)
        return path

    def graft(self, model: nn.Module, epoch: int) -> GraftReport:
        """Wait for the predecessor's weights of ``epoch``, check them and graft them into ``model``.

        With ``source="average"`` every other network's file is read and ``model`` becomes the mean (with
        ``filter-entropy`` its low-entropy filters get the others' added);
        with ``internal`` or ``noise`` the network's own invalid filters change and nothing is read.
        A peer's file that is gone for good (deleted, and the peer has published a later epoch) is
        skipped with a warning: ``report.skipped`` says so and the weights stay as they are.
        """
        epoch = check_epoch(epoch)
        self._check_open("graft")
        module = self._take_model(model)
        if self.active:
            self._check_graft_order(epoch)
        report = GraftReport(epoch=epoch, source=self.source)
        own_only = self.source in ("internal", "noise")
        if not (self.active or own_only):
            return report
        report.grafted = True
        if self._rank_zero:
            if self.exchange is not None:
                self.exchange.wait_published()  # this epoch's own file is complete before any weight changes
            start = time.perf_counter()
            try:
                if own_only:
                    if self.source == "internal":
                        report.invalid_touched = internal_graft_(
                            module, threshold=self.invalid_threshold, rule=self._rule
                        )
                    else:
                        # noise_graft_ counts finished epochs from 0 (the published decay); ours count from 1.
                        report.invalid_touched = noise_graft_(
                            module, epoch - 1, threshold=self.invalid_threshold, rule=self._rule
                        )
                elif self.source in ALL_PEERS_SOURCES:
                    start = self._from_all_peers(module, epoch, report)
                else:
                    start = self._graft_predecessor(module, epoch, report)
            except EpochGone as gone:
                say(logging.WARNING, f"net {self.net}: {gone}")
                report.grafted, report.skipped = False, str(gone)
            _synchronize(module)
            report.graft_ms = (time.perf_counter() - start) * 1000
        self._last_exchanged = epoch  # on every rank: the order checks run on every rank
        if is_distributed():
            _broadcast_state(module)
        return report

    def _check_graft_order(self, epoch: int) -> None:
        """Raise :class:`UsageError` unless ``epoch`` is the epoch just published and not grafted yet."""
        if self._last_exchanged >= epoch:
            said = f"graft(model, {epoch}) after graft(model, {self._last_exchanged}): each epoch is grafted once"
        elif epoch < self._published:
            said = (
                f"graft(model, {epoch}) after publish(model, {self._published}): graft each epoch right after "
                f"publishing it"
            )
        elif epoch > self._published:
            said = (
                f"graft(model, {epoch}) before publish(model, {epoch}): every network publishes an epoch before it "
                f"waits for its peers' (else the ring waits for ever); call publish(model, {epoch}) first, or "
                f"step(model, {epoch})"
            )
        else:
            return
        raise UsageError(said)

    def _graft_predecessor(self, module: nn.Module, epoch: int, report: GraftReport) -> float:
        """Wait for the predecessor's file of ``epoch``, check it and graft it into ``module`` (the method).
        Returns when the work (not the waiting) started."""
        peer = self._shared.predecessor
        report.peer, report.peers = peer, (peer,)
        report.waited_s = self._shared.wait_for(peer, epoch, self.peer_timeout)
        start = time.perf_counter()
        peer_state = self._load_checked(module, peer, epoch, report)
        if self.level == "layer":
            report.layers = graft_layers(
                module, peer_state, a=self.a, c=self.c, rule=self._rule, criterion=self.criterion
            )
        else:
            report.layers = graft_filters(module, peer_state, bn_blend=self.bn_blend)
        report.peer_state = peer_state
        return start

    def _load_checked(self, module: nn.Module, net: int, epoch: int, report: GraftReport) -> dict[str, torch.Tensor]:
        """Network ``net``'s weights of ``epoch``, refused unless their meta, keys, shapes and dtypes fit and
        their values are finite with the magnitudes of a network like this one (vectorised: one host
        transfer for the file's tensors and one per device for this network's)."""
        started = time.perf_counter()
        param = next(module.parameters(), None)
        on_gpu = param is not None and param.device.type == "cuda"  # pinned: one asynchronous copy over
        state, _ = self._shared.read_unchecked(net, epoch, expect=self._expected_meta(), pin_memory=on_gpu)
        read_at = time.perf_counter()
        own = module.state_dict()
        source = f"network {net}'s file {self._shared.path(net, epoch)}"
        check_peer_state(own, state, source=source)
        problem = weights_problem(state, reference=own)
        if problem:
            raise CheckpointError(f"{source} {problem}; {self._shared.repair_advice(net)}")
        report.read_ms += (read_at - started) * 1000
        report.check_ms += (time.perf_counter() - read_at) * 1000
        return state

    def _expected_meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items() if k not in _OWN_META}

    def _from_all_peers(self, module: nn.Module, epoch: int, report: GraftReport) -> float:
        """Wait for every other network's file of ``epoch``, then graft from all of them: ``average``
        replaces ``module`` by the mean of all, ``filter-entropy`` grafts its low-entropy filters.

        Averaging takes the states in network order 1..num, own weights at their place, so every
        network ends the step with the same weights. Per-filter entropy grafting takes the others in the
        published order, from the successor on (i+1, ..., num, 1, ..., i-1), which breaks ties.
        Returns when the work (not the waiting) started. The predecessor's state is reported as
        ``peer_state`` (the teacher of ``--distill peers``). Exchange.cleanup's bound (files of epochs
        <= e-N-1 go) stays safe: here every network waits for all the others each epoch, a tighter
        coupling than the ring's, so no one reads an epoch that old.
        """
        others = [(self.net + k - 1) % self.num + 1 for k in range(1, self.num)]  # successor first
        for net in others:  # the waits overlap: later files usually exist by the time the first one does
            report.waited_s += self._shared.wait_for(net, epoch, self.peer_timeout)
        start = time.perf_counter()
        states = {net: self._load_checked(module, net, epoch, report) for net in others}
        if self.source == "average":
            states[self.net] = module.state_dict()
            average_into_(module, [states[n] for n in range(1, self.num + 1)])
        else:
            report.invalid_touched = filter_entropy_graft_(
                module, [states[n] for n in others], threshold=self.invalid_threshold, rule=self._rule
            )
        report.peer, report.peers = self._shared.predecessor, tuple(sorted(others))
        report.peer_state = states[self._shared.predecessor]
        return start

    def step(self, model: nn.Module, epoch: int) -> GraftReport:
        """The whole per-epoch step: ``publish`` then ``graft`` (``epoch`` is a whole number >= 1)."""
        check_epoch(epoch)
        self._check_open("step")
        self.publish(model, epoch)
        return self.graft(model, epoch)


def _synchronize(module: nn.Module) -> None:
    """Wait for queued device work so graft_ms measures it."""
    param = next(module.parameters(), None)
    if param is not None and param.device.type == "cuda":
        torch.cuda.synchronize(param.device)


def _broadcast_state(module: nn.Module) -> None:
    """Rank 0's (grafted) parameters and buffers to every other rank."""
    for tensor in module.state_dict().values():
        torch.distributed.broadcast(tensor, src=0)
