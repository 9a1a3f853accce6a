"""Installed with ``pip install .``, the project adds no generic top-level ``models`` package (the CIFAR
architectures are ``grafting_models``), and the console commands work from the install alone."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, copy_checkout

from grafting.data.fake import write_fake_cifar


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment (torch and friends visible from the test's own) with a copy of the checkout
    pip-installed into it, not editable; returns its bin folder."""
    root = tmp_path_factory.mktemp("install")
    source = copy_checkout(root / "source")
    env_dir = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    shared = Path(torch.__file__).resolve().parent.parent  # where torch, pip and setuptools live
    Path(site, "shared.pth").write_text(f"{shared}\n{sysconfig.get_paths()['purelib']}\n")
    done = run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
        root,
        {k: v for k, v in child_env().items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr
    return env_dir / "bin"


@pytest.mark.e2e
@pytest.mark.slow
def test_no_generic_models_package_and_the_commands_work_from_the_install(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    python = str(installed / "python")
    imported = run([python, "-c", "import models"], tmp_path, env)
    assert imported.returncode != 0 and "No module named 'models'" in imported.stderr, imported.stdout
    where = run(
        [python, "-c", "import grafting, grafting_models; print(grafting.__file__); print(grafting_models.__file__)"],
        tmp_path,
        env,
    )
    assert where.returncode == 0, where.stderr
    assert all(str(REPO) not in line for line in where.stdout.splitlines()), "the install imports the checkout"

    data = write_fake_cifar(tmp_path / "data", 10, train_size=64, test_size=32)
    trained = run(
        [
            str(installed / "graft-cifar"),
            "--data",
            str(data),
            "--s",
            "run",
            "--model",
            "resnet20",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--batch-size",
            "32",
        ],
        tmp_path,
        env,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    summary = run([str(installed / "graft-summary"), "run"], tmp_path, env)
    assert summary.returncode == 0 and "resnet20" in summary.stdout, summary.stdout + summary.stderr
    filters = run([str(installed / "graft-filters"), "run/net1/best.pt"], tmp_path, env)
    assert filters.returncode == 0 and "t = 0.1" in filters.stdout, filters.stdout + filters.stderr
    # The launcher plans a ring from the install alone: its training script is the installed one.
    launch = [str(installed / "graft-launch"), "--ring", "ring", "2", "--model", "resnet20", "--data", str(data)]
    planned = run(launch, tmp_path, {**env, "DRY": "1", "GPUS": "cpu", "OUT": "."})
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert f"{installed.parent}/lib/" in planned.stdout and "grafting_cifar/train.py" in planned.stdout
