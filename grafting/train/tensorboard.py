"""A run in TensorBoard (``<s>/tb/net<i>/``): per-epoch scalars, the grafting at a glance and the run's settings.

What each epoch adds, besides the scalars of :meth:`EpochRecord.scalars`:

- ``alpha/all_layers`` (``filter_w/all_convs`` at filter level): a histogram of the epoch's coefficients;
- custom scalars (the "Custom Scalars" tab): each layer's entropy next to its peer's, one chart per layer;
- ``filters/l1_norm``: a histogram of the l1 norms of the conv filters the paper counts, and at a few
  points of the run (first epoch, quarters, last) an image of that distribution with the invalid
  filters (l1 below 0.1) in red: the paper's figure of invalid filters, drawn with Pillow (no plotting
  library needed during training).

The settings go in once, as a text table (``settings``) and as hparams, so runs can be compared in the
HParams view. A run on a generated stand-in says so in both.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grafting.data.fake import MARKER_NAME
from grafting.train.report import INVALID_THRESHOLDS, PAPER_THRESHOLD, EpochRecord

__all__ = ["TensorBoardRun", "picture_epochs", "filter_norm_picture", "STAND_IN_NOTE"]

STAND_IN_NOTE = (
    f"GENERATED stand-in data (the data folder holds {MARKER_NAME}), not the real dataset: "
    "the accuracies say nothing about the paper"
)
# Metrics the HParams view shows for each run (the last value of these scalar tags).
HPARAM_METRICS = ("test/acc", "test/best")


def picture_epochs(epochs: int) -> list[int]:
    """The epochs that get an image of the filter norms: the first, the quarters and the last."""
    return sorted({max(1, round(epochs * part)) for part in (0.0, 0.25, 0.5, 0.75, 1.0)})


def _hparam_value(value: Any) -> int | float | str:
    """A value TensorBoard's hparams accept: numbers, or text (switches as 'true'/'false', which torch would
    otherwise store as the numbers 1 and 0)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return value
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _settings_text(settings: Mapping[str, Any]) -> str:
    lines = [f"**{STAND_IN_NOTE}**", ""] if settings.get("generated_data") else []
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in sorted(settings.items())]
    return "\n".join(lines)


def _quiet_writer_thread() -> None:
    """TensorBoard writes the events in a thread of its own. A write that fails there (a full disk) is
    raised again by the writer's next call in the training thread, which stops the run with one line;
    the thread's own traceback on stderr would only repeat it at length. Installed once per process."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard_writer", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.quiet_tensorboard_writer = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoardRun:
    """The TensorBoard event file of one network; ``settings`` are written at once. With ``purge_step``,
    TensorBoard hides the steps from there on that earlier event files of the folder hold (a restarted
    run logs them again)."""

    def __init__(
        self, folder: str | Path, settings: Mapping[str, Any] | None = None, *, purge_step: int | None = None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _quiet_writer_thread()
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        self._layout_written = False
        if settings:
            self._write_settings(settings)

    def _write_settings(self, settings: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("settings", _settings_text(settings), 0)
        # Written into this run (SummaryWriter.add_hparams would start a separate one), so the
        # HParams view pairs the settings with this run's own test accuracy.
        experiment, start, end = hparams(
            {name: _hparam_value(v) for name, v in settings.items()}, dict.fromkeys(HPARAM_METRICS, 0.0)
        )
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)

    def _write_entropy_layout(self, keys: Sequence[str]) -> None:
        """One chart per layer with its own entropy and its peer's (the Custom Scalars tab)."""
        charts = {
            key: ["Multiline", [f"^entropy/{re.escape(key)}$", f"^entropy_peer/{re.escape(key)}$"]] for key in keys
        }
        self.writer.add_custom_scalars({"entropy: own vs peer": charts})
        self._layout_written = True

    def epoch(self, record: EpochRecord, filter_norms: torch.Tensor | None = None) -> None:
        """Everything ``record`` (and the epoch's filter norms) shows in TensorBoard."""
        step = record.epoch
        for name, value in record.scalars().items():
            if value is not None:  # a rewritten record read back from metrics.jsonl holds NaN as None
                self.writer.add_scalar(name, value, step)
        if record.alphas:
            self.writer.add_histogram("alpha/all_layers", np.array(list(record.alphas.values())), step)
        if record.filter_weights:
            self.writer.add_histogram("filter_w/all_convs", np.array(list(record.filter_weights.values())), step)
        if record.peer_entropies and not self._layout_written:
            self._write_entropy_layout(list(record.peer_entropies))
        if filter_norms is not None and filter_norms.numel():
            norms = filter_norms.detach().float().cpu().numpy()
            self.writer.add_histogram("filters/l1_norm", norms, step)
            if step in picture_epochs(record.epochs):
                picture = filter_norm_picture(norms, f"epoch {step}/{record.epochs}")
                self.writer.add_image("filters/l1_norm_distribution", picture, step, dataformats="HWC")
        self.writer.flush()

    def close(self, *, quiet: bool = False) -> None:
        """Flush and close the event file; ``quiet``: after a failed write, whose error was already said."""
        try:
            self.writer.close()
        except OSError:
            if not quiet:
                raise


# ----------------------------------------------------------------------------------------------
# The picture of the filter norms


_WIDTH, _HEIGHT = 560, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 34, 44
_BINS_PER_DECADE = 8
_LOWEST_DECADE = -3  # norms below 0.001 are drawn in the first bin


def filter_norm_picture(norms: np.ndarray, title: str, thresholds: Sequence[float] = INVALID_THRESHOLDS) -> np.ndarray:
    """A histogram of filter l1 norms on a log axis as an RGB uint8 array (H, W, 3).

    Bins below the paper's threshold are red (invalid filters), the others blue; dashed lines mark
    ``thresholds``; the title says how many filters are invalid.
    """
    from PIL import Image, ImageDraw

    norms = np.asarray(norms, dtype=np.float64)
    finite = norms[np.isfinite(norms)]
    top_decade = max(1, math.ceil(math.log10(max(float(finite.max()), 1e-3)))) if finite.size else 1
    edges = np.logspace(_LOWEST_DECADE, top_decade, _BINS_PER_DECADE * (top_decade - _LOWEST_DECADE) + 1)
    counts, _ = np.histogram(np.clip(finite, edges[0], edges[-1]), bins=edges)
    invalid = int((finite < PAPER_THRESHOLD).sum())

    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    span = top_decade - _LOWEST_DECADE

    def x_of(value: float) -> float:
        return _LEFT + plot_w * (math.log10(value) - _LOWEST_DECADE) / span

    peak = max(int(counts.max()), 1) if counts.size else 1
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        if count:
            top = _TOP + plot_h * (1 - count / peak)
            colour = (200, 40, 40) if high <= PAPER_THRESHOLD * (1 + 1e-9) else (60, 110, 180)
            draw.rectangle([x_of(low) + 1, top, x_of(high) - 1, _TOP + plot_h], fill=colour)
    for threshold in thresholds:
        x = x_of(threshold)
        for y in range(_TOP, _TOP + plot_h, 8):
            draw.line([x, y, x, y + 4], fill=(90, 90, 90))
    draw.line([_LEFT, _TOP + plot_h, _LEFT + plot_w, _TOP + plot_h], fill="black")
    draw.line([_LEFT, _TOP, _LEFT, _TOP + plot_h], fill="black")
    for decade in range(_LOWEST_DECADE, top_decade + 1):
        x = x_of(10.0**decade)
        draw.line([x, _TOP + plot_h, x, _TOP + plot_h + 4], fill="black")
        draw.text((x - 12, _TOP + plot_h + 6), f"{10.0**decade:g}", fill="black")
    draw.text(
        (_LEFT, _HEIGHT - 16),
        "filter l1 norm (log scale); red: invalid, dashed: t = " + ", ".join(f"{t:g}" for t in thresholds),
        fill="black",
    )
    draw.text((4, _TOP - 4), f"{peak}", fill="black")
    draw.text((4, _TOP + plot_h - 10), "0", fill="black")
    draw.text((_LEFT, 8), f"{title}: {invalid} of {norms.size} filters have l1 < {PAPER_THRESHOLD:g}", fill="black")
    return np.asarray(image, dtype=np.uint8)
