"""The ring supervisor: start the N processes of a ring, follow them, stop the ring when one fails, and
say how it ended in one line.

Every network's output is appended to its log, after a header line per start (a resumed network's log
keeps its earlier runs). A network that fails (an exit status other than 0 or the stop signal's) leaves
its peers waiting for it forever, so the supervisor stops them (SIGTERM: they keep their last finished
epoch; SIGKILL after a grace period). A network killed by a stop signal before its handler was
installed counts as stopped, as one that exited with the stop status does, and its log says so.

How a network starts is a parameter (``start``): by default a real process of its command
(:func:`spawn`); anything that returns a :class:`Handle` works, e.g. a warm fork server in the tests.
The nohup queue, ``scripts/quickstart.sh``, ``scripts/bench.py`` and the tests all use this class.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from grafting.train.signals import STOP_SIGNALS, STOPPED_EXIT_CODE

__all__ = [
    "NetworkCommand",
    "Handle",
    "Child",
    "spawn",
    "Outcome",
    "RingResult",
    "RingSupervisor",
    "ring_result_line",
    "now",
]


def now() -> str:
    """The time stamp of the launcher's lines."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class NetworkCommand:
    """How to start network ``net`` of the ring in ``ring``: its command, what it adds to the environment,
    its log, and where it runs (for the header: ``cpu``, ``GPU 0``)."""

    ring: Path
    net: int
    argv: tuple[str, ...]
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    where: str = "cpu"


class Handle(Protocol):
    """What the supervisor needs of a started network (the subset of ``subprocess.Popen`` it uses)."""

    @property
    def pid(self) -> int:
        """The process id."""
        ...

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal), else None."""
        ...

    def poll(self) -> int | None:
        """The exit status if the process has ended, else None (never blocks)."""
        ...

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends (``subprocess.TimeoutExpired`` after ``timeout`` seconds)."""
        ...

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process."""
        ...

    def kill(self) -> None:
        """SIGKILL the process."""
        ...


class Child:
    """A network started as a child process of this one; keeps the process's resource usage
    (``os.wait4``: CPU seconds, peak memory) once it has ended."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.usage: Any = None  # os.struct_rusage once reaped

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), None while it runs."""
        return self.popen.returncode

    def poll(self) -> int | None:
        """Reap the process if it has ended; its exit status, or None while it runs."""
        if self.popen.returncode is None:
            try:
                pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: Popen knows the status
                return self.popen.poll()
            if pid:
                self.popen.returncode, self.usage = os.waitstatus_to_exitcode(status), usage
        return self.popen.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process ends (``subprocess.TimeoutExpired`` after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.popen.args, timeout or 0.0)
            time.sleep(0.02)
        return self.popen.returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless the process has ended (its pid may belong to another process by then)."""
        if self.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


def spawn(command: NetworkCommand) -> Child:
    """Start ``command`` as a child process, its output appended to its log, stdin closed."""
    with open(command.log, "ab") as log:
        popen = subprocess.Popen(
            list(command.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **command.env},
        )
    return Child(popen)


@dataclass
class Outcome:
    """How one network ended: ``finished`` (exit 0), ``stopped`` (by a stop signal), ``failed``, or
    ``ended by the ring`` (the supervisor stopped it because a peer failed)."""

    net: int
    code: int
    kind: str
    seconds: float  # from the start of the ring


def _describe_code(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


@dataclass
class RingResult:
    """How a ring ended: ``finished``, ``failed`` or ``stopped``, each network's outcome, and the line that says so."""

    folder: Path
    status: str
    outcomes: list[Outcome]
    line: str


def ring_result_line(folder: Path) -> str:
    """A finished ring's results in one line: recipe, networks, best and final test top-1 (mean ± std)."""
    from grafting.errors import GraftingError
    from grafting.tools.runs import read_run
    from grafting.tools.summary import summary_rows

    try:
        [row] = summary_rows([read_run(folder)])
    except (GraftingError, OSError, ValueError) as err:
        return f"no results to show ({err})"

    def spread(metric: str) -> str:
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        return "-" if mean is None else f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    stand_in = ", GENERATED stand-in data" if row["generated_stand_in"] else ""
    return (
        f"{row['model']} {row['dataset']} {row['method']}, {row['networks']} network(s), {row['epochs']} epochs "
        f"({row['status']}{stand_in}): best top-1 {spread('best')}, final {spread('final')}"
    )


class RingSupervisor:
    """The networks of one ring, started together and followed until all have ended.

    ``start(command)`` starts one network (default :func:`spawn`); ``say(line)`` reports the ring's
    events (default: print). ``grace_s``: how long a peer stopped because of a failure may take before
    it is killed. ``started_by`` goes into each log's header.
    """

    def __init__(
        self,
        commands: Sequence[NetworkCommand],
        *,
        start: Callable[[NetworkCommand], Handle] = spawn,
        say: Callable[[str], None] = print,
        grace_s: float = 30.0,
        started_by: str = "graft-launch",
    ) -> None:
        if not commands:
            raise ValueError("a ring needs at least one network")
        self.commands = list(commands)
        self.folder = commands[0].ring
        self._start = start
        self._say = say
        self.grace_s = grace_s
        self.started_by = started_by
        self.handles: dict[int, Handle] = {}
        self.outcomes: dict[int, Outcome] = {}
        self._began = 0.0
        self._stopping_since: float | None = None
        self._failed: Outcome | None = None

    # ------------------------------------------------------------------ starting

    def start(self) -> None:
        """Start every network: a header line in its log, then the process; ``<ring>/pids`` lists them."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._began = time.monotonic()
        for command in self.commands:
            command.log.parent.mkdir(parents=True, exist_ok=True)
            shown = " ".join(command.argv)
            with open(command.log, "a") as log:
                print(
                    f"==== {now()} network {command.net} on {command.where}, started by {self.started_by}: {shown}",
                    file=log,
                )
            self.handles[command.net] = self._start(command)
        pids = "".join(
            f"{c.net} {self.handles[c.net].pid} {c.env.get('CUDA_VISIBLE_DEVICES', 'cpu')}\n" for c in self.commands
        )
        (self.folder / "pids").write_text(pids)

    # ------------------------------------------------------------------ following

    @property
    def running(self) -> list[int]:
        """The networks that have not ended yet."""
        return [net for net in self.handles if net not in self.outcomes]

    def poll(self) -> bool:
        """Note the networks that ended; stop the others when one failed or stopped. True once all have ended."""
        for command in self.commands:
            net = command.net
            if net in self.outcomes:
                continue
            code = self.handles[net].poll()
            if code is None:
                continue
            seconds = time.monotonic() - self._began
            if code == 0:
                kind = "finished"
            elif self._stopping_since is not None:
                kind = "ended by the ring"
            elif code == STOPPED_EXIT_CODE or -code in STOP_SIGNALS:
                kind = "stopped"
                if code < 0:  # the signal came before the training script could install its handler
                    with open(command.log, "a") as log:
                        print(
                            f"==== {now()} network {net} stopped by {signal.Signals(-code).name} before its "
                            f"handler was installed; its last finished epoch is kept",
                            file=log,
                        )
            else:
                kind = "failed"
            self.outcomes[net] = Outcome(net, code, kind, seconds)
            if kind in ("failed", "stopped") and self._stopping_since is None:
                # Its peers would wait for it forever: stop them; they keep their last finished epoch.
                self._failed = self.outcomes[net]
                self.stop()
        if self._stopping_since is not None and time.monotonic() - self._stopping_since > self.grace_s:
            for net in self.running:
                self.handles[net].kill()
        return not self.running

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to every network still running (they stop at once, keeping their last finished epoch)."""
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
        for net in self.running:
            with contextlib.suppress(ProcessLookupError):
                self.handles[net].send_signal(sig)

    def wait(self, timeout: float | None = None, poll_s: float = 0.2) -> RingResult:
        """Follow the ring until every network has ended (after ``timeout`` seconds: stop it) and return its result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline and self._stopping_since is None:
                self._say(f"{now()} ring {self.folder} did not finish within {timeout:g} s; stopping it")
                self.stop()
            time.sleep(poll_s)
        return self.result()

    # ------------------------------------------------------------------ the result

    def result(self) -> RingResult:
        """How the ring ended (call it once every network has ended), with its line, which ``say`` reports."""
        outcomes = [self.outcomes[c.net] for c in self.commands if c.net in self.outcomes]
        first = self._failed
        if all(o.kind == "finished" for o in outcomes) and len(outcomes) == len(self.commands):
            status = "finished"
            line = f"{now()} ring {self.folder} finished: {ring_result_line(self.folder)}"
        elif first is not None:
            status = "failed" if first.kind == "failed" else "stopped"
            log = next(c.log for c in self.commands if c.net == first.net)
            said = _last_line(log)
            why = f"network {first.net} of {self.folder} {first.kind} ({_describe_code(first.code)})"
            line = f"{now()} {why}; see {log}" + (f": {said}" if said else "") + "; its ring was stopped"
        else:
            status = "stopped"
            line = f"{now()} ring {self.folder} was stopped"
        self._say(line)
        return RingResult(self.folder, status, outcomes, line)
