"""LAUNCHER=nohup: the rings run as processes on this machine, queued until their GPUs are free.

Each network gets a slot: a group of GPUS_PER_NET GPU ids (``CUDA_VISIBLE_DEVICES``), taken round-robin
from the least busy, JOBS_PER_GPU networks per group; or the CPU. A ring starts only when all its networks
fit under MAX_JOBS (a ring larger than that runs alone, its networks sharing the slots round-robin): its
networks wait for each other every epoch. The queue prints each ring's result line when it ends, runs the
follow-up commands once every ring has finished well, and exits 1 when a ring failed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from grafting.errors import UsageError
from grafting.launch.plan import Plan, PlannedRing
from grafting.launch.rings import quote
from grafting.launch.settings import Settings
from grafting.launch.supervisor import Handle, NetworkCommand, RingSupervisor, now, spawn

__all__ = ["slots", "max_jobs", "check_gpus", "dry_lines", "Queue", "most_at_once"]


def slots(settings: Settings) -> list[str]:
    """What one network runs on: groups of GPUS_PER_NET GPU ids ("0" or "0,1"), or "cpu"."""
    if settings.gpus is None:
        return ["cpu"]
    size = settings.gpus_per_net
    return [",".join(settings.gpus[k : k + size]) for k in range(0, len(settings.gpus) - size + 1, size)]


def max_jobs(settings: Settings) -> int:
    """Networks running at once: MAX_JOBS, else every slot JOBS_PER_GPU times (on the CPU: one ring at a time)."""
    return settings.max_jobs or len(slots(settings)) * settings.jobs_per_gpu


def check_gpus(settings: Settings) -> str | None:
    """Every id in GPUS must be a GPU of this machine, as far as nvidia-smi can tell; a warning where it cannot."""
    if settings.gpus is None:
        return None
    if shutil.which("nvidia-smi") is None:
        return (
            f"nvidia-smi not found, so GPUS={settings.values['GPUS']} is not checked; on a machine without GPUs "
            f"use GPUS=cpu"
        )
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise UsageError(
            f"nvidia-smi failed ({said[0] if said else f'exit {done.returncode}'}); check the GPU driver, "
            f"or use GPUS=cpu"
        )
    listed = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    for gpu in settings.gpus:
        if gpu.isdigit() and gpu not in listed:  # a UUID or MIG name: CUDA resolves it
            raise UsageError(
                f"GPUS={settings.values['GPUS']}: this machine has no GPU {gpu} (nvidia-smi lists "
                f"{','.join(listed) or 'none'}); set GPUS to those ids, or GPUS=cpu"
            )
    if len(settings.gpus) % settings.gpus_per_net:
        return (
            f"GPUS lists {len(settings.gpus)} GPUs, not a multiple of GPUS_PER_NET={settings.gpus_per_net}; "
            f"the rest stay idle"
        )
    return None


class _Slots:
    """How many networks each slot runs; hands out the least busy (ties: the first), which is round-robin."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.load = [0] * len(names)

    def take(self) -> int:
        best = min(range(len(self.names)), key=lambda k: (self.load[k], k))
        self.load[best] += 1
        return best

    def give(self, index: int) -> None:
        self.load[index] -= 1


def _command(plan: Plan, ring: PlannedRing, net: int, slot: str) -> NetworkCommand:
    env = {} if slot == "cpu" else {"CUDA_VISIBLE_DEVICES": slot}
    where = "cpu" if slot == "cpu" else f"GPU {slot}" if "," not in slot else f"GPUs {slot}"
    return NetworkCommand(
        ring=ring.folder,
        net=net,
        argv=(*plan.program(), *ring.network_args(net)),
        log=ring.folder / f"{net}.log",
        env=env,
        where=where,
    )


@dataclass
class _Step:
    """One step of the queue: a ring that starts (after the rings above have ended, when ``waits``)."""

    ring: PlannedRing
    waits: bool
    commands: list[NetworkCommand]


def _schedule(plan: Plan) -> Iterator[_Step]:
    """The queue's order, as if every ring it waits for had ended by the time it starts (DRY=1 and the banner)."""
    names, limit = slots(plan.settings), max_jobs(plan.settings)
    load, running = _Slots(names), 0
    for ring in plan.runnable:
        waits = running > 0 and running + ring.num > limit
        if waits:
            load, running = _Slots(names), 0
        commands = [_command(plan, ring, net, names[load.take()]) for net in range(1, ring.num + 1)]
        running += ring.num
        yield _Step(ring, waits, commands)


def most_at_once(plan: Plan) -> int:
    """The most training processes that run at the same time."""
    most = running = 0
    for step in _schedule(plan):
        running = (0 if step.waits else running) + step.ring.num * plan.procs_per_net
        most = max(most, running)
    return most


def dry_lines(plan: Plan) -> list[str]:
    """The commands of the plan, one per line, each pasteable as it is (it creates its ring's folder)."""
    lines = []
    for ring in plan.rings:
        if ring.skipped:
            lines.append(f"# skipped {ring.folder}: {ring.skipped}")
    for step in _schedule(plan):
        if step.waits:
            limit = max_jobs(plan.settings)
            lines.append(f"# queued: starts when the rings above have finished (MAX_JOBS={limit} networks at a time)")
        for command in step.commands:
            env = [f"{name}={value}" for name, value in command.env.items()]
            run = quote([*env, "nohup", *command.argv])
            lines.append(f"mkdir -p {quote([str(step.ring.folder)])} && {run} >> {quote([str(command.log)])} 2>&1 &")
    for after in plan.after:
        lines.append("# once every ring above has finished well:")
        lines.append(f"cd {quote([str(after.cwd)])} && {quote([plan.settings.python, *after.argv])}")
    return lines


class Queue:
    """The rings of a plan, started as their slots free up and followed to the end.

    ``start`` starts one network (see :class:`RingSupervisor`); ``say`` reports (default: print, which goes
    to queue.log when the queue runs in the background); ``results`` is the command that shows the results.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        start: Callable[[NetworkCommand], Handle] = spawn,
        say: Callable[[str], None] = print,
        results: str = "",
    ) -> None:
        self.plan = plan
        self._start = start
        self._say = say
        self.results = results
        self.failed: list[str] = []
        self._load = _Slots(slots(plan.settings))
        self._active: list[tuple[RingSupervisor, list[int]]] = []

    def _running(self) -> int:
        return sum(len(sup.commands) for sup, _ in self._active)

    def _reap(self) -> None:
        for sup, taken in list(self._active):
            if sup.poll():
                result = sup.result()
                if result.status != "finished":
                    self.failed.append(str(sup.folder))
                for index in taken:
                    self._load.give(index)
                self._active.remove((sup, taken))

    def _wait(self, until: Callable[..., bool]) -> None:
        while True:
            self._reap()
            if until():
                return
            time.sleep(self.plan.settings.poll)

    def run(self) -> int:
        """Start and follow every ring; 0 when all finished, 1 when one failed or was stopped."""
        limit = max_jobs(self.plan.settings)
        for ring in self.plan.rings:
            if ring.skipped:
                self._say(f"{now()} skipping {ring.folder}: {ring.skipped}")
                continue
            self._wait(lambda need=ring.num: not self._active or self._running() + need <= limit)
            taken = [self._load.take() for _ in range(ring.num)]
            names = self._load.names
            commands = [_command(self.plan, ring, net, names[k]) for net, k in zip(range(1, ring.num + 1), taken)]
            supervisor = RingSupervisor(
                commands, start=self._start, say=self._say, started_by=self.plan.settings.script
            )
            self._say(f"{now()} starting {ring.folder}: {ring.num} network(s)")
            supervisor.start()
            for command in commands:
                pid = supervisor.handles[command.net].pid
                self._say(f"  net {command.net} on {command.where}, pid {pid}: {quote(list(command.argv))}")
            shown = quote([str(ring.folder)])
            self._say(f"  follow: tail -f {shown}/*.log    stop: kill $(cut -d' ' -f2 {shown}/pids)")
            self._active.append((supervisor, taken))
        self._wait(lambda: not self._active)
        for after in self.plan.after:
            argv = [self.plan.settings.python, *after.argv]
            if self.failed:
                self._say(f"{now()} not running {quote(argv)}: a ring did not finish")
                continue
            self._say(f"{now()} running: {quote(argv)}")
            done = subprocess.run(argv, cwd=after.cwd)
            if done.returncode:
                self._say(f"{now()} the command above failed (exit {done.returncode})")
        self._say(f"{now()} all rings finished; results: {self.results}")
        if self.failed:
            self._say(f"failed rings: {' '.join(self.failed)}")
            return 1
        return 0
