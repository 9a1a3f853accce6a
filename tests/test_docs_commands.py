"""Every shell command of the README and the docs/ pages, run verbatim as a new user would: in a folder laid
out like the checkout, in the state its page names next to it ("in a fresh shell", or "after
`source scripts/env.sh`"), on generated data. A command that cannot run here (a GPU, a cluster, the internet
or hours) is skipped with its reason, from the explicit list SKIPPED below; an entry of that list that no page
holds any more is an error, so the list stays small and true.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO

from grafting.archs import cifar_models
from grafting.data.fake import write_fake_cifar

PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
FRESH, AFTER_ENV = "in a fresh shell", "after `source scripts/env.sh`"
COMMAND_TIMEOUT_S = 300

_GPU = "needs a GPU (CUDA_VISIBLE_DEVICES, --device cuda, torchrun on 4 GPUs)"
_IMAGENET = "needs ImageNet in /data/imagenet and a trained ResNet-50 ring"
_CLUSTER = "submits to a Slurm cluster (tests/test_slurm.py runs these paths on a local one)"
_HOURS = "trains ResNet-32 for 200 epochs: hours"
_TIER = "runs a tier of this test suite (tests/test_suite.py checks, in a fresh shell, that it selects tests)"
SKIPPED: dict[str, str] = {
    # README.md
    "bash scripts/quickstart.sh": "trains two networks for minutes (about 1.5 on 2 idle cores); "
    "tests/test_scripts.py::test_the_quickstart_trains_two_grafted_networks_with_the_launcher runs it",
    "bash scripts/test.sh": "is this test suite",
    'pytest -m "not e2e" -n 2': _TIER,
    'pytest -m "not slow"': _TIER,
    'pytest -m "e2e and not slurm and not rehearsal"': _TIER,
    "pytest -m slurm": _TIER,
    "pytest -m rehearsal": _TIER,
    "pytest tests/test_faults.py -k resume": _TIER,
    # docs/library.md: tests/test_readme_example.py runs docs/examples/own_loop.py so, twice in one folder
    "CUDA_VISIBLE_DEVICES=0 python docs/examples/own_loop.py runs/own-loop-1 1 2 &": "tests/test_readme_example.py "
    "runs it",
    "CUDA_VISIBLE_DEVICES=1 python docs/examples/own_loop.py runs/own-loop-1 2 2 &": "tests/test_readme_example.py "
    "runs it",
    # docs/performance.md
    "python scripts/bench.py": "the whole benchmark: minutes",
    "python scripts/bench.py --what train --nets 1 2 4 --variants fp32 amp --device cuda": _GPU,
    "python scripts/bench.py --what compile": "torch.compile: minutes on a CPU",
    "python scripts/bench.py --what entropy graft": "a benchmark: seconds on an idle machine, minutes on a loaded one; "
    "the GPU check's rehearsal (tests/test_gpu_check.py) runs these sections",
    "python scripts/bench.py -- --threads 1": "the whole benchmark: minutes",
    "python scripts/bench.py --data ~/data/cifar --train-repeat 3 --json bench.json": "needs CIFAR-10 in ~/data/cifar; "
    "the whole benchmark three times",
    "bash scripts/gpu_check.sh": _GPU,
    "GPU_CHECK_OUT=/some/folder bash scripts/gpu_check.sh": _GPU,
    "GPU_CHECK_REHEARSE=1 bash scripts/gpu_check.sh": "minutes; tests/test_gpu_check.py runs this rehearsal",
    # docs/reproducing.md
    "graft-data download data --cifar 10 100": "needs the internet (tests/test_tools.py runs it offline)",
    "GPUS=0,1,2,3 scripts/cifar_grafting.sh": _GPU,
    "GPUS=0,1 MODELS=resnet56 DATASETS=100 METHODS=dlr scripts/cifar_grafting.sh": _GPU,
    "tail -f runs/cifar_grafting/queue.log": "follows a log until interrupted",
    # docs/setup.md
    'GRAFTING_PYTHON="$(command -v python)" source scripts/env.sh': "needs an environment with its own torch "
    "active (tests/test_env.py brings one)",
    "python3 -m venv ~/torch-cu124": "the start of installing a CUDA build of torch from the internet",
    "~/torch-cu124/bin/pip install torch torchvision --index-url https://download.pytorch.org/whl/cu124": "downloads "
    "torch from the internet",
    "~/torch-cu124/bin/pip install numpy tensorboard pytest pytest-xdist matplotlib": "needs the environment made "
    "above",
    "GRAFTING_PYTHON=~/torch-cu124/bin/python source scripts/env.sh": "needs the environment made above",
    'python -m pytest -q -m "not e2e" -n 2 tests': "is this test suite's unit part",
    "bash scripts/check.sh": "CI runs it before the tests (.ci/run)",
    # docs/slurm.md
    "export LAUNCHER=slurm PARTITION=gpu ACCOUNT=mylab": _CLUSTER,
    "DRY=1 scripts/cifar_grafting.sh (slurm.md)": _CLUSTER,
    "scripts/cifar_grafting.sh": _CLUSTER,
    "squeue --me": _CLUSTER,
    "THROTTLE=4 scripts/cifar_grafting.sh": _CLUSTER,
    "scancel 1234": _CLUSTER,
    "tail -f runs/cifar_grafting/resnet32_c10_dlr/1.log": "follows a log until interrupted",
    "LAUNCHER=slurm PARTITION=gpu TIME=8:00:00 MODELS=resnet56 DATASETS=100 METHODS=dlr scripts/cifar_grafting.sh": (
        _CLUSTER
    ),
    "LAUNCHER=slurm PARTITION=gpu JOBS_PER_GPU=2 MODELS=resnet32 DATASETS=10 scripts/cifar_grafting.sh": _CLUSTER,
    "LAUNCHER=slurm PARTITION=gpu GPUS_PER_NET=4 CPUS_PER_NET=24 MEM_PER_NET=128G ARCHS=resnet50 METHODS=grafting "
    "DATA=/datasets/imagenet scripts/imagenet.sh": _CLUSTER,
    "LAUNCHER=slurm PARTITION=gpu NODES_PER_NET=2 GPUS_PER_NET=8 CPUS_PER_NET=64 MEM_PER_NET=480G "
    "SBATCH_EXTRA=--exclusive ARCHS=resnet50 METHODS=grafting DATA=/datasets/imagenet scripts/imagenet.sh": _CLUSTER,
    # docs/training.md
    "python grafting_cifar/train.py --s runs/r32 --num 2 --i 1 --model resnet32 --cifar 10 --difflr --cos "
    "--data data &": _HOURS,
    "python grafting_cifar/train.py --s runs/r32 --num 2 --i 2 --model resnet32 --cifar 10 --difflr --cos "
    "--data data &": _HOURS,
    "CUDA_VISIBLE_DEVICES=0 nohup python grafting_imagenet/train.py --data /data/imagenet -a resnet18 --s runs/r18 "
    "--num 2 --i 1 > runs/r18-1.log 2>&1 &": _GPU,
    "CUDA_VISIBLE_DEVICES=1 nohup python grafting_imagenet/train.py --data /data/imagenet -a resnet18 --s runs/r18 "
    "--num 2 --i 2 > runs/r18-2.log 2>&1 &": _GPU,
    "CUDA_VISIBLE_DEVICES=0,1,2,3 nohup torchrun --standalone --nproc_per_node 4 -- grafting_imagenet/train.py "
    "--data /data/imagenet -a resnet50 --s runs/r50 --num 2 --i 1 > runs/r50-1.log 2>&1 &": _GPU,
    "CUDA_VISIBLE_DEVICES=4,5,6,7 nohup torchrun --standalone --nproc_per_node 4 -- grafting_imagenet/train.py "
    "--data /data/imagenet -a resnet50 --s runs/r50 --num 2 --i 2 > runs/r50-2.log 2>&1 &": _GPU,
    "python grafting_imagenet/train.py --data /data/imagenet --s runs/r50 --i 2 -e": _IMAGENET,
    "python grafting_imagenet/train.py --data /data/imagenet -a resnet18 -e --checkpoint ~/downloads/r18.pth": (
        "needs ImageNet in /data/imagenet and a checkpoint in ~/downloads"
    ),
}
# The same command on two pages in two states: the page decides (a key of SKIPPED may name its page).
_PAGE_QUALIFIED = {("docs/slurm.md", "DRY=1 scripts/cifar_grafting.sh"): "DRY=1 scripts/cifar_grafting.sh (slurm.md)"}


@dataclass
class Command:
    """One command of a page: its text as printed (continuation lines joined), the line it starts on, and the
    state the page says it runs in."""

    page: str
    line: int
    text: str
    state: str

    @property
    def key(self) -> str:
        """The command without its trailing comment, spaces collapsed: how SKIPPED names it."""
        bare = re.sub(r"\s+#.*$", "", self.text).strip()
        bare = re.sub(r"\s+", " ", bare)
        return _PAGE_QUALIFIED.get((self.page, bare), bare)


def _state(prose: str, page: str, line: int, required: bool) -> str:
    """The state the prose before a block names: exactly one of FRESH and AFTER_ENV (FRESH when it names none
    and none is ``required``)."""
    text = " ".join(prose.split()).lower()
    found = [state for state in (FRESH, AFTER_ENV) if state in text]
    if len(found) != 1 and (required or found):
        raise AssertionError(
            f"{page}:{line}: the text before this shell block must say where it runs: '{FRESH}' or '{AFTER_ENV}'"
            + (" (it says both)" if found else "")
        )
    return found[0] if found else FRESH


def page_commands(page: str, states_required: bool = True) -> list[Command]:
    """The commands of every ```bash block of ``page``, each with the state named in the paragraph before it."""
    commands: list[Command] = []
    fence: str | None = None  # the language of the block we are in, None in prose
    paragraph: list[str] = []  # the paragraph being read, or the last one before a blank line
    ended = False  # the paragraph ended (a blank line came after it)
    pending, start = "", 0
    for number, line in enumerate((REPO / page).read_text().splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[3:] or "text"
                if fence in ("bash", "sh", "shell"):
                    state = _state(" ".join(paragraph), page, number, states_required)
                continue
            if stripped.startswith("#"):  # a heading: what came before it says nothing about what follows
                paragraph, ended = [], False
            elif not stripped:
                ended = True
            else:
                paragraph = [line] if ended else [*paragraph, line]
                ended = False
            continue
        if stripped == "```":
            fence, paragraph, ended = None, [], False
            continue
        if fence not in ("bash", "sh", "shell") or (not pending and (not stripped or stripped.startswith("#"))):
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        commands.append(Command(page, start, pending + line.strip(), state))
        pending = ""
    return commands


# ----------------------------------------------------------------------------------------------
# The folder the commands run in


def _fresh_shell() -> dict[str, str]:
    """This process's environment as a new shell would have it: nothing of scripts/env.sh activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "GRAFTING_PYTHON")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(REPO)))
    return env


def _write_run(ring: Path, model: str, num: int, method: dict, data: Path) -> None:
    """A finished run of ``num`` networks of ``model`` on the generated CIFAR-10 in ``data``: config.json,
    metrics.jsonl of 2 epochs (with alphas for a ring), best.pt and last.pt, as the training script leaves them."""
    for net in range(1, num + 1):
        folder = ring / f"net{net}"
        folder.mkdir(parents=True)
        config = {"model": model, "dataset": "cifar10", "num_classes": 10, "cifar": 10, "epochs": 2, "num": num}
        config.update(i=net, data=str(data), generated_data=True, stand_in="CIFAR-10 layout, 100 train and 50 test")
        (folder / "config.json").write_text(json.dumps({**config, **method}))
        records = [
            {"epoch": e, "epochs": 2, "test_acc": 20.0 + 5 * e + net, "invalid_filters": {"0.1": 3 - e, "0.01": 0}}
            | ({"alphas": {"conv1.weight": 0.4 + 0.1 * net}} if num > 1 and e == 1 else {})
            for e in (1, 2)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        torch.manual_seed(net)
        weights = cifar_models.create(model).state_dict()
        torch.save({"model": weights, "acc": 30.0}, folder / "best.pt")
        torch.save({"model": weights, "epoch": 2}, folder / "last.pt")


def _results(workspace: Path) -> None:
    """The runs the results tools' commands read, where the pages name them (written once)."""
    runs, data = workspace / "runs", workspace / "data"
    if (runs / "cifar_grafting").exists():
        return
    _write_run(runs / "cifar_baselines" / "resnet32_c10_baseline", "resnet32", 1, {}, data)
    _write_run(runs / "cifar_grafting" / "resnet32_c10_dlr", "resnet32", 2, {"difflr": True, "cos": True}, data)
    _write_run(runs / "cifar_grafting" / "resnet32_c10_slr", "resnet32", 2, {}, data)
    for member in ("m1", "m2"):
        _write_run(runs / "mobilenetv2_networks" / "mobilenetv2_c10_ensemble" / member, "mobilenetv2", 1, {}, data)


# What a command needs that an earlier step of the user's would have made (it is made just before the command).
_NEEDS = {
    "graft-summary": _results,
    "graft-plot": _results,
    "scripts/summarize.py": _results,
    "scripts/plot.py": _results,
    "scripts/count_filters.py": _results,
    "scripts/ensemble.py": _results,
}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A folder laid out like the checkout (its files linked, its .venv included) with data/ holding small
    generated CIFAR-10 and CIFAR-100 and an empty runs/."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("data", "runs", ".git", ".pytest_cache"):
            (folder / entry.name).symlink_to(entry)
    write_fake_cifar(folder / "data", 10, train_size=100, test_size=50)
    write_fake_cifar(folder / "data", 100, train_size=200, test_size=100)
    (folder / "runs").mkdir()
    return folder


def _run(command: Command, workspace: Path) -> subprocess.CompletedProcess:
    for needle, prepare in _NEEDS.items():
        if needle in command.text:
            prepare(workspace)
    script = command.text if command.state == FRESH else f"source scripts/env.sh >/dev/null && {command.text}"
    return subprocess.run(
        ["bash", "-c", script],
        cwd=workspace,
        env=_fresh_shell(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


# The pages of branch launch (its quickstart and experiment scripts are being rewritten there): they do not yet
# say where their commands run. Remove an entry when its page does (strict: it then fails until removed).
_PENDING: dict[str, str] = {}


def _page_param(page: str) -> Any:
    """A page as a test parameter: ``e2e`` when it has a command to run, ``slow`` for the pages whose commands
    train or plot for tens of seconds."""
    runs = any(command.key not in SKIPPED for command in page_commands(page, states_required=False))
    marks = [pytest.mark.e2e] if runs else []
    marks += [pytest.mark.slow] if page in SLOW_PAGES else []
    marks += [pytest.mark.xfail(reason=_PENDING[page], strict=True)] if page in _PENDING else []
    return pytest.param(page, marks=marks, id=page)


SLOW_PAGES = {"docs/reproducing.md", "docs/training.md", "README.md"}


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES])
def test_every_command_of_the_page_runs_as_printed(page: str, workspace: Path) -> None:
    failures = []
    for command in page_commands(page):
        if command.key in SKIPPED:
            continue
        done = _run(command, workspace)
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            failures.append(f"{page}:{command.line} ({command.state}): {command.text}\n    " + "\n    ".join(said))
    assert not failures, "commands that fail as printed:\n" + "\n".join(failures)


def test_the_list_of_skipped_commands_is_explicit_and_current() -> None:
    keys = {command.key for page in PAGES for command in page_commands(page, states_required=page not in _PENDING)}
    stale = sorted(set(SKIPPED) - keys)
    assert not stale, f"SKIPPED names commands no page holds any more: {stale}"
    assert all(len(reason) > 10 for reason in SKIPPED.values())
