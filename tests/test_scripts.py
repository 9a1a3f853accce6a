"""The experiment scripts (scripts/*.sh) and their launcher (scripts/lib/launch.sh).

With DRY=1 every script prints its commands; each must be accepted by the parser of the program
it starts. The queue is exercised for real with a stand-in interpreter that only records when it
ran, and one script trains for real: a ring of two networks for one epoch on generated CIFAR.
The checks before anything starts (data, GPUs, settings, rings that ran before) are tested here;
LAUNCHER=slurm is tested in test_slurm.py.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import one_line

from grafting.data.fake import write_fake_cifar
from grafting.tools import ensemble as ensemble_tool
from grafting.tools import runs as runs_tool
from grafting_cifar.train import parse_args as parse_cifar_args

pytestmark = pytest.mark.e2e  # every test here starts real processes

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p for p in (REPO / "scripts").glob("*.sh") if "lib/launch.sh" in p.read_text())
OWN_SCRIPTS = {
    "cifar_baselines.sh",
    "cifar_grafting.sh",
    "mobilenetv2_networks.sh",
    "leaky_resnets.sh",
    "vgg16_grafting.sh",
    "mobilenetv2_a_c.sh",
    "imagenet.sh",
}


@dataclass
class Command:
    """One printed command line, taken apart."""

    env: dict[str, str]
    program: str  # the script the interpreter runs
    launcher: list[str]  # what comes between the interpreter and the program (torchrun)
    args: list[str]
    log: str | None


def _environment(**settings: str) -> dict[str, str]:
    # Only what the scripts need: settings a developer exported must not leak into the test.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHON": sys.executable,
    }
    env.update(settings)
    return env


def data_folders(root: Path) -> None:
    """Empty stand-ins of the folders the scripts check before they start anything: ``data/`` with both
    CIFAR folders and ``imagenet/`` with ``train/`` and ``val/`` (the scripts' default DATA)."""
    for folder in ("data/cifar-10-batches-py", "data/cifar-100-python", "imagenet/train", "imagenet/val"):
        (root / folder).mkdir(parents=True, exist_ok=True)


def run_script(script: str | Path, cwd: Path, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess:
    """Run an experiment script with bash and the given settings (in ``cwd``, which gets the default data
    folders); returns the finished process."""
    data_folders(cwd)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script)],
        cwd=cwd,
        env=_environment(**settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_command(line: str) -> Command:
    """``[VAR=..] nohup PYTHON [-m torch.distributed.run ...] PROGRAM ARGS [>> LOG 2>&1 &]``."""
    words = shlex.split(line)
    env = {}
    while "=" in words[0] and not words[0].startswith("/"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[0] == "nohup":
        words.pop(0)
    assert words[0] == sys.executable, f"not started with $PYTHON: {line}"
    program_at = next(k for k, w in enumerate(words) if w.endswith(".py"))
    log = None
    if ">>" in words:
        end = words.index(">>")
        assert words[end + 2 :] == ["2>&1", "&"], line
        log = words[end + 1]
        words = words[:end]
    return Command(env, words[program_at], words[1:program_at], words[program_at + 1 :], log)


def dry_commands(script: str | Path, cwd: Path, **settings: str) -> tuple[list[str], list[Command]]:
    """The printed lines of a DRY=1 run and its commands; every non-comment line must be a command."""
    result = run_script(script, cwd, DRY="1", **settings)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return lines, [parse_command(line) for line in lines if line and not line.startswith("#")]


def parsed(command: Command):
    """The namespace the started program's own parser makes of the command's arguments."""
    if command.program.endswith("grafting_cifar/train.py"):
        return parse_cifar_args(command.args)
    if command.program.endswith("grafting_imagenet/train.py"):
        imagenet = pytest.importorskip("grafting_imagenet.train", reason="grafting_imagenet/train.py is not there yet")
        return imagenet.parse_args(command.args)
    if command.program.endswith("scripts/ensemble.py"):
        return ensemble_tool.parse_args(command.args)
    raise AssertionError(f"a command of an unexpected program: {command.program}")


def training(commands: list[Command]) -> list[tuple[Command, object]]:
    """The training commands with their parsed flags."""
    return [(c, parsed(c)) for c in commands if c.program.endswith("train.py")]


# ----------------------------------------------------------------------------------------------
# DRY=1: every script, every command through its parser


def listing(root: Path) -> set[Path]:
    """Every file and folder under ``root``."""
    return set(root.rglob("*"))


@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.name)
def test_dry_run_prints_commands_the_parsers_accept(script, tmp_path):
    data_folders(tmp_path)
    before = listing(tmp_path)
    lines, commands = dry_commands(script, tmp_path)
    assert commands, "a DRY run printed no command"
    rings: dict[str, list] = defaultdict(list)
    for command in commands:
        args = parsed(command)  # raises (SystemExit / UsageError) on a flag the program rejects
        if command.program.endswith("train.py"):
            rings[args.s].append(args)
            assert Path(args.s).is_absolute(), "paths are absolute so the lines can be pasted anywhere"
            assert command.log == f"{args.s}/{args.i}.log"
            assert "CUDA_VISIBLE_DEVICES" in command.env
    for folder, members in rings.items():
        nums = {a.num for a in members}
        assert len(nums) == 1, f"{folder}: networks disagree on --num"
        assert sorted(a.i for a in members) == list(range(1, nums.pop() + 1)), f"{folder}: incomplete ring"
    assert listing(tmp_path) == before, "DRY=1 must not create anything"
    assert lines[0].startswith(
        f"# {script.name}: {len(rings)} ring(s), {sum(len(m) for m in rings.values())} network(s)"
    )


EXPECTED_NETWORKS = {  # (rings, training commands) of each script with its default settings
    "cifar_baselines.sh": (8, 8),
    "cifar_grafting.sh": (16, 32),
    "mobilenetv2_networks.sh": (10 + 12, 2 * (2 + 3 + 4 + 6 + 8) + 12),
    "leaky_resnets.sh": (12, 6 + 12),
    "vgg16_grafting.sh": (6, 2 + 4 + 4),
    "mobilenetv2_a_c.sh": (22, 44),
    "imagenet.sh": (6, 3 + 6),
}


@pytest.mark.parametrize("script", sorted(EXPECTED_NETWORKS))
def test_default_settings_cover_every_published_row(script, tmp_path):
    _, commands = dry_commands(script, tmp_path)
    runs = training(commands)
    assert (len({a.s for _, a in runs}), len(runs)) == EXPECTED_NETWORKS[script]
    for _, args in runs:
        assert args.epochs == (90 if script == "imagenet.sh" else 200)
        assert args.lr == 0.1


def test_recipes_of_the_grafting_table(tmp_path):
    _, commands = dry_commands("cifar_grafting.sh", tmp_path)
    rows = {(a.model, a.cifar, Path(a.s).name.rsplit("_", 1)[1]) for _, a in training(commands)}
    assert rows == {
        (m, d, r)
        for m in ("resnet32", "resnet56", "resnet110", "mobilenetv2")
        for d in (10, 100)
        for r in ("slr", "dlr")
    }
    for _, args in training(commands):
        recipe = Path(args.s).name.rsplit("_", 1)[1]
        assert (args.difflr, args.cos) == ((True, True) if recipe == "dlr" else (False, False))
        assert args.num == 2 and args.level == "layer" and (args.a, args.c) == (0.4, 500.0)


def test_the_a_and_c_study_and_vgg_levels(tmp_path):
    _, commands = dry_commands("mobilenetv2_a_c.sh", tmp_path, DATASETS="10")
    pairs = [(a.a, a.c) for c, a in training(commands) if a.i == 1]
    assert pairs == [
        (0.4, 1),
        (0.4, 5),
        (0.4, 10),
        (0.4, 50),
        (0.4, 500),
        (0.0, 100),
        (0.2, 100),
        (0.4, 100),
        (0.6, 100),
        (0.8, 100),
        (1.0, 100),
    ]
    _, commands = dry_commands("vgg16_grafting.sh", tmp_path, DATASETS="100")
    levels = [(a.num, a.level) for _, a in training(commands) if a.i == 1]
    assert levels == [(1, "layer"), (2, "layer"), (2, "filter")]
    assert {a.model for _, a in training(commands)} == {"vgg16"}
    # The published VGG recipe: the same lr for both networks, step schedule; dlr on request.
    assert all((a.difflr, a.cos, a.lr) == (False, False, 0.1) for _, a in training(commands))
    _, commands = dry_commands("vgg16_grafting.sh", tmp_path, DATASETS="100", METHODS="layer", RECIPE="dlr")
    assert [(a.difflr, a.cos) for _, a in training(commands)] == [(True, True)] * 2


def test_ensemble_members_are_seeded_apart_and_evaluated_afterwards(tmp_path):
    _, commands = dry_commands("mobilenetv2_networks.sh", tmp_path, DATASETS="100", NETS="3")
    members = [a for _, a in training(commands) if a.num == 1]
    assert [a.seed for a in members] == [0, 1, 2, 3, 4, 5]
    assert all(a.model == "mobilenetv2" and a.cifar == 100 for a in members)
    [ensemble] = [c for c in commands if c.program.endswith("ensemble.py")]
    assert commands[-1] is ensemble, "the ensemble is evaluated after its members have trained"
    flags = ensemble_tool.parse_args(ensemble.args)
    assert flags.checkpoints == [f"{a.s}/net1/best.pt" for a in members]
    assert (flags.model, flags.cifar) == ("mobilenetv2", 100)


def test_gpus_round_robin_and_queue(tmp_path):
    # A ring of 8 on 3 GPUs: round-robin.
    _, commands = dry_commands("mobilenetv2_networks.sh", tmp_path, GPUS="0,1,2", NETS="8", DATASETS="10", ENSEMBLE="0")
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in commands] == ["0", "1", "2", "0", "1", "2", "0", "1"]
    # Rings of 2 on 4 GPUs: two rings at a time, the others queued behind them.
    lines, commands = dry_commands("cifar_grafting.sh", tmp_path, GPUS="0,1,2,3", MODELS="resnet32", DATASETS="10 100")
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in commands] == ["0", "1", "2", "3"] * 2
    queued = [k for k, line in enumerate(lines) if line.startswith("# queued")]
    assert queued == [5]  # after the plan line and the first two rings
    # Two networks per GPU: all four rings at once.
    lines, commands = dry_commands(
        "cifar_grafting.sh", tmp_path, GPUS="0,1,2,3", MODELS="resnet32", DATASETS="10 100", JOBS_PER_GPU="2"
    )
    assert not any(line.startswith("# queued") for line in lines)
    assert sorted(c.env["CUDA_VISIBLE_DEVICES"] for c in commands) == ["0", "0", "1", "1", "2", "2", "3", "3"]


def test_cpu_and_extra_flags(tmp_path):
    (tmp_path / "cifar data" / "cifar-100-python").mkdir(parents=True)
    _, commands = dry_commands(
        "cifar_baselines.sh",
        tmp_path,
        GPUS="cpu",
        MODELS="resnet20",
        DATASETS="100",
        EXTRA="--amp --peer-timeout 60",
        OUT="my runs",
        DATA="~/cifar data",
        HOME=str(tmp_path),
    )
    [(command, args)] = training(commands)
    assert command.env == {}
    assert args.device == "cpu" and args.amp and args.peer_timeout == 60
    assert args.s == str(tmp_path / "my runs" / "resnet20_c100_baseline")
    assert args.data == str(tmp_path / "cifar data")


def test_imagenet_networks_on_several_gpus_use_torchrun(tmp_path):
    _, commands = dry_commands(
        "imagenet.sh", tmp_path, GPUS="0,1,2,3", GPUS_PER_NET="2", ARCHS="resnet50", METHODS="grafting", RECIPE="step"
    )
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in commands] == ["0,1", "2,3"]
    for command, args in training(commands):
        assert command.launcher == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--"]
        # torchrun's own parser must hand the script and every one of its flags over untouched
        # (without the "--" it reads --num as its --numa-binding and rejects --s as ambiguous).
        from torch.distributed.run import get_args_parser

        run = get_args_parser().parse_args(command.launcher[2:] + [command.program] + command.args)
        assert run.training_script == command.program and run.training_script_args == command.args
        assert args.model == "resnet50" and args.steplr and args.batch_size == 256 and args.num == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"GPUS": "0,,1"}, "GPUS='0,,1' has an empty entry"),
        ({"METHODS": "slr fancy"}, "METHODS: unknown value 'fancy'"),
        ({"DATASETS": "10 1000"}, "DATASETS: unknown value '1000'"),
        ({"JOBS_PER_GPU": "0"}, "JOBS_PER_GPU must be a positive whole number"),
        ({"GPUS": "0", "GPUS_PER_NET": "2"}, "lists 1 GPU(s) but each network needs GPUS_PER_NET=2"),
        (
            {"GPUS": "0,1", "GPUS_PER_NET": "2"},
            "only grafting_imagenet/train.py trains one network on several processes",
        ),
        ({"LAUNCHER": "pbs"}, "LAUNCHER must be nohup or slurm, got 'pbs'"),
        ({"NODES_PER_NET": "2"}, "NODES_PER_NET=2 needs LAUNCHER=slurm"),
        ({"MEM_PER_NET": "lots"}, "MEM_PER_NET must be a size like 16G"),
        ({"METHODS": " "}, "the settings select no ring to run"),
        ({"DATA": "elsewhere"}, "DATA=elsewhere: no CIFAR-10 in "),
        ({"DATA": "elsewhere", "DATASETS": "100"}, "cifar-100-python/ is missing"),
    ],
)
@pytest.mark.parametrize("dry", ["1", "0"])
def test_bad_settings_stop_with_one_line(settings, message, dry, tmp_path):
    result = run_script("cifar_grafting.sh", tmp_path, DRY=dry, **settings)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing may start before the checks pass"


def test_missing_data_advice_downloads_into_the_folder_the_script_reads(tmp_path):
    result = run_script("cifar_baselines.sh", tmp_path, DRY="1", DATA="elsewhere", DATASETS="100")
    assert result.returncode == 2
    advice = result.stderr.split("download it: ", 1)[1].strip()
    command = shlex.split(advice)
    assert command[-4:] == ["download", str(tmp_path / "elsewhere"), "--cifar", "100"], command
    # Followed literally where the internet is out of reach (a proxy that refuses at once): it tries that
    # folder and says in one line what to do instead; with the internet it would download there.
    offline = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    done = subprocess.run(command, cwd=tmp_path, env=offline, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and f"could not download CIFAR-100 into {tmp_path / 'elsewhere'}" in line, line


def _nvidia_smi(tmp_path: Path, indices: str) -> str:
    """A folder with a stand-in nvidia-smi that lists GPUs ``indices`` (comma list); returns a PATH."""
    folder = tmp_path / "bin"
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text("#!/usr/bin/env bash\n" + "".join(f"echo {i}\n" for i in indices.split(",")))
    tool.chmod(0o755)
    return f"{folder}:{os.environ.get('PATH', '/usr/bin:/bin')}"


def test_gpus_are_checked_with_nvidia_smi(tmp_path):
    path = _nvidia_smi(tmp_path, "0,1")
    result = run_script("cifar_grafting.sh", tmp_path, DRY="1", GPUS="0,1,2,3", PATH=path)
    assert result.returncode == 2 and result.stdout == ""
    assert one_line(result.stderr) == (
        "error: GPUS=0,1,2,3: this machine has no GPU 2 (nvidia-smi lists 0,1); set GPUS to those ids, or GPUS=cpu"
    )
    result = run_script("cifar_grafting.sh", tmp_path, DRY="1", GPUS="1,0", PATH=path)
    assert result.returncode == 0 and result.stderr == ""
    # Without nvidia-smi the ids cannot be checked: a warning, and the commands all the same.
    result = run_script("cifar_grafting.sh", tmp_path, DRY="1", GPUS="0,1", PATH="/usr/bin:/bin")
    assert result.returncode == 0
    assert "warning: nvidia-smi not found, so GPUS=0,1 is not checked" in one_line(result.stderr)
    result = run_script("cifar_grafting.sh", tmp_path, DRY="1", GPUS="cpu", PATH="/usr/bin:/bin")
    assert result.returncode == 0 and result.stderr == ""


def test_a_ring_that_ran_before_needs_resume(tmp_path):
    ring = tmp_path / "out" / "resnet20_c10_dlr"
    (ring / "net2").mkdir(parents=True)
    (ring / "net2" / "last.pt").write_bytes(b"")
    settings = {
        "PYTHON": _stub(tmp_path),
        "FOREGROUND": "1",
        "POLL": "1",
        "GPUS": "0,1",
        "MODELS": "resnet20",
        "DATASETS": "10",
        "OUT": "out",
        "STUB_SECONDS": "0",
    }
    result = run_script("cifar_grafting.sh", tmp_path, **settings)
    assert result.returncode == 2 and result.stdout == ""
    assert one_line(result.stderr) == (
        f"error: {ring}/net2/last.pt exists: that ring has run before; continue it "
        f"with EXTRA=--resume, or choose another OUT"
    )
    assert not (tmp_path / "out" / "resnet20_c10_slr").exists(), "no ring may start before the checks pass"
    # The advice, followed literally.
    result = run_script("cifar_grafting.sh", tmp_path, EXTRA="--resume", **settings)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(_events(ring)["end"]) == 2


# ----------------------------------------------------------------------------------------------
# The queue, for real, with a stand-in interpreter

STUB = r"""#!/usr/bin/env bash
# Stands in for python: records when network --i of ring --s started and ended; answers for summarize.py.
if [[ "$1" == */scripts/summarize.py ]]; then
    echo "| summary row of $2 |"
    exit 0
fi
while (( $# )); do
    case "$1" in --s) ring="$2"; shift ;; --i) net="$2"; shift ;; esac
    shift
done
echo "start $net $(date +%s.%N)" >> "$ring/events"
echo "stand-in network $net"
if [[ "$ring" == *_slr && -n "${STUB_FAIL:-}" ]]; then
    [[ "$net" == 1 ]] && exit 3
    exec sleep 60
fi
sleep "${STUB_SECONDS:-1}"
echo "end $net $(date +%s.%N)" >> "$ring/events"
"""


def _stub(tmp_path: Path) -> str:
    path = tmp_path / "stub-python"
    path.write_text(STUB)
    path.chmod(0o755)
    return str(path)


def _events(ring: Path) -> dict[str, list[float]]:
    found: dict[str, list[float]] = defaultdict(list)
    for line in (ring / "events").read_text().splitlines():
        kind, _, when = line.split()
        found[kind].append(float(when))
    return found


def test_queue_runs_rings_one_after_another_when_gpus_are_short(tmp_path):
    started = time.monotonic()
    result = run_script(
        "cifar_grafting.sh",
        tmp_path,
        PYTHON=_stub(tmp_path),
        FOREGROUND="1",
        POLL="1",
        GPUS="0,1",
        MODELS="resnet20",
        DATASETS="10",
        OUT="out",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    first, second = tmp_path / "out" / "resnet20_c10_slr", tmp_path / "out" / "resnet20_c10_dlr"
    one, two = _events(first), _events(second)
    assert len(one["end"]) == len(two["end"]) == 2
    assert min(two["start"]) >= max(one["end"]), "the second ring started before the first had finished"
    assert max(one["start"]) - min(one["start"]) < 1.0, "the networks of a ring start together"
    pids = [line.split() for line in (first / "pids").read_text().splitlines()]
    assert [(net, gpu) for net, _, gpu in pids] == [("1", "0"), ("2", "1")]
    assert (first / "1.log").read_text().splitlines()[1:] == ["stand-in network 1"]
    assert "all rings finished" in result.stdout and f"tail -f {first}/*.log" in result.stdout
    # Each ring's result line as soon as it has finished, before the next ring starts.
    out = result.stdout
    assert out.index(f"ring {first} finished:\n    | summary row of {first} |") < out.index(f"starting {second}")
    assert f"ring {second} finished:\n    | summary row of {second} |" in out


def test_a_failed_network_stops_its_ring_and_the_queue_moves_on(tmp_path):
    started = time.monotonic()
    result = run_script(
        "cifar_grafting.sh",
        tmp_path,
        PYTHON=_stub(tmp_path),
        FOREGROUND="1",
        POLL="1",
        GPUS="0,1",
        MODELS="resnet20",
        DATASETS="10",
        OUT="out",
        STUB_FAIL="1",
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 30, "the surviving network of the failed ring was not stopped"
    failed = tmp_path / "out" / "resnet20_c10_slr"
    assert f"network 1 of {failed} failed (exit 3)" in result.stdout
    assert f"failed rings: {failed}" in result.stdout
    assert f"ring {failed} finished" not in result.stdout
    assert len(_events(tmp_path / "out" / "resnet20_c10_dlr")["end"]) == 2


def test_network_logs_are_appended_with_a_header_per_start(tmp_path):
    # Resuming a ring (EXTRA=--resume) must keep the log lines of the networks' earlier runs.
    settings = {
        "PYTHON": _stub(tmp_path),
        "FOREGROUND": "1",
        "POLL": "1",
        "GPUS": "0,1",
        "MODELS": "resnet20",
        "DATASETS": "10",
        "METHODS": "slr",
        "OUT": "out",
        "STUB_SECONDS": "0",
    }
    first = run_script("cifar_grafting.sh", tmp_path, **settings)
    assert first.returncode == 0, first.stdout + first.stderr
    again = run_script("cifar_grafting.sh", tmp_path, EXTRA="--resume", **settings)
    assert again.returncode == 0, again.stdout + again.stderr
    log = (tmp_path / "out" / "resnet20_c10_slr" / "1.log").read_text().splitlines()
    assert log.count("stand-in network 1") == 2, log
    headers = [line for line in log if line.startswith("==== ")]
    assert len(headers) == 2 and all("network 1 on 0" in line for line in headers), log
    assert log[0] == headers[0] and "--resume" in headers[1] and "--resume" not in headers[0]


def test_queue_detaches_and_logs_to_queue_log(tmp_path):
    started = time.monotonic()
    # The default POLL: a few seconds between checks, so the second ring follows the first at once.
    result = run_script(
        "cifar_baselines.sh",
        tmp_path,
        PYTHON=_stub(tmp_path),
        GPUS="0",
        MODELS="resnet20",
        DATASETS="10 100",
        OUT="out",
        STUB_SECONDS="0",
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10, "the script should return while the queue runs on"
    assert "started in the background" in result.stdout and "tail -f" in result.stdout
    queue_log = tmp_path / "out" / "queue.log"
    deadline = time.monotonic() + 30
    while "all rings finished" not in (queue_log.read_text() if queue_log.exists() else ""):
        assert time.monotonic() < deadline, "the detached queue did not finish"
        time.sleep(0.2)
    assert time.monotonic() - started < 20, "the queue waited too long between its checks"
    assert "# cifar_baselines.sh: 2 ring(s), 2 network(s)" in queue_log.read_text()
    for cifar in (10, 100):
        assert len(_events(tmp_path / "out" / f"resnet20_c{cifar}_baseline")["end"]) == 1


# ----------------------------------------------------------------------------------------------
# One real run


def test_grafting_script_trains_one_epoch_on_the_cpu(tmp_path):
    data = write_fake_cifar(tmp_path / "data", num_classes=10, train_size=128, test_size=50)
    result = run_script(
        "cifar_grafting.sh",
        tmp_path,
        timeout=300,
        PYTHON=sys.executable,
        FOREGROUND="1",
        POLL="1",
        GPUS="cpu",
        EPOCHS="1",
        MODELS="resnet20",
        DATASETS="10",
        METHODS="dlr",
        DATA=str(data),
        OUT="out",
        EXTRA="--print_frequence 0",
    )
    ring = tmp_path / "out" / "resnet20_c10_dlr"
    logs = {i: (ring / f"{i}.log").read_text() for i in (1, 2)}
    assert result.returncode == 0, result.stdout + "".join(logs.values())
    finals = []
    for i, log in logs.items():
        assert f"network {i} of 2: resnet20 on cpu" in log and "epoch 1/1" in log
        last = torch.load(ring / f"net{i}" / "last.pt", weights_only=True)
        assert last["epoch"] == 1 and 0.0 <= last["acc"] <= 100.0
        finals.append(last["acc"])
    [run] = runs_tool.find_runs([tmp_path / "out"])
    assert (run.model, run.dataset, run.method, run.epochs) == ("resnet20", "cifar10", "dlr", 1)
    assert [n.final for n in run.networks] == finals
    # The queue printed the ring's summary row when it finished.
    after = result.stdout.split(f"ring {ring} finished:\n", 1)[1].splitlines()
    rows = list(after[: after.index(next(x for x in after if not x.startswith("    ")))])
    assert any("resnet20" in row and "dlr" in row for row in rows), result.stdout
