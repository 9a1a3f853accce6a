"""The warm fork server gives a test the same process a new interpreter would: the same output, exit status,
signals, threads, descriptors and locks, for the same command line (helpers.forkserver)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import child_env, forkserver, warm_up

# Each case: a Python command line (after the interpreter) and what it prints; run both ways, compared as text.
CASES = {
    "exit-status": ["-c", "import sys; print('out'); sys.exit(3)"],
    "exit-message": ["-c", "import sys; sys.exit('a message on stderr, status 1')"],
    "traceback": ["-c", "def f():\n    raise ValueError('boom')\nf()"],
    "keyboard-interrupt": ["-c", "raise KeyboardInterrupt"],
    "main-module": ["-c", "import sys; print(sorted(vars(sys.modules['__main__'])), __loader__, __spec__)"],
    "atexit-and-threads": [
        "-c",
        "import atexit, threading, time\n"
        "atexit.register(print, 'atexit ran after the thread')\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done', flush=True))).start()\n",
    ],
    "process": [
        "-c",
        "import os, signal, sys\n"
        "print(sys.argv, repr(sys.path[0]), __name__, os.getcwd(), os.environ['ONLY_HERE'])\n"
        "print(sorted(os.listdir('/proc/self/fd')), os.getpgrp() == int(sys.argv[1]), os.umask(0o22))\n"
        "print([signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD)])\n"
        "print(os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0))",
        str(os.getpgrp()),
    ],
    "threads-1": ["-c", "import torch; print(torch.get_num_threads())"],
    "script": ["script.py", "--flag", "value"],
    "module": ["-m", "runnable", "x"],
}
SCRIPT = "import sys\nprint(__name__, __file__, sys.argv, sys.path[0], sorted(globals()))\nraise SystemExit(5)\n"


def run_both(case: str, workdir: Path) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """(status, stdout, stderr) of the case run by a new interpreter and by the fork server."""
    argv = [sys.executable, *CASES[case]]
    env = child_env(ONLY_HERE=case, PYTHONPATH=str(workdir))
    if case == "threads-1":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results = []
    for start in (subprocess.Popen, forkserver.popen):
        with open(workdir / "out", "w+") as out, open(workdir / "err", "w+") as err:
            process = start(argv, cwd=workdir, env=env, stdout=out, stderr=err)
            status = process.wait(timeout=120)
            results.append((status, (workdir / "out").read_text(), (workdir / "err").read_text()))
    return results[0], results[1]


@pytest.mark.e2e
def test_a_forked_process_is_what_a_new_interpreter_would_be(tmp_path: Path) -> None:
    warm_up()
    (tmp_path / "script.py").write_text(SCRIPT)
    (tmp_path / "runnable.py").write_text(SCRIPT)
    for case in CASES:
        real, forked = run_both(case, tmp_path)
        assert forked == real, f"{case}: a new interpreter gave\n{real}\nthe fork server\n{forked}"
    assert run_both("threads-1", tmp_path)[1][1] == "1\n"


@pytest.mark.e2e
def test_thread_counts_follow_the_childs_environment(tmp_path: Path) -> None:
    warm_up()
    for threads in ("1", "2"):
        env = child_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        done = forkserver.popen(
            [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert done.communicate(timeout=60)[0] == f"{threads}\n"


@pytest.mark.e2e
def test_signals_pipes_and_locks_act_on_the_forked_process(tmp_path: Path) -> None:
    warm_up()
    lock = tmp_path / "lock"
    holder = forkserver.popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            "handle = open(sys.argv[1], 'w')\n"
            "fcntl.flock(handle, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    with open(lock) as handle:
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert holder.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            holder.wait(timeout=0.1)
        holder.kill()
        assert holder.wait(timeout=30) == -signal.SIGKILL
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel dropped the killed holder's lock
    assert holder.communicate(timeout=10) == ("", "")
    assert holder.cpu_s is not None and holder.cpu_s >= 0

    stopped = forkserver.popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(0.1)
    stopped.terminate()
    assert stopped.wait(timeout=30) == -signal.SIGTERM
    stopped.kill()  # after the exit: nothing is sent (the pid may belong to another process by now)


def test_what_only_a_new_interpreter_can_do_is_refused(tmp_path: Path) -> None:
    for argv in (["bash", "-c", "true"], [sys.executable, "-X", "importtime", "x.py"], [sys.executable, "-c"]):
        with pytest.raises(ValueError):
            forkserver.popen(argv)
    with pytest.raises(FileNotFoundError):
        forkserver.popen([sys.executable, "-c", "pass"], cwd=tmp_path / "missing")
