"""Everything between "the model and the data exist" and "the run is over", shared by the CIFAR
and ImageNet scripts: optimizer and schedule, mixed precision, the grafter and its lock, the run's
files, resumption, distillation, and the epoch loop."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

import torch
from torch import nn

from .grafter import Grafter
from .log import MetricsWriter
from .loop import EpochHook, fit
from .schedule import dlr_factor, make_scheduler
from .session import ResumeState, load_last, prepare_run_files

__all__ = ["amp_dtype_for", "run_ring"]

log = logging.getLogger("grafting")


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the device supports it, else fp16 (which then needs a grad scaler); None when off."""
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


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
) -> float:
    """Train network ``args.i`` of ``args.num`` to ``args.epochs``; returns its best test top-1.

    ``model`` is already on its device (wrapped in DDP when several GPUs train it). Only the main
    rank (``is_main``) writes files; the grafter broadcasts grafted weights to the others.
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
             f"{'no grafting (baseline)' if args.num == 1 else f'{args.level} grafting, {rule} rule'}"
             f"{', amp ' + str(amp_dtype).replace('torch.', '') if amp_dtype else ''}")

    grafter = Grafter(args.s, args.i, args.num, a=args.a, c=args.c, level=args.level, rule=rule,
                      criterion=args.criterion, peer_timeout=args.peer_timeout, keep_all=args.keep_all,
                      meta={"model": config["model"], "num_classes": config["num_classes"]})
    writer = None
    with grafter:
        files = prepare_run_files(args.s, args.i, config, args.resume) if is_main else None
        hook = hook_factory() if hook_factory else None
        state = ResumeState()
        if args.resume and files is not None:
            state = load_last(files, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            if hook is not None and state.extra:
                hook.load_state_dict(state.extra)
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
