"""What the test files share: the checkout's paths, the devices of CPU/GPU comparisons, starting the
project's scripts as processes, watching and stopping them, and small checks (the one-line error).

The tests import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path``); ``conftest.py`` holds
only fixtures and hooks. ``helpers.published_code`` holds the authors' computations the method tests
compare with, ``helpers.forkserver`` the warm fork server, ``helpers.markers`` the check of the markers.

Starting processes: :func:`start_script` runs a training script as a fork of the warm fork server (the
same process a new interpreter would give, without importing torch again); :func:`start_process` starts
any command as a new process (``fork=True`` for a Python command line through the server), for the tests
that must show a real command line (console commands, installation, torchrun, the documented example);
:func:`popen_forked` is ``subprocess.Popen`` through the server, for code that takes a Popen-like starter.
Every one of them is killed after its test if it still runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import pytest
import torch

from helpers import forkserver

REPO = Path(__file__).resolve().parents[2]
CIFAR_SCRIPT = REPO / "grafting_cifar" / "train.py"
IMAGENET_SCRIPT = REPO / "grafting_imagenet" / "train.py"
# docs/library.md's "own training loop" example, the file the page shows (tests/test_readme_example.py)
OWN_LOOP_EXAMPLE = REPO / "docs" / "examples" / "own_loop.py"
RUN_TIMEOUT_S = 300.0
# scripts/gpu_check.sh's rehearsal: the ``cuda`` tests run on the CPU instead of skipping.
REHEARSAL = os.environ.get("GPU_CHECK_REHEARSE") == "1"
# The devices of tests that compare the CPU with the GPU: the GPU case is marked ``cuda``, and runs on
# the CPU in a rehearsal on a machine without one.
DEVICES = [
    "cpu",
    pytest.param("cpu" if REHEARSAL and not torch.cuda.is_available() else "cuda", marks=pytest.mark.cuda, id="cuda"),
]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout importable, single-threaded math libraries (the
    test machine has 2 cores and a ring runs several processes at once), plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


# What the helpers start: a new interpreter or a fork of the warm fork server, handled alike.
Process = Union[subprocess.Popen, forkserver.ForkedProcess]


@dataclass
class Proc:
    """A process started by a test; its stdout and stderr go to files so the test can watch them while it runs."""

    name: str
    process: Process
    out: Path
    err: Path

    @property
    def log(self) -> str:
        """Everything the process printed on stdout so far (stderr too, when they share a file)."""
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        """Everything the process printed on stderr so far."""
        return self.err.read_text(errors="replace")

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.process.poll()

    def report(self) -> str:
        """Exit status and both outputs, for assertion messages."""
        text = f"--- {self.name} (exit {self.process.poll()}) stdout:\n{self.log}"
        return text if self.err == self.out else f"{text}\n--- stderr:\n{self.stderr}"


_started: list[Process] = []  # every process started and not yet reaped


def kill_leftovers() -> None:
    """Kill and reap every process the helpers started that still runs (a network whose peer died waits
    forever); the fixture ``no_process_outlives_its_test`` calls it after each test."""
    while _started:
        process = _started.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def warm_up() -> None:
    """Start the fork server in the background, so that its imports overlap what runs before the first
    forked process."""
    forkserver.start(child_env())


def popen_forked(args: Sequence[str], **kwargs: Any) -> forkserver.ForkedProcess:
    """``subprocess.Popen(args, **kwargs)`` for a Python command line, forked from the warm fork server
    (:func:`helpers.forkserver.popen`: ``cwd``, ``env``, ``stdin``, ``stdout``, ``stderr``, ``text``); killed after
    the test if it still runs. A drop-in wherever a process-starting function is a parameter."""
    warm_up()
    process = forkserver.popen(args, **kwargs)
    _started.append(process)
    return process


def start_process(
    argv: Sequence[str],
    workdir: Path,
    name: str,
    *,
    env: dict[str, str] | None = None,
    merge_output: bool = False,
    output: Path | None = None,
    logs: Path | None = None,
    fork: bool = False,
    rlimits: Mapping[str, tuple[int, int]] | None = None,
    ignore_signals: Sequence[str] = (),
) -> Proc:
    """Start ``argv`` in ``workdir`` with ``child_env()`` (or ``env``); output goes to ``<logs>/<name>.out`` and
    ``.err`` (``logs`` defaults to ``workdir/logs``; one file with ``merge_output``; both to ``output`` when given).

    ``fork``: a Python command line runs as a fork of the warm fork server (:mod:`helpers.forkserver`, no
    interpreter start, no imports) instead of a new interpreter; the test sees the same process either way.
    ``rlimits`` (``{"RLIMIT_FSIZE": (soft, hard)}``) and ``ignore_signals`` (``["SIGXFSZ"]``) are set in the
    child before it runs.
    """
    logs = logs or workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = output or logs / f"{name}.out"
    err = out if merge_output or output else logs / f"{name}.err"
    merge_output = merge_output or output is not None
    with open(out, "w") as out_file, open(err, "a") as err_file:
        stderr = subprocess.STDOUT if merge_output else err_file
        process: Process
        if fork:
            process = popen_forked(
                argv,
                cwd=workdir,
                env=env or child_env(),
                stdout=out_file,
                stderr=stderr,
                rlimits=rlimits,
                ignore_signals=ignore_signals,
            )
        else:

            def limit() -> None:
                for sig in ignore_signals:
                    signal.signal(getattr(signal, sig), signal.SIG_IGN)
                for limit_name, limits in (rlimits or {}).items():
                    resource.setrlimit(getattr(resource, limit_name), limits)

            process = subprocess.Popen(
                list(argv),
                cwd=workdir,
                stdout=out_file,
                stderr=stderr,
                env=env or child_env(),
                preexec_fn=limit if rlimits or ignore_signals else None,
            )
            _started.append(process)
    return Proc(name, process, out, err)


def start_script(
    script: Path, flags: Sequence[str], workdir: Path, name: str, *, fork: bool = True, **kwargs: Any
) -> Proc:
    """Start a training script (``CIFAR_SCRIPT`` or ``IMAGENET_SCRIPT``) with ``flags``, forked from the warm
    fork server unless ``fork=False`` (a new interpreter); see :func:`start_process`."""
    return start_process([sys.executable, str(script), *flags], workdir, name, fork=fork, **kwargs)


def train_ring(
    script: Path, flags: Sequence[Sequence[str]], workdir: Path, *, timeout: float = RUN_TIMEOUT_S
) -> list[Proc]:
    """Train the networks of one ring side by side under the launcher's ring supervisor
    (:class:`grafting.launch.supervisor.RingSupervisor`), as the experiment scripts do: network i runs
    ``script`` with ``flags[i - 1]``, a fork of the warm fork server in ``workdir``, its stdout in
    ``workdir/logs/net<i>.out`` (after the supervisor's header line) and its stderr in ``.err``. The
    supervisor stops the ring as soon as one network fails (its peers would wait for it) and after
    ``timeout`` seconds; returns a :class:`Proc` per network, ended, for the caller to check. Its own
    record of the ring (``pids``) goes to ``workdir``, so ``--s`` holds only what the networks write."""
    from grafting.launch.supervisor import NetworkCommand, RingSupervisor

    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: dict[int, Proc] = {}

    def start(command: NetworkCommand) -> Process:
        err = command.log.with_suffix(".err")
        with open(command.log, "ab") as out_file, open(err, "ab") as err_file:
            process = popen_forked(
                list(command.argv), stdout=out_file, stderr=err_file, env=child_env(**command.env), cwd=workdir
            )
        procs[command.net] = Proc(command.log.stem, process, command.log, err)
        return process

    commands = [
        NetworkCommand(workdir, net, (sys.executable, str(script), *argv), logs / f"net{net}.out")
        for net, argv in enumerate(flags, start=1)
    ]
    supervisor = RingSupervisor(commands, start=start, say=lambda line: None, started_by="the tests")
    supervisor.start()
    supervisor.wait(timeout)
    return [procs[net] for net in sorted(procs)]


def kill(proc: Proc) -> None:
    """SIGKILL (no clean-up runs: no finally, no atexit, the lock is dropped by the kernel) and reap."""
    if proc.process.poll() is None:
        os.kill(proc.process.pid, signal.SIGKILL)
    proc.process.wait(timeout=30)


def finish(procs: Sequence[Proc], timeout: float = RUN_TIMEOUT_S) -> list[int]:
    """Wait for every process and return their exit codes; kill them all and fail with their logs if one
    takes too long."""
    deadline = time.monotonic() + timeout
    try:
        return [proc.process.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            kill(proc)
        pytest.fail(f"a process did not finish within {timeout:.0f} s:\n" + "\n".join(p.report() for p in procs))


def wait_until(
    condition: Callable[[], bool], what: str, procs: Sequence[Proc], timeout: float = RUN_TIMEOUT_S
) -> float:
    """Poll ``condition`` until true and return the time (monotonic); fail if a process exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        exited = [proc for proc in procs if proc.process.poll() is not None]
        if exited or time.monotonic() > deadline:
            for proc in procs:
                kill(proc)
            reason = "a process exited" if exited else "timed out"
            pytest.fail(f"waiting for {what}: {reason}\n" + "\n".join(proc.report() for proc in procs))
        time.sleep(0.02)
    return time.monotonic()


def set_cifar_label(batch_file: Path, index: int, label: int) -> None:
    """Overwrite label ``index`` of a CIFAR batch file (pickled as the real ones are), e.g. out of range."""
    with open(batch_file, "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    key = "labels" if "labels" in batch else "fine_labels"
    batch[key][index] = label
    with open(batch_file, "wb") as handle:
        pickle.dump(batch, handle)


def same_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Every entry of ``state`` equals (``torch.equal``) the same entry of ``model``'s state_dict."""
    own = model.state_dict()
    return all(torch.equal(own[key], value) for key, value in state.items())


def differing_entries(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors are not ``torch.equal`` in the state dicts ``a`` and ``b`` (their key lists must
    agree, order included)."""
    assert list(a) == list(b)
    return [key for key in a if not torch.equal(a[key], b[key])]


def one_line(text: str) -> str:
    """The single line of ``text``; fails when there are more (or none)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {len(lines)}:\n{text}"
    return lines[0]


def copy_checkout(destination: Path) -> Path:
    """A copy of this checkout's files (tracked, and untracked ones git does not ignore) in ``destination``."""
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    return destination


# ----------------------------------------------------------------------------------------------
# The experiment scripts, planned by the launcher in this process

EXPERIMENTS = sorted(p for p in (REPO / "scripts").glob("*.sh") if "lib/rings.sh" in p.read_text())


def script_environment(**settings: str) -> dict[str, str]:
    """The environment of an experiment script: only what it needs, so that settings a developer exported do
    not leak into the test, plus ``settings``."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **settings}


def data_folders(root: Path) -> None:
    """Empty stand-ins of the folders the launcher checks before it starts anything: ``data/`` with both
    CIFAR folders and ``imagenet/`` with ``train/`` and ``val/`` (the scripts' default DATA)."""
    for folder in ("data/cifar-10-batches-py", "data/cifar-100-python", "imagenet/train", "imagenet/val"):
        (root / folder).mkdir(parents=True, exist_ok=True)


def plan_script(script: str | Path, cwd: Path, **settings: str) -> Any:
    """The launcher's checked plan (grafting.launch.plan.Plan) of an experiment script with ``settings``, in this
    process: bash prints the script's rings (``X.sh --rings``), the launcher plans them. ``cwd`` gets the data
    folders."""
    from grafting.launch.cli import plan_experiment, script_rings

    data_folders(cwd)
    path = str(script if isinstance(script, Path) else REPO / "scripts" / script)
    env = script_environment(**settings)
    return plan_experiment(path, script_rings(path, env, cwd), env, cwd)


# ----------------------------------------------------------------------------------------------
# A script's main() run in this process (or a thread)


@contextlib.contextmanager
def script_state() -> Iterator[None]:
    """Put back the console logging and torch's thread count that scripts run in this process set up."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)


def tensorboard_clock_a_second_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name the TensorBoard event files written from now on as a restart seconds later would. TensorBoard
    names an event file by the second, the process and a per-process counter, and reads a folder's files in
    the order of their names, as text: two starts of a network in one process within one second can be read
    restart first (counter 10 sorts before 9), and the restart's purge then hides its steps. A real restart
    is a new process, seconds later; a test that restarts in this process and reads the TensorBoard steps
    calls this first (instead of sleeping to the next second)."""
    from tensorboard.summary.writer import event_file_writer

    clock = types.SimpleNamespace(time=lambda: time.time() + 1)
    monkeypatch.setattr(event_file_writer, "time", clock)


class VirtualClock:
    """``time.monotonic`` and ``time.sleep`` for code that polls, where sleeping moves the clock on at once: a
    test checks when the code acts and what it says, to the poll, without waiting. The wall clock
    (``time.time``, which file times are compared with) stays real."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        # Any sleep moves the clock on, at least to the next float: a pause below the clock's float step would
        # leave it where it was, and a loop that waits for a deadline would never reach it.
        self.now = max(self.now + max(0.0, seconds), math.nextafter(self.now, math.inf))


def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    """Run the ring's waits (:mod:`grafting.ring.exchange`) on a :class:`VirtualClock` for the rest of the test."""
    from grafting.ring import exchange

    clock = VirtualClock()
    clocks = types.SimpleNamespace(
        monotonic=clock.monotonic, sleep=clock.sleep, time=time.time, perf_counter=time.perf_counter
    )
    monkeypatch.setattr(exchange, "time", clocks)
    return clock


def exit_code_of(main: Callable[[list[str] | None], None], argv: list[str]) -> int:
    """Call a script's ``main`` in this process (or thread); its exit code (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as stopped:
        return stopped.code if isinstance(stopped.code, int) else 1
    return 0


def run_script_here(main: Callable[[list[str] | None], None], argv: list[str]) -> int:
    """:func:`exit_code_of` inside :func:`script_state`."""
    with script_state():
        return exit_code_of(main, argv)
