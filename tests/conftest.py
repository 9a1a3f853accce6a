"""Helpers the test files share: starting the project's scripts as real processes, watching and
stopping them, and the one-line-error check.

Markers (declared in pyproject.toml): ``e2e`` for tests that start processes, ``slow`` for the long ones,
``cuda`` for tests that need a GPU (they skip without one, unless ``GPU_CHECK_REHEARSE=1`` has them
rehearse on the CPU, as ``scripts/gpu_check.sh`` does). ``pytest -m "not e2e"`` runs the unit tests alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CIFAR_SCRIPT = REPO / "grafting_cifar" / "train.py"
IMAGENET_SCRIPT = REPO / "grafting_imagenet" / "train.py"
RUN_TIMEOUT_S = 300.0
# scripts/gpu_check.sh's rehearsal: the ``cuda`` tests run on the CPU instead of skipping.
REHEARSAL = os.environ.get("GPU_CHECK_REHEARSE") == "1"
# The devices of tests that compare the CPU with the GPU: the GPU case is marked ``cuda``, and runs on
# the CPU in a rehearsal on a machine without one.
DEVICES = [
    "cpu",
    pytest.param("cpu" if REHEARSAL and not torch.cuda.is_available() else "cuda", marks=pytest.mark.cuda, id="cuda"),
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where no GPU is visible (they run on the CPU in a rehearsal)."""
    if torch.cuda.is_available() or REHEARSAL:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def in_process_logs() -> Iterator[None]:
    """A script's main() run in this process points the root logger at the console; put pytest's handlers
    back afterwards (see :func:`script_state`)."""
    with script_state():
        yield


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


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout importable, single-threaded math libraries (the
    test machine has 2 cores and a ring runs several processes at once), plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


@dataclass
class Proc:
    """A process started by a test; its stdout and stderr go to files so the test can watch them while it runs."""

    name: str
    process: subprocess.Popen
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


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """Kill what a failed test left running: a network whose peer died waits for it forever."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def start_process(
    argv: Sequence[str],
    workdir: Path,
    name: str,
    *,
    env: dict[str, str] | None = None,
    merge_output: bool = False,
    output: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Proc:
    """Start ``argv`` in ``workdir`` with ``child_env()`` (or ``env``); output goes to
    ``workdir/logs/<name>.out`` and ``.err`` (one file with ``merge_output``; both to ``output`` when given)."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = output or logs / f"{name}.out"
    err = out if merge_output or output else logs / f"{name}.err"
    merge_output = merge_output or output is not None
    with open(out, "w") as out_file, open(err, "a") as err_file:
        process = subprocess.Popen(
            list(argv),
            cwd=workdir,
            stdout=out_file,
            stderr=subprocess.STDOUT if merge_output else err_file,
            env=env or child_env(),
            preexec_fn=preexec_fn,
        )
    _started.append(process)
    return Proc(name, process, out, err)


def start_script(script: Path, flags: Sequence[str], workdir: Path, name: str, **kwargs) -> Proc:
    """Start a training script (``CIFAR_SCRIPT`` or ``IMAGENET_SCRIPT``) with ``flags``; see :func:`start_process`."""
    return start_process([sys.executable, str(script), *flags], workdir, name, **kwargs)


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


def one_line(text: str) -> str:
    """The single line of ``text``; fails when there are more (or none)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {len(lines)}:\n{text}"
    return lines[0]


# ----------------------------------------------------------------------------------------------
# The experiment scripts (scripts/*.sh), planned by the launcher in this process

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


def plan_script(script: str | Path, cwd: Path, **settings: str):
    """The launcher's checked plan (grafting.launch.plan.Plan) of an experiment script with ``settings``, in this
    process: bash prints the script's rings (``X.sh --rings``), the launcher plans them. ``cwd`` gets the data
    folders."""
    from grafting.launch.cli import plan_experiment, script_rings

    data_folders(cwd)
    path = str(script if isinstance(script, Path) else REPO / "scripts" / script)
    env = script_environment(**settings)
    return plan_experiment(path, script_rings(path, env, cwd), env, cwd)


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
