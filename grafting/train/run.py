"""Everything between "the model and the data exist" and "the run is over", shared by the CIFAR
and ImageNet scripts: optimizer and schedule, mixed precision, the grafter and its lock, the run's
files, resumption, distillation, and the epoch loop."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
from torch import nn

from grafting.data.fake import MARKER_NAME
from grafting.distributed import broadcast_from_main, is_distributed
from grafting.errors import GraftingError, UsageError
from grafting.method.distill import Distiller, ModelBuilder, make_distiller
from grafting.method.graft import unwrap_model
from grafting.ring.grafter import Grafter
from grafting.train.cli import is_out_of_memory, out_of_memory
from grafting.train.config import SCRIPT_WORDING, RunConfig
from grafting.train.files import (
    ResumeState,
    load_last,
    prepare_run_files,
    read_saved_config,
    resolve_resume,
    save_last,
)
from grafting.train.loop import fit, paper_filter_norms, record_grafting_step
from grafting.train.report import RunReporter
from grafting.train.schedule import make_optimizer
from grafting.train.signals import StopRequested

__all__ = ["amp_dtype_for", "run_ring", "share_resumed_state"]

log = logging.getLogger(__name__)


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the device supports it, else fp16 (which then needs a grad scaler); None when off."""
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _distiller(config: RunConfig, model: nn.Module, build_model: ModelBuilder) -> Distiller | None:
    """The --distill hook, its teacher loaded and checked now, before any file of the run is written."""
    return make_distiller(
        config.distill,
        model,
        teachers=config.teacher,
        teacher_model=config.teacher_model or config.model,
        num_classes=config.num_classes,
        build_model=build_model,
        temperature=config.kd_temperature,
        weight=config.kd_weight,
        soften_teacher=config.kd_soften_teacher,
    )


def run_ring(
    config: RunConfig,
    model: nn.Module,
    train_loader: Any,
    test_loader: Any,
    *,
    build_model: ModelBuilder,
    is_main: bool = True,
) -> float:
    """Train network ``config.i`` of ``config.num`` to ``config.epochs``; returns its best test top-1.

    ``config`` holds the resolved settings (graft rule, device, threads ...) and is what config.json
    stores. ``model`` is already on its device (wrapped in DDP when several GPUs train it). Only the
    main rank (``is_main``) writes files; the grafter broadcasts grafted weights to the others.
    ``build_model(name, num_classes)`` constructs a --teacher-model.
    """
    device = next(model.parameters()).device
    optimizer, scheduler = make_optimizer(model, config, len(train_loader))
    lr = optimizer.param_groups[0]["initial_lr"]  # network i's initial lr (dlr), before any schedule step
    amp_dtype = amp_dtype_for(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log.info(
        f"network {config.i} of {config.num}: {config.model} on {device}, lr {lr:.4f} "
        f"({'cosine' if config.cos else f'x0.1 every {config.step_epochs} epochs'}), "
        f"{_grafting_summary(config)}"
        f"{', amp ' + str(amp_dtype).replace('torch.', '') if amp_dtype else ''}"
    )
    if config.generated_data and is_main:
        log.warning(
            f"data: GENERATED stand-in in {config.data} ({MARKER_NAME}), not the real dataset: its "
            f"accuracies say nothing about the paper"
        )

    # --resume auto becomes continue or start, decided by rank 0 (which alone reads the shared folder).
    config = config.replace(resume=_resume_decision(config, is_main))
    # The hook first: a teacher that does not fit fails before the lock, the run files or training.
    hook = _distiller(config, model, build_model)
    # The saved settings (checked now, before anything is written) name the ring a resumed network belongs to.
    saved = read_saved_config(config) if config.resume and is_main else None
    grafter = Grafter(
        config.s,
        config.i,
        config.num,
        model=model,  # checked now (the rule against the model), before anything is written
        a=config.a,
        c=config.c,
        level=config.level,
        rule=config.graft_rule,  # the scripts resolve it from the model before this
        criterion=config.criterion,
        source=config.source,
        invalid_threshold=config.invalid_threshold,
        peer_timeout=config.peer_timeout,
        bn_blend=config.filter_bn_blend,
        keep_all=config.keep_all,
        meta=config.peer_settings(),
        ring=(saved or {}).get("ring"),
        wording=SCRIPT_WORDING,
        check_folder=False,  # prepare_run_files checks it against the networks' own records
    )
    with grafter:
        files = prepare_run_files(config, grafter.ring) if is_main else None
        state = ResumeState()
        if config.resume and files is not None:
            state = load_last(
                files, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, num=config.num
            )
            if hook is not None and state.extra:
                hook.load_state_dict(state.extra)
        if config.resume:  # under DDP only rank 0 read last.pt: the other ranks get the same state from it
            state = share_resumed_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        state = _apply_start_epoch(config, state, scheduler, len(train_loader))
        if hook is not None:
            hook.sync_ranks()  # under DDP only rank 0 read last.pt: share a resumed peers teacher
        if state.start_epoch > config.epochs:
            log.info(f"nothing to do: {config.epochs} epochs already done (best {state.best_acc:.2f})")
            grafter.finish()
            return state.best_acc
        grafter.discard_from(state.start_epoch)  # an interrupted attempt's files of the epochs to come
        reporter = RunReporter(
            files.metrics if files else None,
            files.tensorboard if files else None,
            start_epoch=state.start_epoch,
            settings=dataclasses.asdict(config),
        )
        try:
            if not state.graft_step_done:
                _graft_extended_epoch(
                    state,
                    epochs=config.epochs,
                    grafter=grafter,
                    files=files,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    hook=hook,
                    reporter=reporter,
                )
            best = fit(
                model,
                train_loader,
                test_loader,
                optimizer=optimizer,
                scheduler=scheduler,
                grafter=grafter,
                files=files,
                epochs=config.epochs,
                start_epoch=state.start_epoch,
                best_acc=state.best_acc,
                hook=hook,
                amp_dtype=amp_dtype,
                scaler=scaler,
                print_freq=config.print_freq,
                reporter=reporter,
                extra_state=hook.state_dict if hook is not None else None,
            )
        except StopRequested as stop:
            if files is not None:
                log.warning(f"{stop}: {files.last} keeps the last finished epoch; continue with --resume")
            raise
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            raise GraftingError(
                f"{out_of_memory(err)}; the checkpoints of the finished epochs are intact: continue with --resume "
                f"once other processes have freed the memory (or with fewer --workers), or start a new run in "
                f"another --s with a smaller {config.flag_of('batch_size')}"
            ) from None
        finally:
            reporter.close()
        grafter.finish()  # the exchange files no network needs any more, the heartbeat and the lock
    log.info(f"done: best test accuracy {best:.2f}{' (GENERATED stand-in data)' if config.generated_data else ''}")
    return best


def _resume_decision(config: RunConfig, is_main: bool) -> bool:
    """Whether this network continues its run (:func:`resolve_resume` on rank 0, the same on every rank);
    a plain --resume with nothing to continue stops every rank with rank 0's one-line error."""
    decision: bool | str = False
    if is_main:
        try:
            decision = resolve_resume(config)
        except UsageError as err:
            decision = str(err)
    decision = broadcast_from_main(decision)
    if isinstance(decision, str):
        raise UsageError(decision)
    return decision


def _graft_extended_epoch(
    state: ResumeState,
    *,
    epochs: int,
    grafter: Grafter,
    files: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    hook: Distiller | None,
    reporter: RunReporter,
) -> None:
    """The grafting step of the epoch that was the final one of the run before it was extended to
    ``epochs`` (a final epoch publishes and grafts nothing): publish its weights, graft the peer's, record
    the step in that epoch's record (metrics.jsonl, TensorBoard), save last.pt again."""
    epoch = state.start_epoch - 1
    log.info(f"epoch {epoch} was the last of the run before --epochs grew: grafting it now")
    report = grafter.step(model, epoch)
    if hook is not None:
        hook.after_exchange(report)
    log.info(report.summary())
    record = reporter.recorded(epoch)
    if record is not None:  # it no longer is the final epoch, and it grafted
        norms = paper_filter_norms(model)
        record.epochs = epochs
        record_grafting_step(record, report, norms)
        reporter.rewrite(record, norms)
    elif files is not None:
        log.warning(f"{files.metrics} holds no readable record of epoch {epoch}: its grafting step is not recorded")
    if files is not None:
        save_last(
            files,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            epoch=epoch,
            best_acc=state.best_acc,
            extra=hook.state_dict() if hook is not None else None,
            acc=state.acc,
            acc5=state.acc5,
        )
    state.graft_step_done = True


def _grafting_summary(config: RunConfig) -> str:
    """What happens after each epoch, for the start-up line."""
    if config.source in ("internal", "noise"):
        text = f"{config.source} grafting of invalid filters (l1 < {config.invalid_threshold:g})"
    elif config.num == 1:
        text = "no grafting (baseline)"
    elif config.source == "average":
        text = f"plain averaging of {config.num} networks"
    elif config.source == "filter-entropy":
        text = f"per-filter entropy grafting (entropy < {config.invalid_threshold:g}) from {config.num - 1} networks"
    else:
        text = f"{config.level} grafting, {config.graft_rule} rule, {config.criterion}"
        if config.level == "filter":
            text = f"filter grafting, {config.filter_bn_blend} BatchNorm blend"
    return text if config.distill == "none" else f"{text}, distillation from {config.distill}"


def share_resumed_state(
    state: ResumeState,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> ResumeState:
    """Give every DDP rank what rank 0 restored from last.pt: weights, optimizer, schedule, scaler, epoch.

    Only rank 0 reads the shared folder; the others receive the restored state dicts with one
    ``broadcast_object_list``. Their random generators are not restored (each rank keeps its own
    seeded stream; the data order does not depend on them). Without torch.distributed nothing happens.
    """
    if not is_distributed():
        return state
    payload: dict[str, Any] | None = None
    if torch.distributed.get_rank() == 0:
        payload = {
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "resume": state,
        }
    payload = broadcast_from_main(payload)
    assert payload is not None
    if torch.distributed.get_rank() != 0:
        unwrap_model(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload["scaler"]:
            scaler.load_state_dict(payload["scaler"])
    return payload["resume"]


def _apply_start_epoch(
    config: RunConfig, state: ResumeState, scheduler: torch.optim.lr_scheduler.LRScheduler, iters_per_epoch: int
) -> ResumeState:
    """--start-epoch (ImageNet script, 1-based): with --resume the resumed epoch wins; without, fresh
    weights start at that epoch with the learning-rate schedule moved on to it."""
    start = config.start_epoch
    if start is None or start == state.start_epoch:
        return state
    if config.resume:
        log.warning(f"--start-epoch {start} ignored: --resume continues at epoch {state.start_epoch}")
        return state
    log.warning(
        f"--start-epoch {start} without --resume: fresh weights start at epoch {start} and the "
        f"learning-rate schedule skips the epochs before it; use --resume to continue a run"
    )
    skipped = (start - 1) * iters_per_epoch
    scheduler.last_epoch = skipped - 1
    with warnings.catch_warnings():  # "scheduler stepped before optimizer": intended, nothing was trained
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return ResumeState(start_epoch=start, best_acc=state.best_acc, extra=state.extra)
