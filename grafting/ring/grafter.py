"""The per-epoch grafting step, as one object any training loop can call (docs/METHOD.md §5).

    grafter = Grafter("runs/r32", net=1, num=2)      # network 1 of a ring of 2
    with grafter:                                     # takes the per-network lock
        for epoch in range(1, epochs + 1):
            train_one_epoch(model, ...)
            report = grafter.step(model, epoch)       # save own -> wait for peer -> graft
            print(report.summary())

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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grafting.checkpoint import weights_problem
from grafting.distributed import is_distributed
from grafting.errors import CheckpointError, UsageError
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
    graft_filters,
    graft_layers,
    unwrap_model,
)
from grafting.method.weighting import DEFAULT_A, DEFAULT_C, check_weighting
from grafting.ring.exchange import EpochGone, Exchange, check_epoch, check_ring_position, say

__all__ = ["Grafter", "GraftReport", "LEVELS", "check_grafting"]

LEVELS = ("layer", "filter")
# Meta entries that differ between the networks of one ring by design.
_OWN_META = ("net", "epoch")


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
    rule: str,
    criterion: str,
    source: str,
    invalid_threshold: float,
    peer_timeout: float | None,
    bn_blend: str = "per-channel",
) -> None:
    """Raise :class:`UsageError` for the first impossible grafting setting (the one check both the
    :class:`Grafter` and the training scripts' configuration use)."""
    check_ring_position(net, num)
    check_weighting(a, c)
    if level not in LEVELS:
        raise UsageError(f"unknown grafting level '{level}' (--level); choose one of: {', '.join(LEVELS)}")
    check_rule(rule)
    check_criterion(criterion)
    check_bn_blend(bn_blend)
    if bn_blend != "per-channel" and level != "filter":
        raise UsageError(f"--filter-bn-blend {bn_blend} only applies with --level filter")
    check_source(source)
    if not 0 <= invalid_threshold < math.inf:
        raise UsageError(f"--invalid-threshold must be >= 0 and finite, got {invalid_threshold}")
    if peer_timeout is not None and not 0 < peer_timeout <= math.inf:
        raise UsageError(f"--peer-timeout must be positive seconds, got {peer_timeout}")
    if source in ALL_PEERS_SOURCES and num < 2:
        raise UsageError(f"--graft-source {source} needs --num 2 or more networks")


class Grafter:
    """Owns the shared folder for network ``net`` of ``num`` and performs the per-epoch grafting step.

    Args:
        root: the shared folder all networks of the ring use (``--s``).
        net, num: this network's number (1-based) and the ring size; ``num == 1`` never grafts.
        a, c: weighting hyper-parameters (docs/METHOD.md §3).
        level: ``"layer"`` (entropy-weighted per layer) or ``"filter"`` (per channel by BN scale).
        rule: ``"name"`` (published key rule) or ``"module"`` (by module type), for layer level.
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
        ring: the ring's identity a resumed network recorded (None: join the shared folder's ring, or
            create it when this network is the first).
    """

    def __init__(
        self,
        root: str | Path,
        net: int,
        num: int,
        *,
        a: float = DEFAULT_A,
        c: float = DEFAULT_C,
        level: str = "layer",
        rule: str = "name",
        criterion: str = "entropy",
        source: str = "external",
        invalid_threshold: float = 0.1,
        peer_timeout: float | None = None,
        keep_all: bool = False,
        meta: Mapping[str, Any] | None = None,
        ring: str | None = None,
        bn_blend: str = "per-channel",
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
        )
        self.net, self.num = net, num
        self.bn_blend = bn_blend
        self.a, self.c, self.level, self.rule, self.criterion = a, c, level, rule, criterion
        self.source, self.invalid_threshold = source, invalid_threshold
        self.peer_timeout = peer_timeout
        self.keep_all = keep_all
        self._last_exchanged = 0  # the last epoch whose grafting step ran (grafted or skipped)
        # What a peer's file must agree on: the grafting settings, and whatever the caller adds
        # (model, classes, recipe).
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
            Exchange(root, net, num, keep_all=keep_all, ring=ring) if self._rank_zero else None
        )

    @property
    def ring(self) -> str | None:
        """The ring's identity once :meth:`open` has joined it (None on DDP ranks other than 0)."""
        return self._shared.ring if self.exchange is not None else None

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
        """Take this network's lock in the shared folder (rank 0 only), join the ring and start the heartbeat."""
        if self._rank_zero:
            self._shared.acquire()

    def close(self) -> None:
        """Release the lock; safe to call twice. The heartbeat file stays, so a waiting peer sees it go stale."""
        if self._rank_zero:
            self._shared.release()

    def discard_from(self, epoch: int) -> list[Path]:
        """Delete this network's exchange files of epochs >= ``epoch``, newest first; return them.

        Call it once when a network (re)starts at ``epoch``: such files belong to an interrupted attempt
        and are published again, and a reader must not take the old ones for the new.
        """
        epoch = check_epoch(epoch)
        if not self._rank_zero:
            return []
        return self._shared.remove_files(self.net, first=epoch)

    def finish(self) -> None:
        """The run is over: delete the exchange files no network needs any more, this network's heartbeat
        and its lock file, and release the lock (rank 0; with ``keep_all`` the exchange files stay).

        This network was the only reader of its predecessor's files, so those go; its own go when its
        successor finishes. With ``source="average"`` (or ``filter-entropy``) every network reads every
        file: the epochs all networks have read (and could need after a resume from their previous
        checkpoint) go now, the rest when the last network finishes (no other heartbeat left).
        """
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
        exchange.finish()

    def publish(self, model: nn.Module, epoch: int, *, background: bool = False) -> Path | None:
        """Save this network's pre-graft weights of ``epoch`` for its successor (atomic).

        With ``background`` the weights are copied at once and written and fsynced by a thread while the
        caller goes on (e.g. tests the network): :meth:`graft` waits for the file before it starts, and
        :meth:`finish` and :meth:`close` before they return, so the graft never overlaps the write and
        the process never ends before the file is complete.
        """
        epoch = check_epoch(epoch)
        if not self.active or not self._rank_zero:
            return None
        state = unwrap_model(model).state_dict()
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
        report = GraftReport(epoch=epoch, source=self.source)
        own_only = self.source in ("internal", "noise")
        if not (self.active or own_only):
            return report
        module = unwrap_model(model)
        report.grafted = True
        if self._rank_zero:
            if self.exchange is not None:
                self.exchange.wait_published()  # this epoch's own file is complete before any weight changes
            start = time.perf_counter()
            try:
                if own_only:
                    if self.source == "internal":
                        report.invalid_touched = internal_graft_(
                            module, threshold=self.invalid_threshold, rule=self.rule
                        )
                    else:
                        # noise_graft_ counts finished epochs from 0 (the published decay); ours count from 1.
                        report.invalid_touched = noise_graft_(
                            module, epoch - 1, threshold=self.invalid_threshold, rule=self.rule
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
            self._last_exchanged = epoch
        if is_distributed():
            _broadcast_state(module)
        return report

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
                module, peer_state, a=self.a, c=self.c, rule=self.rule, criterion=self.criterion
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
                module, [states[n] for n in others], threshold=self.invalid_threshold, rule=self.rule
            )
        report.peer, report.peers = self._shared.predecessor, tuple(sorted(others))
        report.peer_state = states[self._shared.predecessor]
        return start

    def step(self, model: nn.Module, epoch: int) -> GraftReport:
        """The whole per-epoch step: ``publish`` then ``graft`` (``epoch`` is a whole number >= 1)."""
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
