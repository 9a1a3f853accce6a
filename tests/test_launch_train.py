"""What the training scripts do with the two flags the launcher relies on: ``--resume`` (continue, and
stop when there is nothing to continue), its scheduler form ``--resume auto``, and an explicit
``--device cuda``, which never falls back to the CPU."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest
import torch
from helpers import one_line

from grafting.data.fake import write_fake_cifar
from grafting.distributed import Processes
from grafting.errors import UsageError
from grafting.ring.layout import NetworkFiles
from grafting.train import runtime
from grafting.train.files import resolve_resume, something_to_continue
from grafting_cifar.train import main as cifar_main
from grafting_cifar.train import parse_args


def config(shared: Path, *flags: str, net: int = 1):
    return parse_args(["--s", str(shared), "--num", "2", "--i", str(net), "--model", "resnet20", *flags])


def test_resume_takes_auto_as_its_scheduler_form() -> None:
    assert parse_args([]).resume is False
    assert parse_args(["--resume"]).resume is True
    assert parse_args(["--resume", "--epochs", "3"]).resume is True
    assert parse_args(["--resume", "auto"]).resume == "auto"
    assert parse_args(["--resume=auto"]).resume == "auto"


def test_resume_auto_continues_what_there_is_and_starts_otherwise(tmp_path: Path) -> None:
    shared = tmp_path / "s"
    assert resolve_resume(config(shared, "--resume", "auto")) is False  # no --s at all
    files = NetworkFiles(shared, 1)
    files.folder.mkdir(parents=True)
    assert resolve_resume(config(shared, "--resume", "auto")) is False  # its folder alone: nothing yet
    # Interrupted in its first epoch: it continues at epoch 1, its settings checked against config.json.
    (files.folder / "config.json").write_text("{}")
    assert resolve_resume(config(shared, "--resume", "auto")) is True
    assert resolve_resume(config(shared, "--resume")) is True
    files.config.unlink()
    # A last.pt set aside as unusable leaves previous.pt: still something to continue.
    files.previous.write_bytes(b"")
    (files.folder / "last.pt.unusable").write_bytes(b"")
    assert something_to_continue(files) and resolve_resume(config(shared, "--resume", "auto")) is True
    assert resolve_resume(config(shared, "--resume")) is True
    assert resolve_resume(config(shared)) is False


def test_resume_continues_a_network_known_to_have_got_further_without_checkpoints(tmp_path: Path) -> None:
    # Its checkpoints are gone but metrics.jsonl shows epoch 3: resuming must stop and say how to go on
    # (load_last), never start it over at epoch 1.
    files = NetworkFiles(tmp_path / "s", 1)
    files.folder.mkdir(parents=True)
    files.metrics.write_text('{"epoch": 3}\n')
    assert resolve_resume(config(tmp_path / "s", "--resume", "auto")) is True


@pytest.mark.parametrize("exists", [False, True])
def test_resume_with_nothing_to_continue_is_one_line_exit_2_and_its_advice_starts_the_run(
    tmp_path: Path, exists: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_fake_cifar(tmp_path / "data", num_classes=10, train_size=32, test_size=16)
    shared = tmp_path / "runs" / "typo"
    if exists:
        shared.mkdir(parents=True)
    flags = ["--data", str(data), "--s", str(shared), "--model", "resnet20", "--epochs", "1", "--device", "cpu"]
    flags += ["--threads", "1", "--batch-size", "16", "--print-freq", "0"]
    code, err = run_main(flags + ["--resume"], capsys)
    line = one_line(err)
    where = f"{shared} does not exist" if not exists else f"{shared / 'net1'} has no checkpoint"
    assert code == 2 and line == (
        f"error: --resume: {where}, so network 1 has nothing to continue; check --s, or start it without "
        f"--resume (--resume auto continues when there is something, else starts)"
    )
    assert not (shared / "net1" / "last.pt").exists()
    # The advice, followed literally: the same command without --resume starts the run.
    code, err = run_main(flags, capsys)
    assert code is None, err
    assert torch.load(shared / "net1" / "last.pt", weights_only=True)["epoch"] == 1
    # Now there is something: --resume continues it (nothing left to do after its one epoch).
    code, err = run_main(flags + ["--resume"], capsys)
    assert code is None, err


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    """grafting_cifar/train.py's main in this process: its exit code (None: it returned) and stderr."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    code: object = None
    try:
        cifar_main(argv)
    except SystemExit as stop:
        code = stop.code
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


def test_an_explicit_cuda_request_never_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # A node whose driver cannot run the installed CUDA build: torch.cuda.is_available() is False.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    under_torchrun = Processes(rank=0, local_rank=0, world_size=2)
    for requested in ("cuda", "cuda:0"):
        for procs in (Processes(), under_torchrun):
            with pytest.raises(UsageError) as refused:
                runtime.choose_process_device(requested, procs)
            said = str(refused.value)
            assert said.startswith(f"--device {requested}: CUDA is not available on this machine") and "nvidia-smi" in (
                said
            )
            assert said.endswith("use --device cpu")
    # Without a request the CPU is still the fallback (with a warning), and --device cpu is the CPU.
    assert runtime.choose_process_device(None, under_torchrun).type == "cpu"
    assert runtime.choose_process_device("cpu", under_torchrun).type == "cpu"


def test_the_help_says_what_resume_auto_does() -> None:
    from grafting.train.cli import build_parser
    from grafting.train.config import CifarConfig

    text = " ".join(build_parser(CifarConfig, "graft-cifar", "").format_help().split())
    assert "--resume [{auto}]" in text and "'--resume auto' (for schedulers and launchers)" in text
    assert shlex.split("--resume auto") == ["--resume", "auto"]
