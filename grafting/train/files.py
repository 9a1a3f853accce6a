"""One network's own files in the shared folder: its configuration, the best checkpoint and the
resumable ones (their names: :class:`grafting.ring.layout.NetworkFiles`), and the checks that keep a
run from being continued with other settings, started over another run, or restarted at epoch 1
over finished work.

Recovery rules:

- ``last.pt`` is written after every epoch; the file it replaces becomes ``previous.pt`` first (a hard
  link, so ``last.pt`` always exists). ``--resume`` continues from the newest usable of the two: a
  ``last.pt`` that cannot be read, or that holds NaN, absurd values or the weights of another model,
  is moved aside (``last.pt.unusable``) with a warning and ``previous.pt`` is used (absurd: a million
  times the magnitudes of the freshly built network).
- ``--resume`` continues a run; with nothing to continue (no checkpoint, no ``best.pt`` or
  ``metrics.jsonl`` of a later epoch, no exchange file of this network beyond epoch 1) it stops and says
  how to start instead. ``--resume auto`` starts at epoch 1 then. A network known to have finished later
  epochs whose checkpoints are gone stops either way and says how to go on.
- A missing or unreadable ``config.json`` next to a checkpoint stops ``--resume``: the settings it must
  keep could not be checked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grafting.checkpoint import (
    capture_rng_state,
    extract_state_dict,
    load_file,
    read_json_file,
    remove_temp_files,
    restore_rng_state,
    save_atomic,
    state_dict_misfit,
    weights_problem,
    write_text_atomic,
)
from grafting.errors import CheckpointError, GraftingError, UsageError, first_line
from grafting.method.ablation import EXCHANGING_SOURCES
from grafting.method.graft import unwrap_model
from grafting.ring import identity
from grafting.ring.layout import NetworkFiles, SharedFolder
from grafting.train.config import CONFIG_FORMAT, RESUME_AUTO, RunConfig
from grafting.train.report import read_metrics

__all__ = [
    "ResumeState",
    "something_to_continue",
    "resolve_resume",
    "read_saved_config",
    "prepare_run_files",
    "load_last",
    "save_last",
    "save_best",
    "CHECKPOINT_FORMAT",
]

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "filter-grafting/1"


@dataclass
class ResumeState:
    """Where a resumed run continues: the next epoch, the best accuracy so far and extra entries.

    ``graft_step_done`` is False when the last finished epoch was the final one of its run, which
    neither publishes nor grafts: a run extended with a larger ``--epochs`` does that step first.
    ``acc``/``acc5`` are that epoch's test accuracies.
    """

    start_epoch: int = 1
    best_acc: float = 0.0
    extra: dict[str, Any] | None = None
    graft_step_done: bool = True
    acc: float | None = None
    acc5: float | None = None


# ----------------------------------------------------------------------------------------------
# config.json


def _settings_error(path: Path, problem: str) -> UsageError:
    return UsageError(
        f"--resume: {path} {problem}, so the settings this run must keep cannot be checked; "
        f"restore it from a backup, or start a new run in another --s"
    )


def read_saved_config(config: RunConfig) -> dict[str, Any] | None:
    """For ``--resume``: network ``config.i``'s saved configuration, checked against ``config`` (every
    setting fixed on resume must be unchanged); None when the network has neither a checkpoint nor a
    config.json yet (it starts at epoch 1).

    A checkpoint without a readable config.json of this project is a :class:`UsageError` that says how
    to go on. Reading only: call it before taking the lock, so the ring's identity it records is known.
    """
    files = NetworkFiles(Path(config.s), config.i)
    has_checkpoint = any(os.path.lexists(path) for path in (files.last, files.previous))
    try:
        info = os.stat(files.config)
    except FileNotFoundError:
        if has_checkpoint:
            raise _settings_error(files.config, "is missing") from None
        return None
    except OSError as err:
        raise _settings_error(files.config, f"cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _settings_error(files.config, "is not a regular file")
    try:
        saved = read_json_file(files.config)
    except OSError as err:
        raise _settings_error(files.config, f"cannot be read ({err.strerror or first_line(err)})") from None
    except UnicodeDecodeError as err:
        raise _settings_error(files.config, f"cannot be read ({first_line(err)})") from None
    except ValueError as err:
        raise _settings_error(files.config, f"is not valid JSON ({first_line(err)})") from None
    if not isinstance(saved, dict):
        raise _settings_error(files.config, f"holds a JSON {type(saved).__name__}, not the settings object")
    if saved.get("format") != CONFIG_FORMAT:
        raise _settings_error(files.config, f"has format {saved.get('format')!r}, not {CONFIG_FORMAT!r}")
    ring = saved.get("ring")
    if ring is not None and not (isinstance(ring, str) and ring):
        raise _settings_error(files.config, f"holds ring {ring!r}, not a ring's name")
    config.check_resume(saved, str(files.config))
    return saved


# ----------------------------------------------------------------------------------------------
# What a network has done so far


def _reached(files: NetworkFiles, *, exchange_files: bool = True) -> tuple[int, list[str]]:
    """The furthest epoch network ``files.net`` is known to have reached (trained, maybe not finished),
    from the files that outlive a lost last.pt, and what says so: previous.pt, best.pt (an unreadable one
    counts as epoch 2, beyond what a fresh start may replace), metrics.jsonl and, with
    ``exchange_files``, the network's own exchange files."""
    reached, evidence = 0, []
    if os.path.lexists(files.previous):
        reached, evidence = 2, [f"{files.previous.name}"]
    if os.path.lexists(files.best):
        try:
            best = load_file(files.best, weights_only=True)
            epoch = best.get("epoch") if isinstance(best, dict) else None
            epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 2
        except CheckpointError:
            epoch = 2
        reached = max(reached, epoch)
        evidence.append(f"{files.best.name} of epoch {epoch}")
    epochs = [r["epoch"] for r in read_metrics(files.metrics) if isinstance(r.get("epoch"), int)]
    if epochs:
        reached = max(reached, max(epochs))
        evidence.append(f"{files.metrics.name} up to epoch {max(epochs)}")
    own = [(epoch, path) for net, epoch, path in SharedFolder(files.root).exchange_files() if net == files.net]
    if own and exchange_files:  # epoch e is published before it is tested: the network got that far
        epoch, path = max(own)
        reached = max(reached, epoch)
        evidence.append(path.name)
    return reached, evidence


def something_to_continue(files: NetworkFiles) -> bool:
    """Whether network ``files.net`` has a run to continue: a resumable checkpoint (usable or not), files
    that show it finished an epoch beyond the first (:func:`_reached`), or its config.json (it started and
    stopped before its first checkpoint: it continues at epoch 1, its settings checked against the file)."""
    if any(os.path.lexists(path) for path in (files.last, files.previous, files.config)):
        return True
    return _reached(files)[0] >= 2


def resolve_resume(config: RunConfig) -> bool:
    """What ``--resume`` asks of network ``config.i``: True to continue its run, False to start one.

    ``--resume auto`` continues when there is something to continue (:func:`something_to_continue`, which
    includes a network that started in this folder but saved no epoch: every failure's advice "restart it
    with --resume" then works) and starts otherwise. A plain ``--resume`` with nothing at all is a
    :class:`UsageError` that says how to start instead (a mistyped --s must not cost a whole new run)."""
    if not config.resume:
        return False
    files = NetworkFiles(Path(config.s), config.i)
    if something_to_continue(files):
        return True
    if config.resume == RESUME_AUTO:
        log.info(f"--resume {RESUME_AUTO}: no {files.last} yet, starting from epoch 1")
        return False
    where = f"{config.s} does not exist" if not os.path.lexists(config.s) else f"{files.folder} has no checkpoint"
    raise UsageError(
        f"--resume: {where}, so network {config.i} has nothing to continue; check --s, or start it without "
        f"--resume (--resume {RESUME_AUTO} continues when there is something, else starts)"
    )


# ----------------------------------------------------------------------------------------------
# The start of a run


def _check_folders(files: NetworkFiles) -> None:
    """Every folder the run writes into must be a folder, and every file it reads and writes (its settings,
    its epoch records) a regular file (or not exist yet): a FIFO there would block the run for ever."""
    for path, what in (
        (files.root, "the shared folder (--s)"),
        (files.folder, "this network's checkpoints"),
        (files.tensorboard.parent, "TensorBoard events"),
        (files.tensorboard, "TensorBoard events"),
    ):
        if os.path.lexists(path) and not path.is_dir():
            raise GraftingError(f"{path} is a file, not a folder; the run writes {what} there: move it away")
    for path, what in ((files.config, "its settings"), (files.metrics, "its epoch records")):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # missing (written later), or unreadable (said when it is read)
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe or a device)"
            raise GraftingError(f"{path} is {kind}; the run writes {what} there: move it away")


def _peer_ring(files: NetworkFiles) -> str | None:
    """The ring a network's config.json records (None: missing, unreadable or without one)."""
    try:
        saved = read_json_file(files.config)
    except (OSError, ValueError):
        return None
    ring = saved.get("ring") if isinstance(saved, dict) else None
    return ring if isinstance(ring, str) else None


def foreign_exchange_files(config: RunConfig, ring: str) -> list[tuple[Path, str]]:
    """Exchange files of the ring of network ``config.i`` that this ring cannot have written, each with
    the reason: a peer's file whose network has no config.json naming this ring (the folder was reused,
    or that network's folder deleted), or, at a fresh start, a file further ahead than a ring whose
    network ``i`` has not finished epoch 1 allows (network i+d is at most d epochs ahead of it; its own
    files at most at epoch 1)."""
    shared = SharedFolder(Path(config.s))

    @functools.cache
    def member(net: int) -> str | None:
        recorded = _peer_ring(shared.network(net))
        if recorded == ring:
            return None
        return f"network {net} has no config.json" if recorded is None else f"network {net} belongs to ring {recorded}"

    # A fresh start may follow an attempt that published epoch 1 and saved nothing: it is replaced.
    return identity.foreign_exchange_files(
        shared, config.i, config.num, fresh=not config.resume, published=1, member=member
    )


def prepare_run_files(config: RunConfig, ring: str | None = None) -> NetworkFiles:
    """Check the shared folder, create network ``config.i``'s folder and write its configuration (with
    the ring's identity ``ring``). Call it only while holding the network's lock.

    Without ``config.resume`` a folder that holds this network's checkpoints, or files of a later epoch,
    is refused (that would lose a run's work); with it, the saved settings are checked
    (:func:`read_saved_config`). Peers' exchange files that this ring cannot have written are refused
    in any case, naming them.
    """
    files = NetworkFiles(Path(config.s), config.i)
    _check_folders(files)
    if config.resume:
        read_saved_config(config)  # run_ring checked it before the lock; callers on their own need it here
    else:
        if os.path.lexists(files.last) or os.path.lexists(files.previous):
            raise GraftingError(f"{files.last} already exists; pass --resume to continue that run, or use another --s")
        reached, evidence = _reached(files, exchange_files=False)  # those are checked below
        if reached >= 2:
            raise GraftingError(
                f"{files.folder} holds a run that reached epoch {reached} ({', '.join(evidence)}); "
                f"pass --resume to continue it, or use another --s"
            )
    exchanging = config.num > 1 and config.source in EXCHANGING_SOURCES
    if exchanging and ring is not None:
        foreign = foreign_exchange_files(config, ring)
        if foreign:
            raise GraftingError(
                f"{files.root} holds exchange files this ring cannot have written: "
                f"{identity.describe_files(foreign)}; they are another run's: move them away, or start this ring "
                f"in a new --s"
            )
    try:
        files.folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GraftingError(
            f"could not create {files.folder}: {err.strerror or err}; fix the permissions of --s"
        ) from None
    remove_temp_files(files.folder)
    settings = json.loads(config.to_json())
    if ring is not None:
        settings["ring"] = ring
    write_text_atomic(json.dumps(settings, indent=2, sort_keys=True), files.config)
    return files


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_best(files: NetworkFiles, model: nn.Module, epoch: int, acc: float) -> None:
    """The tested (pre-graft) weights of the best epoch so far."""
    save_atomic(
        {"model": unwrap_model(model).state_dict(), "epoch": epoch, "acc": acc, "format": CHECKPOINT_FORMAT}, files.best
    )


def _keep_as_previous(files: NetworkFiles) -> None:
    """Make the current last.pt the fallback previous.pt, atomically and without a moment in which
    last.pt is missing (a hard link, or a copy where links are not supported)."""
    if not files.last.is_file():
        return
    temp = files.previous.with_name(f"{files.previous.name}.tmp-{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        try:
            os.link(files.last, temp)
        except OSError:
            shutil.copyfile(files.last, temp)
        os.replace(temp, files.previous)
    except OSError as err:
        with contextlib.suppress(OSError):
            temp.unlink()
        log.warning(
            f"could not keep {files.last} as {files.previous.name} ({err.strerror or err}); "
            f"the fallback checkpoint is older"
        )


def save_last(
    files: NetworkFiles,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    best_acc: float,
    extra: Mapping[str, Any] | None = None,
    acc: float | None = None,
    acc5: float | None = None,
    graft_step_done: bool = True,
) -> None:
    """Everything a resumed run needs after ``epoch`` (grafting included), written atomically; the file
    it replaces becomes ``previous.pt``.

    ``acc``/``acc5`` are this epoch's test top-1/top-5: after the last epoch, the run's final accuracy.
    ``graft_step_done`` is False for a final epoch, which skips the grafting step.
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": epoch,
        "best_acc": best_acc,
        "acc": acc,
        "acc5": acc5,
        "graft_step_done": graft_step_done,
        "rng": capture_rng_state(),
        "extra": dict(extra or {}),
    }
    _keep_as_previous(files)
    save_atomic(state, files.last)


_UNFIT = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _restore(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    restore_rng: bool,
) -> ResumeState:
    """Restore the run from the resumable checkpoint ``path`` or raise :class:`CheckpointError` saying why
    it is unusable (unreadable, another layout, hand-edited values, weights that do not fit or are not
    finite)."""
    state = load_file(path, weights_only=True, advice="it cannot be resumed from")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a resumable checkpoint of this project")
    epoch = state.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise CheckpointError(f"{path} records epoch {epoch!r}, not a finished epoch")
    if not _number(state.get("best_acc")) or not all(
        state.get(k) is None or _number(state[k]) for k in ("acc", "acc5")
    ):
        raise CheckpointError(f"{path} records accuracies that are not finite numbers")
    if not isinstance(state.get("extra") or {}, dict):
        raise CheckpointError(f"{path} records 'extra' entries that are not a dict")
    weights = extract_state_dict(state, source=str(path))
    fresh = unwrap_model(model).state_dict()  # as built: initialised (or pretrained) weights
    problem = state_dict_misfit(fresh, weights) or weights_problem(weights, reference=fresh)
    if problem:
        raise CheckpointError(f"{path} {problem}")
    try:
        unwrap_model(model).load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if restore_rng:
            restore_rng_state(state["rng"])
    except _UNFIT as err:
        raise CheckpointError(f"{path} does not fit this run ({type(err).__name__}: {first_line(err)})") from None
    done = state.get("graft_step_done", True)  # checkpoints of earlier versions: as if grafted
    return ResumeState(
        start_epoch=epoch + 1,
        best_acc=float(state["best_acc"]),
        extra=state.get("extra") or {},
        graft_step_done=bool(done),
        acc=state.get("acc"),
        acc5=state.get("acc5"),
    )


def load_last(
    files: NetworkFiles,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    restore_rng: bool = True,
    num: int = 1,
) -> ResumeState:
    """Restore a run from the newest usable of ``last.pt`` and ``previous.pt``; returns where it continues.

    An unusable last.pt is moved aside (kept for inspection) with a warning. With neither file the run
    starts at epoch 1, unless this network is known to have finished later epochs (see
    :func:`_reached`): then, as when both files are unusable, a :class:`CheckpointError` says how to go
    on (``num``, the ring size, decides the advice).
    """
    problems = []
    for path in (files.last, files.previous):
        if not os.path.lexists(path):
            problems.append(f"{path.name} is missing")
            continue
        try:
            state = _restore(
                path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, restore_rng=restore_rng
            )
        except CheckpointError as err:
            problems.append(str(err))
            log.warning(f"--resume: {err}")
            continue
        if path == files.previous and os.path.lexists(files.last):
            aside = files.set_aside(files.last)
            try:
                os.replace(files.last, aside)
                kept = f"; the unusable file is kept as {aside.name}"
            except OSError:
                kept = ""
            log.warning(
                f"--resume: continuing from {files.previous} (epoch {state.start_epoch - 1}) instead of the "
                f"unusable {files.last.name}{kept}"
            )
        log.info(f"resumed from {path}: epoch {state.start_epoch - 1} done, best {state.best_acc:.2f}")
        return state
    reached, evidence = _reached(files)
    damaged = any(os.path.lexists(path) for path in (files.last, files.previous))
    if not damaged and reached <= 1:
        log.info(f"--resume: no {files.last} yet, starting from epoch 1")
        return ResumeState()
    if num == 1 or reached <= 1:
        advice = f"to train it again from epoch 1, move {files.folder} away and start without --resume"
    else:
        advice = (
            f"its ring has moved on and cannot take it back at epoch 1: restore {files.last} from a backup, "
            f"or start the ring again in a new --s"
        )
    known = f" although it reached epoch {reached} ({', '.join(evidence)})" if reached > 1 else ""
    raise CheckpointError(
        f"--resume: network {files.net} has no usable checkpoint ({'; '.join(problems)}){known}; {advice}"
    )
