"""One network's own files in the shared folder: its configuration, and the best and resumable last
checkpoints (their names: :class:`grafting.ring.layout.NetworkFiles`)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from grafting.checkpoint import (capture_rng_state, extract_state_dict, load_file, remove_temp_files,
                                 restore_rng_state, save_atomic, write_text_atomic)
from grafting.errors import CheckpointError, GraftingError, first_line
from grafting.method.graft import unwrap_model
from grafting.ring.layout import NetworkFiles
from grafting.train.config import RunConfig

__all__ = ["ResumeState", "prepare_run_files", "load_last", "save_last", "save_best", "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "filter-grafting/1"
@dataclass
class ResumeState:
    """Where a resumed run continues: the next epoch, the best accuracy so far and extra entries."""

    start_epoch: int = 1
    best_acc: float = 0.0
    extra: dict[str, Any] | None = None


def prepare_run_files(config: RunConfig) -> NetworkFiles:
    """Create network ``config.i``'s folder under ``config.s`` and write or check its configuration.

    Without ``config.resume`` an existing ``last.pt`` is never overwritten (that would lose a run's
    work); with it, the saved configuration must agree on every setting fixed on resume. Call it only
    while holding the network's lock.
    """
    files = NetworkFiles(Path(config.s), config.i)
    if files.last.exists() and not config.resume:
        raise GraftingError(f"{files.last} already exists; pass --resume to continue that run, or use another --s")
    if config.resume and files.config.exists():
        try:
            saved = json.loads(files.config.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{files.config} is unreadable ({err}); fix or delete it") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{files.config} does not hold a settings object; fix or delete it")
        config.check_resume(saved, str(files.config))
    try:
        files.folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GraftingError(f"could not create {files.folder}: {err.strerror or err}; fix the permissions of "
                            f"--s") from None
    remove_temp_files(files.folder)
    write_text_atomic(config.to_json(), files.config)
    return files


def save_best(files: NetworkFiles, model: nn.Module, epoch: int, acc: float) -> None:
    """The tested (pre-graft) weights of the best epoch so far."""
    save_atomic({"model": unwrap_model(model).state_dict(), "epoch": epoch, "acc": acc,
                 "format": CHECKPOINT_FORMAT}, files.best)


def save_last(files: NetworkFiles, *, model: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
              epoch: int, best_acc: float, extra: Mapping[str, Any] | None = None,
              acc: float | None = None, acc5: float | None = None) -> None:
    """Everything a resumed run needs after ``epoch`` (grafting included), written atomically.

    ``acc``/``acc5`` are this epoch's test top-1/top-5: after the last epoch, the run's final accuracy.
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
        "rng": capture_rng_state(),
        "extra": dict(extra or {}),
    }
    save_atomic(state, files.last)


def load_last(files: NetworkFiles, *, model: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
              restore_rng: bool = True) -> ResumeState:
    """Restore a run from ``last.pt``; returns where it continues. No file: a fresh start (logged)."""
    if not files.last.exists():
        log.info(f"--resume: no {files.last} yet, starting from epoch 1")
        return ResumeState()
    state = load_file(files.last, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{files.last} is not a resumable checkpoint of this project; move it away or use another --s")
    try:
        unwrap_model(model).load_state_dict(extract_state_dict(state, source=str(files.last)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{files.last} does not fit this run ({first_line(err)}); resume with the same "
                              f"settings") from None
    if restore_rng:
        restore_rng_state(state["rng"])
    log.info(f"resumed from {files.last}: epoch {state['epoch']} done, best {state['best_acc']:.2f}")
    return ResumeState(start_epoch=int(state["epoch"]) + 1, best_acc=float(state["best_acc"]),
                       extra=state.get("extra") or {})
