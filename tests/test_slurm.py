"""LAUNCHER=slurm: one sbatch job per ring, requeue-safe, networks that span nodes.

The jobs run on a real one-node Slurm that scripts/ci/local_slurm.sh starts once per test run (it
installs Debian's slurm-wlm and munge where they are missing). Where Slurm cannot be started the tests
that need it fail with the reason under CI (CI=true) and skip with it elsewhere. The job scripts of
DRY=1, the stop signal and a network on two "nodes" (two torchrun agents on this machine) need no Slurm.

One ring serves every run: resnet20 on a generated CIFAR-10 (128 training images), 2 networks (dlr),
3 epochs, one thread each, so that a run is deterministic and the Slurm runs can be compared with the
same ring started with LAUNCHER=nohup.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, finish, one_line, start_process
from test_scripts import EXPERIMENTS, data_folders, dry_commands, listing, parsed, run_script, training

from grafting.data.fake import write_fake_cifar, write_fake_imagefolder
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
        lambda: all("done: best test accuracy" in log.read_text() for log in logs),
        "the networks' last lines",
        ring,
        poll=0.02,
    )
    ended = wait_for(finished, "the launcher to finish the ring", ring, poll=0.02)
    return Ring(ring, submitted, started, trained, ended)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cifar: Path) -> Ring:
    """The ring run to its end without interruption by the default launcher (LAUNCHER=nohup, FOREGROUND=1)."""
    work = tmp_path_factory.mktemp("nohup")
    data_folders(work)
    settings = {**RING, "FOREGROUND": "1", "DATA": str(cifar), "PYTHON": sys.executable}
    submitted = time.monotonic()
    script = start_process(
        ["bash", str(REPO / "scripts" / "cifar_grafting.sh")],
        work,
        "nohup",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), **settings},
    )
    ring = watch(work / "out" / RING_NAME, submitted, lambda: script.returncode is not None)
    assert script.returncode == 0, script.report()
    return ring


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


def submit(work: Path, cifar: Path, env: dict[str, str], **settings: str) -> str:
    """Submit the ring with cifar_grafting.sh and LAUNCHER=slurm; returns the job id."""
    result = run_script("cifar_grafting.sh", work, DATA=str(cifar), **{**RING, **SLURM, **env, **settings})
    assert result.returncode == 0, result.stdout + result.stderr
    [job] = re.findall(r"^submitted .*: job (\d+) \(2 network\(s\)\)$", result.stdout, re.M)
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
    return job_fields(env, job)["JobState"] in (
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
    )


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
    launcher = (REPO / "scripts" / "lib" / "launch.sh").read_text()
    assert f"_STOPPED_STATUS={STOPPED_EXIT_CODE}\n" in launcher, "launch.sh must know the stopped exit status"


# ----------------------------------------------------------------------------------------------
# DRY=1 LAUNCHER=slurm: the job scripts of every experiment script

SETTINGS = {
    "PARTITION": "gpu-long",
    "ACCOUNT": "lab42",
    "QOS": "high",
    "TIME": "1-12:00:00",
    "CPUS_PER_NET": "6",
    "MEM_PER_NET": "24G",
    "MAX_REQUEUES": "5",
    "SBATCH_EXTRA": "--constraint=a100 --mail-type=END",
}
JOB_START = re.compile(r"^# ---- (\S+): sbatch (\S+)$")


@dataclass
class JobScript:
    """One printed job script: its path, text, #SBATCH options and the training command's words."""

    path: Path
    text: str
    options: dict[str, str]
    train: list[str]


def job_scripts(stdout: str, tmp_path: Path) -> list[JobScript]:
    """The job scripts of a DRY=1 LAUNCHER=slurm run; each must parse (bash -n)."""
    jobs, lines, current = [], stdout.splitlines(), None
    for line in lines:
        start = JOB_START.match(line)
        if start:
            assert start.group(1) == start.group(2), line
            current = (Path(start.group(1)), [])
        elif current and line == f"# ---- end of {current[0]}":
            text = "\n".join(current[1]) + "\n"
            check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
            assert check.returncode == 0, f"{current[0]} does not parse: {check.stderr}"
            options = dict(
                o.split("=", 1) if "=" in o else (o, "")
                for o in (line.split()[1] for line in current[1] if line.startswith("#SBATCH "))
            )
            train = []
            if any(line.startswith("TRAIN=(") for line in current[1]):
                words = subprocess.run(
                    ["bash", "-c", 'eval "$(grep "^TRAIN=(" /dev/stdin)"; printf "%s\\0" "${TRAIN[@]}"'],
                    input=text,
                    text=True,
                    capture_output=True,
                    check=True,
                ).stdout
                train = words.split("\0")[:-1]
            jobs.append(JobScript(current[0], text, options, train))
            current = None
        elif current:
            current[1].append(line)
        else:
            assert line.startswith("#"), f"a line outside the job scripts: {line}"
    assert current is None, "a job script without its end marker"
    return jobs


@pytest.mark.e2e
@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.name)
def test_dry_run_prints_one_job_script_per_ring(script: Path, tmp_path: Path) -> None:
    _, commands = dry_commands(script, tmp_path)  # the nohup plan: which rings, how many networks
    rings = {}
    for _, args in training(commands):
        rings[args.s] = args.num
    before = listing(tmp_path)
    result = run_script(script, tmp_path, DRY="1", **{**SLURM, **SETTINGS})
    assert result.returncode == 0, result.stderr
    assert listing(tmp_path) == before, "DRY=1 must not create anything"
    jobs = job_scripts(result.stdout, tmp_path)
    ring_jobs = [job for job in jobs if job.train]
    assert {str(job.path.parent): int(job.options["--ntasks"]) for job in ring_jobs} == rings
    assert len(ring_jobs) == len(rings), "one job per ring"
    for job in ring_jobs:
        assert job.path.name == "job.sbatch"
        options = job.options
        assert (options["--partition"], options["--account"], options["--qos"], options["--time"]) == (
            "gpu-long",
            "lab42",
            "high",
            "1-12:00:00",
        )
        assert options["--cpus-per-task"] == "6" and options["--mem-per-cpu"] == "4096M"
        assert "--constraint" in options and options["--mail-type"] == "END"
        assert options["--gpus-per-task"] == "4" if script.name == "imagenet.sh" else options["--gpus-per-task"] == "1"
        assert options["--signal"].startswith("USR1@") and "--requeue" in options
        assert options["--output"] == f"{job.path.parent}/slurm-%j.out"
        assert "\nMAX_REQUEUES=5 " in job.text
        command = type(commands[0])(
            env={}, program=job.train[0], launcher=[], args=[*job.train[1:], "--i", "1"], log=None
        )
        args = parsed(command)
        assert args.s == str(job.path.parent) and args.num == rings[args.s]
        name = options["--job-name"]
        model = args.model
        assert name.startswith("imagenet_" + model if script.name == "imagenet.sh" else model), name
        assert Path(args.s).name in name
    after = [job for job in jobs if not job.train]
    if script.name == "mobilenetv2_networks.sh":
        assert len(after) == 2 and all("--dependency" in job.options and "ensemble.py" in job.text for job in after)
    else:
        assert after == []


@pytest.mark.e2e
def test_dry_run_resources_per_layout(tmp_path: Path) -> None:
    def options(script: str, **settings: str) -> dict[str, str]:
        result = run_script(script, tmp_path, DRY="1", LAUNCHER="slurm", **settings)
        assert result.returncode == 0, result.stderr
        [job] = job_scripts(result.stdout, tmp_path)
        return job.options

    cifar = {"MODELS": "resnet20", "DATASETS": "10", "METHODS": "dlr"}
    shared = options("cifar_grafting.sh", JOBS_PER_GPU="2", NUM="3", **cifar)  # 3 networks on 2 GPUs
    assert (shared["--nodes"], shared["--ntasks"], shared["--gpus"]) == (
        "1",
        "3",
        "2",
    ) and "--gpus-per-task" not in shared
    on_cpu = options("cifar_grafting.sh", GPUS="cpu", **cifar)
    assert not any(key.startswith("--gpus") for key in on_cpu)
    imagenet = {"ARCHS": "resnet50", "METHODS": "grafting", "GPUS_PER_NET": "8"}
    two_nodes = options("imagenet.sh", NODES_PER_NET="2", **imagenet)
    assert (two_nodes["--nodes"], two_nodes["--ntasks-per-node"], two_nodes["--gpus-per-node"]) == ("4", "1", "8")
    one_node = options("imagenet.sh", **imagenet)
    assert (one_node["--ntasks"], one_node["--gpus-per-task"]) == ("2", "8") and "--nodes" not in one_node


STUB = r"""#!/usr/bin/env bash
# Stands in for python in a job's network task: records what it was started with.
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} $*" >> "$STUB_RECORD"
"""


@pytest.mark.e2e
def test_network_tasks_get_their_gpus_and_resume_flags(tmp_path: Path) -> None:
    stub = tmp_path / "stub-python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    result = run_script(
        "cifar_grafting.sh",
        tmp_path,
        DRY="1",
        LAUNCHER="slurm",
        JOBS_PER_GPU="2",
        NUM="3",
        MODELS="resnet20",
        DATASETS="10",
        METHODS="dlr",
        PYTHON=str(stub),
    )
    [job] = job_scripts(result.stdout, tmp_path)
    job.path.parent.mkdir(parents=True)
    job.path.write_text(job.text)
    record = tmp_path / "record"
    for task in range(3):  # what srun does on the node: the same script, one task id each
        env = dict(
            os.environ,
            SLURM_PROCID=str(task),
            SLURM_LOCALID=str(task),
            SLURM_JOB_ID="12",
            CUDA_VISIBLE_DEVICES="4,6",
            RESUME_NETS=" 2",
            RING_HOSTS="node1",
            STUB_RECORD=str(record),
        )
        subprocess.run(["bash", str(job.path), "--network"], env=env, check=True, timeout=30)
    lines = record.read_text().splitlines()
    assert [line.split()[0] for line in lines] == [
        "CUDA_VISIBLE_DEVICES=4",
        "CUDA_VISIBLE_DEVICES=6",
        "CUDA_VISIBLE_DEVICES=4",
    ]
    assert [line.split()[-3:] for line in lines] == [["3", "--i", "1"], ["--i", "2", "--resume"], ["3", "--i", "3"]]
    log = (job.path.parent / "2.log").read_text()
    assert log.startswith("==== ") and "network 2, Slurm job 12 start 1" in log and "GPU 6" in log


# ----------------------------------------------------------------------------------------------
# A network on two nodes: two torchrun agents of the job script on this machine (no Slurm needed)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_network_on_two_nodes_grafts_with_a_single_process_peer(tmp_path: Path) -> None:
    data = write_fake_imagefolder(
        tmp_path / "imagenet", num_classes=3, train_per_class=16, val_per_class=8, image_size=40
    )
    result = run_script(
        "imagenet.sh",
        tmp_path,
        DRY="1",
        LAUNCHER="slurm",
        GPUS="cpu",
        NODES_PER_NET="2",
        ARCHS="resnet18",
        METHODS="grafting",
        EPOCHS="2",
        OUT="out",
        DATA=str(data),
        EXTRA="--threads 1 -j 0 -b 16 --image-size 32 -p 0",
    )
    assert result.returncode == 0, result.stderr
    [job] = job_scripts(result.stdout, tmp_path)
    assert job.options["--nodes"] == "4" and job.options["--ntasks-per-node"] == "1"
    ring = job.path.parent
    ring.mkdir(parents=True)
    job.path.write_text(job.text)
    # Tasks 0 and 1 are network 1's two nodes; here both "nodes" are this machine. Network 2 is one plain
    # process with the same flags.
    agents = []
    for task in (0, 1):
        env = child_env(
            SLURM_PROCID=str(task),
            SLURM_LOCALID="0",
            SLURM_JOB_ID="7",
            RING_HOSTS="localhost localhost localhost localhost",
            RESUME_NETS="",
        )
        agents.append(
            start_process(["bash", str(job.path), "--network"], tmp_path, f"agent{task}", env=env, merge_output=True)
        )
    peer = start_process([sys.executable, *job.train, "--i", "2"], tmp_path, "net2", merge_output=True)
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
# Real Slurm


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.slurm
def test_ring_runs_as_one_job_and_the_summary_reads_it(
    tmp_path: Path, slurm: dict[str, str], cifar: Path, reference: Ring
) -> None:
    # Slurm's own checks come before anything is submitted.
    refused = run_script(
        "cifar_grafting.sh", tmp_path, DATA=str(cifar), **{**RING, **SLURM, **slurm, "PARTITION": "nope"}
    )
    assert refused.returncode == 2 and refused.stdout == "", refused.stdout
    assert "sbatch --test-only refused the job of" in one_line(refused.stderr) and "invalid partition" in refused.stderr
    assert not (tmp_path / "out").exists()
    submitted = time.monotonic()
    job = submit(tmp_path, cifar, slurm)
    ring = tmp_path / "out" / RING_NAME
    # The same ring again while its job runs: refused, naming the job.
    again = run_script("cifar_grafting.sh", tmp_path, DATA=str(cifar), **{**RING, **SLURM, **slurm})
    assert one_line(again.stderr) == (
        f"error: {ring} is already queued or running as Slurm job {job}; wait for it, or stop it: scancel {job}"
    )
    timing = watch(ring, submitted, lambda: job_ended(slurm, job))
    fields = job_fields(slurm, job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "0"), fields
    assert fields["JobName"] == RING_NAME and fields["NumTasks"] == "2"
    assert_ring_complete(ring, reference.folder)
    overhead = timing.overhead - reference.overhead
    for name, run in (("nohup", reference), ("slurm", timing)):
        print(
            f"\n{name}: {run.ended - run.submitted:.1f} s in all; networks started after "
            f"{run.started - run.submitted:.1f} s, the ring finished {run.ended - run.trained:.1f} s after their "
            f"last lines",
            end="",
        )
    print(f"\nthe Slurm path's overhead over the nohup path: {overhead:+.1f} s")
    assert overhead < 15, f"the Slurm path took {overhead:.1f} s longer than the nohup path"
    # The results tools read the ring folder as they read a nohup run's; the job's output ends with its row.
    [run] = runs_tool.find_runs([tmp_path / "out"])
    assert (run.model, run.dataset, run.method, run.epochs) == ("resnet20", "cifar10", "dlr", 3)
    output = (ring / f"slurm-{job}.out").read_text()
    assert "ring finished:" in output and "resnet20" in output.split("ring finished:")[1]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.slurm
def test_requeue_resumes_every_network_and_ends_as_an_uninterrupted_run(
    tmp_path: Path, slurm: dict[str, str], cifar: Path, reference: Ring
) -> None:
    job = submit(tmp_path, cifar, slurm)
    ring = tmp_path / "out" / RING_NAME
    wait_for(lambda: None not in last_epochs(ring), "both networks' first epoch", ring, poll=0.05)
    requeued_at = time.time()
    slurm_command(slurm, "scontrol", "requeue", job)
    done = [torch.load(ring / f"net{net}" / "last.pt", weights_only=True)["epoch"] for net in (1, 2)]
    lost = [requeued_at - (ring / f"net{net}" / "last.pt").stat().st_mtime for net in (1, 2)]
    wait_for(lambda: job_ended(slurm, job), f"job {job} to end", ring)
    fields = job_fields(slurm, job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), fields
    assert_ring_complete(ring, reference.folder)
    for net in (1, 2):
        log = (ring / f"{net}.log").read_text()
        assert log.count("==== ") >= 2 and f"Slurm job {job} start 2" in log, log
        assert f"resumed from {ring}/net{net}/last.pt: epoch {done[net - 1]} done" in log, log
        epoch_s = max(r["epoch_s"] for r in metrics(ring, net))
        print(
            f"\nnet{net}: requeued in epoch {done[net - 1] + 1}, {lost[net - 1]:.1f} s after its last finished "
            f"epoch (an epoch takes up to {epoch_s:.1f} s): the work lost"
        )
        assert lost[net - 1] < epoch_s + 5, "more than the unfinished epoch was lost"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.slurm
def test_time_limit_signal_stops_the_networks_and_the_job_requeues_itself(
    tmp_path: Path, slurm: dict[str, str], cifar: Path
) -> None:
    job = submit(tmp_path, cifar, slurm)
    ring = tmp_path / "out" / RING_NAME

    def log(net: int) -> str:
        path = ring / f"{net}.log"
        return path.read_text() if path.exists() else ""

    def saved_an_epoch(net: int) -> bool:
        # An epoch logged and in last.pt (a stop between the two would repeat that epoch after the restart)
        lines = len(EPOCH_LINE.findall(log(net)))
        return lines >= 1 and last_epochs(ring)[net - 1] == lines

    wait_for(lambda: all(saved_an_epoch(net) for net in (1, 2)), "an epoch of both networks", ring, poll=0.05)
    signalled = time.monotonic()
    slurm_command(slurm, "scancel", "--signal=USR1", job)  # what Slurm sends before the time limit
    stopped = wait_for(lambda: all("stopped by SIGUSR1:" in log(net) for net in (1, 2)), "the stop lines", ring)
    # (exit 75, or 143 where srun's SIGTERM for the ring's first stopped network came during the exit)
    exited = wait_for(
        lambda: all(f"network {net} stopped by SIGUSR1 (exit " in log(net) for net in (1, 2)),
        "the networks to exit",
        ring,
    )
    print(f"\nstop lines {stopped - signalled:.1f} s and exits {exited - signalled:.1f} s after the signal")
    assert stopped - signalled < 10, "the networks did not stop at once"
    assert exited - signalled < 60, "the networks took too long to exit"
    for net in (1, 2):
        finished = len(EPOCH_LINE.findall(log(net).split("stopped by SIGUSR1:")[0]))
        last = torch.load(ring / f"net{net}" / "last.pt", weights_only=True)  # intact: it loads
        assert last["epoch"] == finished >= 1 and set(last) >= {"model", "optimizer", "scheduler"}
        assert not list((ring / f"net{net}").glob("*.tmp*")), "a temporary file was left behind"
    wait_for(lambda: job_fields(slurm, job)["Restarts"] == "1", "the job to requeue itself", ring, timeout=60)
    output = (ring / f"slurm-{job}.out").read_text()
    assert "the networks stopped at the time-limit signal; requeueing (1 of at most 3)" in output, output
    slurm_command(slurm, "scancel", job)  # what a restart does is the subject of the requeue test


STOPPABLE = r"""#!/usr/bin/env bash
# Stands in for python in a job's network task: records its flags, then trains until a signal kills it.
echo "$*" >> "$STUB_RECORD"
exec sleep 300
"""


@pytest.mark.e2e
@pytest.mark.slurm
def test_after_max_requeues_the_job_ends_and_its_advice_resumes(tmp_path: Path, slurm: dict[str, str]) -> None:
    stub = tmp_path / "stub-python"
    stub.write_text(STOPPABLE)
    stub.chmod(0o755)
    record = tmp_path / "record"
    settings = {**RING, **SLURM, **slurm, "MAX_REQUEUES": "0", "PYTHON": str(stub), "STUB_RECORD": str(record)}
    result = run_script("cifar_grafting.sh", tmp_path, DATA=str(tmp_path / "data"), **settings)
    [job] = re.findall(r"^submitted .*: job (\d+) ", result.stdout, re.M)
    ring = tmp_path / "out" / RING_NAME
    wait_for(lambda: record.exists() and len(record.read_text().splitlines()) == 2, "both networks", ring)
    slurm_command(slurm, "scancel", "--signal=USR1", job)  # the stand-in dies of it, as a network stops
    wait_for(lambda: job_ended(slurm, job), f"job {job} to end", ring, timeout=60)
    fields = job_fields(slurm, job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "75:0", "0"), fields
    for net in (1, 2):  # the stand-in died of the signal: the task reports it stopped (75)
        assert f"network {net} stopped by SIGUSR1 (exit 138)" in (ring / f"{net}.log").read_text()
    advice = (ring / f"slurm-{job}.out").read_text().splitlines()[-1]
    assert advice.endswith(f"not requeued: MAX_REQUEUES=0 reached; to continue, submit again: sbatch {ring}/job.sbatch")
    # The advice, followed literally: a network with a last.pt resumes, the others start fresh.
    (ring / "net2").mkdir()
    (ring / "net2" / "last.pt").write_bytes(b"")
    record.unlink()
    sbatch, path = advice.rsplit("submit again: ", 1)[1].split()
    again = slurm_command({**slurm, "STUB_RECORD": str(record)}, sbatch, "--parsable", path).strip()
    wait_for(lambda: record.exists() and len(record.read_text().splitlines()) == 2, "both networks again", ring)
    slurm_command(slurm, "scancel", again)
    flags = {line.split("--i ")[1].split()[0]: line for line in record.read_text().splitlines()}
    assert flags["1"].endswith("--i 1") and flags["2"].endswith("--i 2 --resume"), flags
