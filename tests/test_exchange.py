"""Tests for grafting.exchange: files, lock, heartbeat, waiting, loading and cleanup in a real folder.

Where a lock or a kill is involved the other side is a real separate process (subprocess), because
flock and SIGKILL only mean something between processes.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import popen_forked
from helpers.forkserver import ForkedProcess
from torch import nn

from grafting.checkpoint import load_file
from grafting.errors import CheckpointError, GraftingError, LockError, PeerMismatchError, PeerTimeoutError
from grafting.ring.exchange import Exchange, format_duration

REPO_ROOT = Path(__file__).resolve().parents[1]
META = {"model": "resnet32", "num_classes": 10}

# A child that takes network 2's lock of a ring of 3, says so, and then idles until it is killed.
HOLD_LOCK = """
import sys, time
import torch
torch.set_num_threads(1)
from grafting.ring.exchange import Exchange
exchange = Exchange(sys.argv[1], 2, 3, heartbeat_interval=0.05)
exchange.acquire()
print("locked", flush=True)
time.sleep(60)
"""

# A child that rewrites network 1's epoch-1 file as fast as it can until it is killed.
REWRITE_FOREVER = """
import itertools, sys
import torch
torch.set_num_threads(1)
from grafting.ring.exchange import Exchange
exchange = Exchange(sys.argv[1], 1, 2)
print("writing", flush=True)
for step in itertools.count():
    exchange.publish(1, {"w": torch.full((100_000,), float(step))}, {"model": "m", "num_classes": 10, "step": step})
"""


def start_child(script: str, *args: str) -> ForkedProcess:
    """Start ``script`` in a Python process of its own (forked from the tests' warm fork server) that can import
    the project; wait for its first line."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    child = popen_forked(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    first_line = child.stdout.readline().strip()
    if not first_line:
        child.kill()
        raise AssertionError(f"child failed to start: {child.stderr.read()}")
    return child


def kill_child(child: ForkedProcess) -> None:
    """SIGKILL the child (no cleanup handlers run) and reap it."""
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    child.stdout.close()
    child.stderr.close()


def small_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    return dict(model.state_dict())


# ------------------------------------------------------------------ naming


def test_ring_predecessor_and_file_names(tmp_path: Path) -> None:
    assert Exchange(tmp_path, 1, 3).predecessor == 3
    assert Exchange(tmp_path, 2, 3).predecessor == 1
    assert Exchange(tmp_path, 3, 3).predecessor == 2
    assert Exchange(tmp_path, 1, 1).predecessor == 1
    exchange = Exchange(tmp_path, 2, 3)
    assert exchange.path(3, 17) == tmp_path / "net3_epoch17.pt"
    assert exchange.lock_path == tmp_path / "net2.lock"
    assert exchange.alive_path(1) == tmp_path / "net1.alive"


@pytest.mark.parametrize("net, num", [(0, 2), (3, 2), (1, 0)])
def test_network_index_outside_the_ring_is_refused(tmp_path: Path, net: int, num: int) -> None:
    with pytest.raises(GraftingError):
        Exchange(tmp_path, net, num)


def test_format_duration() -> None:
    assert format_duration(0.2) == "0s"
    assert format_duration(45) == "45s"
    assert format_duration(120) == "2m00s"
    assert format_duration(190) == "3m10s"
    assert format_duration(3909) == "1h05m09s"


# ------------------------------------------------------------------ publish and load


def test_publish_then_load_round_trip(tmp_path: Path) -> None:
    writer = Exchange(tmp_path, 2, 3)
    reader = Exchange(tmp_path, 3, 3)
    state = small_state_dict()
    path = writer.publish(4, state, META)

    assert path == tmp_path / "net2_epoch4.pt"
    assert [name for name in os.listdir(tmp_path) if ".tmp-" in name] == []
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "meta"}

    loaded, meta = reader.load(2, 4, expect={"model": "resnet32", "num_classes": 10, "num": 3})
    assert meta == {"model": "resnet32", "num_classes": 10, "net": 2, "num": 3, "epoch": 4}
    assert list(loaded) == list(state)
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    assert loaded["1.num_batches_tracked"].dtype == torch.int64


def test_publish_detaches_and_compacts_views(tmp_path: Path) -> None:
    big = torch.arange(10_000, dtype=torch.float32)
    parameter = nn.Parameter(torch.ones(3))
    state = {"view": big[100:110], "param": parameter}
    exchange = Exchange(tmp_path, 1, 2)
    exchange.publish(1, state, META)

    loaded, _ = exchange.load(1, 1)
    assert torch.equal(loaded["view"], big[100:110])
    # Only the ten values of the view were written, not the 10,000 of its storage.
    assert loaded["view"].untyped_storage().nbytes() == 10 * 4
    assert not loaded["param"].requires_grad
    assert (tmp_path / "net1_epoch1.pt").stat().st_size < 10_000


def test_load_refuses_a_peer_of_another_model(tmp_path: Path) -> None:
    Exchange(tmp_path, 2, 2).publish(5, small_state_dict(), {"model": "resnet56", "num_classes": 10})
    reader = Exchange(tmp_path, 1, 2)

    with pytest.raises(PeerMismatchError) as caught:
        reader.load(2, 5, expect={"model": "resnet32", "num_classes": 10})
    path = tmp_path / "net2_epoch5.pt"
    assert str(caught.value) == (
        f"network 2's file {path} has model=resnet56, this network has model=resnet32; "
        "all networks of a ring must use the same model"
    )

    with pytest.raises(PeerMismatchError, match=r"has num_classes=10, this network has num_classes=100"):
        reader.load(2, 5, expect={"num_classes": 100, "model": "resnet56"})
    with pytest.raises(PeerMismatchError, match=r"has no 'width' entry"):
        reader.load(2, 5, expect={"width": 2})


def test_a_file_without_meta_is_read_only_when_nothing_is_expected(tmp_path: Path) -> None:
    reader = Exchange(tmp_path, 1, 2)
    state = small_state_dict()
    torch.save({"module." + key: value for key, value in state.items()}, reader.path(2, 1))

    loaded, meta = reader.load(2, 1)
    assert meta == {}
    assert list(loaded) == list(state)
    # What the Grafter (and so the training scripts) read must carry the meta this project writes.
    with pytest.raises(
        PeerMismatchError,
        match="has no metadata, so this project did not write it; nothing from it "
        "was used: delete it and restart this network with --resume",
    ):
        reader.load(2, 1, expect={"model": "resnet32"})


def test_load_of_a_truncated_peer_file_names_it(tmp_path: Path) -> None:
    path = Exchange(tmp_path, 2, 2).publish(1, small_state_dict(), META)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is truncated or corrupt")):
        Exchange(tmp_path, 1, 2).load(2, 1)


@pytest.mark.e2e
def test_reader_never_sees_a_half_written_file_even_when_the_writer_is_killed(tmp_path: Path) -> None:
    writer = start_child(REWRITE_FOREVER, str(tmp_path))
    reader = Exchange(tmp_path, 2, 2)
    try:
        reader.wait_for(1, 1, timeout=20)
        reads = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            loaded, meta = reader.load(1, 1)
            # Every read is one complete write: all values equal that write's step.
            assert torch.all(loaded["w"] == float(meta["step"]))
            reads += 1
        assert reads > 3
    finally:
        kill_child(writer)

    loaded, meta = reader.load(1, 1)
    assert torch.all(loaded["w"] == float(meta["step"]))

    # The next owner of network 1 removes whatever temporary file the killed writer left behind.
    with Exchange(tmp_path, 1, 2):
        assert [name for name in os.listdir(tmp_path) if ".tmp-" in name] == []


# ------------------------------------------------------------------ waiting


def test_wait_for_notices_a_new_file_quickly(tmp_path: Path) -> None:
    reader = Exchange(tmp_path, 1, 2)
    writer = Exchange(tmp_path, 2, 2)
    delay = 0.4
    published_at: list[float] = []

    def publish_later() -> None:
        time.sleep(delay)
        writer.publish(3, small_state_dict(), META)
        published_at.append(time.monotonic())

    thread = threading.Thread(target=publish_later)
    thread.start()
    waited = reader.wait_for(2, 3, timeout=10)
    returned_at = time.monotonic()
    thread.join()

    assert waited >= delay
    assert waited - delay < 0.5
    assert returned_at - published_at[0] < 0.5


def test_wait_for_an_existing_file_returns_at_once(tmp_path: Path) -> None:
    Exchange(tmp_path, 2, 2).publish(1, small_state_dict(), META)
    assert Exchange(tmp_path, 1, 2).wait_for(2, 1, timeout=0) < 0.1


def test_wait_for_times_out(tmp_path: Path) -> None:
    reader = Exchange(tmp_path, 1, 2, poll_interval=0.05)
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError) as caught:
        reader.wait_for(2, 5, timeout=0.3)
    elapsed = time.monotonic() - start

    assert 0.3 <= elapsed < 0.8
    message = str(caught.value)
    assert message.startswith("network 2 did not write epoch 5 within 0.3 s (")
    assert str(tmp_path / "net2_epoch5.pt") in message
    assert "--resume" in message


def test_wait_for_logs_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = Exchange(tmp_path, 1, 2, poll_interval=0.02, notice_after=0.1, log_every=0.1)
    with caplog.at_level(logging.INFO, logger="grafting.ring.exchange"):
        with pytest.raises(PeerTimeoutError):
            reader.wait_for(2, 5, timeout=0.45)
    lines = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert 3 <= len(lines) <= 5
    target, alive = tmp_path / "net2_epoch5.pt", tmp_path / "net2.alive"
    pattern = (
        rf"net 1: waiting for network 2's epoch 5 \({re.escape(str(target))}\) for \d+s; network 2 has not "
        rf"started yet \(no heartbeat file {re.escape(str(alive))}\)"
    )
    assert all(re.fullmatch(pattern, line) for line in lines), lines


def test_wait_for_warns_once_about_a_stale_heartbeat(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    alive = tmp_path / "net2.alive"
    alive.write_text("0\n")
    old = time.time() - 190
    os.utime(alive, (old, old))
    reader = Exchange(tmp_path, 1, 2, poll_interval=0.02)

    with caplog.at_level(logging.WARNING, logger="grafting.ring.exchange"):
        with pytest.raises(PeerTimeoutError):
            reader.wait_for(2, 5, timeout=0.3)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.fullmatch(
        rf"net 1: waiting for network 2's epoch 5 \(.*net2_epoch5\.pt\) for 0s; network 2 has stopped: "
        rf"its heartbeat {re.escape(str(alive))} is 3m1\ds old; check its log and restart it with "
        rf"--resume",
        warnings[0],
    ), warnings[0]


def test_fresh_or_missing_heartbeat_gives_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = Exchange(tmp_path, 1, 3, poll_interval=0.02)
    (tmp_path / "net3.alive").write_text("now\n")
    with caplog.at_level(logging.WARNING, logger="grafting.ring.exchange"):
        for peer in (2, 3):  # network 2 has no heartbeat file at all, network 3 a fresh one
            with pytest.raises(PeerTimeoutError):
                reader.wait_for(peer, 1, timeout=0.1)
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []


# ------------------------------------------------------------------ lock and heartbeat


def test_heartbeat_runs_while_the_lock_is_held(tmp_path: Path) -> None:
    exchange = Exchange(tmp_path, 1, 2, heartbeat_interval=0.05)
    alive = tmp_path / "net1.alive"
    exchange.acquire()
    try:
        assert alive.exists()
        old = time.time() - 1000
        os.utime(alive, (old, old))
        deadline = time.monotonic() + 2.0
        while exchange.heartbeat_age(1) > 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert exchange.heartbeat_age(1) < 10
    finally:
        exchange.release()
    exchange.release()  # idempotent

    os.utime(alive, (old, old))
    time.sleep(0.2)
    assert exchange.heartbeat_age(1) > 900, "the heartbeat must stop with release()"


def test_lock_is_exclusive_and_released_by_the_context_manager(tmp_path: Path) -> None:
    with Exchange(tmp_path, 1, 2) as first:
        assert first.lock_path.read_text().split()[:2] == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(LockError):
            Exchange(tmp_path, 1, 2).acquire()
        with Exchange(tmp_path, 2, 2):  # another network of the same ring is independent
            pass
    with Exchange(tmp_path, 1, 2):
        pass


@pytest.mark.e2e
def test_lock_held_by_another_process_and_freed_by_sigkill(tmp_path: Path) -> None:
    owner = start_child(HOLD_LOCK, str(tmp_path))
    try:
        with pytest.raises(LockError) as caught:
            Exchange(tmp_path, 2, 3).acquire()
        assert str(caught.value) == (
            f"network 2 in {tmp_path} is already being trained by pid {owner.pid} on host "
            f"{socket.gethostname()}; stop that process or use another --s"
        )
    finally:
        kill_child(owner)

    exchange = Exchange(tmp_path, 2, 3)
    exchange.acquire()  # the kernel dropped the dead owner's lock
    try:
        assert exchange.lock_path.read_text().split()[0] == str(os.getpid())
    finally:
        exchange.release()


def test_acquire_removes_own_leftover_temp_files_only(tmp_path: Path) -> None:
    own = tmp_path / "net1_epoch4.pt.tmp-99999"
    other = tmp_path / "net2_epoch4.pt.tmp-99999"
    own.write_bytes(b"half")
    other.write_bytes(b"half")
    with Exchange(tmp_path, 1, 2):
        assert not own.exists()
        assert other.exists()


# ------------------------------------------------------------------ cleanup


def _own_epochs(exchange: Exchange) -> set[int]:
    pattern = re.compile(rf"^net{exchange.net}_epoch(\d+)\.pt$")
    return {int(match.group(1)) for name in os.listdir(exchange.root) if (match := pattern.match(name))}


@pytest.mark.parametrize("num", [1, 2, 3])
def test_cleanup_removes_exactly_the_epochs_no_peer_needs(tmp_path: Path, num: int) -> None:
    exchange = Exchange(tmp_path, 1, num)
    # Files of other networks (and of network 10, whose name starts like network 1's) are never touched.
    bystanders = [tmp_path / "net2_epoch1.pt", tmp_path / "net10_epoch1.pt"]
    for bystander in bystanders:
        bystander.write_bytes(b"x")
    state = {"w": torch.zeros(2)}

    for epoch in range(1, 9):
        exchange.publish(epoch, state, META)
        removed = exchange.cleanup(epoch)
        if num == 1:
            kept = set(range(1, epoch + 1))
            gone: list[int] = []
        else:
            # After epoch e, epochs <= e - N - 1 go; the one removed now is exactly e - N - 1.
            kept = set(range(max(1, epoch - num), epoch + 1))
            gone = [epoch - num - 1] if epoch - num - 1 >= 1 else []
        assert removed == [exchange.path(1, e) for e in gone], (num, epoch)
        assert _own_epochs(exchange) == kept, (num, epoch)
    assert all(bystander.exists() for bystander in bystanders)


def test_cleanup_catches_up_after_a_resume(tmp_path: Path) -> None:
    exchange = Exchange(tmp_path, 2, 2)
    for epoch in range(1, 7):
        exchange.publish(epoch, {"w": torch.zeros(1)}, META)
    removed = exchange.cleanup(6)
    assert removed == [exchange.path(2, e) for e in (1, 2, 3)]
    assert _own_epochs(exchange) == {4, 5, 6}


def test_cleanup_with_keep_all_keeps_everything(tmp_path: Path) -> None:
    exchange = Exchange(tmp_path, 1, 2, keep_all=True)
    for epoch in range(1, 9):
        exchange.publish(epoch, {"w": torch.zeros(1)}, META)
        assert exchange.cleanup(epoch) == []
    assert _own_epochs(exchange) == set(range(1, 9))
    loaded = load_file(exchange.path(1, 1))
    assert loaded["meta"]["epoch"] == 1
