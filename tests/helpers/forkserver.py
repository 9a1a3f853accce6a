"""A warm process server for the tests' Python processes: torch and both training scripts are imported once,
and every process a test starts is a fresh fork of that server running the command line it was given.

A training process spends 3-3.5 CPU-seconds importing torch before it trains for about one; a test run starts
about a hundred of them. Here each one costs a fork instead. What a test can observe is what a real
``python script.py ...`` gives it, because the child is a process of its own:

- its own pid, working folder, environment, open files (stdin, stdout and stderr as given; every other
  descriptor closed, as ``subprocess.Popen`` does), resource limits and ignored signals;
- its command line run the way the interpreter runs it (``runpy`` for a script or ``-m``, ``exec`` for ``-c``),
  with ``sys.argv``, ``sys.path`` (the script's folder first, the child's ``PYTHONPATH``) and ``__main__`` set
  as a real start sets them;
- torch's thread count from the child's environment (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``): the math
  libraries read them once, when loaded, so the child applies them itself (numpy's own BLAS keeps the server's
  setting, the tests' one thread);
- the interpreter's exit: non-daemon threads joined, ``atexit`` run, the exit status of ``sys.exit``, a
  traceback and status 1 for an uncaught exception, death by SIGINT after an uncaught KeyboardInterrupt;
- signals, SIGKILL included, sent to its pid; its locks (``flock``) are its own and die with it.

The server itself does no torch work before it forks (no thread pool exists that a child could inherit
half-initialised, and CUDA is left for each child to initialise), and it stays single-threaded: it checks
both at start.

The test side is :func:`popen`, a drop-in for ``subprocess.Popen`` (``args``, ``cwd``, ``env``, ``stdin``,
``stdout``, ``stderr``) for a Python command line, returning a :class:`ForkedProcess` that has Popen's
``pid``, ``args``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``terminate`` and ``kill``. The exit status
comes from the server (the child is the server's, not the test's), over a socket per child.

Run as a file, this module is the server: ``python forkserver.py SOCKET``.
"""

from __future__ import annotations

import array
import atexit
import builtins
import contextlib
import importlib.machinery
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Union

# What the server imports once: everything a training process imports at its start.
PRELOAD = (
    "numpy",
    "torch",
    "torchvision",
    "torch.utils.tensorboard",
    "grafting",
    "grafting_cifar.train",
    "grafting_imagenet.train",
)
_MESSAGE_BYTES = 1 << 20
_POLL_S = 0.01

File = Union[None, int, IO[Any]]


# ----------------------------------------------------------------------------------------------
# The test side


class ForkedProcess:
    """A process started by the server, handled like a ``subprocess.Popen``."""

    def __init__(
        self, args: list[str], pid: int, channel: socket.socket, stdout: IO[Any] | None, stderr: IO[Any] | None
    ) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self.cpu_s: float | None = None  # user + system CPU seconds, once it has exited
        self.stdin = None
        self.stdout, self.stderr = stdout, stderr  # the read ends of pipes asked for with subprocess.PIPE
        self._channel = channel

    def _collect(self, timeout: float | None) -> bool:
        """Read the exit status if it arrives within ``timeout`` seconds (None: wait for it)."""
        if self.returncode is not None:
            return True
        ready, _, _ = select.select([self._channel], [], [], timeout)
        if not ready:
            return False
        message = self._channel.recv(_MESSAGE_BYTES)
        self._channel.close()
        if not message:
            raise RuntimeError(f"the fork server went away before process {self.pid} ({self.args}) exited")
        status = json.loads(message)
        self.returncode, self.cpu_s = status["returncode"], status["cpu_s"]
        sys.audit("tests.forkserver.exit", self.cpu_s)  # its CPU time, for the check of the ``slow`` marker
        return True

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; raise ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if not self._collect(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Read the pipes to their end and wait for the exit; returns ``(stdout, stderr)`` (None where no pipe)."""
        streams = {"stdout": self.stdout, "stderr": self.stderr}
        read: dict[str, Any] = {}
        readers = [
            threading.Thread(target=lambda name=name, stream=stream: read.__setitem__(name, stream.read()), daemon=True)
            for name, stream in streams.items()
            if stream is not None
        ]
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        for stream in streams.values():
            if stream is not None:
                stream.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return read.get("stdout"), read.get("stderr")

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process, unless it has exited (its pid may belong to another by then)."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> ForkedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()

    def __repr__(self) -> str:
        return f"<ForkedProcess pid {self.pid} returncode {self.returncode} args {self.args}>"


class _Server:
    """The running server: its process, its socket and what it printed on stderr."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="forkserver-"))
        self.address = str(self.folder / "socket")
        self.log = self.folder / "server.err"
        with open(self.log, "w") as log:
            # stdin stays open while this process lives: its end tells the server to stop and kill its children.
            self.process = subprocess.Popen(
                [sys.executable, __file__, self.address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=dict(env),
                cwd=self.folder,
            )
        self._ready = False

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the server has imported everything and listens; fail with its stderr if it died."""
        if self._ready:
            return
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline().decode() if ready else ""
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the fork server did not start: {line.strip()}\n{self.log.read_text()}")
        self._ready = True

    def stop(self) -> None:
        """Close the server's stdin: it kills what still runs and exits."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_server: _Server | None = None


def start(env: Mapping[str, str]) -> None:
    """Start the server in the background with the environment ``env`` (imports take a few seconds); a
    later :func:`popen` waits for it. Does nothing when it runs already."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _Server(env)
        atexit.register(_server.stop)


def _fd(file: File, default: int, opened: list[int]) -> int:
    """The descriptor the child gets for ``file``; what this function opens goes into ``opened``."""
    if file is None:
        return default
    if file == subprocess.DEVNULL:
        opened.append(os.open(os.devnull, os.O_RDWR))
        return opened[-1]
    if isinstance(file, int):
        if file < 0:
            raise ValueError(f"the fork server does not take {file} here")
        return file
    return file.fileno()


def _pipe(text: bool, opened: list[int]) -> tuple[int, IO[Any]]:
    """A pipe: the end the child writes to (in ``opened``) and the end this process reads from."""
    read, write = os.pipe()
    opened.append(write)
    return write, open(read, "r" if text else "rb")  # noqa: SIM115  # closed by communicate() or its owner


def popen(
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    stdin: File = None,
    stdout: File = None,
    stderr: File = None,
    text: bool = False,
    rlimits: Mapping[str, tuple[int, int]] | None = None,
    ignore_signals: Sequence[str] = (),
) -> ForkedProcess:
    """Run the Python command line ``args`` (``[python, script, ...]``, ``[python, "-m", module, ...]`` or
    ``[python, "-c", code, ...]``) in a fresh fork of the server, as ``subprocess.Popen(args, cwd=..., env=...,
    stdin=..., stdout=..., stderr=..., text=...)`` would run it: files, descriptors, ``subprocess.PIPE`` (for
    stdout and stderr), ``DEVNULL``, ``stderr=subprocess.STDOUT``, or None to inherit this process's.
    ``rlimits`` (e.g. ``{"RLIMIT_FSIZE": (n, n)}``) and ``ignore_signals`` (e.g. ``["SIGXFSZ"]``) are applied
    in the child before it runs, where a ``preexec_fn`` would. :func:`start` must have been called.
    """
    argv = [str(arg) for arg in args]
    _command(argv)  # refuse what a fork cannot run before anything starts
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(f"[Errno 2] No such file or directory: {os.fspath(cwd)!r}")  # as Popen says
    if _server is None:
        raise RuntimeError("forkserver.start(env) first")
    _server.wait_ready()
    opened: list[int] = []  # descriptors opened here for the child, closed here once it has them
    out_fd, out_pipe = _pipe(text, opened) if stdout == subprocess.PIPE else (_fd(stdout, 1, opened), None)
    if stderr == subprocess.STDOUT:
        err_fd, err_pipe = out_fd, None
    else:
        err_fd, err_pipe = _pipe(text, opened) if stderr == subprocess.PIPE else (_fd(stderr, 2, opened), None)
    request = {
        "argv": argv,
        "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
        "env": dict(os.environ if env is None else env),
        "rlimits": {name: list(limits) for name, limits in (rlimits or {}).items()},
        "ignore_signals": list(ignore_signals),
    }
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel.connect(_server.address)
    if stdin == subprocess.PIPE:
        raise ValueError("the fork server gives no stdin pipe; pass a file")
    fds = [_fd(stdin, 0, opened), out_fd, err_fd]
    sys.audit("tests.forkserver.popen", argv, request["cwd"], request["env"])
    try:
        channel.sendmsg([json.dumps(request).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        reply = json.loads(channel.recv(_MESSAGE_BYTES) or b'{"error": "the fork server went away"}')
    finally:
        for fd in opened:
            os.close(fd)
    if "error" in reply:
        channel.close()
        raise RuntimeError(f"the fork server could not start {argv}: {reply['error']}")
    return ForkedProcess(argv, reply["pid"], channel, out_pipe, err_pipe)


def _command(argv: list[str]) -> tuple[str, str, list[str]]:
    """``(kind, target, arguments)`` of a Python command line: ``("script", path, ...)``, ``("module", name,
    ...)`` or ``("code", source, ...)``; a ValueError for what only a real interpreter start can do."""
    if len(argv) < 2 or not os.path.basename(argv[0]).startswith("python"):
        raise ValueError(f"not a Python command line: {argv}")
    first, rest = argv[1], argv[2:]
    if first in ("-m", "-c"):
        if not rest:
            raise ValueError(f"{first} without its argument: {argv}")
        return ("module" if first == "-m" else "code"), rest[0], rest[1:]
    if first.startswith("-"):
        raise ValueError(f"interpreter option {first} acts while the interpreter starts: use a real exec for {argv}")
    return "script", first, rest


# ----------------------------------------------------------------------------------------------
# The server side


def _threads_from(env: Mapping[str, str]) -> int:
    """torch's intra-op threads for an interpreter started with ``env``: MKL_NUM_THREADS, else
    OMP_NUM_THREADS (the first of a list), else the cores, as torch reads them at start."""
    for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        text = env.get(name, "").split(",")[0].strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    return len(os.sched_getaffinity(0))


def _run_child(request: dict[str, Any], fds: list[int], closing: list[socket.socket], import_warnings: str) -> None:
    """In the forked child: become the requested process, run its command line, exit as the interpreter would."""
    for sock in closing:
        sock.close()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    # The server ignores SIGINT; a new interpreter installs Python's handler, unless it inherited SIGINT ignored
    # (a process started in the background by a shell), which the server noted when it started.
    signal.signal(signal.SIGINT, signal.SIG_IGN if _INHERITED_SIGINT_IGNORED else signal.default_int_handler)
    code = 1
    try:
        import numpy as np
        import torch

        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import resource

        for name, (soft, hard) in request["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        for name in request["ignore_signals"]:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        torch.set_num_threads(_threads_from(os.environ))
        np.random.seed()  # a new interpreter draws numpy's global seed from the system, not the server's state
        if import_warnings:
            sys.stderr.write(import_warnings)
        code = _run_command(request["argv"])
    except BaseException:  # the launch itself failed: say so as an interpreter would, with a traceback
        sys.excepthook(*sys.exc_info())
        code = 1
    os._exit(code)


def _run_command(argv: list[str]) -> int:
    """Run the command line as ``__main__`` and shut down like the interpreter; returns the exit status
    (or dies by SIGINT after an uncaught KeyboardInterrupt, as the interpreter does)."""
    import runpy

    kind, target, rest = _command(argv)
    pythonpath = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    site = [path for path in sys.path[1:] if path not in _SERVER_PYTHONPATH]
    code = 0
    interrupted = False
    try:
        if kind == "script":
            path = os.path.abspath(target)
            if not os.path.exists(path):
                print(
                    f"{sys.executable}: can't open file {path!r}: [Errno 2] No such file or directory", file=sys.stderr
                )
                return 2
            sys.path[:] = [os.path.dirname(os.path.realpath(path)), *pythonpath, *site]
            sys.argv = [target, *rest]
            main = _new_main(
                __file__=path, __cached__=None, __loader__=importlib.machinery.SourceFileLoader("__main__", path)
            )
            with io.open_code(path) as source:
                exec(compile(source.read(), path, "exec"), main.__dict__)
        elif kind == "module":
            sys.path[:] = [os.getcwd(), *pythonpath, *site]
            sys.argv = [target, *rest]  # runpy puts the module's file in argv[0]
            _new_main(__loader__=importlib.machinery.BuiltinImporter)
            runpy._run_module_as_main(target)  # type: ignore[attr-defined]  # what ``python -m`` calls
        else:
            sys.path[:] = ["", *pythonpath, *site]
            sys.argv = ["-c", *rest]
            main = _new_main(__loader__=importlib.machinery.BuiltinImporter)
            exec(compile(target, "<string>", "exec"), main.__dict__)
    except SystemExit as stop:
        code = _exit_status(stop)
    except KeyboardInterrupt as err:
        _print_uncaught(err)
        interrupted = True
    except BaseException as err:
        _print_uncaught(err)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter joins non-daemon threads first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _new_main(**attributes: Any) -> types.ModuleType:
    """A fresh ``__main__`` module, as the interpreter makes it for a script or ``-c``."""
    main = types.ModuleType("__main__")
    main.__dict__.update(
        {"__builtins__": builtins, "__package__": None, "__spec__": None, "__annotations__": {}, **attributes}
    )
    sys.modules["__main__"] = main
    return main


def _print_uncaught(err: BaseException) -> None:
    """The traceback the interpreter prints, which starts in the command's own code (not in this server's)."""
    import runpy

    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__):
        tb = tb.tb_next
    sys.excepthook(type(err), err.with_traceback(tb), tb)


def _exit_status(stop: SystemExit) -> int:
    """The exit status the interpreter gives ``sys.exit(code)``: 0 for None, the int, else 1 after printing it."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code & 0xFF
    print(stop.code, file=sys.stderr)
    return 1


_SERVER_PYTHONPATH: set[str] = set()
_INHERITED_SIGINT_IGNORED = False


def _serve(address: str) -> None:
    """Import what the training processes need, say ``ready`` on stdout, then fork a child per request until
    stdin closes; then kill the children still running and exit."""
    global _SERVER_PYTHONPATH, _INHERITED_SIGINT_IGNORED
    _SERVER_PYTHONPATH = {path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path}
    _INHERITED_SIGINT_IGNORED = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the children (same process group), not the server
    with warnings.catch_warnings(record=True) as caught:  # under the interpreter's default filters
        import importlib

        for name in PRELOAD:
            importlib.import_module(name)
    # A real start prints what importing warns about on its own stderr: every child does.
    import_warnings = "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught
    )
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        print(f"{threads} threads after the imports: forking would copy them half-alive", flush=True)
        return
    if sys.modules["torch"].cuda.is_initialized():
        print("CUDA was initialised by the imports: a forked child could not use it", flush=True)
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    print("ready", flush=True)
    channels: dict[int, socket.socket] = {}  # pid -> the channel its exit status goes to
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], _POLL_S)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
            break
        if listener in ready:
            _fork_one(listener, channels, import_warnings)
        _reap(channels)
    for pid in channels:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while channels:
        _reap(channels, block=True)


def _fork_one(listener: socket.socket, channels: dict[int, socket.socket], import_warnings: str) -> None:
    channel, _ = listener.accept()
    message, ancillary, _, _ = channel.recvmsg(_MESSAGE_BYTES, socket.CMSG_SPACE(3 * array.array("i").itemsize))
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    try:
        request = json.loads(message)
        if len(fds) != 3:
            raise ValueError(f"expected stdin, stdout and stderr, got {len(fds)} descriptors")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _run_child(request, list(fds), [listener, channel, *channels.values()], import_warnings)
            finally:
                os._exit(1)  # whatever happened, the child never returns into the server's loop
        channel.send(json.dumps({"pid": pid}).encode())
        channels[pid] = channel
    except Exception as err:  # a bad request: tell the client, go on serving
        channel.send(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
        channel.close()
    finally:
        for fd in fds:
            os.close(fd)


def _reap(channels: dict[int, socket.socket], block: bool = False) -> None:
    """Send the exit status of every child that has exited to its channel."""
    while channels:
        try:
            pid, status, usage = os.wait4(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        channel = channels.pop(pid, None)
        if channel is None:
            continue
        result = {"returncode": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime}
        with contextlib.suppress(OSError):  # the test side may have gone
            channel.send(json.dumps(result).encode())
        channel.close()
        if block:
            return


if __name__ == "__main__":
    _serve(sys.argv[1])
