"""Stopping a training run on request: the signal a cluster sends before a job's time limit (Slurm's
``--signal=USR1@...``) and SIGTERM (preemption, ``scancel``, ``kill``).

A stop is immediate: the handler raises :class:`StopRequested` in the main thread, where Python runs
signal handlers, so it also ends a ``time.sleep`` in the wait for a peer. Nothing needs saving: every
checkpoint is written atomically after its epoch, so ``last.pt`` keeps the last finished epoch and only
the unfinished one is lost. The script then exits with :data:`STOPPED_EXIT_CODE`, which the Slurm job
script written by ``grafting.launch.slurm`` and the ring supervisor (``grafting.launch.supervisor``) read as
"stopped on request", not failed: the Slurm job requeues itself and resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["STOPPED_EXIT_CODE", "STOP_SIGNALS", "StopRequested", "stop_on_signals"]

# EX_TEMPFAIL of sysexits.h: "temporary failure, try again later". The Slurm job scripts get it from here.
STOPPED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequested(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way up turns it into an ordinary error."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


class _Handler:
    """Raises StopRequested once in the process that installed it; later signals are ignored while the
    run winds down. A forked child (a DataLoader worker) ignores the time-limit signal (its parent
    stops it) and dies of the others as it would without a handler."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.raised = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.owner:
            if signum != signal.SIGUSR1:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.raised:
            return
        self.raised = True
        raise StopRequested(signum)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While inside, each of ``signals`` raises :class:`StopRequested` in the main thread (the first
    one only); the previous handlers come back afterwards. Outside the main thread it does nothing
    (Python can install signal handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _Handler()
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
