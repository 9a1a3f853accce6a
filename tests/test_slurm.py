"""LAUNCHER=slurm: one job array per experiment (and ring size), a task per ring, a Slurm task per network.

In this process: the job scripts of every experiment script (options, the ring table, the names squeue
shows), the resources of each layout, the DRY=1 output. Without Slurm: the network tasks of a job script
(their GPUs and flags) and a network on two "nodes" (two torchrun agents on this machine). On a real
one-node Slurm that scripts/ci/local_slurm.sh starts once per test run: a real ring that requeues itself
at the time-limit signal and ends with the weights of the same ring run by the nohup queue, and, with
stand-in networks, a failed network, USR1 to the batch shell, --resume auto on every start, the refusal to
submit a ring twice, and the local cluster's isolation from another Slurm. Where Slurm cannot be started
those tests fail with the reason under CI (CI=true) and skip with it elsewhere.

The real ring: resnet20 on a generated CIFAR-10 (128 training images), 2 networks (dlr), 3 epochs, one
thread each, so that a run is deterministic and the Slurm run can be compared with the nohup run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    EXPERIMENTS,
    REPO,
    child_env,
    data_folders,
    finish,
    one_line,
    plan_script,
    script_environment,
    start_process,
)

from grafting.data.fake import write_fake_cifar, write_fake_imagefolder
from grafting.errors import UsageError
from grafting.launch import slurm as slurm_jobs
from grafting.launch.cli import run, script_rings
from grafting.tools import runs as runs_tool
from grafting.train.cli import entry_point
from grafting.train.signals import STOPPED_EXIT_CODE, StopRequested, stop_on_signals

LOCAL_SLURM = REPO / "scripts" / "ci" / "local_slurm.sh"
RING = {
    "GPUS": "cpu",
    "OUT": "out",
    "MODELS": "resnet20",
    "DATASETS": "10",
    "METHODS": "dlr",
    "EPOCHS": "3",
    "EXTRA": "--threads 1 --print_frequence 0",
}
SLURM = {"LAUNCHER": "slurm", "CPUS_PER_NET": "1", "MEM_PER_NET": "1G", "TIME": "30:00"}
RING_NAME = "resnet20_c10_dlr"
JOB_TIMEOUT_S = 600.0
EPOCH_LINE = re.compile(r"\[net (\d)/2\] epoch (\d)/3 \|")


def in_ci() -> bool:
    """Whether this runs under CI, where a missing Slurm is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


# ----------------------------------------------------------------------------------------------
# The job scripts, in this process

SETTINGS = {
    "LAUNCHER": "slurm",
    "PARTITION": "gpu-long",
    "ACCOUNT": "lab42",
    "QOS": "high",
    "TIME": "1-12:00:00",
    "CPUS_PER_NET": "6",
    "MEM_PER_NET": "24G",
    "MAX_REQUEUES": "5",
    "THROTTLE": "3",
    "SBATCH_EXTRA": "--constraint=a100 --mail-type=END",
}


@dataclass
class JobScript:
    """A written job script: its text, #SBATCH options, and each task's ring, name and training command."""

    text: str
    options: dict[str, str]
    rings: dict[int, tuple[str, str, list[str]]]


def read_job_script(text: str) -> JobScript:
    """Take a job script apart; it must parse (bash -n), and its ring table is read by bash itself."""
    check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    options = dict(
        o.split("=", 1) if "=" in o else (o, "")
        for o in (line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH "))
    )
    rings = {}
    for task in re.findall(r"^ {8}(\d+)\) RING=", text, re.M):
        table = text.split("\nset -uo pipefail\n")[0]
        shown = subprocess.run(
            ["bash", "-c", f'{table}\nring_of_task {task}; printf "%s\\0" "$RING" "$NAME" "${{TRAIN[@]}}"'],
            text=True,
            capture_output=True,
            check=True,
        ).stdout.split("\0")[:-1]
        rings[int(task)] = (shown[0], shown[1], shown[2:])
    return JobScript(text, options, rings)


@pytest.mark.e2e
@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.name)
def test_one_job_array_per_ring_size_with_a_task_per_ring(script: Path, tmp_path: Path) -> None:
    p = plan_script(script.name, tmp_path, **SETTINGS)
    arrays = slurm_jobs.arrays(p, "STAMP")
    assert sorted(len(a.rings) for a in arrays) == sorted(
        sum(1 for r in p.runnable if r.num == n) for n in {r.num for r in p.runnable}
    )
    seen = set()
    for array in arrays:
        job = read_job_script(slurm_jobs.job_script(p, array, sys.executable))
        options = job.options
        assert options["--job-name"] == script.stem, "the experiment's name, until a task names its ring"
        assert options["--array"] == f"{array.tasks}%3"
        assert (options["--partition"], options["--account"], options["--qos"], options["--time"]) == (
            "gpu-long",
            "lab42",
            "high",
            "1-12:00:00",
        )
        assert options["--cpus-per-task"] == "6" and options["--mem-per-cpu"] == "4096M"
        assert options["--constraint"] == "a100" and options["--mail-type"] == "END"
        gpus = "1"  # imagenet.sh too: one GPU per network, as published
        assert options["--ntasks"] == str(array.num) and options["--gpus-per-task"] == gpus
        assert options["--signal"].startswith("USR1@") and "--requeue" in options
        assert options["--output"] == f"{array.path.parent}/slurm-%A_%a.out"
        assert "\nMAX_REQUEUES=5 " in job.text and f"\nSTOPPED={STOPPED_EXIT_CODE} " in job.text
        assert len(job.rings) == len(array.rings)
        names = [name for _, name, _ in job.rings.values()]
        assert len({name[:8] for name in names}) == len(names), f"squeue's 8 columns must tell the rings apart: {names}"
        for folder, _, train in job.rings.values():
            seen.add(folder)
            args = p.trainer.parse([*train[1:], "--i", "1"])
            assert args.s == folder and args.num == array.num
            assert args.device == "cuda" and args.resume == "auto", "every start continues what there is"
    assert seen == {str(r.folder) for r in p.runnable}


@pytest.mark.e2e
def test_resources_per_layout(tmp_path: Path) -> None:
    def options(script: str, **settings: str) -> dict[str, str]:
        p = plan_script(script, tmp_path, LAUNCHER="slurm", **settings)
        [array] = slurm_jobs.arrays(p, "STAMP")
        return read_job_script(slurm_jobs.job_script(p, array, sys.executable)).options

    cifar = {"MODELS": "resnet20", "DATASETS": "10", "METHODS": "dlr"}
    shared = options("cifar_grafting.sh", JOBS_PER_GPU="2", NUM="3", **cifar)  # 3 networks on 2 GPUs
    assert (shared["--nodes"], shared["--ntasks"], shared["--gpus"]) == ("1", "3", "2")
    assert "--gpus-per-task" not in shared
    assert not any(key.startswith("--gpus") for key in options("cifar_grafting.sh", GPUS="cpu", **cifar))
    imagenet = {"ARCHS": "resnet50", "METHODS": "grafting", "GPUS_PER_NET": "8"}
    two_nodes = options("imagenet.sh", NODES_PER_NET="2", **imagenet)
    assert (two_nodes["--nodes"], two_nodes["--ntasks-per-node"], two_nodes["--gpus-per-node"]) == ("4", "1", "8")
    one_node = options("imagenet.sh", **imagenet)
    assert (one_node["--ntasks"], one_node["--gpus-per-task"]) == ("2", "8") and "--nodes" not in one_node


def test_squeue_names_tell_the_rings_apart() -> None:
    models = ("resnet32", "resnet56", "resnet110", "mobilenetv2")
    folders = [f"{m}_c{d}_{r}" for m in models for d in (10, 100) for r in ("slr", "dlr")]
    names = slurm_jobs.short_names(folders, "cifar_grafting")
    assert len({n[:8] for n in names}) == 16 and names[:2] == ["sc10r32", "dc10r32"]
    assert slurm_jobs.short_names(["resnet20_c10_dlr"]) == ["r20c10d"]
    members = [f"mobilenetv2_c{d}_ensemble/m{k}" for d in (10, 100) for k in (1, 2)]
    assert slurm_jobs.short_names(members) == ["c10m1", "c10m2", "c100m1", "c100m2"]
    alike = [f"123456789{k}" for k in range(3)]  # the first 8 characters alike whatever the order: numbered
    assert slurm_jobs.short_names(alike, "my_experiment") == ["me0", "me1", "me2"]


@pytest.mark.e2e
def test_dry_output_is_a_script_that_writes_and_submits_every_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_folders(tmp_path)
    script = str(REPO / "scripts" / "mobilenetv2_networks.sh")
    env = script_environment(DRY="1", LAUNCHER="slurm", DATASETS="10", NETS="2 3", ENSEMBLE="2")
    assert run(["--script", script], stdin=script_rings(script, env, tmp_path), environ=env, cwd=tmp_path) == 0
    output = capsys.readouterr().out
    assert not (tmp_path / "runs").exists(), "DRY=1 must not create anything"
    # Pasted as it is, with a stand-in sbatch that records what it is given: every job script lands where it
    # says and is submitted, the follow-up after the ring arrays.
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/submitted\necho $$\n')
    (folder / "sbatch").chmod(0o755)
    subprocess.run(["bash", "-c", output], env={**os.environ, "PATH": f"{folder}:/usr/bin:/bin"}, check=True)
    submitted = (tmp_path / "submitted").read_text().splitlines()
    written = sorted((tmp_path / "runs" / "mobilenetv2_networks" / "slurm").glob("*.sbatch"))
    assert len(submitted) == len(written) == 3 + 1  # ring sizes 2, 3 and 1 (the members), then the ensemble
    assert submitted[-1].startswith("--dependency=afterok:") and submitted[-1].count(":") == 3
    for path in written:
        read_job_script(path.read_text())


# ----------------------------------------------------------------------------------------------
# The stop signal in the training scripts (no processes)


def test_a_stop_signal_raises_once_and_the_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(StopRequested) as stop:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # interrupted: the handler raises here, in the main thread
    assert stop.value.signal_name == "SIGUSR1" and str(stop.value) == "stopped by SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    with stop_on_signals():  # a second signal while the run winds down is ignored
        with pytest.raises(StopRequested):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)


def test_the_scripts_exit_with_the_status_the_job_script_reads(capsys: pytest.CaptureFixture) -> None:
    @entry_point
    def main(argv: list[str] | None) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == STOPPED_EXIT_CODE == 75
    assert one_line(capsys.readouterr().err) == "stopped by SIGTERM (exit 75)"


# ----------------------------------------------------------------------------------------------
# The network tasks of a job script, without Slurm

STUB = r"""#!/usr/bin/env bash
# Stands in for python in a job's network task: records what it was started with.
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} $*" >> "$STUB_RECORD"
"""


def written_job(tmp_path: Path, script: str, **settings: str) -> tuple[Path, JobScript]:
    """Write the one job script of ``script`` with ``settings`` (LAUNCHER=slurm) to where it would go."""
    p = plan_script(script, tmp_path, LAUNCHER="slurm", **settings)
    [array] = slurm_jobs.arrays(p, "STAMP")
    text = slurm_jobs.job_script(p, array, sys.executable)
    array.path.parent.mkdir(parents=True)
    array.path.write_text(text)
    return array.path, read_job_script(text)


@pytest.mark.e2e
def test_network_tasks_get_their_gpus_and_continue_what_there_is(tmp_path: Path) -> None:
    stub = tmp_path / "stub-python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    path, job = written_job(
        tmp_path, "cifar_grafting.sh", JOBS_PER_GPU="2", NUM="3", MODELS="resnet20", DATASETS="10", METHODS="dlr",
        PYTHON=str(stub),
    )  # fmt: skip
    ring = Path(job.rings[0][0])
    # Network 2's last.pt was found unusable and set aside: previous.pt is what it continues from.
    (ring / "net2").mkdir(parents=True)
    (ring / "net2" / "previous.pt").write_bytes(b"")
    (ring / "net2" / "last.pt.unusable").write_bytes(b"")
    (ring / ".slurm-status").mkdir()
    record = tmp_path / "record"
    for task in range(3):  # what srun does on the node: the same script, one task id each
        env = dict(
            os.environ,
            SLURM_ARRAY_TASK_ID="0",
            SLURM_ARRAY_JOB_ID="12",
            SLURM_PROCID=str(task),
            SLURM_LOCALID=str(task),
            SLURM_JOB_ID="12",
            CUDA_VISIBLE_DEVICES="4,6",
            RING_HOSTS="node1",
            STATUS=str(ring / ".slurm-status"),
            STUB_RECORD=str(record),
        )
        subprocess.run(["bash", str(path), "--network"], env=env, check=True, timeout=30)
    lines = record.read_text().splitlines()
    assert [line.split()[0] for line in lines] == [
        "CUDA_VISIBLE_DEVICES=4",
        "CUDA_VISIBLE_DEVICES=6",
        "CUDA_VISIBLE_DEVICES=4",
    ]
    assert [line.split()[-4:] for line in lines] == [["--resume", "auto", "--i", str(n)] for n in (1, 2, 3)]
    log = (ring / "2.log").read_text()
    assert log.startswith("==== ") and "network 2, Slurm job 12_0 start 1" in log and "GPU 6" in log
    statuses = sorted(p.read_text().split() for p in (ring / ".slurm-status").iterdir())
    assert statuses == [["1", "0", "finished"], ["2", "0", "finished"], ["3", "0", "finished"]]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_network_on_two_nodes_grafts_with_a_single_process_peer(tmp_path: Path) -> None:
    data = write_fake_imagefolder(
        tmp_path / "imagenet", num_classes=3, train_per_class=16, val_per_class=8, image_size=40
    )
    path, job = written_job(
        tmp_path,
        "imagenet.sh",
        GPUS="cpu",
        NODES_PER_NET="2",
        ARCHS="resnet18",
        METHODS="grafting",
        EPOCHS="2",
        OUT="out",
        DATA=str(data),
        EXTRA="--threads 1 -j 0 -b 16 --image-size 32 -p 0",
    )
    assert job.options["--nodes"] == "4" and job.options["--ntasks-per-node"] == "1"
    ring, _, train = job.rings[0]
    ring = Path(ring)
    (ring / ".slurm-status").mkdir(parents=True)
    # Tasks 0 and 1 are network 1's two nodes; here both "nodes" are this machine. Network 2 is one plain
    # process with the same flags.
    agents = []
    for task in (0, 1):
        env = child_env(
            SLURM_ARRAY_TASK_ID="0",
            SLURM_ARRAY_JOB_ID="7",
            SLURM_PROCID=str(task),
            SLURM_LOCALID="0",
            SLURM_JOB_ID="7",
            RING_HOSTS="localhost localhost localhost localhost",
            STATUS=str(ring / ".slurm-status"),
        )
        agents.append(
            start_process(["bash", str(path), "--network"], tmp_path, f"agent{task}", env=env, merge_output=True)
        )
    peer = start_process([sys.executable, *train, "--i", "2"], tmp_path, "net2", merge_output=True)
    codes = finish([*agents, peer], timeout=JOB_TIMEOUT_S)
    logs = {p.name: p.read_text() for p in ring.glob("*.log")}
    assert codes == [0, 0, 0], f"{codes}\n{logs}\n{peer.log}"
    assert sorted(logs) == ["1.log", "1.node1.log"]
    assert "--nnodes 2" in logs["1.log"] and "--rdzv_backend c10d" in logs["1.log"]
    assert "is_host=1" in logs["1.log"] and "is_host=0" in logs["1.node1.log"]
    rank0 = [name for name, text in logs.items() if "[net 1/2 rank 0]" in text]
    assert len(rank0) == 1, logs  # rank 0 of the network logs and owns --s, on whichever node it landed
    config = json.loads((ring / "net1" / "config.json").read_text())
    assert config["world_size"] == 2
    for net in (1, 2):
        assert [(r["epoch"], r["grafted"]) for r in metrics(ring, net)] == [(1, True), (2, False)]


# ----------------------------------------------------------------------------------------------
# Fixtures: Slurm, data, the reference ring


@pytest.fixture(scope="session")
def slurm() -> Iterator[dict[str, str]]:
    """A running one-node Slurm; yields the environment its client commands need (SLURM_CONF)."""
    was_running = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True).returncode == 0
    try:
        started = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=900)
        failed = started.returncode != 0
        why = (started.stderr.strip().splitlines() or ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired) as err:
        failed, why = True, str(err)
    if failed:
        reason = f"no Slurm: scripts/ci/local_slurm.sh start failed: {why}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout).group(1)
    yield {"SLURM_CONF": conf}
    if not was_running:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated CIFAR-10: 128 training and 32 test images."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"), num_classes=10, train_size=128, test_size=32)


@dataclass
class Ring:
    """A finished ring: its folder, and when (monotonic seconds) the script was started, both networks'
    logs appeared, both networks had logged their last line, and the launcher had finished the ring."""

    folder: Path
    submitted: float
    started: float
    trained: float
    ended: float

    @property
    def overhead(self) -> float:
        """The launcher's own time: before the networks start and after they are done (training, whose
        speed varies with the machine's load, left out)."""
        return (self.started - self.submitted) + (self.ended - self.trained)


def watch(ring: Path, submitted: float, finished) -> Ring:
    """Follow a ring until ``finished()``; returns its :class:`Ring` times."""
    logs = [ring / f"{net}.log" for net in (1, 2)]
    started = wait_for(lambda: all(log.exists() for log in logs), "the networks' logs", ring, poll=0.02)
    trained = wait_for(
        lambda: all(log.read_text().count("done: best test accuracy") for log in logs),
        "the networks' last lines",
        ring,
        poll=0.02,
    )
    ended = wait_for(finished, "the launcher to finish the ring", ring, poll=0.02)
    return Ring(ring, submitted, started, trained, ended)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cifar: Path) -> tuple[Ring, str]:
    """The ring run to its end by the nohup queue (FOREGROUND=1) through cifar_grafting.sh, for real;
    returns it and the queue's output."""
    work = tmp_path_factory.mktemp("nohup")
    data_folders(work)
    settings = {**RING, "FOREGROUND": "1", "DATA": str(cifar), "PYTHON": sys.executable}
    submitted = time.monotonic()
    script = start_process(
        ["bash", str(REPO / "scripts" / "cifar_grafting.sh")], work, "nohup", env=script_environment(**settings)
    )
    ring = watch(work / "out" / RING_NAME, submitted, lambda: script.returncode is not None)
    assert script.returncode == 0, script.report()
    return ring, script.log


# ----------------------------------------------------------------------------------------------
# Helpers


def slurm_command(env: dict[str, str], *argv: str) -> str:
    """Run a Slurm client command; returns its stdout (fails the test when it fails)."""
    result = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


def job_fields(env: dict[str, str], job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    text = slurm_command(env, "scontrol", "show", "job", "-o", job)
    return dict(re.findall(r"(\w+)=(\S*)", text))


@dataclass
class Launched:
    """What a launch in this process returned and printed."""

    code: int
    out: str
    err: str


@pytest.fixture
def launch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """cifar_grafting.sh with the test ring's settings and LAUNCHER=slurm, planned and submitted in this process
    (the jobs inherit this process's environment, as they would the shell's)."""

    def launch(work: Path, env: dict[str, str], **settings: str) -> Launched:
        data_folders(work)
        environ = script_environment(**{**RING, **SLURM, **env, **settings})
        for name in ("SLURM_CONF", "STUB_RECORD", "STUB_FAIL"):
            if name in environ:
                monkeypatch.setenv(name, environ[name])
        script = str(REPO / "scripts" / "cifar_grafting.sh")
        try:
            code = run(["--script", script], stdin=script_rings(script, environ, work), environ=environ, cwd=work)
        except UsageError as err:
            code = 2
            print(f"error: {err}", file=sys.stderr)
        said = capsys.readouterr()
        return Launched(code, said.out, said.err)

    return launch


def submitted(work: Path, launched: Launched) -> str:
    """The job (array_task) of the test ring in a launch's output."""
    assert launched.code == 0, launched.out + launched.err
    [job] = re.findall(rf"^  (\d+_0)  \S+ +{re.escape(str(work / 'out' / RING_NAME))}$", launched.out, re.M)
    return job


def wait_for(condition, what: str, ring: Path, timeout: float = JOB_TIMEOUT_S, poll: float = 0.1) -> float:
    """Poll ``condition`` until true; returns the time (monotonic). Fails with the ring's logs on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text()}" for p in sorted(ring.glob("*.log")) + sorted(ring.glob("*.out"))
            )
            pytest.fail(f"timed out waiting for {what}\n{logs}")
        time.sleep(poll)
    return time.monotonic()


def job_ended(env: dict[str, str], job: str) -> bool:
    """Whether the job reached a final state."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return job_fields(env, job)["JobState"] in final


def last_epochs(ring: Path) -> list[int | None]:
    """The epoch of each network's last.pt (None where there is none yet)."""
    epochs = []
    for net in (1, 2):
        path = ring / f"net{net}" / "last.pt"
        epochs.append(torch.load(path, weights_only=True)["epoch"] if path.exists() else None)
    return epochs


def metrics(ring: Path, net: int) -> list[dict]:
    """The records of ``net<net>/metrics.jsonl``."""
    return [json.loads(line) for line in (ring / f"net{net}" / "metrics.jsonl").read_text().splitlines()]


def assert_ring_complete(ring: Path, reference: Path | None = None) -> None:
    """Three epochs per network, each logged once, grafted after every epoch but the last; with
    ``reference``, final weights bit for bit equal to the reference ring's."""
    for net in (1, 2):
        records = metrics(ring, net)
        assert [(r["epoch"], r["grafted"]) for r in records] == [(1, True), (2, True), (3, False)], records
        log = (ring / f"{net}.log").read_text()
        assert sorted(int(m.group(2)) for m in EPOCH_LINE.finditer(log)) == [1, 2, 3], log
        if reference is not None:
            got = torch.load(ring / f"net{net}" / "last.pt", weights_only=True)
            want = torch.load(reference / f"net{net}" / "last.pt", weights_only=True)
            assert got["epoch"] == want["epoch"] == 3
            assert list(got["model"]) == list(want["model"])
            for key, tensor in want["model"].items():
                assert torch.equal(got["model"][key], tensor), f"net{net} {key} differs from the uninterrupted run"


# ----------------------------------------------------------------------------------------------
# Real training: the nohup queue, and the same ring as a Slurm array that requeues itself


@pytest.mark.e2e
@pytest.mark.slow
def test_the_nohup_queue_trains_a_ring_and_prints_its_result(reference: tuple[Ring, str]) -> None:
    ring, output = reference
    assert_ring_complete(ring.folder)
    [run_] = runs_tool.find_runs([ring.folder.parent])
    assert (run_.model, run_.dataset, run_.method, run_.epochs) == ("resnet20", "cifar10", "dlr", 3)
    line = next(line for line in output.splitlines() if f"ring {ring.folder} finished: " in line)
    assert "resnet20 cifar10 dlr, 2 network(s), 3 epochs (done, GENERATED stand-in data)" in line, line
    finals = [torch.load(ring.folder / f"net{n}" / "last.pt", weights_only=True)["acc"] for n in (1, 2)]
    assert [n.final for n in run_.networks] == finals
    for net in (1, 2):
        header = (ring.folder / f"{net}.log").read_text().splitlines()[0]
        assert header.startswith("==== ") and f"network {net} on cpu, started by cifar_grafting.sh" in header


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.slurm
def test_an_array_task_requeues_itself_at_the_time_limit_signal_and_ends_as_an_uninterrupted_run(
    tmp_path: Path, slurm: dict[str, str], cifar: Path, reference: tuple[Ring, str], launch
) -> None:
    began = time.monotonic()
    job = submitted(tmp_path, launch(tmp_path, slurm, DATA=str(cifar)))
    ring = tmp_path / "out" / RING_NAME

    def log(net: int) -> str:
        path = ring / f"{net}.log"
        return path.read_text() if path.exists() else ""

    def saved_an_epoch(net: int) -> bool:
        # An epoch logged and in last.pt (a stop between the two would repeat that epoch after the restart)
        lines = len(EPOCH_LINE.findall(log(net)))
        return lines >= 1 and last_epochs(ring)[net - 1] == lines

    wait_for(lambda: all(saved_an_epoch(net) for net in (1, 2)), "an epoch of both networks", ring, poll=0.05)
    name = slurm_command(slurm, "squeue", "-h", "-j", job, "-o", "%j").strip()
    assert name == "r20c10d", "the task names itself after its ring"
    done = last_epochs(ring)
    signalled = time.monotonic()
    slurm_command(slurm, "scancel", "--signal=USR1", job)  # what Slurm sends before the time limit
    stopped = wait_for(lambda: all("stopped by SIGUSR1:" in log(net) for net in (1, 2)), "the stop lines", ring)
    print(f"\nthe networks stopped {stopped - signalled:.1f} s after the signal")
    assert stopped - signalled < 10, "the networks did not stop at once"
    wait_for(lambda: job_ended(slurm, job), f"job {job} to end", ring)
    ended = time.monotonic()
    fields = job_fields(slurm, job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), fields
    assert_ring_complete(ring, reference[0].folder)
    output = (ring / f"slurm-{job}.out").read_text()
    assert "the networks stopped at the time-limit signal; requeueing (1 of at most 3)" in output, output
    assert "ring finished: resnet20 cifar10 dlr, 2 network(s), 3 epochs" in output, output
    for net in (1, 2):
        text = log(net)
        assert text.count("==== ") >= 3 and f"Slurm job {job} start 2" in text, text
        assert f"resumed from {ring}/net{net}/last.pt: epoch {done[net - 1]} done" in text, text
    print(f"submitted to finished: {ended - began:.1f} s, a requeue (cred_expire 10 s) included")


# ----------------------------------------------------------------------------------------------
# Slurm with stand-in networks: failure, USR1 to the batch shell, --resume auto, submitting twice

STOPPABLE = r"""#!/usr/bin/env bash
# Stands in for python in a job's network task: records its flags, then fails (network STUB_FAIL) or trains
# until a signal kills it.
echo "$*" >> "$STUB_RECORD"
if [[ " $* " == *" --i ${STUB_FAIL:-none} "* ]]; then echo "error: stand-in failure at start-up"; exit 1; fi
exec sleep 300
"""


def stand_in(tmp_path: Path) -> dict[str, str]:
    """Settings whose networks are the STOPPABLE stand-in, recording to tmp_path/record."""
    stub = tmp_path / "stub-python"
    stub.write_text(STOPPABLE)
    stub.chmod(0o755)
    return {"PYTHON": str(stub), "STUB_RECORD": str(tmp_path / "record")}


def recorded(tmp_path: Path) -> list[str]:
    path = tmp_path / "record"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.e2e
@pytest.mark.slurm
def test_a_failed_network_ends_the_job_as_failed_and_is_never_requeued(
    tmp_path: Path, slurm: dict[str, str], launch
) -> None:
    # Network 1 fails; srun stops network 2, which exits with the stopped status (75) that srun passes on.
    job = submitted(tmp_path, launch(tmp_path, slurm, **stand_in(tmp_path), STUB_FAIL="1"))
    ring = tmp_path / "out" / RING_NAME
    wait_for(lambda: job_ended(slurm, job), f"job {job} to end", ring, timeout=120)
    fields = job_fields(slurm, job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "1:0", "0"), fields
    lines = (ring / f"slurm-{job}.out").read_text().splitlines()
    said = next(line for line in lines if "failed (exit" in line)
    assert "network 1 failed (exit 1): error: stand-in failure at start-up; its ring was stopped and is not" in said
    assert said.endswith(f"then: sbatch --array=0 {next((tmp_path / 'out' / 'slurm').glob('*.sbatch'))}"), said
    assert not any("requeueing" in line for line in lines)


@pytest.mark.e2e
@pytest.mark.slurm
def test_usr1_to_the_batch_shell_stops_the_networks_and_requeues(tmp_path: Path, slurm: dict[str, str], launch) -> None:
    job = submitted(tmp_path, launch(tmp_path, slurm, **stand_in(tmp_path), MAX_REQUEUES="1"))
    ring = tmp_path / "out" / RING_NAME
    wait_for(lambda: len(recorded(tmp_path)) == 2, "both networks", ring, timeout=120)
    slurm_command(slurm, "scancel", "--batch", "--signal=USR1", job)  # or --signal=B:USR1@N before the limit
    wait_for(lambda: job_fields(slurm, job)["Restarts"] == "1", "the job to requeue itself", ring, timeout=60)
    output = (ring / f"slurm-{job}.out").read_text()
    assert "the networks stopped at the time-limit signal (SIGUSR1 to the batch shell); requeueing (1 of at most" in (
        output
    )
    for net in (1, 2):
        assert f"network {net} stopped by SIGUSR1" in (ring / f"{net}.log").read_text()
    slurm_command(slurm, "scancel", job)


@pytest.mark.e2e
@pytest.mark.slurm
def test_every_start_passes_resume_auto_to_every_network(tmp_path: Path, slurm: dict[str, str], launch) -> None:
    # Network 2's last.pt was found unusable and set aside (its previous.pt remains); network 1 has nothing.
    ring = tmp_path / "out" / RING_NAME
    (ring / "net2").mkdir(parents=True)
    (ring / "net2" / "previous.pt").write_bytes(b"")
    (ring / "net2" / "last.pt.unusable").write_bytes(b"")
    job = submitted(tmp_path, launch(tmp_path, slurm, **stand_in(tmp_path), EXTRA="--resume --threads 1"))
    wait_for(lambda: len(recorded(tmp_path)) == 2, "both networks", ring, timeout=120)
    slurm_command(slurm, "scancel", job)
    flags = sorted(line.split("--resume ", 1)[1] for line in recorded(tmp_path))
    assert flags == ["auto --i 1", "auto --i 2"], recorded(tmp_path)


@pytest.mark.e2e
@pytest.mark.slurm
def test_a_ring_is_never_submitted_twice(tmp_path: Path, slurm: dict[str, str], launch) -> None:
    # Slurm's own checks come first: nothing is submitted or written when sbatch --test-only refuses.
    refused = launch(tmp_path, slurm, PARTITION="nope")
    assert refused.code == 2 and refused.out == ""
    line = one_line(refused.err)
    assert "sbatch --test-only refused the job of" in line and "invalid partition" in line
    assert not (tmp_path / "out").exists()
    # Held, so that it stays queued: a second launch of the same ring is refused, naming the job, also when its
    # command differs (EXTRA=--resume).
    job = submitted(tmp_path, launch(tmp_path, slurm, **stand_in(tmp_path), SBATCH_EXTRA="--hold"))
    ring = tmp_path / "out" / RING_NAME
    for extra in ({}, {"EXTRA": "--resume"}):
        if extra:
            (ring / "net1").mkdir()
            (ring / "net1" / "last.pt").write_bytes(b"")  # something to continue, for EXTRA=--resume
        again = launch(tmp_path, slurm, **stand_in(tmp_path), **extra)
        assert again.code == 2 and one_line(again.err) == (
            f"error: {ring} is already queued or running as Slurm job {job}; wait for it, or stop it: scancel {job}"
        )
    # The same job script submitted by hand from another folder (its command reads //tmp/... there): the
    # launcher recognises the file and its ring, not the string.
    slurm_command(slurm, "scancel", job)
    wait_for(lambda: job_ended(slurm, job.split("_")[0]), "the job to go", ring, timeout=60)
    (ring / "slurm.job").unlink()
    [script] = (tmp_path / "out" / "slurm").glob("*.sbatch")
    by_hand = subprocess.run(
        ["sbatch", "--parsable", "--hold", str(script.relative_to("/"))],
        cwd="/",
        env={**os.environ, **slurm},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    again = launch(tmp_path, slurm, **stand_in(tmp_path), EXTRA="--resume")
    assert f"is already queued or running as Slurm job {by_hand}_0;" in one_line(again.err)
    slurm_command(slurm, "scancel", by_hand)


# ----------------------------------------------------------------------------------------------
# The local cluster is this project's alone

FOREIGN_CONF = """ClusterName=foreign
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmctldLogFile={folder}/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.slurm
def test_local_slurm_leaves_a_foreign_controller_on_the_default_ports_alone(tmp_path: Path) -> None:
    if subprocess.run(["bash", str(LOCAL_SLURM), "install"], capture_output=True).returncode != 0 or os.getuid():
        (pytest.fail if in_ci() else pytest.skip)("needs Slurm's daemons and root")
    for port in (6817, 6818):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is taken: a real Slurm runs here")
    folder = tmp_path / "foreign"
    (folder / "state").mkdir(parents=True)
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    conf = folder / "slurm.conf"
    conf.write_text(FOREIGN_CONF.format(host=socket.gethostname().split(".")[0], folder=folder, node=node))
    # Ours gets its own folder, name and ports, so that the session's cluster of the other tests runs on.
    ours = {"GRAFTING_SLURM_DIR": str(tmp_path / "ours"), "GRAFTING_SLURM_PORT": "17817", "GRAFTING_SLURM_CLUSTER": "t"}
    foreign = {"SLURM_CONF": str(conf)}

    def local_slurm(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LOCAL_SLURM), command], env={**os.environ, **ours}, capture_output=True, text=True, timeout=120
        )

    assert local_slurm("start").returncode == 0  # munged first: the foreign controller needs it too
    subprocess.run(["slurmctld", "-c", "-f", str(conf)], env={**os.environ, **foreign}, check=True, timeout=60)
    controller = ["-f", f"^slurmctld -c -f {conf}$"]  # pgrep/pkill find it by its command line, pid file or not
    try:
        submit_held = ["sbatch", "--parsable", "--hold", "--wrap", "sleep 300"]
        wait_for(lambda: subprocess.run(["squeue"], env={**os.environ, **foreign}).returncode == 0, "it", folder)
        job = slurm_command(foreign, *submit_held).strip()

        def foreign_jobs() -> str:
            return slurm_command(foreign, "squeue", "-h", "-o", "%i %T")

        assert foreign_jobs().split() == [job, "PENDING"]
        for command, code in (("stop", 0), ("status", 1), ("start", 0), ("status", 0), ("stop", 0), ("status", 1)):
            done = local_slurm(command)
            assert done.returncode == code, f"{command}: {done.stderr}"
            assert foreign_jobs().split() == [job, "PENDING"], f"{command} touched the foreign cluster's job"
        # What answers on our ports while ours runs is ours, by name.
        assert local_slurm("start").returncode == 0
        ours_conf = {"SLURM_CONF": str(tmp_path / "ours" / "slurm.conf")}
        assert "ClusterName             = t\n" in slurm_command(ours_conf, "scontrol", "show", "config")
        assert local_slurm("stop").returncode == 0
        assert foreign_jobs().split() == [job, "PENDING"]
    finally:
        subprocess.run(["pkill", "-TERM", *controller])
        wait_for(
            lambda: subprocess.run(["pgrep", *controller]).returncode == 1, "the foreign controller to stop", folder
        )
        local_slurm("stop")  # and the munged it started, now that no other cluster needs it
