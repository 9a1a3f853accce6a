"""The training loop shared by the CIFAR and ImageNet scripts: one epoch of training, evaluation,
and ``fit``, which runs the epochs with the grafting step, logging and checkpoints in between.

One epoch, as the data flows::

    train_one_epoch -> grafter.publish (own pre-graft weights out) -> evaluate (the peer catches up)
    -> best checkpoint -> grafter.graft (peer's weights in) -> epoch line, TensorBoard -> last checkpoint

The last epoch publishes and grafts nothing: its tested weights are the final ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from grafting.distributed import is_distributed
from grafting.errors import GraftingError
from grafting.method.filters import conv_filter_norms
from grafting.method.graft import LayerRecord, unwrap_model
from grafting.ring.grafter import Grafter, GraftReport
from grafting.ring.layout import NetworkFiles
from grafting.train.files import save_best, save_last
from grafting.train.report import INVALID_THRESHOLDS, EpochRecord, RunReporter, coefficient_summary

__all__ = [
    "Criterion",
    "cross_entropy",
    "train_one_epoch",
    "evaluate",
    "fit",
    "EpochStats",
    "NonFiniteLossError",
    "epoch_record",
    "record_grafting_step",
    "paper_filter_norms",
]

log = logging.getLogger(__name__)

# criterion(logits, targets, images) -> (loss to minimise, named parts of it for the logs)
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class Batches(Protocol):
    """What the loops iterate: ``(images, labels)`` batches with a known count (a loader or a list)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


class NonFiniteLossError(GraftingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class EpochHook(Protocol):
    """Something that adds to the loss and learns from each exchange (distillation)."""

    def criterion(self, base: Criterion) -> Criterion:
        """The training criterion to use, built on ``base`` (e.g. cross-entropy plus a distillation term)."""

    def after_exchange(self, report: GraftReport) -> None:
        """Learn from the epoch's grafting step (e.g. take the peer's weights as the next teacher)."""

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume, stored in ``last.pt``."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain criterion: cross-entropy, reported as ``ce``."""
    loss = F.cross_entropy(logits, targets)
    return loss, {"ce": loss}


@dataclass
class EpochStats:
    """Averages over one pass: loss parts, accuracies (%), images per second."""

    loss: float
    top1: float
    top5: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    seconds: float = 0.0


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _stopped_because(what: str, epoch: int) -> NonFiniteLossError:
    """The one-line error for a NaN/inf found in ``epoch``, saying which checkpoint survives."""
    if epoch == 1:
        return NonFiniteLossError(
            f"{what}; stopped before any checkpoint was written: start again with a lower --lr or check the data"
        )
    # --resume keeps the saved settings (--lr included), so a lower --lr needs a fresh run.
    return NonFiniteLossError(
        f"{what}; stopped. The checkpoint of epoch {epoch - 1} is intact: check the data, "
        f"or start a new run (another --s) with a lower --lr"
    )


def _raise_if_nonfinite(first_bad: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad.item())
    if bad >= 0:
        raise _stopped_because(f"the loss became NaN or infinite in epoch {epoch}, batch {bad + 1}", epoch)


def _raise_if_weights_nonfinite(model: nn.Module, epoch: int) -> None:
    """Stop when the last optimizer step of ``epoch`` broke the weights (the loss before it was finite)."""
    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not bool(finite):
        raise _stopped_because(f"the weights became NaN or infinite at the end of epoch {epoch}", epoch)


def train_one_epoch(
    model: nn.Module,
    loader: Batches,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    epoch: int,
    criterion: Criterion = cross_entropy,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    print_freq: int = 100,
) -> EpochStats:
    """Train one epoch, stepping ``scheduler`` every batch.

    Running sums stay on the device, so the GPU is synchronised only every ``print_freq`` batches
    and at the end. A NaN or infinite loss stops training with :class:`NonFiniteLossError` naming
    the epoch and the first bad batch.
    """
    model.train()
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen, start, total = 0, time.perf_counter(), len(loader)
    for batch, (images, targets) in enumerate(loader):
        with _autocast(device, amp_dtype):
            logits = model(images)
            loss, parts = criterion(logits, targets, images)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()

        n = targets.size(0)
        seen += n
        loss_sum += loss.detach().float() * n
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.detach().float() * n
        correct += (logits.argmax(1) == targets).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), batch, first_bad)
        if print_freq > 0 and (batch + 1) % print_freq == 0:
            _raise_if_nonfinite(first_bad, epoch)
            elapsed = time.perf_counter() - start
            text = "".join(f"{k} {float(v) / seen:.4f} " for k, v in sums.items()) if len(sums) > 1 else ""
            log.info(
                f"epoch {epoch} [{batch + 1}/{total}] loss {float(loss_sum) / seen:.4f} {text}"
                f"acc {100.0 * float(correct) / seen:.2f}% "
                f"lr {optimizer.param_groups[0]['lr']:.5f} {seen / elapsed:.0f} img/s"
            )
    _raise_if_nonfinite(first_bad, epoch)
    seconds = time.perf_counter() - start
    parts_avg = {k: float(v) / max(seen, 1) for k, v in sums.items()}
    return EpochStats(
        loss=float(loss_sum) / max(seen, 1),
        top1=100.0 * float(correct) / max(seen, 1),
        parts=parts_avg,
        images_per_s=seen / seconds if seconds > 0 else 0.0,
        seconds=seconds,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Batches, *, amp_dtype: torch.dtype | None = None, topk: tuple[int, ...] = (1, 5)
) -> EpochStats:
    """Loss, top-1 and top-5 accuracy (%) of ``model`` on ``loader`` (one host sync at the end).

    A loader whose ``sharded`` attribute is true holds this rank's part of the set under
    torch.distributed (ImageNet with several GPUs): every rank then evaluates the plain module with
    rank 0's BatchNorm statistics, and the counts are summed over the ranks, so all ranks return
    the numbers of the whole set. ``top5`` is None for 5 classes or fewer, where it is always 100 %.
    """
    sharded = bool(getattr(loader, "sharded", False)) and is_distributed()
    if sharded:
        # The shards differ in length: DDP's per-forward collectives would not line up across ranks.
        model = unwrap_model(model)
        # Under DDP each rank updates BatchNorm statistics from its own batches; rank 0's are the ones saved.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros(len(topk), device=device, dtype=torch.long)
    seen, start, classes = 0, time.perf_counter(), 0
    for images, targets in loader:
        with _autocast(device, amp_dtype):
            logits = model(images)
        classes = logits.size(1)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        k_max = min(max(topk), logits.size(1))
        best = logits.topk(k_max, dim=1).indices
        match = best == targets[:, None]
        hits += torch.stack([match[:, : min(k, k_max)].any(dim=1).sum() for k in topk])
        seen += targets.size(0)
    if sharded:
        totals = torch.cat(
            [loss_sum.double().view(1), hits.double(), torch.tensor([seen], dtype=torch.float64, device=device)]
        )
        torch.distributed.all_reduce(totals)
        loss_sum, hits, seen = totals[0], totals[1:-1], int(totals[-1].item())
    seconds = time.perf_counter() - start
    acc = (100.0 * hits.double() / max(seen, 1)).tolist()
    top5 = acc[1] if len(acc) > 1 and classes > 5 else None
    return EpochStats(
        loss=float(loss_sum) / max(seen, 1),
        top1=acc[0],
        top5=top5,
        images_per_s=seen / seconds if seconds > 0 else 0.0,
        seconds=seconds,
    )


def paper_filter_norms(model: nn.Module) -> torch.Tensor:
    """The l1 norm of every conv filter the paper counts (keys containing ``conv``), in one CPU tensor;
    empty for models whose keys never say ``conv``."""
    return conv_filter_norms(unwrap_model(model).state_dict()).cpu()


def epoch_record(
    epoch: int,
    epochs: int,
    train: EpochStats,
    test: EpochStats,
    *,
    best_acc: float,
    lr: float,
    report: GraftReport,
    model: nn.Module,
    epoch_s: float,
    elapsed_s: float = 0.0,
    eta_s: float = 0.0,
    filter_norms: torch.Tensor | None = None,
) -> EpochRecord:
    """Everything ``epoch`` produced, for the epoch line, metrics.jsonl and TensorBoard. ``filter_norms``
    (from :func:`paper_filter_norms`, computed here when not given) gives the invalid-filter counts."""
    record = EpochRecord(
        epoch=epoch,
        epochs=epochs,
        train_loss=train.loss,
        train_acc=train.top1,
        test_loss=test.loss,
        test_acc=test.top1,
        test_acc5=test.top5,
        best_acc=best_acc,
        lr=lr,
        loss_parts=dict(train.parts),
        train_images_per_s=train.images_per_s,
        test_images_per_s=test.images_per_s,
        epoch_s=epoch_s,
        elapsed_s=elapsed_s,
        eta_s=eta_s,
    )
    record_grafting_step(record, report, paper_filter_norms(model) if filter_norms is None else filter_norms)
    device = next(model.parameters()).device
    if device.type == "cuda":
        record.gpu_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def record_grafting_step(record: EpochRecord, report: GraftReport, filter_norms: torch.Tensor) -> None:
    """Set ``record``'s fields of the grafting step from ``report``, and its invalid-filter counts from
    ``filter_norms`` (:func:`paper_filter_norms` after the step). Also for the record of a run's old final
    epoch, whose grafting step a ring extension runs later."""
    record.grafted, record.source, record.peer = report.grafted, report.source, report.peer
    record.waited_s = report.waited_s
    record.graft_ms = report.graft_ms if report.grafted else None
    record.invalid_touched = report.invalid_touched
    record.alphas, record.entropies, record.peer_entropies, record.filter_weights = {}, {}, {}, {}
    for layer in report.layers:
        if isinstance(layer, LayerRecord):
            record.alphas[layer.key] = layer.alpha
            record.entropies[layer.key] = layer.h_self
            record.peer_entropies[layer.key] = layer.h_peer
        else:
            record.filter_weights[layer.key] = layer.mean_w
    record.alpha_mean, record.alpha_min, record.alpha_max = coefficient_summary(report.alphas)
    record.total_filters = filter_norms.numel()
    record.invalid_filters = (
        {str(t): int((filter_norms < t).sum()) for t in INVALID_THRESHOLDS} if record.total_filters else {}
    )


def fit(
    model: nn.Module,
    train_loader: Any,
    test_loader: Any,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grafter: Grafter,
    files: NetworkFiles | None,
    epochs: int,
    start_epoch: int = 1,
    best_acc: float = 0.0,
    criterion: Criterion = cross_entropy,
    hook: EpochHook | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    print_freq: int = 100,
    reporter: RunReporter | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
) -> float:
    """Train epochs ``start_epoch..epochs`` with grafting after each; returns the best test top-1.

    ``files`` is None on DDP ranks other than 0: they train and receive the grafted weights but
    write nothing. ``reporter`` writes the epoch line, metrics.jsonl and TensorBoard. ``extra_state``
    adds entries to the resumable checkpoint (e.g. a distillation teacher).
    """
    reporter = reporter or RunReporter(None, None)
    loss_fn = hook.criterion(criterion) if hook is not None else criterion
    run_started = time.perf_counter()
    for epoch in range(start_epoch, epochs + 1):
        started = time.perf_counter()
        train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(
            model,
            train_loader,
            optimizer,
            scheduler,
            epoch=epoch,
            criterion=loss_fn,
            amp_dtype=amp_dtype,
            scaler=scaler,
            print_freq=print_freq,
        )
        _raise_if_weights_nonfinite(model, epoch)  # broken weights must reach neither the peer nor last.pt
        final = epoch == epochs
        if not final:
            # Before testing, so the peer's file arrives meanwhile; our own is written during the test pass.
            grafter.publish(model, epoch, background=True)
        test = evaluate(model, test_loader, amp_dtype=amp_dtype)
        if test.top1 > best_acc:
            best_acc = test.top1
            if files is not None:
                save_best(files, model, epoch, test.top1)
        report = grafter.graft(model, epoch) if not final else GraftReport(epoch=epoch)
        if hook is not None:
            hook.after_exchange(report)
        now = time.perf_counter()
        per_epoch_s = (now - run_started) / (epoch - start_epoch + 1)  # this process's pace
        norms = paper_filter_norms(model)
        reporter.epoch(
            epoch_record(
                epoch,
                epochs,
                train,
                test,
                best_acc=best_acc,
                lr=lr,
                report=report,
                model=model,
                epoch_s=now - started,
                elapsed_s=reporter.elapsed_before_s + now - run_started,
                eta_s=per_epoch_s * (epochs - epoch),
                filter_norms=norms,
            ),
            norms,
        )
        if files is not None:
            save_last(
                files,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                epoch=epoch,
                best_acc=best_acc,
                extra=extra_state() if extra_state else None,
                acc=test.top1,
                acc5=test.top5,
                graft_step_done=not final,
            )
    return best_acc
