"""Input that must give one line, never a hang or a traceback: a FIFO, a
folder, a huge or deeply nested file where the project reads one, settings that size memory or
processes, a full disk under the epoch records, values beyond float32, a broken teacher, a negative seed.

The scripts' ``main`` runs in this process; a test that would hang without its fix is stopped by an alarm
(``no_hang``) instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import exit_code_of, one_line, run_script_here, tensorboard_clock_a_second_on

from grafting.data.fake import write_fake_cifar, write_fake_imagefolder
from grafting.errors import GraftingError
from grafting.ring.identity import join_ring
from grafting.ring.layout import NetworkFiles, SharedFolder
from grafting.train.report import read_metrics

TRAIN_IMAGES, TEST_IMAGES, BATCH = 16, 16, 16  # one batch an epoch: what these tests check is per epoch
DEEP = "[" * 200_000 + "]" * 200_000  # parses only by recursing deeper than Python allows


class Hung(BaseException):
    """The alarm of :func:`no_hang` went off."""


@contextlib.contextmanager
def no_hang(seconds: float = 60.0) -> Iterator[None]:
    """Fail instead of blocking for ever (a FIFO opened for reading waits for a writer): an alarm interrupts
    the blocking call in this (the main) thread."""

    def alarm(signum: int, frame: object) -> None:
        raise Hung(f"still blocked after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("data"), 10, TRAIN_IMAGES, TEST_IMAGES)


def cifar_flags(data: Path, shared: Path, *extra: str, epochs: int = 1) -> list[str]:
    return [
        *("--data", str(data), "--s", str(shared), "--epochs", str(epochs), "--model", "resnet20"),
        *("--device", "cpu", "--threads", "1", "--print-freq", "0", "--batch-size", str(BATCH)),
        *("--test-batch-size", str(TEST_IMAGES), *extra),
    ]


def cifar_main() -> Callable[[list[str] | None], None]:
    from grafting_cifar.train import main

    return main


def summary_main() -> Callable[[list[str] | None], None]:
    from grafting.tools.summary import main

    return main


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A baseline that trained one epoch; returns its --s. Copy it before changing anything."""
    shared = tmp_path_factory.mktemp("finished") / "s"
    assert run_script_here(cifar_main(), cifar_flags(data, shared)) == 0
    return shared


def copy_of(run: Path, tmp_path: Path) -> Path:
    shared = tmp_path / "s"
    shutil.copytree(run, shared)
    return shared


def replace_with(path: Path, kind: str) -> None:
    """Put a FIFO, a folder, a file of 20 MiB (sparse) or deeply nested JSON where ``path`` is."""
    if path.exists():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "huge":
        with open(path, "wb") as handle:
            handle.truncate(20 * 2**20)
    else:
        path.write_text(DEEP + "\n" if kind == "nested" else kind)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return one_line(err)


# ----------------------------------------------------------------------------------------------
# a FIFO, a folder, a huge or a deeply nested file where a network's files belong


NETWORK_FILES = {
    # case: (file of net1, what replaces it, exit code of a fresh start, of --resume, text of the one line)
    "config.json a fifo": ("config.json", "fifo", 1, 2, "net1/config.json is not a regular file"),
    "config.json a folder": ("config.json", "folder", 1, 2, "net1/config.json is "),
    "config.json huge": ("config.json", "huge", None, 2, "holds 20.0 MiB, far more than such a file ever does"),
    "config.json nested": ("config.json", "nested", None, 2, "is not valid JSON (JSON nested too deeply)"),
    "metrics.jsonl a fifo": ("metrics.jsonl", "fifo", 1, 1, "net1/metrics.jsonl is not a regular file"),
    "metrics.jsonl a folder": ("metrics.jsonl", "folder", 1, 1, "net1/metrics.jsonl is a folder"),
    "metrics.jsonl nested": ("metrics.jsonl", "nested", 1, 1, "metrics.jsonl, line 1 is not a JSON record (JSON"),
}
# A fresh start replaces its config.json without reading it: only what it cannot replace is refused.
STARTS = [
    (case, start)
    for case, (_, _, fresh, _, _) in NETWORK_FILES.items()
    for start in (["fresh"] if fresh is not None else []) + ["--resume"]
]


@pytest.mark.parametrize("case, start", STARTS)
def test_a_network_file_that_cannot_be_read_is_one_line_at_the_start(
    case: str, start: str, tmp_path: Path, data: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, kind, fresh_code, resume_code, said = NETWORK_FILES[case]
    code = fresh_code if start == "fresh" else resume_code
    shared = tmp_path / "s" if start == "fresh" else copy_of(finished_run, tmp_path)
    (shared / "net1").mkdir(parents=True, exist_ok=True)
    replace_with(shared / "net1" / name, kind)
    extra = ("--resume", "--epochs", "2") if start == "--resume" else ()
    with no_hang():
        assert run_script_here(cifar_main(), cifar_flags(data, shared, *extra)) == code
    line = error_line(capsys)
    assert said in line, line
    assert "move it away" in line or "another --s" in line or "fix or delete that line" in line, line


SUMMARY_FILES = {
    # A folder whose only config.json is a FIFO is no run to graft-summary; next to a real one it is read.
    "config.json a fifo": ("net2/config.json", "fifo", "{path} is unreadable (is not a regular file"),
    "config.json huge": ("net1/config.json", "huge", "{path} is unreadable (holds 20.0 MiB"),
    "config.json nested": ("net1/config.json", "nested", "{path} is unreadable (JSON nested too deeply)"),
    "metrics.jsonl a fifo": ("net1/metrics.jsonl", "fifo", "cannot read {path} (is not a regular file"),
    "metrics.jsonl a folder": ("net1/metrics.jsonl", "folder", "cannot read {path} (is a directory, not a file)"),
    "metrics.jsonl nested": ("net1/metrics.jsonl", "nested", "{path}, line 1 is not a JSON record (JSON nested"),
}


@pytest.mark.parametrize("case", list(SUMMARY_FILES))
def test_graft_summary_names_a_file_that_cannot_be_read(
    case: str, tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, kind, said = SUMMARY_FILES[case]
    shared = copy_of(finished_run, tmp_path)
    path = shared / name
    path.parent.mkdir(exist_ok=True)
    replace_with(path, kind)
    with no_hang():
        assert run_script_here(summary_main(), [str(shared)]) == 1
    line = error_line(capsys)
    assert said.format(path=path) in line, line


def test_a_cut_off_last_line_is_no_error_but_a_damaged_line_before_others_is(
    tmp_path: Path, finished_run: Path
) -> None:
    metrics = NetworkFiles(copy_of(finished_run, tmp_path), 1).metrics
    record = metrics.read_text()
    metrics.write_text(record + record[:30])  # killed while writing the second line
    assert [r["epoch"] for r in read_metrics(metrics)] == [1]
    metrics.write_text(record[:30] + "\n" + record)
    with pytest.raises(GraftingError, match=r"line 1 is not a JSON record .*fix or delete that line"):
        read_metrics(metrics)


@pytest.mark.parametrize("kind", ["fifo", "nested", "huge"])
def test_ring_json_and_a_checkpoints_config_json_that_cannot_be_read_are_one_line(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grafting_imagenet.train import _saved_settings

    folder = SharedFolder(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    replace_with(folder.ring, kind)
    monkeypatch.setattr("grafting.ring.identity._WRITE_GRACE_S", 0.1)  # not being written: no need to wait
    with no_hang(), pytest.raises(GraftingError) as caught:
        join_ring(folder)
    assert one_line(str(caught.value)).startswith(f"{folder.ring} ")
    checkpoint = tmp_path / "net1" / "best.pt"
    checkpoint.parent.mkdir()
    replace_with(checkpoint.parent / "config.json", kind)
    if kind == "fifo":  # not a file: there is no config.json to follow
        assert _saved_settings(checkpoint) is None
        return
    with no_hang(), pytest.raises(GraftingError) as caught:
        _saved_settings(checkpoint)
    assert "config.json is unreadable (" in one_line(str(caught.value))


def test_the_json_reader_refuses_what_would_block_exhaust_or_recurse(tmp_path: Path) -> None:
    from grafting.checkpoint import read_json_file

    for kind, error in (("fifo", OSError), ("folder", IsADirectoryError), ("huge", OSError), ("nested", ValueError)):
        path = tmp_path / kind
        replace_with(path, kind)
        with no_hang(), pytest.raises(error):
            read_json_file(path)


# ----------------------------------------------------------------------------------------------
# a FIFO among the images of an ImageNet folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_imagefolder(
        tmp_path_factory.mktemp("images"), 2, train_per_class=2, val_per_class=2, image_size=32
    )


def imagenet_flags(data: Path, shared: Path, *extra: str) -> list[str]:
    return [
        *("--data", str(data), "--s", str(shared), "--epochs", "1", "-a", "resnet18", "--device", "cpu"),
        *("--threads", "1", "-b", "2", "--image-size", "32", "-p", "0", *extra),
    ]


@pytest.mark.parametrize("workers", ["0", pytest.param("1", marks=pytest.mark.e2e)], ids=["in-process", "in-a-worker"])
def test_a_fifo_among_the_images_is_one_line(
    tmp_path: Path, image_folder: Path, workers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from grafting_imagenet.train import main

    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    fifo = data / "train" / "class_001" / "0.jpg"
    replace_with(fifo, "fifo")
    with no_hang():
        assert run_script_here(main, imagenet_flags(data, tmp_path / "s", "-j", workers)) == 1
    line = error_line(capsys)
    assert (
        line
        == f"error: cannot read image {fifo} (is not a regular file (a pipe or a device)); replace or remove that file"
    )
    # The worker is stopped with the run, not left to the garbage collector (whose shutdown of it waited 5 s).
    assert multiprocessing.active_children() == []


# ----------------------------------------------------------------------------------------------
# the settings that size memory or processes


def test_more_workers_than_cores_are_capped_with_a_warning(
    data: Path, image_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checked on the loaders as built: no worker is started here (they start with the first batch)."""
    from grafting.data.cifar import cifar_loaders
    from grafting.data.imagenet import imagenet_loaders, imagenet_val_loader
    from grafting.train.runtime import available_cores

    cpu, cores = torch.device("cpu"), available_cores()
    with caplog.at_level(logging.WARNING):
        loaders = [
            *cifar_loaders(data, 10, device=cpu, pipeline="torchvision", workers=100_000)[:2],
            *imagenet_loaders(image_folder, image_size=32, batch_size=2, workers=100_000, device=cpu)[:2],
            imagenet_val_loader(image_folder, image_size=32, batch_size=2, workers=100_000, device=cpu)[0],
        ]
    assert [loader.loader.num_workers for loader in loaders] == [cores] * 5
    warned = [r.getMessage() for r in caplog.records if "--workers 100000" in r.getMessage()]
    assert (
        warned
        == [f"--workers 100000 is more than the {cores} cores this process may use; using {cores} DataLoader workers"]
        * 3
    )  # once per script start
    kept = cifar_loaders(data, 10, device=cpu, pipeline="torchvision", workers=1)[0]
    assert kept.loader.num_workers == 1


def test_a_generated_cifar_that_asks_for_terabytes_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grafting.tools.data import main

    assert run_script_here(main, ["stand-in-cifar", str(tmp_path / "d"), "--train-size", "1000000000"]) == 2
    assert "argument --train-size: 1e+09 must lie in 1..500000" in error_line(capsys)
    with pytest.raises(GraftingError, match=r"1 to 500000 images per split, got train_size=5 test_size=1000000000"):
        write_fake_cifar(tmp_path / "d", 10, train_size=5, test_size=10**9)
    assert not (tmp_path / "d").exists()


def test_an_image_size_that_asks_for_terabytes_is_refused(tmp_path: Path) -> None:
    from grafting.errors import UsageError
    from grafting_imagenet.train import parse_args

    with pytest.raises(UsageError, match=r"--image-size must lie in 16\.\.1024 pixels, got 100000"):
        parse_args(["--image-size", "100000"])
    config = tmp_path / "net1" / "config.json"
    config.parent.mkdir()
    config.write_text('{"image_size": 100000}')
    from grafting_imagenet.train import recipe_for_evaluation

    with pytest.raises(GraftingError, match="records --image-size 100000, which is not valid"):
        recipe_for_evaluation(parse_args(["-e"]), config.parent / "best.pt", frozenset())


OUT_OF_MEMORY = {
    "gpu": torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
        "3.12 GiB is free. Including non-PyTorch memory, this process has 76.06 GiB memory in use."
    ),
    "host": MemoryError(),
    "torch-host": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)"
    ),
}


@pytest.mark.parametrize("case", list(OUT_OF_MEMORY))
def test_running_out_of_memory_in_training_is_one_line_whose_advice_works(
    case: str, tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from grafting.train import loop

    shared, train_one_epoch = tmp_path / "s", loop.train_one_epoch

    def exhausted_in_epoch_2(*args: object, epoch: int, **kwargs: object) -> object:
        if epoch == 2:
            raise OUT_OF_MEMORY[case]
        return train_one_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", exhausted_in_epoch_2)
    assert run_script_here(cifar_main(), cifar_flags(data, shared, epochs=2)) == 1
    line = error_line(capsys)
    said = {
        "gpu": "CUDA out of memory. Tried to allocate 20.00 GiB",
        "host": "out of memory",
        "torch-host": "out of memory: tried to allocate 20.00 GiB",
    }[case]
    assert line == (
        f"error: {said}; the checkpoints of the finished epochs are intact: continue with --resume once other "
        f"processes have freed the memory (or with fewer --workers), or start a new run in another --s with a "
        f"smaller --batch-size"
    ), line
    monkeypatch.undo()  # the memory is free again: --resume, as the line says
    assert run_script_here(cifar_main(), cifar_flags(data, shared, "--resume", epochs=2)) == 0
    assert [r["epoch"] for r in read_metrics(NetworkFiles(shared, 1).metrics)] == [1, 2]


def test_running_out_of_memory_outside_training_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from grafting.train.cli import entry_point

    @entry_point
    def main(argv: list[str] | None = None) -> None:
        raise MemoryError

    assert exit_code_of(main, []) == 1
    line = error_line(capsys)
    assert line == "error: out of memory; lower the batch size (or the image size, or the workers), or free the " + (
        "memory other processes hold"
    )


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda" if torch.cuda.is_available() else "cpu", marks=pytest.mark.cuda, id="cuda")]
)
def test_a_real_out_of_memory_is_one_line(device: str, capsys: pytest.CaptureFixture[str]) -> None:
    """256 TiB: more than any machine's memory, and than a process's whole address space."""
    from grafting.train.cli import entry_point

    @entry_point
    def main(argv: list[str] | None = None) -> None:
        torch.empty(2**46, device=device)

    assert exit_code_of(main, []) == 1
    line = error_line(capsys)
    said = (
        "CUDA out of memory. Tried to allocate 256.00 TiB"
        if device == "cuda"
        else "out of memory: tried to allocate 262144.00 GiB"
    )
    assert line.startswith(f"error: {said}; lower the batch size"), line


# ----------------------------------------------------------------------------------------------
# a full disk under metrics.jsonl or the TensorBoard events


def _metrics_disk_full_in_epoch_2(monkeypatch: pytest.MonkeyPatch, epoch: int = 2) -> str:
    """metrics.jsonl's writes fail as on a full disk once ``epoch`` is reported (half its line reaches it)."""
    from grafting.train import report

    class FullDisk:
        def __init__(self, path: Path, mode: str) -> None:
            self.handle = open(path, mode)  # noqa: SIM115 (closed by __exit__)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, text: str) -> int:
            if f'"epoch": {epoch},' in text:
                self.handle.write(text[: len(text) // 2])
                self.handle.flush()
                raise OSError(28, "No space left on device")
            return self.handle.write(text)

    monkeypatch.setattr(report, "open", FullDisk, raising=False)  # report.py's own open() alone
    return "{s}/net1/metrics.jsonl"


def _events_disk_full_in_epoch_2(monkeypatch: pytest.MonkeyPatch) -> str:
    """The TensorBoard writer thread's writes fail as on a full disk from epoch 2 on."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    from grafting.train.tensorboard import TensorBoardRun

    full, write, epoch = [False], RecordWriter.write, TensorBoardRun.epoch

    def record_write(self: RecordWriter, data: bytes) -> None:
        if full[0]:
            raise OSError(28, "No space left on device")
        write(self, data)

    def board_epoch(self: TensorBoardRun, record: object, *args: object) -> None:
        full[0] = full[0] or getattr(record, "epoch", 0) == 2
        epoch(self, record, *args)

    monkeypatch.setattr(RecordWriter, "write", record_write)
    monkeypatch.setattr(TensorBoardRun, "epoch", board_epoch)
    return "TensorBoard events in {s}/tb/net1"


def _metrics_disk_full_in_epoch_1(monkeypatch: pytest.MonkeyPatch) -> str:
    """As :func:`_metrics_disk_full_in_epoch_2` in the first epoch: no checkpoint exists yet."""
    return _metrics_disk_full_in_epoch_2(monkeypatch, epoch=1)


@pytest.mark.parametrize(
    "fill",
    [_metrics_disk_full_in_epoch_1, _metrics_disk_full_in_epoch_2, _events_disk_full_in_epoch_2],
    ids=["metrics-epoch-1", "metrics", "tb"],
)
def test_a_full_disk_under_the_epoch_records_is_one_line_and_resume_loses_nothing(
    fill: Callable[[pytest.MonkeyPatch], str],
    tmp_path: Path,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shared = tmp_path / "s"
    what = fill(monkeypatch).format(s=shared)
    assert run_script_here(cifar_main(), cifar_flags(data, shared, epochs=2)) == 1
    line = error_line(capsys)
    assert line == (
        f"error: could not write {what}: No space left on device; the checkpoints of the finished epochs are "
        f"intact: free some space and continue with --resume"
    ), line
    files = NetworkFiles(shared, 1)
    if fill is not _metrics_disk_full_in_epoch_1:
        assert torch.load(files.last, weights_only=True)["epoch"] == 1
    monkeypatch.undo()  # space was freed: the advice, literally
    tensorboard_clock_a_second_on(monkeypatch)
    assert run_script_here(cifar_main(), cifar_flags(data, shared, "--resume", epochs=2)) == 0
    assert [r["epoch"] for r in read_metrics(files.metrics)] == [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(shared / "tb" / "net1"))
    events.Reload()
    assert [event.step for event in events.Scalars("test/acc")] == [1, 2]


# ----------------------------------------------------------------------------------------------
# learning rate and weight decay beyond float32


@pytest.mark.parametrize("script", ["cifar", "imagenet"])
@pytest.mark.parametrize("flag", ["--lr", "--wd"])
def test_optimizer_values_beyond_float32_are_one_line_before_anything_is_written(
    script: str, flag: str, tmp_path: Path, data: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if script == "cifar":
        main, argv = cifar_main(), cifar_flags(data, tmp_path / "s", flag, "1e39")
    else:
        from grafting_imagenet.train import main

        argv = imagenet_flags(image_folder, tmp_path / "s", flag, "1e39")
    named = {"--lr": "--lr", "--wd": "--wd/--weight-decay"}[flag]
    named = "--lr/--learning-rate" if script == "imagenet" and flag == "--lr" else named
    assert run_script_here(main, argv) == 2
    said = "must be at most 3.4e+38 (the largest float32, the weights' type), got 1e+39"
    assert error_line(capsys) == f"error: {named} {said}"
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------
# a teacher that diverged


@pytest.mark.parametrize("value", ["nan", "inf", "1e30"])
def test_a_teacher_with_broken_weights_is_one_line_naming_it_before_training(
    value: str, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grafting.archs import cifar_models

    teacher = cifar_models.create("resnet20", num_classes=10)
    with torch.no_grad():
        teacher.conv1.weight[0, 0, 0, 0] = float(value)
    path = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, path)
    flags = cifar_flags(data, tmp_path / "s", "--distill", "teacher", "--teacher", str(path))
    assert run_script_here(cifar_main(), flags) == 2
    line = error_line(capsys)
    broken = (
        "holds NaN or infinite values (conv1.weight)" if value != "1e30" else "holds values up to 1e+30 (conv1.weight)"
    )
    assert line.startswith(f"error: --teacher {path} {broken}"), line
    assert line.endswith("it is not a usable teacher: give a checkpoint of a run that did not diverge"), line
    assert not (tmp_path / "s").exists(), "nothing may be written before the teacher is known to be usable"


# ----------------------------------------------------------------------------------------------
# a negative seed: numpy's generators take none (graft-data's refusal is tested in test_tools.py)


def test_the_training_scripts_refuse_a_negative_seed_in_one_line(
    tmp_path: Path, data: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from grafting_imagenet.train import main as imagenet_main

    for main, argv in (
        (cifar_main(), cifar_flags(data, tmp_path / "s", "--seed", "-1")),
        (imagenet_main, imagenet_flags(image_folder, tmp_path / "s", "--seed", "-1")),
    ):
        assert run_script_here(main, argv) == 2
        assert error_line(capsys) == "error: --seed must lie in 0..4611686018427387904, got -1"
    assert not (tmp_path / "s").exists()
