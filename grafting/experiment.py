"""Everything between "the model and the data exist" and "the run is over", shared by the CIFAR
and ImageNet scripts: optimizer and schedule, mixed precision, the grafter and its lock, the run's
files, resumption, distillation, and the epoch loop."""
from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .distributed import broadcast_from_main, is_distributed
from .distill import Distiller, ModelBuilder, make_distiller
from .errors import UsageError
from .graft import unwrap_model
from .grafter import Grafter
from .log import MetricsWriter
from .loop import EpochHook, fit
from .schedule import dlr_factor, make_scheduler
from .session import ResumeState, load_last, prepare_run_files

__all__ = ["amp_dtype_for", "default_model_builder", "run_ring", "share_resumed_state"]

log = logging.getLogger("grafting")


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the device supports it, else fp16 (which then needs a grad scaler); None when off."""
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def default_model_builder(dataset: str) -> ModelBuilder:
    """How to build a network by name for ``dataset`` (a distillation teacher): the project's CIFAR
    registry for ``cifar*``, torchvision's classification models otherwise."""
    if dataset.startswith("cifar"):
        import models  # the project's CIFAR architectures

        return lambda name, num_classes: models.create(name, num_classes=num_classes)

    def build_torchvision(name: str, num_classes: int) -> nn.Module:
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            raise UsageError(f"--teacher-model: unknown torchvision model '{name}'")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return build_torchvision


def _distiller_from_args(args: argparse.Namespace, model: nn.Module, config: dict[str, Any],
                         build_model: ModelBuilder | None) -> Distiller | None:
    """The --distill hook, its teacher loaded and checked now, before any file of the run is written."""
    mode = getattr(args, "distill", "none")
    if mode == "none":
        return None
    return make_distiller(
        mode, model, teachers=args.teacher, teacher_model=args.teacher_model or config["model"],
        num_classes=config["num_classes"],
        build_model=build_model or default_model_builder(str(config.get("dataset", ""))),
        temperature=args.kd_temperature, weight=args.kd_weight, soften_teacher=args.kd_soften_teacher)


def run_ring(
    args: argparse.Namespace,
    model: nn.Module,
    train_loader: Any,
    test_loader: Any,
    *,
    config: dict[str, Any],
    weight_decay: float,
    momentum: float,
    step_epochs: int,
    rule: str,
    is_main: bool = True,
    hook_factory: Callable[[], EpochHook | None] | None = None,
    build_model: ModelBuilder | None = None,
) -> float:
    """Train network ``args.i`` of ``args.num`` to ``args.epochs``; returns its best test top-1.

    ``model`` is already on its device (wrapped in DDP when several GPUs train it). Only the main
    rank (``is_main``) writes files; the grafter broadcasts grafted weights to the others.
    Without ``hook_factory`` the --distill flags build the hook; ``build_model(name, num_classes)``
    constructs a --teacher-model (default: :func:`default_model_builder` of ``config['dataset']``).
    """
    device = next(model.parameters()).device
    lr = args.lr * (dlr_factor(args.i, args.num) if args.difflr else 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = make_scheduler(optimizer, cosine=args.cos, epochs=args.epochs, iters_per_epoch=len(train_loader),
                               step_epochs=step_epochs)
    amp_dtype = amp_dtype_for(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log.info(f"network {args.i} of {args.num}: {config['model']} on {device}, lr {lr:.4f} "
             f"({'cosine' if args.cos else f'x0.1 every {step_epochs} epochs'}), "
             f"{_grafting_summary(args, rule)}"
             f"{', amp ' + str(amp_dtype).replace('torch.', '') if amp_dtype else ''}")

    # The hook first: a teacher that does not fit fails before the lock, the run files or training.
    hook = hook_factory() if hook_factory else _distiller_from_args(args, model, config, build_model)
    grafter = Grafter(args.s, args.i, args.num, a=args.a, c=args.c, level=args.level, rule=rule,
                      criterion=args.criterion, source=args.source, invalid_threshold=args.invalid_threshold,
                      peer_timeout=args.peer_timeout, keep_all=args.keep_all,
                      meta={"model": config["model"], "num_classes": config["num_classes"]})
    writer = None
    with grafter:
        files = prepare_run_files(args.s, args.i, config, args.resume) if is_main else None
        state = ResumeState()
        if args.resume and files is not None:
            state = load_last(files, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            if hook is not None and state.extra:
                hook.load_state_dict(state.extra)
        if args.resume:  # under DDP only rank 0 read last.pt: the other ranks get the same state from it
            state = share_resumed_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        state = _apply_start_epoch(args, state, scheduler, len(train_loader))
        if isinstance(hook, Distiller):
            hook.sync_ranks()  # under DDP only rank 0 read last.pt: share a resumed peers teacher
        if state.start_epoch > args.epochs:
            log.info(f"nothing to do: {args.epochs} epochs already done (best {state.best_acc:.2f})")
            return state.best_acc
        writer = MetricsWriter(files.tensorboard if files is not None else None)
        try:
            best = fit(model, train_loader, test_loader, optimizer=optimizer, scheduler=scheduler, grafter=grafter,
                       files=files, epochs=args.epochs, start_epoch=state.start_epoch, best_acc=state.best_acc,
                       hook=hook, amp_dtype=amp_dtype, scaler=scaler, print_freq=args.print_freq, writer=writer,
                       extra_state=hook.state_dict if hook is not None else None)
        finally:
            writer.close()
    log.info(f"done: best test accuracy {best:.2f}")
    return best


def _grafting_summary(args: argparse.Namespace, rule: str) -> str:
    """What happens after each epoch, for the start-up line."""
    source = getattr(args, "source", "external")
    if source in ("internal", "noise"):
        text = f"{source} grafting of invalid filters (l1 < {args.invalid_threshold:g})"
    elif args.num == 1:
        text = "no grafting (baseline)"
    elif source == "average":
        text = f"plain averaging of {args.num} networks"
    else:
        text = f"{args.level} grafting, {rule} rule, {args.criterion}"
    distill = getattr(args, "distill", "none")
    return text if distill == "none" else f"{text}, distillation from {distill}"


def share_resumed_state(state: ResumeState, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        scaler: torch.amp.GradScaler | None) -> ResumeState:
    """Give every DDP rank what rank 0 restored from last.pt: weights, optimizer, schedule, scaler, epoch.

    Only rank 0 reads the shared folder; the others receive the restored state dicts with one
    ``broadcast_object_list``. Their random generators are not restored (each rank keeps its own
    seeded stream; the data order does not depend on them). Without torch.distributed nothing happens.
    """
    if not is_distributed():
        return state
    payload = None
    if torch.distributed.get_rank() == 0:
        payload = {"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                   "resume": state}
    payload = broadcast_from_main(payload)
    if torch.distributed.get_rank() != 0:
        unwrap_model(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload["scaler"]:
            scaler.load_state_dict(payload["scaler"])
    return payload["resume"]


def _apply_start_epoch(args: argparse.Namespace, state: ResumeState,
                       scheduler: torch.optim.lr_scheduler.LRScheduler, iters_per_epoch: int) -> ResumeState:
    """--start-epoch (ImageNet script, 1-based): with --resume the resumed epoch wins; without, fresh
    weights start at that epoch with the learning-rate schedule moved on to it."""
    start = getattr(args, "start_epoch", None)
    if start is None or start == state.start_epoch:
        return state
    if args.resume:
        log.warning(f"--start-epoch {start} ignored: --resume continues at epoch {state.start_epoch}")
        return state
    log.warning(f"--start-epoch {start} without --resume: fresh weights start at epoch {start} and the "
                f"learning-rate schedule skips the epochs before it; use --resume to continue a run")
    skipped = (start - 1) * iters_per_epoch
    scheduler.last_epoch = skipped - 1
    with warnings.catch_warnings():  # "scheduler stepped before optimizer": intended, nothing was trained
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return ResumeState(start_epoch=start, best_acc=state.best_acc, extra=state.extra)
