"""What a run reports after each epoch, from one record: the epoch line of the console (for ``nohup``
logs), one JSON object in ``<s>/net<i>/metrics.jsonl`` (for tools, tests and the benchmark) and
TensorBoard (:mod:`grafting.train.tensorboard`).

``metrics.jsonl`` holds one object per finished epoch, in order; every start (resumed or fresh) first
drops the records of the epochs it is about to train, left by a process that stopped after reporting an
epoch but before saving it, so every epoch appears once. TensorBoard hides the steps a start repeats
in the same way (``purge_step``). Its keys are the fields of :class:`EpochRecord`, and every number of
the epoch line is one of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from grafting.train.tensorboard import TensorBoardRun

from grafting.checkpoint import parse_json, read_text_file, write_text_atomic
from grafting.errors import CheckpointError, GraftingError, first_line
from grafting.ring.exchange import format_duration

__all__ = ["EpochRecord", "RunReporter", "read_metrics", "coefficient_summary", "PAPER_THRESHOLD", "INVALID_THRESHOLDS"]

log = logging.getLogger(__name__)

# The paper's thresholds of the invalid-filter count (docs/METHOD.md §8); the epoch line shows the first.
INVALID_THRESHOLDS = (0.1, 0.01)
PAPER_THRESHOLD = INVALID_THRESHOLDS[0]
# The most a metrics.jsonl holds: tens of kilobytes per epoch for the deepest networks, a few hundred epochs.
METRICS_FILE_LIMIT = 2**30


def coefficient_summary(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, min, max) of the grafting coefficients of one epoch; (None, None, None) when there are none."""
    if not values:
        return None, None, None
    return sum(values) / len(values), min(values), max(values)


@dataclass
class EpochRecord:
    """Everything one epoch of one network produced: losses, accuracies, the grafting step, speed, time.

    Accuracies are in %, ``lr`` is the learning rate at the start of the epoch (the schedule moves it
    during the epoch), ``graft_ms`` is None when the epoch did not graft (the final epoch, a baseline),
    ``alphas``/``entropies``/``peer_entropies`` are per scoring key (layer level), ``filter_weights`` the
    mean channel weight per conv (filter level); ``alpha_mean``/``alpha_min``/``alpha_max`` summarise
    whichever of the two the epoch has. ``invalid_filters`` is the paper's count (l1 norm below the
    threshold; key: the threshold as text) of ``total_filters`` conv filters after this epoch's graft.
    ``elapsed_s`` counts the run's time from its first epoch (earlier processes of a resumed run
    included, the time between them not), ``eta_s`` estimates the time left from this process's pace.
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
    elapsed_s: float = 0.0
    eta_s: float = 0.0
    gpu_memory_gib: float | None = None
    alpha_mean: float | None = None
    alpha_min: float | None = None
    alpha_max: float | None = None
    alphas: dict[str, float] = field(default_factory=dict)
    entropies: dict[str, float] = field(default_factory=dict)
    peer_entropies: dict[str, float] = field(default_factory=dict)
    filter_weights: dict[str, float] = field(default_factory=dict)
    invalid_filters: dict[str, int] = field(default_factory=dict)
    total_filters: int = 0

    @property
    def final(self) -> bool:
        """Whether this is the run's last epoch (it neither publishes nor grafts)."""
        return self.epoch == self.epochs

    def _graft_text(self) -> str:
        if self.grafted:
            return f"wait {self.waited_s:.1f} s | graft {self.graft_ms:.1f} ms"
        return "no graft (last epoch)" if self.final else "no graft"

    def _coefficient_text(self) -> str:
        if self.alpha_mean is None:
            return ""
        name = "alpha" if self.alphas else "filter w"  # filter level: the mean channel weight per conv
        return f" | {name} mean {self.alpha_mean:.3f} min {self.alpha_min:.3f} max {self.alpha_max:.3f}"

    def _invalid_text(self) -> str:
        invalid = self.invalid_filters.get(str(PAPER_THRESHOLD))
        if invalid is None or not self.total_filters:
            return ""
        return f" | invalid {invalid}/{self.total_filters} (l1 < {PAPER_THRESHOLD:g})"

    def line(self, tag: str = "") -> str:
        """The epoch line of the console."""
        parts = " ".join(f"{k} {v:.4f}" for k, v in self.loss_parts.items()) if len(self.loss_parts) > 1 else ""
        top5 = f" top5 {self.test_acc5:.2f}" if self.test_acc5 is not None else ""
        touched = f" | touched {self.invalid_touched} invalid" if self.invalid_touched is not None else ""
        memory = f" | mem {self.gpu_memory_gib:.2f} GiB" if self.gpu_memory_gib is not None else ""
        eta = "" if self.final else f" | ETA {format_duration(self.eta_s)}"
        return (
            f"{tag}epoch {self.epoch}/{self.epochs} | train loss {self.train_loss:.4f} acc {self.train_acc:.2f}"
            f"{' (' + parts + ')' if parts else ''} | test loss {self.test_loss:.4f} acc {self.test_acc:.2f}{top5} "
            f"| best {self.best_acc:.2f} | lr {self.lr:.5f} (epoch start) | {self._graft_text()}{touched}"
            f"{self._coefficient_text()}{self._invalid_text()} "
            f"| {self.train_images_per_s:.0f} img/s (test {self.test_images_per_s:.0f}){memory} "
            f"| elapsed {format_duration(self.elapsed_s)}{eta}"
        )

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars, by tag."""
        values = {
            "train/loss": self.train_loss,
            "train/acc": self.train_acc,
            "test/loss": self.test_loss,
            "test/acc": self.test_acc,
            "test/best": self.best_acc,
            "lr": self.lr,
            "speed/train_img_per_s": self.train_images_per_s,
            "speed/test_img_per_s": self.test_images_per_s,
            "time/epoch_s": self.epoch_s,
            "time/elapsed_s": self.elapsed_s,
        }
        values.update({f"train/{k}": v for k, v in self.loss_parts.items()})
        if self.test_acc5 is not None:
            values["test/acc5"] = self.test_acc5
        if self.grafted:
            values.update({"graft/wait_s": self.waited_s, "graft/ms": self.graft_ms or 0.0})
        if self.invalid_touched is not None:  # noise or internal grafting (docs/METHOD.md §9)
            values["graft/invalid_touched"] = self.invalid_touched
        if self.alpha_mean is not None and self.alpha_min is not None and self.alpha_max is not None:
            values.update(
                {
                    "graft/coefficient_mean": self.alpha_mean,
                    "graft/coefficient_min": self.alpha_min,
                    "graft/coefficient_max": self.alpha_max,
                }
            )
        values.update({f"alpha/{k}": v for k, v in self.alphas.items()})
        values.update({f"entropy/{k}": v for k, v in self.entropies.items()})
        values.update({f"entropy_peer/{k}": v for k, v in self.peer_entropies.items()})
        values.update({f"filter_w/{k}": v for k, v in self.filter_weights.items()})
        values.update({f"invalid_filters/t={t}": n for t, n in self.invalid_filters.items()})
        return values

    def to_json(self) -> str:
        """One line of ``metrics.jsonl`` (NaN and infinities as null, so every reader can parse it)."""
        return json.dumps(_finite(dataclasses.asdict(self)), sort_keys=False)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> EpochRecord | None:
        """The record a line of ``metrics.jsonl`` holds; None when it lacks a field this version writes
        (another version's, or edited by hand)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not names <= set(values):
            return None
        try:
            return cls(**{name: values[name] for name in names})
        except TypeError:
            return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order ([] when it does not exist); a last line that
    does not parse (cut off by a crash mid-write) is left out. A :class:`CheckpointError` names the file
    when it cannot be read (also: not a regular file, far too large) or a line before the last does not
    parse."""
    text = _metrics_text(Path(path))
    return [] if text is None else _parse_metrics(text, Path(path))


def _metrics_text(path: Path) -> str | None:
    """The text of ``path`` (None when it does not exist)."""
    try:
        return read_text_file(path, max_bytes=METRICS_FILE_LIMIT)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        raise CheckpointError(f"cannot read {path} ({reason}); move it away") from None


def _parse_metrics(text: str, path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = parse_json(line)
        except ValueError as err:
            if number == len(lines) and not text.endswith("\n"):
                break  # cut off by a crash while it was written
            raise CheckpointError(
                f"{path}, line {number} is not a JSON record ({first_line(err)}); fix or delete that line"
            ) from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _write_failed(what: str, err: OSError) -> GraftingError:
    """The one line for a report that could not be written (a full disk, a quota)."""
    return GraftingError(
        f"could not write {what}: {err.strerror or first_line(err)}; the checkpoints of the finished epochs are "
        f"intact: free some space and continue with --resume"
    )


class RunReporter:
    """Writes each :class:`EpochRecord` to the console, ``metrics.jsonl`` and TensorBoard.

    ``metrics`` and ``tensorboard`` are None on DDP ranks other than 0 (they log nothing). ``settings``
    (the run's configuration) goes to TensorBoard as text and as hparams. The TensorBoard writer is
    created lazily so a run that fails during set-up leaves no event file behind.
    """

    def __init__(
        self,
        metrics: Path | None,
        tensorboard: Path | None,
        *,
        start_epoch: int = 1,
        tag: str = "",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.metrics = metrics
        self.tensorboard = tensorboard
        self.tag = tag
        self.settings = dict(settings or {})
        self._board: TensorBoardRun | None = None
        self._first_step = start_epoch  # TensorBoard hides what an earlier start logged from here on
        self._kept: list[dict[str, Any]] = []  # the records of the epochs before start_epoch
        self.elapsed_before_s = 0.0
        if metrics is not None:
            self._drop_from(start_epoch)

    def _drop_from(self, epoch: int) -> None:
        """Forget the records of ``epoch`` and later (this start trains them again); remember how long the
        kept epochs took, so that the elapsed time goes on from there."""
        assert self.metrics is not None
        text = _metrics_text(self.metrics)
        if text is None:
            return
        kept = [r for r in _parse_metrics(text, self.metrics) if isinstance(r.get("epoch"), int) and r["epoch"] < epoch]
        self._kept = kept
        if self._text(kept) != text:  # also drops a line cut off by a crash, before anything is appended to it
            write_text_atomic(self._text(kept), self.metrics)
        last = kept[-1].get("elapsed_s") if kept else None
        if isinstance(last, (int, float)) and math.isfinite(last) and last > 0:
            self.elapsed_before_s = float(last)

    @staticmethod
    def _text(records: Sequence[Mapping[str, Any]]) -> str:
        return "".join(json.dumps(r) + "\n" for r in records)

    def recorded(self, epoch: int) -> EpochRecord | None:
        """The record of ``epoch`` that an earlier start left in metrics.jsonl (None: there is none, or
        one this version cannot read)."""
        found = [r for r in self._kept if r["epoch"] == epoch]
        return EpochRecord.from_json(found[-1]) if found else None

    def rewrite(self, record: EpochRecord, filter_norms: torch.Tensor | None = None) -> None:
        """Put ``record`` in the place of the kept record of its epoch, in metrics.jsonl and in TensorBoard:
        the old final epoch of a run whose grafting step a ring extension runs now. Call it before
        :meth:`epoch`."""
        assert self._board is None, "rewrite() comes before the first epoch() of a start"
        if self.metrics is not None:
            self._kept = [json.loads(record.to_json()) if r["epoch"] == record.epoch else r for r in self._kept]
            write_text_atomic(self._text(self._kept), self.metrics)
        self._first_step = min(self._first_step, record.epoch)  # hide that epoch's old TensorBoard points
        self._show(record, filter_norms)

    def epoch(self, record: EpochRecord, filter_norms: torch.Tensor | None = None) -> None:
        """Report one finished epoch; ``filter_norms`` (the l1 norm of every conv filter the paper counts)
        feeds TensorBoard's picture of the invalid filters. A write that fails (a full disk) stops the run
        with one line before the epoch's checkpoint is saved, so a resumed run reports the epoch again."""
        log.info(record.line(self.tag))
        if self.metrics is not None:
            try:
                with open(self.metrics, "a") as handle:
                    handle.write(record.to_json() + "\n")
            except OSError as err:  # a line cut off here is dropped by the next start
                raise _write_failed(str(self.metrics), err) from None
        self._show(record, filter_norms)

    def _show(self, record: EpochRecord, filter_norms: torch.Tensor | None) -> None:
        """``record`` in TensorBoard."""
        if self.tensorboard is None:
            return
        try:
            if self._board is None:
                from grafting.train.tensorboard import TensorBoardRun  # slow import, only when used

                self._board = TensorBoardRun(self.tensorboard, self.settings, purge_step=self._first_step)
            self._board.epoch(record, filter_norms)
        except OSError as err:
            folder, board = self.tensorboard, self._board
            self.tensorboard = self._board = None  # nothing more goes there in this process
            if board is not None:
                board.close(quiet=True)
            raise _write_failed(f"TensorBoard events in {folder}", err) from None

    def close(self) -> None:
        """Flush and close the TensorBoard event file (every epoch was flushed already: a failure here is
        a warning)."""
        if self._board is not None:
            board, self._board = self._board, None
            try:
                board.close()
            except OSError as err:
                log.warning(f"could not close the TensorBoard events in {self.tensorboard}: {err.strerror or err}")
