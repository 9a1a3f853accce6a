"""The test tiers, checked: a pytest plugin that watches what each test does and fails a test whose markers
say otherwise. ``conftest.py`` registers it.

- ``e2e``: the test starts a process (a new interpreter, a shell script, a fork of the warm fork server), itself
  or through a fixture it uses. Seen through the interpreter's audit events (``subprocess.Popen``, ``os.fork``,
  ``os.system``, ... and the fork server's own ``tests.forkserver.popen``).
- ``slurm``: one of those processes is a Slurm command or ``scripts/ci/local_slurm.sh``.
- ``rehearsal``: one of them is the GPU check (``scripts/gpu_check.sh``), whose rehearsal runs on the CPU.
- ``slow``: the test costs more than about ten seconds on a 2-core machine when run alone. What it costs is
  counted from its own set-up and call plus the set-up of every shared (module or session) fixture it uses, so
  the answer does not depend on which test happened to set a fixture up first. Unmarked, it fails above
  :data:`UNMARKED_CPU_S` CPU-seconds (its own, its children's and its forked processes'): CPU time hardly
  grows with the machine's load, unlike wall time. Marked, it fails below :data:`MARKED_WALL_S` seconds of
  wall time, which load only makes longer.

Only passing tests are judged: a failure or a skip says nothing about what the test would have done.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

PROCESS_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.posix_spawn",
        "os.spawn",
        "os.exec",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
        "tests.forkserver.popen",
    }
)
FORKED_EXIT_EVENT = "tests.forkserver.exit"  # a forked process has exited; its argument is its CPU-seconds
SLURM_COMMANDS = frozenset({"sbatch", "srun", "salloc", "squeue", "scontrol", "scancel", "sacct", "sinfo", "sstat"})
UNMARKED_CPU_S = 20.0  # ten seconds on both cores: more than that needs @pytest.mark.slow
MARKED_WALL_S = 2.0  # a test marked slow that ends sooner on a loaded machine is not slow


@dataclass
class Usage:
    """What a test or a fixture's set-up did: the commands it started, its wall and CPU seconds."""

    commands: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    forked_cpu_s: float = 0.0  # reported by the fork server as its processes exit

    def add(self, other: Usage) -> None:
        self.commands += other.commands
        self.wall_s += other.wall_s
        self.cpu_s += other.cpu_s
        self.forked_cpu_s += other.forked_cpu_s


def _cpu_s() -> float:
    """CPU-seconds of this process (every thread) and of its children that have been waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class _Clock:
    """Measures a stretch of the run into a :class:`Usage`, leaving out the stretches measured inside it
    (a shared fixture set up during a test counts for the fixture, not for the test)."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage
        self.nested_wall = self.nested_cpu = 0.0

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.monotonic(), _cpu_s()
        _open.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _open.remove(self)
        wall, cpu = time.monotonic() - self.wall, _cpu_s() - self.cpu
        self.usage.wall_s += wall - self.nested_wall
        self.usage.cpu_s += cpu - self.nested_cpu
        if _open:
            _open[-1].nested_wall += wall
            _open[-1].nested_cpu += cpu


_open: list[_Clock] = []  # the clocks running now, innermost last
_shared: dict[int, Usage] = {}  # id(fixturedef) of a module or session fixture -> what its set-up did
_tests: dict[str, Usage] = {}  # nodeid -> what the test did itself (set-up and call)


def _command(event: str, args: tuple[Any, ...]) -> str:
    """The command line an audit event starts, as one string (the event's name for a bare fork)."""
    argv: Any = event
    if event == "subprocess.Popen":
        argv = args[1]
    elif event in ("tests.forkserver.popen", "os.system"):
        argv = args[0]
    elif event in ("os.posix_spawn", "os.exec"):
        argv = args[1]
    elif event == "os.spawn":
        argv = args[2]
    if isinstance(argv, (list, tuple)):
        return " ".join(os.fsdecode(arg) if isinstance(arg, bytes) else str(arg) for arg in argv)
    return os.fsdecode(argv) if isinstance(argv, bytes) else str(argv)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _open:
        return
    if event in PROCESS_EVENTS:
        command = _command(event, args)
        for clock in _open:  # a fixture's processes are the test's too while the test sets it up
            clock.usage.commands.append(command)
    elif event == FORKED_EXIT_EVENT:
        _open[-1].usage.forked_cpu_s += float(args[0])


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _Clock(_tests.setdefault(item.nodeid, Usage())):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _Clock(_tests.setdefault(item.nodeid, Usage())):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Iterator[Any]:
    if fixturedef.scope == "function":  # the test's own: counted with the test
        return (yield)
    with _Clock(_shared.setdefault(id(fixturedef), Usage())):
        return (yield)


def usage_of(item: pytest.Item) -> Usage:
    """What running the test alone would do: its own set-up and call, and the set-up of every shared fixture
    it uses (whenever that was set up)."""
    total = Usage()
    total.add(_tests.get(item.nodeid, Usage()))
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    for fixturedefs in fixtureinfo.name2fixturedefs.values() if fixtureinfo else []:
        for fixturedef in fixturedefs:
            shared = _shared.get(id(fixturedef))
            if shared is not None:
                total.add(shared)
    return total


def marker_errors(marked: set[str], usage: Usage) -> list[str]:
    """What is wrong with a passing test's markers ``marked``, given what it did."""
    errors = []

    def rule(marker: str, does: bool, what: str) -> None:
        if does and marker not in marked:
            errors.append(f"it {what} but is not marked @pytest.mark.{marker}")
        elif marker in marked and not does:
            errors.append(f"it is marked @pytest.mark.{marker} but never {what.split(' (')[0]}")

    commands = usage.commands
    first = f" (the first: {commands[0][:300]})" if commands else ""
    rule("e2e", bool(commands), f"starts processes{first}")
    slurm = [c for c in commands if os.path.basename(c.split(" ")[0]) in SLURM_COMMANDS or "local_slurm.sh" in c]
    rule("slurm", bool(slurm), "starts Slurm commands (local_slurm.sh, sbatch, ...)")
    rule("rehearsal", any("gpu_check.sh" in c for c in commands), "starts the GPU check (gpu_check.sh)")
    cpu = usage.cpu_s + usage.forked_cpu_s
    if "slow" not in marked and cpu > UNMARKED_CPU_S:
        errors.append(
            f"it used {cpu:.0f} CPU-seconds (more than {UNMARKED_CPU_S:.0f}: over ten seconds on two cores, "
            f"shared fixtures included) but is not marked @pytest.mark.slow"
        )
    if "slow" in marked and usage.wall_s < MARKED_WALL_S:
        errors.append(
            f"it is marked @pytest.mark.slow but took {usage.wall_s:.1f} s, shared fixtures included "
            f"(less than {MARKED_WALL_S:.0f})"
        )
    return errors


_cpu_by_test: dict[str, float] = {}  # nodeid -> CPU-seconds as judged for ``slow``, for the summary


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when == "call" and report.passed:
        usage = usage_of(item)
        _cpu_by_test[item.nodeid] = usage.cpu_s + usage.forked_cpu_s
        errors = marker_errors({mark.name for mark in item.iter_markers()}, usage)
        if errors:
            report.outcome = "failed"
            report.longrepr = f"{item.nodeid}: wrong markers: " + "; ".join(errors)
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """With ``--durations=N``, also the N tests that cost the most CPU-seconds (shared fixtures included): the
    measure of ``slow`` that the machine's load hardly changes."""
    count = config.option.durations
    if count is None or not _cpu_by_test:
        return
    ranked = sorted(_cpu_by_test.items(), key=lambda pair: -pair[1])[: count or None]
    terminalreporter.write_sep("=", f"most CPU-seconds {count or ''} (slow: above {UNMARKED_CPU_S:.0f} unmarked)")
    for nodeid, cpu in ranked:
        terminalreporter.write_line(f"{cpu:6.1f} CPU-s  {nodeid}")


def pytest_runtest_logfinish(nodeid: str, location: Sequence[object]) -> None:
    _tests.pop(nodeid, None)
