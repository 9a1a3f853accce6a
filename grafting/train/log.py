"""The console of a run: flushed log lines for nohup logs."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_console"]


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
