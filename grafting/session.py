"""One network's own files in the shared folder: configuration, best and resumable last checkpoints.

    <s>/net<i>/config.json   the run's settings, written at the start and checked on --resume
    <s>/net<i>/last.pt       everything needed to resume (model, optimizer, scheduler, epoch, RNG ...)
    <s>/net<i>/best.pt       the weights with the best test accuracy, {'model', 'epoch', 'acc'}
    <s>/tb/net<i>/           TensorBoard events
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import capture_rng_state, extract_state_dict, load_file, restore_rng_state, save_atomic
from .errors import CheckpointError, GraftingError
from .graft import unwrap_model

__all__ = ["RunFiles", "ResumeState", "prepare_run_files", "load_last", "save_last", "save_best", "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "filter-grafting/1"
# Settings that must not change between a run and its resumption: the ring and the recipe depend on them.
# momentum and weight_decay come back from the optimizer's saved state, so a new value would be ignored.
FIXED_ON_RESUME = ("model", "dataset", "num_classes", "num", "i", "level", "graft_rule", "criterion", "source",
                   "invalid_threshold", "difflr", "cos", "lr", "momentum", "weight_decay", "batch_size", "seed",
                   "distill", "teacher_model", "kd_temperature", "kd_weight", "kd_soften_teacher")


@dataclass(frozen=True)
class RunFiles:
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
        return self.folder / "config.json"

    @property
    def last(self) -> Path:
        """The resumable checkpoint of the last finished epoch."""
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        """The weights of the best test accuracy so far."""
        return self.folder / "best.pt"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event folder ``<s>/tb/net<i>``."""
        return self.root / "tb" / f"net{self.net}"


@dataclass
class ResumeState:
    """Where a resumed run continues: the next epoch, the best accuracy so far and extra entries."""

    start_epoch: int = 1
    best_acc: float = 0.0
    extra: dict[str, Any] | None = None


def prepare_run_files(root: str | Path, net: int, config: Mapping[str, Any], resume: bool) -> RunFiles:
    """Create the network's folder and write or check its configuration.

    Without ``resume`` an existing ``last.pt`` is never overwritten (that would lose a run's work);
    with it, the saved configuration must agree on every setting that shapes the run.
    """
    files = RunFiles(Path(root), net)
    if files.last.exists() and not resume:
        raise GraftingError(f"{files.last} already exists; pass --resume to continue that run, or use another --s")
    if resume and files.config.exists():
        try:
            saved = json.loads(files.config.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{files.config} is unreadable ({err}); fix or delete it") from None
        for key in FIXED_ON_RESUME:
            if key in saved and key in config and saved[key] != config[key]:
                raise GraftingError(
                    f"--resume: {key} was {saved[key]!r} in {files.config} but is {config[key]!r} now; "
                    f"resume with the same settings or use another --s"
                )
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
    tmp = files.config.with_suffix(".json.tmp")
    try:
        files.folder.mkdir(parents=True, exist_ok=True)
        _remove_temp_files(files.folder)
        tmp.write_text(text)
        tmp.replace(files.config)
    except OSError as err:
        raise GraftingError(f"could not write {files.config}: {err.strerror or err}; free space or fix the "
                            f"permissions of --s") from None
    return files


def _remove_temp_files(folder: Path) -> None:
    """Delete the half-written files a killed run left (``last.pt.tmp-<pid>`` ...).

    Only the holder of the network's lock calls this, so no live writer owns them.
    """
    for path in folder.iterdir():
        if re.search(r"\.tmp(-\d+)?$", path.name) and path.is_file():
            path.unlink(missing_ok=True)
            log.info(f"removed {path}, left by an interrupted write")


def save_best(files: RunFiles, model: nn.Module, epoch: int, acc: float) -> None:
    """The tested (pre-graft) weights of the best epoch so far."""
    save_atomic({"model": unwrap_model(model).state_dict(), "epoch": epoch, "acc": acc,
                 "format": CHECKPOINT_FORMAT}, files.best)


def save_last(files: RunFiles, *, model: nn.Module, optimizer: torch.optim.Optimizer,
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


def load_last(files: RunFiles, *, model: nn.Module, optimizer: torch.optim.Optimizer,
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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{files.last} does not fit this run ({first}); resume with the same settings") from None
    if restore_rng:
        restore_rng_state(state["rng"])
    log.info(f"resumed from {files.last}: epoch {state['epoch']} done, best {state['best_acc']:.2f}")
    return ResumeState(start_epoch=int(state["epoch"]) + 1, best_acc=float(state["best_acc"]),
                       extra=state.get("extra") or {})
