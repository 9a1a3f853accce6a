"""scripts/env.sh as a user sources it: no pip warning from a stray egg-info in the current folder, and a
torch the user brings (GRAFTING_PYTHON) used instead of the shared environment, with nothing downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, copy_checkout

pytestmark = pytest.mark.e2e  # every test here runs bash

REPORT = 'python -c "import sys, torch, grafting; print(sys.prefix); print(torch.__file__); print(grafting.__file__)"'


def bash(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``command`` in bash with ``set -euo pipefail`` (as the scripts run), in ``cwd``, as in a fresh shell
    (without what env.sh sets), with ``env`` added."""
    base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "GRAFTING_PYTHON")}
    base["PATH"] = os.pathsep.join(p for p in base["PATH"].split(os.pathsep) if not p.startswith(str(REPO)))
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {command}"],  # as the project's scripts source it
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def source_env(checkout: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``source <checkout>/scripts/env.sh`` and report which environment, torch and grafting are used."""
    return bash(f'source "{checkout}/scripts/env.sh" && {REPORT}', cwd, **env)


def test_a_stray_egg_info_in_the_current_folder_prints_no_pip_warning(tmp_path: Path) -> None:
    # what `pip install -e '.[plot]'` into another environment can leave in a checkout or wherever it ran
    egg = tmp_path / "filter_grafting.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: filter-grafting\nVersion: 0.1.0\n")
    done = source_env(REPO, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stdout + done.stderr and done.stderr == "", done.stderr  # today: "Skipping ..."
    prefix, _, grafting = done.stdout.splitlines()
    assert Path(prefix) == REPO / ".venv" and Path(grafting).is_relative_to(REPO)


@pytest.mark.slow
def test_bring_your_own_torch_and_go_back(tmp_path: Path) -> None:
    checkout = copy_checkout(tmp_path / "checkout")
    import torch

    never = tmp_path / "no-shared-venv"  # with GRAFTING_PYTHON the shared environment is neither made nor used
    offline = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # nothing may be downloaded
    # The active environment's torch: this test's own Python, as a user's activated environment.
    done = source_env(checkout, tmp_path, GRAFTING_PYTHON=sys.executable, GRAFTING_VENV=str(never), **offline)
    assert done.returncode == 0, done.stderr
    prefix, torch_file, grafting_file = done.stdout.splitlines()
    assert Path(prefix) == checkout / ".venv" and Path(grafting_file).is_relative_to(checkout)
    assert Path(torch_file) == Path(torch.__file__) and not never.exists()
    assert (checkout / ".venv" / ".base").read_text().strip() == sys.executable
    # .venv remembers the choice: a later shell needs no GRAFTING_PYTHON and rebuilds nothing
    installed = (checkout / ".venv" / ".installed").stat().st_mtime_ns
    again = source_env(checkout, tmp_path, GRAFTING_VENV=str(never), **offline)
    assert again.returncode == 0 and again.stdout == done.stdout, again.stderr
    assert (checkout / ".venv" / ".installed").stat().st_mtime_ns == installed

    # A Python without torch: one line that says what to do, and .venv is left as it was.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    refused = source_env(checkout, tmp_path, GRAFTING_PYTHON=str(bare / "bin" / "python"), **offline)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "lacks torch torchvision numpy tensorboard" in refused.stderr
    assert (checkout / ".venv" / ".installed").stat().st_mtime_ns == installed
    # Its advice, followed literally, goes back to the shared environment (the one this test runs in).
    advice = refused.stderr.split("or run '")[1].split("'")[0]
    assert advice == "GRAFTING_PYTHON= source scripts/env.sh"
    back = bash(f"{advice} && {REPORT}", checkout, **offline)
    assert back.returncode == 0, back.stderr
    prefix, torch_file, grafting_file = back.stdout.splitlines()
    assert Path(prefix) == checkout / ".venv" and Path(grafting_file).is_relative_to(checkout)
    assert not (checkout / ".venv" / ".base").exists()
