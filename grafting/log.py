"""What a run tells its user: flushed console lines for nohup logs, and TensorBoard scalars."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Mapping

__all__ = ["setup_console", "MetricsWriter"]


def setup_console(tag: str, level: int = logging.INFO) -> logging.Logger:
    """Log lines ``HH:MM:SS [tag] message`` to stdout, flushed line by line (``nohup ... > 1.log``)."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [{tag}] %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger("grafting")


class MetricsWriter:
    """TensorBoard scalars under ``folder``; does nothing when ``folder`` is None (other DDP ranks).

    The writer is created lazily so a run that fails during set-up leaves no event file behind.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = folder
        self._writer = None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write each ``name: value`` at ``step``."""
        if self.folder is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when used

            self._writer = SummaryWriter(str(self.folder))
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
