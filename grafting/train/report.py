"""What a run reports after each epoch, from one record: the epoch line of the console (for ``nohup``
logs), one JSON object in ``<s>/net<i>/metrics.jsonl`` (for tools, tests and the benchmark) and
TensorBoard scalars.

``metrics.jsonl`` holds one object per finished epoch, in order; a resumed run first drops the
records of the epochs it is about to repeat, so every epoch appears once. Its keys are the fields of
:class:`EpochRecord`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafting.checkpoint import write_text_atomic

__all__ = ["EpochRecord", "RunReporter", "read_metrics"]

log = logging.getLogger(__name__)


@dataclass
class EpochRecord:
    """Everything one epoch of one network produced: losses, accuracies, the grafting step, speed.

    Accuracies are in %, ``lr`` is the learning rate at the start of the epoch, ``graft_ms`` is None when
    the epoch did not graft (the final epoch, a baseline), ``alphas``/``entropies``/``peer_entropies``
    are per scoring key (layer level), ``filter_weights`` the mean channel weight per conv (filter
    level), ``invalid_filters`` the paper's count at each threshold (key: the threshold as text).
    """

    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    best_acc: float
    lr: float
    test_acc5: float | None = None
    loss_parts: dict[str, float] = field(default_factory=dict)
    grafted: bool = False
    source: str = "external"
    peer: int | None = None
    waited_s: float = 0.0
    graft_ms: float | None = None
    invalid_touched: int | None = None
    train_images_per_s: float = 0.0
    test_images_per_s: float = 0.0
    epoch_s: float = 0.0
    gpu_memory_gib: float | None = None
    alphas: dict[str, float] = field(default_factory=dict)
    entropies: dict[str, float] = field(default_factory=dict)
    peer_entropies: dict[str, float] = field(default_factory=dict)
    filter_weights: dict[str, float] = field(default_factory=dict)
    invalid_filters: dict[str, int] = field(default_factory=dict)
    total_filters: int = 0

    def line(self, tag: str = "") -> str:
        """The epoch line of the console."""
        parts = " ".join(f"{k} {v:.4f}" for k, v in self.loss_parts.items()) if len(self.loss_parts) > 1 else ""
        top5 = f" top5 {self.test_acc5:.2f}" if self.test_acc5 is not None else ""
        if self.grafted:
            graft = f"wait {self.waited_s:.1f} s | graft {self.graft_ms:.1f} ms"
        else:
            graft = "no graft (last epoch)" if self.epoch == self.epochs else "no graft"
        touched = f" | touched {self.invalid_touched} invalid" if self.invalid_touched is not None else ""
        memory = f" | mem {self.gpu_memory_gib:.2f} GiB" if self.gpu_memory_gib is not None else ""
        return (f"{tag}epoch {self.epoch}/{self.epochs} | train loss {self.train_loss:.4f} acc {self.train_acc:.2f}"
                f"{' (' + parts + ')' if parts else ''} | test loss {self.test_loss:.4f} acc {self.test_acc:.2f}{top5} "
                f"| best {self.best_acc:.2f} | lr {self.lr:.5f} | {graft}{touched} "
                f"| {self.train_images_per_s:.0f} img/s (test {self.test_images_per_s:.0f}){memory}")

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars, by tag."""
        values = {"train/loss": self.train_loss, "train/acc": self.train_acc, "test/loss": self.test_loss,
                  "test/acc": self.test_acc, "lr": self.lr, "speed/train_img_per_s": self.train_images_per_s,
                  "speed/test_img_per_s": self.test_images_per_s}
        values.update({f"train/{k}": v for k, v in self.loss_parts.items()})
        if self.test_acc5 is not None:
            values["test/acc5"] = self.test_acc5
        if self.grafted:
            values.update({"graft/wait_s": self.waited_s, "graft/ms": self.graft_ms or 0.0})
        if self.invalid_touched is not None:  # noise or internal grafting (docs/METHOD.md §9)
            values["graft/invalid_touched"] = self.invalid_touched
        values.update({f"alpha/{k}": v for k, v in self.alphas.items()})
        values.update({f"entropy/{k}": v for k, v in self.entropies.items()})
        values.update({f"filter_w/{k}": v for k, v in self.filter_weights.items()})
        values.update({f"invalid_filters/t={t}": n for t, n in self.invalid_filters.items()})
        return values

    def to_json(self) -> str:
        """One line of ``metrics.jsonl`` (NaN and infinities as null, so every reader can parse it)."""
        return json.dumps(_finite(dataclasses.asdict(self)), sort_keys=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order ([] when it does not exist); a line that does not
    parse (cut off by a crash mid-write) ends the list."""
    records = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break
        if isinstance(record, dict):
            records.append(record)
    return records


class RunReporter:
    """Writes each :class:`EpochRecord` to the console, ``metrics.jsonl`` and TensorBoard.

    ``metrics`` and ``tensorboard`` are None on DDP ranks other than 0 (they log nothing). The TensorBoard
    writer is created lazily so a run that fails during set-up leaves no event file behind.
    """

    def __init__(self, metrics: Path | None, tensorboard: Path | None, *, start_epoch: int = 1, tag: str = "") -> None:
        self.metrics = metrics
        self.tensorboard = tensorboard
        self.tag = tag
        self._writer = None
        if metrics is not None and start_epoch > 1:
            self._drop_from(start_epoch)

    def _drop_from(self, epoch: int) -> None:
        """Forget the records of ``epoch`` and later (a resumed run repeats them)."""
        kept = [r for r in read_metrics(self.metrics) if isinstance(r.get("epoch"), int) and r["epoch"] < epoch]
        write_text_atomic("".join(json.dumps(r) + "\n" for r in kept), self.metrics)

    def epoch(self, record: EpochRecord) -> None:
        """Report one finished epoch."""
        log.info(record.line(self.tag))
        if self.metrics is not None:
            with open(self.metrics, "a") as handle:
                handle.write(record.to_json() + "\n")
        if self.tensorboard is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter  # slow import, only when used

                self._writer = SummaryWriter(str(self.tensorboard))
            for name, value in record.scalars().items():
                self._writer.add_scalar(name, value, record.epoch)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
