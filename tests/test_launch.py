"""The launcher's pieces as plain functions, in this process: settings and their checks, the ring
description, the plan (every network's command through its trainer's parser), the banner, the nohup
queue's order and the ring supervisor (with stand-in processes).

The experiment scripts themselves are tested in test_scripts.py, the Slurm side in test_slurm.py.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from grafting.errors import UsageError
from grafting.launch import nohup
from grafting.launch.cli import banner
from grafting.launch.plan import REPO, make_plan
from grafting.launch.rings import parse_description, quote
from grafting.launch.settings import MIN_TIME_S, parse_time, read_script_settings, read_settings
from grafting.launch.supervisor import NetworkCommand, RingSupervisor
from grafting.train.signals import STOPPED_EXIT_CODE

BLOCK = """#!/usr/bin/env bash
# A test experiment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
OUT="${OUT:-runs/test}"
EPOCHS="${EPOCHS:-200}"
MODELS="${MODELS:-resnet32 resnet56}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
RECIPE="${RECIPE:-slr}"                                 # one of: slr dlr cos
MODEL=mobilenetv2
"""


def settings_of(environ: dict[str, str] | None = None, block: str = BLOCK):
    """The checked settings of ``block`` with ``environ``."""
    return read_settings(
        environ or {}, script_name="test.sh", script_settings=read_script_settings(block), python="/py"
    )


def cifar(root: Path, *versions: int) -> Path:
    """A data folder holding (empty) CIFAR folders: enough for the launcher's check."""
    for version in versions:
        (root / ("cifar-10-batches-py" if version == 10 else "cifar-100-python")).mkdir(parents=True, exist_ok=True)
    return root


def plan_of(tmp_path: Path, text: str, **environ: str):
    """The plan of the ring description ``text`` with ``environ`` (OUT defaults to tmp_path/out)."""
    settings = settings_of({"OUT": str(tmp_path / "out"), **environ})
    return make_plan(parse_description(text, tmp_path), settings, tmp_path, "/py")


def ring_line(folder: str = "out/r", num: int = 2, flags: str = "--model resnet20 --data data") -> str:
    return f"ring {folder} {num} {flags}\n"


# ----------------------------------------------------------------------------------------------
# Settings


def test_the_settings_block_gives_names_defaults_comments_and_choices() -> None:
    found = read_script_settings(BLOCK)
    assert list(found) == ["GPUS", "OUT", "EPOCHS", "MODELS", "DATASETS", "RECIPE", "MODEL"]
    assert (found["EPOCHS"].default, found["EPOCHS"].fixed) == ("200", False)
    assert (found["DATASETS"].choices, found["DATASETS"].several) == (("10", "100"), True)
    assert (found["RECIPE"].choices, found["RECIPE"].several) == (("slr", "dlr", "cos"), False)
    assert (found["MODEL"].default, found["MODEL"].fixed) == ("mobilenetv2", True)
    assert found["GPUS"].comment == "GPU ids, or cpu"


@pytest.mark.parametrize(
    "name, close", [("MODEL_NAME", None), ("EPOCH", "EPOCHS"), ("DATASET", "DATASETS"), ("RECIPES", "RECIPE")]
)
def test_a_variable_that_looks_like_a_setting_is_refused_with_did_you_mean(name: str, close: str | None) -> None:
    if close is None:
        settings_of({name: "x"})  # not close to any setting: another program's
        return
    with pytest.raises(UsageError) as refused:
        settings_of({name: "3"})
    assert str(refused.value).startswith(f"{name} is not a setting of test.sh; did you mean {close}?")


def test_model_next_to_models_is_refused_but_slurms_own_variables_are_not() -> None:
    no_model = BLOCK.replace("MODEL=mobilenetv2\n", "")
    with pytest.raises(UsageError, match="MODEL is not a setting of test.sh; did you mean MODELS"):
        settings_of({"MODEL": "resnet20"}, no_model)
    settings_of({"SBATCH_EXPORT": "ALL", "SLURM_CONF": "/etc/slurm.conf", "PATH": "/bin", "HOME": "/root"}, no_model)


def test_the_environment_overrides_a_setting_but_not_a_fixed_one() -> None:
    settings = settings_of({"EPOCHS": "3", "MODEL": "resnet20"})
    assert settings.values["EPOCHS"] == "3" and settings.values["MODEL"] == "mobilenetv2"
    assert settings_of({"EPOCHS": ""}).values["EPOCHS"] == "200"  # empty: the default, as ${EPOCHS:-200}


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"DATASETS": "10 1000"}, "DATASETS: unknown value '1000'; choose from: 10 100"),
        ({"RECIPE": "slr dlr"}, "RECIPE takes one of: slr dlr cos; got 'slr dlr'"),
        ({"GPUS": "0,,1"}, "GPUS='0,,1' has an empty entry"),
        ({"JOBS_PER_GPU": "0"}, "JOBS_PER_GPU must be a positive whole number, got '0'"),
        ({"MAX_REQUEUES": "-1"}, "MAX_REQUEUES must be a whole number (0: none), got '-1'"),
        ({"LAUNCHER": "pbs"}, "LAUNCHER must be nohup or slurm, got 'pbs'"),
        ({"NODES_PER_NET": "2"}, "NODES_PER_NET=2 needs LAUNCHER=slurm"),
        ({"MEM_PER_NET": "lots"}, "MEM_PER_NET must be a size like 16G"),
        ({"GPUS": "0", "GPUS_PER_NET": "2"}, "lists 1 GPU(s) but each network needs GPUS_PER_NET=2"),
        ({"TIME": "tomorrow"}, "TIME must be a Slurm time limit like 24:00:00"),
        ({"SBATCH_EXTRA": "--constraint a100"}, "SBATCH_EXTRA: 'a100' is not an sbatch option"),
        ({"DRY": "yes"}, "DRY must be 0 or 1, got 'yes'"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(environ: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as refused:
        settings_of(environ)
    assert message in str(refused.value)


@pytest.mark.parametrize("name", ["PARTITION", "ACCOUNT", "QOS"])
def test_a_line_break_in_a_slurm_setting_is_refused(name: str) -> None:
    # Written into the job script, it would end the #SBATCH header: the lines after it would be ignored.
    with pytest.raises(UsageError, match=f"{name} holds a line break"):
        settings_of({name: "gpu\n#SBATCH --time=1", "LAUNCHER": "slurm"})
    with pytest.raises(UsageError, match=f"{name} must be a Slurm name"):
        settings_of({name: "gpu #x", "LAUNCHER": "slurm"})


def test_a_time_limit_within_the_signal_lead_is_refused() -> None:
    assert [parse_time(t) for t in ("30", "5:00", "1:00:00", "2-0", "1-2:03", "1-00:00:05")] == [
        1800,
        300,
        3600,
        172800,
        93780,
        86405,
    ]
    for short in ("3", "3:00", "4:59", "0:03:00"):
        with pytest.raises(UsageError) as refused:
            settings_of({"LAUNCHER": "slurm", "TIME": short})
        assert "leaves no time to train" in str(refused.value) and "at least 5:00" in str(refused.value)
    with pytest.raises(UsageError, match="SBATCH_EXTRA --time=2:00 is too short"):  # it would replace TIME's line
        settings_of({"LAUNCHER": "slurm", "TIME": "1:00:00", "SBATCH_EXTRA": "--time=2:00"})
    assert parse_time("5:00") == MIN_TIME_S
    settings_of({"LAUNCHER": "slurm", "TIME": "5:00"})
    settings_of({"LAUNCHER": "nohup", "TIME": "3:00"})  # nohup has no time limit


@pytest.mark.parametrize("gpus", ["0 1", "0,1", " 0, 1 ", "0,\t1"])
def test_gpus_are_separated_by_commas_or_spaces(gpus: str) -> None:
    assert settings_of({"GPUS": gpus}).gpus == ["0", "1"]
    assert settings_of({"GPUS": "cpu"}).gpus is None


# ----------------------------------------------------------------------------------------------
# The ring description


def test_ring_lines_keep_their_words_and_folders_become_absolute(tmp_path: Path) -> None:
    text = (
        "# a comment\n"
        "ring 'runs/my runs/r1' 2 --model resnet20 --data '~/cifar data'  # trailing comment\n"
        "\n"
        "after scripts/ensemble.py --model resnet20 a.pt b.pt\n"
    )
    parsed = parse_description(text, tmp_path)
    [ring] = parsed.rings
    assert ring.folder == tmp_path / "runs" / "my runs" / "r1" and ring.num == 2 and ring.line == 2
    assert ring.flags == ("--model", "resnet20", "--data", "~/cifar data")
    assert parsed.after[0].argv == ("scripts/ensemble.py", "--model", "resnet20", "a.pt", "b.pt")


@pytest.mark.parametrize(
    "line, message",
    [
        ("ring out/r\n", "'ring' needs a folder and a number of networks"),
        ("ring out/r two --model x\n", "the number of networks must be a positive whole number, got 'two'"),
        ("ring out/r 0\n", "got '0'"),
        ("rings out/r 2\n", "starts with 'rings'"),
        ("ring 'out/r 2\n", "cannot split it into words"),
    ],
)
def test_a_malformed_ring_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_description(line, tmp_path, "x.sh")
    assert str(refused.value).startswith("x.sh, line 1: ") and message in str(refused.value)


def test_quoted_words_come_back_as_they_were() -> None:
    words = ["plain", "with space", "it's", "$HOME", "~/x", "a;b", ""]
    assert shlex.split(quote(words)) == words


@pytest.mark.e2e
def test_the_bash_ring_function_quotes_as_the_launcher_reads(tmp_path: Path) -> None:
    words = ["runs/it's here", "2", "--data", "~/cifar data", "--tag", "$x;`y`", "ü"]
    script = f'source {REPO}/scripts/lib/rings.sh; ring "$@"'
    line = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True, text=True, check=True).stdout
    [ring] = parse_description(line, tmp_path).rings
    assert ring.folder == tmp_path / "runs" / "it's here" and list(ring.flags) == words[2:]


# ----------------------------------------------------------------------------------------------
# The plan: every network's command, checked


def test_every_network_gets_the_ring_the_device_and_resume_auto(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    plan = plan_of(tmp_path, ring_line(num=3), GPUS="0,1")
    [ring] = plan.rings
    assert ring.network_args(3)[-10:] == [
        "--s",
        str(tmp_path / "out" / "r"),
        "--num",
        "3",
        "--device",
        "cuda",
        "--resume",
        "auto",
        "--i",
        "3",
    ]
    assert "--data" in ring.args and ring.args[ring.args.index("--data") + 1] == str(tmp_path / "data")
    assert plan_of(tmp_path, ring_line(), GPUS="cpu").rings[0].args[-4:-2] == ["--device", "cpu"]


def test_gpus_make_every_network_ask_for_cuda_explicitly(tmp_path: Path) -> None:
    # An explicit --device cuda stops at once on a node without a usable CUDA instead of training on the CPU.
    cifar(tmp_path / "data", 10)
    for environ in ({"GPUS": "0,1"}, {"GPUS": "0 1", "LAUNCHER": "slurm"}):
        plan = plan_of(tmp_path, ring_line(), **environ)
        args = plan.trainer.parse(plan.rings[0].network_args(1))
        assert args.device == "cuda" and args.resume == "auto"


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--model resnet20 --data data --epochs two", "argument --epochs: invalid int value: 'two'"),
        ("--model resnet2O --data data", "--model: unknown model 'resnet2O'; choose one of: "),
        ("--model resnet20 --data data --amp-typo", "unrecognized arguments: --amp-typo"),
        ("--model resnet20 --data data --lr -1", "--lr must be positive, got -1.0"),
    ],
)
def test_a_command_the_trainer_refuses_stops_the_plan_with_its_message_naming_the_ring(
    tmp_path: Path, flags: str, message: str
) -> None:
    cifar(tmp_path / "data", 10)
    with pytest.raises(UsageError) as refused:
        plan_of(tmp_path, ring_line("out/ok", 2, "--model resnet20 --data data") + ring_line("out/bad", 2, flags))
    said = str(refused.value)
    assert said.startswith(f"ring {tmp_path / 'out' / 'bad'} (network 1): ") and message in said, said
    assert "\n" not in said


def test_extra_flags_reach_every_network_and_the_launchers_own_flags_are_refused(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    plan = plan_of(tmp_path, ring_line(), EXTRA="--amp --peer-timeout 60")
    config = plan.trainer.parse(plan.rings[0].network_args(2))
    assert config.amp and config.peer_timeout == 60
    for extra, flag in (("--device cuda:1", "--device"), ("--s=x", "--s"), ("--num 3", "--num"), ("--gpu 1", "--gpu")):
        with pytest.raises(UsageError, match=f"EXTRA: {flag} is set by the launcher"):
            plan_of(tmp_path, ring_line(), EXTRA=extra)
    with pytest.raises(UsageError, match="--resume is set by the launcher for every network; use EXTRA=--resume"):
        plan_of(tmp_path, ring_line(flags="--model resnet20 --data data --resume"))


def test_missing_data_is_refused_with_advice(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as refused:
        plan_of(tmp_path, ring_line(flags="--model resnet20 --data elsewhere --cifar 100"))
    said = str(refused.value)
    assert f"--data {tmp_path / 'elsewhere'}" in said and "no CIFAR-100 there (cifar-100-python/ is missing)" in said
    advice = shlex.split(said.split("download it: ", 1)[1])
    assert advice[-5:] == ["grafting.tools.data", "download", str(tmp_path / "elsewhere"), "--cifar", "100"]
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"imagenet/val/ is missing; set DATA to the folder that holds ImageNet"):
        plan_of(
            tmp_path,
            ring_line(flags="-a resnet18 --data imagenet"),
            TRAIN="grafting_imagenet/train.py",
        )


def test_a_ring_whose_teacher_is_not_there_yet_is_skipped(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    teacher = tmp_path / "teachers" / "best.pt"
    text = ring_line("out/kd", 2, f"--model resnet20 --data data --distill teacher --teacher {teacher}")
    text += ring_line("out/plain")
    plan = plan_of(tmp_path, text)
    assert [r.skipped is not None for r in plan.rings] == [True, False]
    assert f"its teacher {teacher} is not there yet" in str(plan.rings[0].skipped)
    assert banner(plan).startswith("# test.sh: 1 ring(s) (1 skipped), 2 network(s)")
    teacher.parent.mkdir()
    teacher.write_bytes(b"")
    assert plan_of(tmp_path, text).rings[0].skipped is None


def test_a_ring_that_ran_before_needs_extra_resume_and_resume_needs_something_to_continue(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    with pytest.raises(UsageError, match="none of the 1 ring.s. has anything to continue"):
        plan_of(tmp_path, ring_line(), EXTRA="--resume")
    (tmp_path / "out" / "r" / "net2").mkdir(parents=True)
    (tmp_path / "out" / "r" / "net2" / "previous.pt").write_bytes(b"")
    with pytest.raises(UsageError) as refused:
        plan_of(tmp_path, ring_line())
    assert str(refused.value) == (
        f"{tmp_path}/out/r/net2/last.pt exists: that ring has run before; continue it with EXTRA=--resume, or "
        f"choose another OUT"
    )
    plan = plan_of(tmp_path, ring_line(), EXTRA="--resume")
    assert plan.rings[0].args.count("--resume") == 1 and "auto" in plan.rings[0].args


def test_two_rings_in_one_folder_and_an_empty_plan_are_refused(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    with pytest.raises(UsageError, match="two rings share the folder .*out/r .lines 1 and 2."):
        plan_of(tmp_path, ring_line() + ring_line())
    with pytest.raises(UsageError, match="the settings select no ring to run"):
        plan_of(tmp_path, "# nothing\n")


def test_only_the_imagenet_script_trains_a_network_on_several_gpus(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    with pytest.raises(UsageError, match="only grafting_imagenet/train.py trains one network on several processes"):
        plan_of(tmp_path, ring_line(), GPUS="0,1", GPUS_PER_NET="2")


def test_a_follow_up_is_checked_by_its_own_parser(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    plan = plan_of(tmp_path, ring_line() + "after scripts/ensemble.py --cifar 10 a.pt\n")
    assert plan.after[0].argv == (str(REPO / "scripts" / "ensemble.py"), "--cifar", "10", "a.pt")
    with pytest.raises(UsageError, match="after scripts/ensemble.py .line 2.: argument --cifar: invalid choice"):
        plan_of(tmp_path, ring_line() + "after scripts/ensemble.py --cifar 7 a.pt\n")
    with pytest.raises(UsageError, match="after .line 2.: runs rm; it may run scripts/ensemble.py"):
        plan_of(tmp_path, ring_line() + "after rm -rf /\n")


# ----------------------------------------------------------------------------------------------
# The banner and the nohup queue's order


def test_the_banner_counts_processes(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    two_rings = ring_line("out/a") + ring_line("out/b")
    # On the CPU one ring runs at a time, and each of its networks is a process.
    plan = plan_of(tmp_path, two_rings, GPUS="cpu")
    assert banner(plan) == (
        "# test.sh: 2 ring(s), 4 network(s), 4 process(es); LAUNCHER=nohup on the CPU (--device cpu), "
        "at most 2 process(es) at a time"
    )
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    imagenet = ring_line("out/a", 2, "-a resnet18 --data imagenet")
    plan = plan_of(tmp_path, imagenet, GPUS="0,1,2,3", GPUS_PER_NET="2", TRAIN="grafting_imagenet/train.py")
    assert "2 network(s), 4 process(es); LAUNCHER=nohup on GPUs 0,1,2,3 (--device cuda), at most 4 process" in (
        banner(plan)
    )


def test_networks_take_the_least_busy_gpus_and_rings_wait_for_room(tmp_path: Path) -> None:
    cifar(tmp_path / "data", 10)
    eight = plan_of(tmp_path, ring_line(num=8), GPUS="0,1,2")
    assert [line.split(" && ")[1].split()[0] for line in nohup.dry_lines(eight)] == [
        f"CUDA_VISIBLE_DEVICES={gpu}" for gpu in "01201201"
    ]
    four = plan_of(tmp_path, "".join(ring_line(f"out/{k}") for k in range(4)), GPUS="0,1,2,3")
    lines = nohup.dry_lines(four)
    assert [k for k, line in enumerate(lines) if line.startswith("# queued")] == [4]
    packed = plan_of(tmp_path, "".join(ring_line(f"out/{k}") for k in range(4)), GPUS="0,1,2,3", JOBS_PER_GPU="2")
    assert not any(line.startswith("# queued") for line in nohup.dry_lines(packed))
    assert nohup.most_at_once(packed) == 8 and nohup.most_at_once(four) == 4


@pytest.mark.e2e
def test_dry_lines_paste_as_they_are(tmp_path: Path) -> None:
    """Each printed line, run by the shell as it is, starts its network with its log in a folder it creates."""
    cifar(tmp_path / "data", 10)
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "started with $*"\n')
    stub.chmod(0o755)
    plan = plan_of(tmp_path, ring_line("'out/new folder/r'", 2), GPUS="cpu", PYTHON=str(stub))
    lines = nohup.dry_lines(plan)
    assert len(lines) == 2 and not (tmp_path / "out").exists()
    subprocess.run(["bash", "-c", "\n".join(lines) + "\nwait"], cwd="/", check=True, timeout=30)
    log = (tmp_path / "out" / "new folder" / "r" / "2.log").read_text()
    assert log.startswith("started with ") and log.rstrip().endswith("--resume auto --i 2")


# ----------------------------------------------------------------------------------------------
# The ring supervisor, with processes that stand in for networks


def stand_in(tmp_path: Path, net: int, script: str, ring: Path | None = None) -> NetworkCommand:
    """Network ``net`` as a shell process running ``script``."""
    ring = ring or tmp_path / "ring"
    return NetworkCommand(ring=ring, net=net, argv=("bash", "-c", script), log=ring / f"{net}.log")


@pytest.mark.e2e
def test_a_ring_that_finishes(tmp_path: Path) -> None:
    said: list[str] = []
    commands = [stand_in(tmp_path, net, f"echo network {net}") for net in (1, 2)]
    supervisor = RingSupervisor(commands, say=said.append, started_by="test")
    supervisor.start()
    result = supervisor.wait(timeout=30, poll_s=0.02)
    assert result.status == "finished" and [o.kind for o in result.outcomes] == ["finished", "finished"]
    assert said == [result.line] and f"ring {tmp_path / 'ring'} finished: no results to show" in result.line
    pids = (tmp_path / "ring" / "pids").read_text().splitlines()
    assert [line.split()[0] for line in pids] == ["1", "2"]
    log = (tmp_path / "ring" / "1.log").read_text().splitlines()
    assert log[0].startswith("==== ") and "network 1 on cpu, started by test: bash -c echo network 1" in log[0]
    assert log[1:] == ["network 1"]


@pytest.mark.e2e
def test_logs_are_appended_with_a_header_per_start(tmp_path: Path) -> None:
    for attempt in (1, 2):
        supervisor = RingSupervisor([stand_in(tmp_path, 1, f"echo attempt {attempt}")], say=lambda line: None)
        supervisor.start()
        supervisor.wait(timeout=30, poll_s=0.02)
    log = (tmp_path / "ring" / "1.log").read_text().splitlines()
    assert [line.startswith("==== ") for line in log] == [True, False, True, False]
    assert log[1::2] == ["attempt 1", "attempt 2"]


@pytest.mark.e2e
def test_a_failed_network_stops_its_peers(tmp_path: Path) -> None:
    said: list[str] = []
    commands = [stand_in(tmp_path, 1, "echo 'error: boom'; exit 3"), stand_in(tmp_path, 2, "exec sleep 60")]
    supervisor = RingSupervisor(commands, say=said.append)
    supervisor.start()
    result = supervisor.wait(timeout=30, poll_s=0.02)
    assert result.status == "failed"
    assert [(o.net, o.kind, o.code) for o in result.outcomes] == [
        (1, "failed", 3),
        (2, "ended by the ring", -signal.SIGTERM),
    ]
    assert result.outcomes[1].seconds < 10, "the peer was not stopped"
    assert (
        f"network 1 of {tmp_path / 'ring'} failed (exit 3); see {tmp_path / 'ring' / '1.log'}: error: boom" in (said[0])
    )


@pytest.mark.e2e
def test_a_peer_that_ignores_the_stop_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    ready = tmp_path / "ready"  # network 1 fails once network 2 ignores SIGTERM
    commands = [
        stand_in(tmp_path, 1, f"while [ ! -e {ready} ]; do sleep 0.02; done; exit 1"),
        stand_in(tmp_path, 2, f"trap '' TERM; touch {ready}; sleep 60"),
    ]
    supervisor = RingSupervisor(commands, say=lambda line: None, grace_s=0.5)
    supervisor.start()
    result = supervisor.wait(timeout=30, poll_s=0.02)
    assert result.outcomes[1].code == -signal.SIGKILL and result.outcomes[1].seconds < 10


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["signal", "status"])
def test_a_network_stopped_by_a_signal_counts_as_stopped_not_failed(tmp_path: Path, how: str) -> None:
    # A stop signal in the seconds before the training script installs its handler kills the process by
    # the default action (exit by signal 15); after, the script exits with the stopped status.
    script = "kill -TERM $$; sleep 5" if how == "signal" else f"exit {STOPPED_EXIT_CODE}"
    commands = [stand_in(tmp_path, 1, script), stand_in(tmp_path, 2, "exec sleep 60")]
    supervisor = RingSupervisor(commands, say=lambda line: None)
    supervisor.start()
    result = supervisor.wait(timeout=30, poll_s=0.02)
    assert result.status == "stopped" and result.outcomes[0].kind == "stopped"
    assert "network 1 of" in result.line and " stopped (" in result.line
    log = (tmp_path / "ring" / "1.log").read_text()
    if how == "signal":
        assert "network 1 stopped by SIGTERM before its handler was installed" in log


@pytest.mark.e2e
def test_the_supervisor_starts_networks_the_way_it_is_given(tmp_path: Path) -> None:
    """Any start function returning a Popen-like handle works (the tests' fork server plugs in here)."""
    started: list[NetworkCommand] = []

    def start(command: NetworkCommand) -> subprocess.Popen:
        started.append(command)
        return subprocess.Popen([sys.executable, "-c", "pass"], env={**os.environ, **command.env})

    commands = [stand_in(tmp_path, net, "never run by this start") for net in (1, 2)]
    supervisor = RingSupervisor(commands, start=start, say=lambda line: None)
    supervisor.start()
    assert supervisor.wait(timeout=60, poll_s=0.02).status == "finished"
    assert [c.net for c in started] == [1, 2]


@pytest.mark.e2e
def test_a_ring_that_does_not_finish_in_time_is_stopped(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = RingSupervisor([stand_in(tmp_path, 1, "exec sleep 60")], say=said.append)
    supervisor.start()
    result = supervisor.wait(timeout=0.3, poll_s=0.02)
    assert result.status == "stopped" and "did not finish within 0.3 s; stopping it" in said[0]
