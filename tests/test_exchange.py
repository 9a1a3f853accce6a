"""Tests for grafting.exchange: files, lock, heartbeat, waiting, loading and cleanup in a real folder.

Where a lock or a kill is involved the other side is a real separate process (subprocess), because
flock and SIGKILL only mean something between processes.
"""

from __future__ import annotations

import datetime
import errno
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
from typing import Any

import pytest
import torch
from helpers import popen_forked, virtual_clock
from helpers.forkserver import ForkedProcess
from torch import nn

from grafting.checkpoint import weights_problem
from grafting.errors import CheckpointError, GraftingError, LockError, PeerMismatchError, PeerTimeoutError, UsageError
from grafting.method.graft import graft_layers
from grafting.ring import exchange_file
from grafting.ring.exchange import Exchange, format_duration
from grafting.ring.grafter import Grafter
from grafting.ring.layout import SharedFolder
from grafting.train.config import SCRIPT_WORDING

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

# A child that rewrites network 1's epoch-1 file as fast as it can until it is killed, every other time
# from a background thread (the way the training loop publishes).
REWRITE_FOREVER = """
import itertools, sys
import torch
torch.set_num_threads(1)
from grafting.ring.exchange import Exchange
exchange = Exchange(sys.argv[1], 1, 2)
print("writing", flush=True)
for step in itertools.count():
    meta = {"model": "m", "num_classes": 10, "step": step}
    exchange.publish(1, {"w": torch.full((100_000,), float(step))}, meta, background=step % 2 == 0)
"""

# A child that publishes in the background with a slow disk and then ends at once, without release().
PUBLISH_AND_EXIT = """
import sys, time
import torch
from grafting.ring import exchange_file
from grafting.ring.exchange import Exchange
write = exchange_file.Packed.write
def slow_write(self, path):
    time.sleep(1.0)
    write(self, path)
exchange_file.Packed.write = slow_write
Exchange(sys.argv[1], 1, 2).publish(1, {"w": torch.arange(1000.0)}, {"model": "m"}, background=True)
print("published", flush=True)
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
    assert exchange.path(3, 17) == tmp_path / "net3_epoch17.tensors"
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

    assert path == tmp_path / "net2_epoch4.tensors"
    assert [name for name in os.listdir(tmp_path) if ".tmp-" in name] == []
    assert path.read_bytes().startswith(exchange_file.SIGNATURE)

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
    assert not loaded["param"].requires_grad
    # Only the ten values of the view were written, not the 10,000 of its storage.
    assert (tmp_path / "net1_epoch1.tensors").stat().st_size < 10_000


def test_load_refuses_a_peer_of_another_model(tmp_path: Path) -> None:
    Exchange(tmp_path, 2, 2).publish(5, small_state_dict(), {"model": "resnet56", "num_classes": 10})
    reader = Exchange(tmp_path, 1, 2)

    with pytest.raises(PeerMismatchError) as caught:
        reader.load(2, 5, expect={"model": "resnet32", "num_classes": 10})
    path = tmp_path / "net2_epoch5.tensors"
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
    exchange_file.pack(state, {}).write(reader.path(2, 1))

    loaded, meta = reader.load(2, 1)
    assert meta == {}
    assert list(loaded) == list(state)
    # What the Grafter (and so the training scripts) read must carry the meta this project writes.
    with pytest.raises(
        PeerMismatchError,
        match=re.escape(
            "has no metadata, so this project did not write it; nothing from it was used: delete it and restart "
            "this network from its last checkpoint with Grafter(..., ring="
        ),
    ):
        reader.load(2, 1, expect={"model": "resnet32"})


def test_load_of_a_truncated_peer_file_names_it(tmp_path: Path) -> None:
    path = Exchange(tmp_path, 2, 2).publish(1, small_state_dict(), META)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is truncated or corrupt")):
        Exchange(tmp_path, 1, 2).load(2, 1)


# ------------------------------------------------------------------ the file format


def every_kind_of_tensor() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=generator).to(memory_format=torch.channels_last),
        "half": torch.randn(7, generator=generator).half(),
        "brain": torch.randn(3, 5, generator=generator).bfloat16(),
        "double": torch.randn(2, 2, generator=generator).double(),
        "bn.num_batches_tracked": torch.tensor(123456789012),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "column": torch.randn(6, 4, generator=generator)[:, 1],  # a strided view
    }


def test_every_dtype_and_layout_round_trips_in_order(tmp_path: Path) -> None:
    state = every_kind_of_tensor()
    path = tmp_path / "f.tensors"
    exchange_file.pack(state, {"model": "m", "epoch": 3}).write(path)
    loaded, meta = exchange_file.read(path, advice="fix it")
    assert meta == {"model": "m", "epoch": 3}
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key
    # One read into one buffer: every tensor is a view of the same memory, nothing was unpickled.
    assert len({t.untyped_storage().data_ptr() for t in loaded.values()}) == 1
    assert path.stat().st_size % 64 == 0


def test_a_packed_snapshot_does_not_follow_the_weights(tmp_path: Path) -> None:
    weights = {"w": torch.zeros(1000)}
    packed = exchange_file.pack(weights, {})
    weights["w"].fill_(7.0)  # the graft changes the weights after the snapshot
    packed.write(tmp_path / "f.tensors")
    assert torch.equal(exchange_file.read(tmp_path / "f.tensors", advice="")[0]["w"], torch.zeros(1000))
    again = exchange_file.pack(weights, {}, reuse=packed)  # the next epoch reuses the buffer
    assert again.data is packed.data and torch.equal(again.data.view(torch.float32)[:1000], weights["w"])


@pytest.mark.parametrize(
    "state, meta, wanted",
    [
        ({"w": torch.zeros(2, dtype=torch.complex64)}, {}, "has dtype torch.complex64, which exchange files"),
        ({"w": [1, 2]}, {}, "state_dict entry 'w' is a list, not a tensor"),
        ({"w": torch.zeros(2)}, {"when": datetime.date(2020, 1, 1)}, "plain JSON values"),
        ({"w": torch.zeros(2)}, {"dims": (1, 2)}, "plain JSON values"),  # a tuple would come back a list
        ({"w": torch.zeros(2)}, {"lr": float("nan")}, "plain JSON values"),
    ],
)
def test_what_an_exchange_file_cannot_hold_is_refused_when_packing(state: dict, meta: dict, wanted: str) -> None:
    with pytest.raises(UsageError, match=re.escape(wanted)):
        exchange_file.pack(state, meta)


class _RunsCodeWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.path),)


def _damaged(good: bytes, case: str, tmp_path: Path) -> bytes:
    """The bytes of ``good`` spoiled as ``case`` says."""
    header_length = int.from_bytes(good[8:16], "little")
    header = good[16 : 16 + header_length].rstrip()

    def with_header(text: bytes) -> bytes:  # padded to the same length, so only the header changes
        return good[:16] + text.ljust(header_length) + good[16 + header_length :]

    if case == "torch.save zip":
        torch.save({"model": _RunsCodeWhenUnpickled(tmp_path / "code-ran")}, tmp_path / "evil.pt")
        return (tmp_path / "evil.pt").read_bytes()
    if case == "torch.save pickle":
        torch.save({"w": torch.zeros(1)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
        return (tmp_path / "old.pt").read_bytes()
    if case == "no signature":
        return b"hello world, not weights" * 10
    if case == "empty":
        return b""
    if case == "header length beyond the file":
        return good[:8] + (len(good) * 2).to_bytes(8, "little") + good[16:]
    if case == "header not JSON":
        return with_header(b"{" * header_length)
    if case == "another format":
        return with_header(header.replace(b"exchange/1", b"exchange/9"))
    if case == "tensor outside the data":
        return with_header(header.replace(b'["w","float32",[4],0]', b'["x","float32",[4],64000]'))
    if case == "shape not whole numbers":
        return with_header(header.replace(b"[4]", b"[-4]", 1))
    if case == "longer than its header says":
        return good + bytes(64)
    raise AssertionError(case)


DAMAGE = {
    "torch.save zip": "is a torch.save file (an exchange file of an older version of filter-grafting, or a checkpoint)",
    "torch.save pickle": "is a torch.save file",
    "no signature": "is not an exchange file (it lacks the b'GRAFTEX1' signature)",
    "empty": "is not an exchange file",
    "header length beyond the file": "is truncated or corrupt (its header's length is",
    "header not JSON": "is truncated or corrupt (its header is not readable JSON)",
    "another format": "is in exchange format filter-grafting-exchange/9, this version of filter-grafting reads "
    "filter-grafting-exchange/1: every network of a ring must run the same version",
    "tensor outside the data": "is truncated or corrupt (its header places 'x' outside its data)",
    "shape not whole numbers": "is truncated or corrupt (its header gives 'w' an impossible shape [-4])",
    "longer than its header says": "is truncated or corrupt (its header describes 128 bytes of data where the file "
    "holds 192)",
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_or_foreign_file_is_one_line_naming_it_and_never_unpickled(case: str, tmp_path: Path) -> None:
    good = tmp_path / "good.tensors"
    exchange_file.pack({"w": torch.arange(4.0), "b": torch.ones(2)}, {"net": 1}).write(good)
    path = tmp_path / "net1_epoch1.tensors"
    path.write_bytes(_damaged(good.read_bytes(), case, tmp_path))
    with pytest.raises(CheckpointError) as caught:
        exchange_file.read(path, advice="delete it")
    message = str(caught.value)
    assert message.startswith(f"{path} ") and message.endswith("; delete it") and "\n" not in message, message
    assert DAMAGE[case] in message, message
    assert not (tmp_path / "code-ran").exists()


def test_reading_something_that_is_not_a_file_names_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.tensors")  # a reader that opened it blocking would wait for ever
    (tmp_path / "folder.tensors").mkdir()
    for name in ("fifo.tensors", "folder.tensors"):
        with pytest.raises(CheckpointError, match="is not a regular file"):
            exchange_file.read(tmp_path / name, advice="")
    with pytest.raises(CheckpointError, match="does not exist"):
        exchange_file.read(tmp_path / "missing.tensors", advice="")


def test_a_bool_tensor_with_other_bytes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.tensors"
    exchange_file.pack({"mask": torch.tensor([True, False])}, {}).write(path)
    raw = bytearray(path.read_bytes())
    raw[-64] = 7  # the first element of the only tensor, at the start of the data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="'mask' is not a valid bool tensor"):
        exchange_file.read(path, advice="")


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


@pytest.mark.e2e
def test_a_process_does_not_end_before_its_background_publish_is_complete(tmp_path: Path) -> None:
    child = start_child(PUBLISH_AND_EXIT, str(tmp_path))  # returns after "published": the write still sleeps
    assert child.wait(timeout=30) == 0, child.stderr.read()
    child.stdout.close(), child.stderr.close()
    loaded, meta = Exchange(tmp_path, 2, 2).load(1, 1)
    assert torch.equal(loaded["w"], torch.arange(1000.0)) and meta["epoch"] == 1


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Every exchange file write waits until the returned event is set (or 10 s)."""
    release = threading.Event()
    write = exchange_file.Packed.write

    def waiting_write(self: exchange_file.Packed, path: str | Path) -> None:
        release.wait(10)
        write(self, path)

    monkeypatch.setattr(exchange_file.Packed, "write", waiting_write)
    return release


def test_a_background_publish_returns_at_once_with_a_snapshot(tmp_path: Path, slow_disk: threading.Event) -> None:
    exchange = Exchange(tmp_path, 1, 2)
    weights = {"w": torch.zeros(1000)}
    path = exchange.publish(1, weights, META, background=True)
    weights["w"].fill_(3.0)  # the caller changes its weights while the file is being written
    assert not path.exists()
    slow_disk.set()
    exchange.wait_published()
    assert torch.equal(exchange.load(1, 1)[0]["w"], torch.zeros(1000))
    exchange.wait_published()  # nothing pending: returns at once


def test_a_failed_background_publish_is_raised_by_the_next_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self: exchange_file.Packed, handle: Any) -> None:
        handle.write(self.header)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exchange_file.Packed, "_write_to", full_disk)
    exchange = Exchange(tmp_path, 1, 2)
    exchange.publish(2, {"w": torch.zeros(2)}, META, background=True)
    with pytest.raises(CheckpointError, match=r"could not write .*net1_epoch2\.tensors: No space left on device"):
        exchange.wait_published()
    exchange.publish(3, {"w": torch.zeros(2)}, META, background=True)
    with caplog.at_level(logging.WARNING, logger="grafting.ring.exchange"):
        exchange.release()  # a process that stops anyway logs the failure instead of raising it
    assert any("could not write" in record.getMessage() for record in caplog.records)
    assert os.listdir(tmp_path) == []  # no half-written file, not even a temporary one


def test_the_graft_waits_for_its_own_publish(
    tmp_path: Path, slow_disk: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grafting.ring import grafter as grafter_module

    own_file_at_graft: list[bool] = []

    def recording_graft_layers(*args: Any, **kwargs: Any) -> Any:
        own_file_at_graft.append((tmp_path / "net1_epoch1.tensors").exists())
        return graft_layers(*args, **kwargs)

    monkeypatch.setattr(grafter_module, "graft_layers", recording_graft_layers)
    mine, theirs = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 4, 3))
    with (
        Grafter(tmp_path, 1, 2, meta=META, rule="module") as one,
        Grafter(tmp_path, 2, 2, meta=META, rule="module") as two,
    ):
        one.publish(mine, 1, background=True)
        threading.Timer(0.3, slow_disk.set).start()  # the disk catches up while network 1 waits
        two.publish(theirs, 1, background=True)
        report = one.graft(mine, 1)
    assert report.grafted and own_file_at_graft == [True]
    assert report.read_ms > 0 and report.check_ms > 0 and report.graft_ms >= report.read_ms + report.check_ms


@pytest.mark.e2e  # follows the advice with the shell's rm
def test_a_peer_of_an_older_version_is_refused_and_the_advice_works(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mine, theirs = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Conv2d(3, 4, 3))
    checkpoint = tmp_path / "net1" / "last.pt"  # a network's own files are no exchange files
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"resumable")
    old_file = tmp_path / "net2_epoch1.pt"
    with (
        Grafter(tmp_path, 1, 2, meta=META, rule="module", peer_timeout=10) as one,
        Grafter(tmp_path, 2, 2, meta=META, rule="module") as two,
    ):
        torch.save({"model": theirs.state_dict(), "meta": {**META, "net": 2, "epoch": 1}}, old_file)  # older network 2
        before = {k: v.clone() for k, v in mine.state_dict().items()}
        one.publish(mine, 1)
        started = time.monotonic()
        with pytest.raises(PeerMismatchError) as caught:
            one.graft(mine, 1)
        assert time.monotonic() - started < 5, "refused at once, not after waiting"
        assert str(caught.value) == (
            f"network 2's file {old_file} was written by an older version of filter-grafting, whose exchange files "
            f"this version does not read; run every network of the ring with the same version: stop the older ones, "
            f"delete the old exchange files (rm {tmp_path}/net*_epoch*.pt) and restart every network from its last "
            f"checkpoint with Grafter(..., ring={one.ring!r}) (an epoch whose file is gone is not grafted)"
        )
        assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())

        # The advice, literally: the shell's rm; network 2, now of this version, goes on from epoch 2.
        subprocess.run(f"rm {tmp_path}/net*_epoch*.pt", shell=True, check=True)
        two.publish(theirs, 2)
        assert one.graft(mine, 1).skipped is not None
        one.publish(mine, 2)
        assert one.graft(mine, 2).grafted
    assert checkpoint.read_bytes() == b"resumable"


def one_tensor_at_a_time_problem(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None) -> str:
    """The check as it was before it was vectorised: two host reads per tensor."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
            continue
        if not bool(value.isfinite().all()):
            return f"holds NaN or infinite values ({key})"
        own = reference.get(key) if reference is not None else None
        if not isinstance(own, torch.Tensor) or not own.is_floating_point() or own.numel() == 0:
            continue
        largest, scale = float(value.abs().max()), max(float(own.abs().max()), 1.0)
        if largest > 1e6 * scale:
            return f"holds values up to {largest:.3g} ({key}), more than 1e+06 times this network's {scale:.3g}"
    return ""


def spoiled(state: dict[str, torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with element 0 of some tensors set to a value."""
    copy = {k: v.clone() for k, v in state.items()}
    for key, value in values.items():
        copy[key].view(-1)[0] = value
    return copy


def test_the_vectorised_checks_say_what_the_per_tensor_ones_said() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 2))
    state = dict(model.state_dict())
    state["3.half"] = torch.randn(5).half()
    state["4.empty"] = torch.empty(0)
    reference = {k: v.clone() for k, v in state.items()}
    reference["1.running_var"] = torch.full((8,), float("nan"))  # a NaN scale checks nothing
    del reference["4.bias"]  # no reference: finiteness only
    cases = [
        state,
        spoiled(state, {"2.weight": float("nan")}),
        spoiled(state, {"0.bias": float("inf"), "2.weight": float("nan")}),
        spoiled(state, {"0.weight": -5e7}),  # a magnitude, by the absolute value
        spoiled(state, {"0.weight": 5e5}),  # below a million times the (at least 1) scale
        spoiled(state, {"0.weight": 5e7, "2.bias": float("nan")}),  # the first problem in order
        spoiled(state, {"1.running_var": 1e30}),
        spoiled(state, {"4.bias": 1e30}),
        spoiled(state, {"3.half": float("-inf")}),
    ]
    messages = []
    for case in cases:
        for ref in (reference, None):
            messages.append(weights_problem(case, reference=ref))
            assert messages[-1] == one_tensor_at_a_time_problem(case, ref)
    assert len(set(messages)) >= 6 and "" in messages


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


def test_wait_for_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = virtual_clock(monkeypatch)
    reader = Exchange(tmp_path, 1, 2, poll_interval=0.05)
    with pytest.raises(PeerTimeoutError) as caught:
        reader.wait_for(2, 5, timeout=0.3)

    assert clock.now == pytest.approx(0.3)  # at the timeout, not a poll later
    message = str(caught.value)
    assert message.startswith("network 2 did not write epoch 5 within 0.3 s (")
    assert str(tmp_path / "net2_epoch5.tensors") in message
    # In the library's words; the training scripts pass theirs (their flags).
    assert message.endswith(
        "restart it from its last checkpoint with Grafter(..., ring=<the grafter.ring it saved>) as well"
    )
    scripts = Exchange(tmp_path, 1, 2, poll_interval=0.05, wording=SCRIPT_WORDING)
    with pytest.raises(PeerTimeoutError) as caught:
        scripts.wait_for(2, 5, timeout=0.1)
    assert str(caught.value).endswith("this network's checkpoints are intact: restart it with --resume as well")


def test_wait_for_logs_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    virtual_clock(monkeypatch)
    reader = Exchange(tmp_path, 1, 2, poll_interval=0.02, notice_after=0.1, log_every=0.1)
    with caplog.at_level(logging.INFO, logger="grafting.ring.exchange"):
        with pytest.raises(PeerTimeoutError):
            reader.wait_for(2, 5, timeout=0.45)
    lines = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert len(lines) == 4  # after 0.1 s, then every 0.1 s until the timeout
    target, alive = tmp_path / "net2_epoch5.tensors", tmp_path / "net2.alive"
    pattern = (
        rf"net 1: waiting for network 2's epoch 5 \({re.escape(str(target))}\) for \d+s; network 2 has not "
        rf"started yet \(no heartbeat file {re.escape(str(alive))}\)"
    )
    assert all(re.fullmatch(pattern, line) for line in lines), lines


def test_wait_for_warns_once_about_a_stale_heartbeat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    virtual_clock(monkeypatch)
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
        rf"net 1: waiting for network 2's epoch 5 \(.*net2_epoch5\.tensors\) for 0s; network 2 has stopped: "
        rf"its heartbeat {re.escape(str(alive))} is 3m1\ds old; check its log and restart it from its "
        rf"last checkpoint with Grafter\(\.\.\., ring=<the grafter\.ring it saved>\)",
        warnings[0],
    ), warnings[0]


def test_fresh_or_missing_heartbeat_gives_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    virtual_clock(monkeypatch)
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
            f"{socket.gethostname()}; stop that process or use another root folder"
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
    own = tmp_path / "net1_epoch4.tensors.tmp-99999"
    other = tmp_path / "net2_epoch4.tensors.tmp-99999"
    own.write_bytes(b"half")
    other.write_bytes(b"half")
    with Exchange(tmp_path, 1, 2):
        assert not own.exists()
        assert other.exists()


# ------------------------------------------------------------------ cleanup


def _own_epochs(exchange: Exchange) -> set[int]:
    pattern = SharedFolder.exchange_pattern(exchange.net)
    return {int(match.group(1)) for name in os.listdir(exchange.root) if (match := pattern.fullmatch(name))}


@pytest.mark.parametrize("num", [1, 2, 3])
def test_cleanup_removes_exactly_the_epochs_no_peer_needs(tmp_path: Path, num: int) -> None:
    exchange = Exchange(tmp_path, 1, num)
    # Files of other networks (and of network 10, whose name starts like network 1's) are never touched.
    bystanders = [tmp_path / "net2_epoch1.tensors", tmp_path / "net10_epoch1.tensors"]
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
    _, meta = exchange.load(1, 1)
    assert meta["epoch"] == 1
