"""The experiment scripts (scripts/*.sh): their settings, the rings they describe, and the hand-over to the
launcher (grafting/launch).

Most tests plan a script in this process: bash prints the script's ring description (``X.sh --rings``, no
Python), and the launcher plans it here, every network's command through its trainer's parser. The queue
runs here too, with a stand-in interpreter for the networks. A few tests run a script for real: ``--help``,
a refused setting, the queue that detaches, the download advice followed literally, and the quickstart. The
real training runs through the scripts are in test_slurm.py (the nohup queue and Slurm, on the same ring).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import EXPERIMENTS, REPO, data_folders, one_line, plan_script, script_environment

from grafting.data.fake import write_fake_cifar
from grafting.errors import UsageError
from grafting.launch import nohup
from grafting.launch.cli import banner, help_text, read_script, run, script_rings
from grafting.launch.plan import Plan
from grafting.launch.settings import read_script_settings
from grafting.tools import ensemble as ensemble_tool


def script_path(script: str | Path) -> Path:
    return script if isinstance(script, Path) else REPO / "scripts" / script


def dry_output(script: str | Path, cwd: Path, capsys: pytest.CaptureFixture[str], **settings: str) -> list[str]:
    """What ``DRY=1 X.sh`` prints, planned in this process."""
    data_folders(cwd)
    path, env = str(script_path(script)), script_environment(DRY="1", **settings)
    assert run(["--script", path], stdin=script_rings(path, env, cwd), environ=env, cwd=cwd) == 0
    return capsys.readouterr().out.splitlines()


def trained(p: Plan) -> list:
    """Every network's parsed configuration, ring after ring."""
    return [p.trainer.parse(ring.network_args(net)) for ring in p.runnable for net in range(1, ring.num + 1)]


def listing(root: Path) -> set[Path]:
    """Every file and folder under ``root``."""
    return set(root.rglob("*"))


# ----------------------------------------------------------------------------------------------
# Every script: its rings, planned and checked


@pytest.mark.e2e
@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.name)
def test_every_command_of_every_script_passes_its_trainers_parser(
    script: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_folders(tmp_path)
    before = listing(tmp_path)
    lines = dry_output(script, tmp_path, capsys)
    assert listing(tmp_path) == before, "DRY=1 must not create anything"
    p = plan_script(script, tmp_path)
    assert lines[0] == banner(p)
    rings: dict[str, list] = defaultdict(list)
    for args in trained(p):
        rings[args.s].append(args)
        assert Path(args.s).is_absolute() and Path(args.data).is_absolute(), "commands paste anywhere"
        assert args.device == "cuda" and args.resume == "auto"
    for folder, members in rings.items():
        assert sorted(a.i for a in members) == list(range(1, members[0].num + 1)), f"{folder}: incomplete ring"
    commands = [line for line in lines if not line.startswith("#")]
    assert len([c for c in commands if "train.py" in c]) == sum(len(m) for m in rings.values())


def test_every_script_lists_its_settings_with_their_defaults(tmp_path: Path) -> None:
    for script in EXPERIMENTS:
        name, text = read_script(str(script), tmp_path)
        settings = read_script_settings(text)
        shown = help_text(name, text, settings)
        assert {"GPUS", "LAUNCHER", "OUT", "DATA"} <= set(settings), script.name
        for setting in settings.values():
            assert f"  {setting.name:<14} {setting.default!r}" in shown, (script.name, setting.name)
        for launcher_only in ("DRY", "EXTRA", "THROTTLE", "MAX_REQUEUES", "SBATCH_EXTRA"):
            assert f"  {launcher_only:<14} " in shown
        assert shown.startswith(text.splitlines()[1][2:])  # the script's own description first


EXPECTED_NETWORKS = {  # (rings, training commands) of each script with its default settings
    "cifar_baselines.sh": (8, 8),
    "cifar_grafting.sh": (16, 32),
    "mobilenetv2_networks.sh": (10 + 12, 2 * (2 + 3 + 4 + 6 + 8) + 12),
    "leaky_resnets.sh": (12, 6 + 12),
    "vgg16_grafting.sh": (6, 2 + 4 + 4),
    "mobilenetv2_a_c.sh": (22, 44),
    "imagenet.sh": (6, 3 + 6),
}


@pytest.mark.e2e
@pytest.mark.parametrize("script", sorted(EXPECTED_NETWORKS))
def test_default_settings_cover_every_published_row(script: str, tmp_path: Path) -> None:
    runs = trained(plan_script(script, tmp_path))
    assert (len({a.s for a in runs}), len(runs)) == EXPECTED_NETWORKS[script]
    for args in runs:
        assert args.epochs == (90 if script == "imagenet.sh" else 200)
        assert args.lr == 0.1


@pytest.mark.e2e
def test_recipes_of_the_grafting_table(tmp_path: Path) -> None:
    runs = trained(plan_script("cifar_grafting.sh", tmp_path))
    rows = {(a.model, a.cifar, Path(a.s).name.rsplit("_", 1)[1]) for a in runs}
    assert rows == {
        (m, d, r)
        for m in ("resnet32", "resnet56", "resnet110", "mobilenetv2")
        for d in (10, 100)
        for r in ("slr", "dlr")
    }
    for args in runs:
        recipe = Path(args.s).name.rsplit("_", 1)[1]
        assert (args.difflr, args.cos) == ((True, True) if recipe == "dlr" else (False, False))
        assert args.num == 2 and args.level == "layer" and (args.a, args.c) == (0.4, 500.0)


@pytest.mark.e2e
def test_the_a_and_c_study_and_vgg_levels(tmp_path: Path) -> None:
    pairs = [(a.a, a.c) for a in trained(plan_script("mobilenetv2_a_c.sh", tmp_path, DATASETS="10")) if a.i == 1]
    assert pairs == [(0.4, c) for c in (1, 5, 10, 50, 500)] + [(a, 100) for a in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    runs = trained(plan_script("vgg16_grafting.sh", tmp_path, DATASETS="100"))
    assert [(a.num, a.level) for a in runs if a.i == 1] == [(1, "layer"), (2, "layer"), (2, "filter")]
    assert {a.model for a in runs} == {"vgg16"}
    # The published VGG recipe: the same lr for both networks, step schedule; dlr on request.
    assert all((a.difflr, a.cos, a.lr) == (False, False, 0.1) for a in runs)
    runs = trained(plan_script("vgg16_grafting.sh", tmp_path, DATASETS="100", METHODS="layer", RECIPE="dlr"))
    assert [(a.difflr, a.cos) for a in runs] == [(True, True)] * 2


@pytest.mark.e2e
def test_ensemble_members_are_seeded_apart_and_evaluated_afterwards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = plan_script("mobilenetv2_networks.sh", tmp_path, DATASETS="100", NETS="3")
    members = [a for a in trained(p) if a.num == 1]
    assert [a.seed for a in members] == [0, 1, 2, 3, 4, 5]
    assert all(a.model == "mobilenetv2" and a.cifar == 100 for a in members)
    [after] = p.after
    flags = ensemble_tool.parse_args(list(after.argv[1:]))
    assert [str(after.cwd / c) for c in flags.checkpoints] == [f"{a.s}/net1/best.pt" for a in members]
    assert (flags.model, flags.cifar) == ("mobilenetv2", 100)
    lines = dry_output("mobilenetv2_networks.sh", tmp_path, capsys, DATASETS="100", NETS="3")
    assert lines[-1].startswith(f"cd {tmp_path} && ") and "scripts/ensemble.py" in lines[-1]
    assert lines[-2] == "# once every ring above has finished well:"
    assert not plan_script("mobilenetv2_networks.sh", tmp_path, DATASETS="100", NETS="3", ENSEMBLE="0").after


@pytest.mark.e2e
def test_cultivation_and_ablations(tmp_path: Path) -> None:
    # The ablations: baseline, noise, internal (one network); external entropy and l1, average (two).
    runs = trained(plan_script("cifar_ablations.sh", tmp_path, EPOCHS="3"))
    assert {(a.num, a.source, a.criterion) for a in runs} == {
        (1, "external", "entropy"),
        (1, "noise", "entropy"),
        (1, "internal", "entropy"),
        (2, "external", "entropy"),
        (2, "external", "l1"),
        (2, "average", "entropy"),
    }
    assert len(runs) == 2 * (3 + 3 * 2) and {a.epochs for a in runs} == {3}
    # Cultivation: the teacher variants wait for their teachers (skipped with a note until they exist).
    p = plan_script("cifar_cultivation.sh", tmp_path, MODELS="resnet32", DATASETS="10")
    assert [(Path(r.folder).name, r.skipped is None) for r in p.rings] == [
        ("resnet32_c10_dlr_kd_peers", True),
        ("resnet32_c10_dlr_kd_teacher", False),
        ("resnet32_c10_slr_kd_authors", False),
        ("resnet32_c10_slr_kd_grafted", False),
    ]
    for teacher in ("cifar_baselines/resnet32_c10_baseline/net1", "cifar_grafting/resnet32_c10_dlr/net1"):
        (tmp_path / "runs" / teacher).mkdir(parents=True)
        (tmp_path / "runs" / teacher / "best.pt").write_bytes(b"")
    (tmp_path / "runs" / "cifar_grafting/resnet32_c10_dlr/net2").mkdir()
    (tmp_path / "runs" / "cifar_grafting/resnet32_c10_dlr/net2/best.pt").write_bytes(b"")
    runs = trained(plan_script("cifar_cultivation.sh", tmp_path, MODELS="resnet32", DATASETS="10"))
    assert {(a.num, a.distill, a.kd_temperature, a.kd_soften_teacher, len(a.teacher), a.difflr) for a in runs} == {
        (2, "peers", 4.0, True, 0, True),
        (2, "teacher", 4.0, True, 1, True),
        (1, "teacher", 2.0, False, 1, False),  # authors: one network, one teacher, no grafting
        (2, "teacher", 2.0, False, 2, False),  # grafted-teachers
    }


# ----------------------------------------------------------------------------------------------
# Settings through the scripts


@pytest.mark.e2e
def test_cpu_extra_flags_and_paths_with_spaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cifar data" / "cifar-100-python").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path))  # the launcher expands ~ in paths, as the shell would
    p = plan_script(
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
    [args] = trained(p)
    assert args.device == "cpu" and args.amp and args.peer_timeout == 60
    assert args.s == str(tmp_path / "my runs" / "resnet20_c100_baseline")
    assert args.data == str(tmp_path / "cifar data")
    [line] = nohup.dry_lines(p)
    assert "CUDA_VISIBLE_DEVICES" not in line and shlex.split(line)[2] == str(
        tmp_path / "my runs" / "resnet20_c100_baseline"
    )


@pytest.mark.e2e
def test_gpus_given_with_spaces_go_one_per_network(tmp_path: Path) -> None:
    p = plan_script("cifar_grafting.sh", tmp_path, GPUS="0 1", MODELS="resnet20", DATASETS="10", METHODS="dlr")
    assert [line.split(" && ")[1].split()[0] for line in nohup.dry_lines(p)] == [
        "CUDA_VISIBLE_DEVICES=0",
        "CUDA_VISIBLE_DEVICES=1",
    ]


@pytest.mark.e2e
def test_imagenet_networks_on_several_gpus_use_torchrun(tmp_path: Path) -> None:
    from torch.distributed.run import get_args_parser

    p = plan_script(
        "imagenet.sh", tmp_path, GPUS="0,1,2,3", GPUS_PER_NET="2", ARCHS="resnet50", METHODS="grafting", RECIPE="step"
    )
    lines = nohup.dry_lines(p)
    assert [line.split(" && ")[1].split()[0] for line in lines] == [
        "CUDA_VISIBLE_DEVICES=0,1",
        "CUDA_VISIBLE_DEVICES=2,3",
    ]
    program = p.program()
    assert program[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--"]
    for net, args in enumerate(trained(p), 1):
        # torchrun's own parser must hand the script and every one of its flags over untouched (without the
        # "--" it reads --num as its --numa-binding and rejects --s as ambiguous).
        flags = p.rings[0].network_args(net)
        parsed = get_args_parser().parse_args(program[3:] + flags)
        assert parsed.training_script == program[-1] and parsed.training_script_args == flags
        assert args.model == "resnet50" and args.steplr and args.batch_size == 256 and args.num == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"MODEL": "resnet20"}, "MODEL is not a setting of cifar_grafting.sh; did you mean MODELS?"),
        ({"EPOCH": "3"}, "EPOCH is not a setting of cifar_grafting.sh; did you mean EPOCHS?"),
        ({"EPOCHS": "two"}, "(network 1): argument --epochs: invalid int value: 'two' (see graft-cifar --help)"),
        ({"MODELS": "resnet2O"}, "(network 1): --model: unknown model 'resnet2O'; choose one of: mobilenetv2"),
        ({"EXTRA": "--amp-typo"}, "(network 1): unrecognized arguments: --amp-typo (see graft-cifar --help)"),
        ({"METHODS": "slr fancy"}, "METHODS: unknown value 'fancy'; choose from: slr dlr"),
        ({"DATASETS": "10 1000"}, "DATASETS: unknown value '1000'"),
        ({"GPUS": "0,,1"}, "GPUS='0,,1' has an empty entry"),
        ({"GPUS": "0,1", "GPUS_PER_NET": "2"}, "only grafting_imagenet/train.py trains one network on several"),
        ({"NODES_PER_NET": "2"}, "NODES_PER_NET=2 needs LAUNCHER=slurm"),
        ({"METHODS": " "}, "the settings select no ring to run"),
        ({"DATA": "elsewhere"}, "no CIFAR-10 there (cifar-10-batches-py/ is missing)"),
    ],
)
@pytest.mark.e2e
def test_bad_settings_stop_with_one_line_before_anything_starts(
    settings: dict[str, str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(UsageError) as refused:
        plan_script("cifar_grafting.sh", tmp_path, MODELS=settings.pop("MODELS", "resnet20"), **settings)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_gpus_are_checked_with_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 0\necho 1\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")
    with pytest.raises(UsageError) as refused:
        nohup.check_gpus(plan_script("cifar_grafting.sh", tmp_path, GPUS="0,1,2,3", MODELS="resnet20").settings)
    assert str(refused.value) == (
        "GPUS=0,1,2,3: this machine has no GPU 2 (nvidia-smi lists 0,1); set GPUS to those ids, or GPUS=cpu"
    )
    assert nohup.check_gpus(plan_script("cifar_grafting.sh", tmp_path, GPUS="1,0", MODELS="resnet20").settings) is None
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # without nvidia-smi the ids cannot be checked: a warning
    warning = nohup.check_gpus(plan_script("cifar_grafting.sh", tmp_path, GPUS="0,1", MODELS="resnet20").settings)
    assert warning and warning.startswith("nvidia-smi not found, so GPUS=0,1 is not checked")
    assert nohup.check_gpus(plan_script("cifar_grafting.sh", tmp_path, GPUS="cpu", MODELS="resnet20").settings) is None


@pytest.mark.e2e
def test_a_ring_that_ran_before_needs_resume(tmp_path: Path) -> None:
    ring = tmp_path / "out" / "resnet20_c10_dlr"
    (ring / "net2").mkdir(parents=True)
    (ring / "net2" / "last.pt").write_bytes(b"")
    settings = {"GPUS": "0,1", "MODELS": "resnet20", "DATASETS": "10", "OUT": "out"}
    with pytest.raises(UsageError) as refused:
        plan_script("cifar_grafting.sh", tmp_path, **settings)
    assert str(refused.value) == (
        f"{ring}/net2/last.pt exists: that ring has run before; continue it with EXTRA=--resume, or choose another OUT"
    )
    # The advice, followed literally: every network continues what it has, or starts.
    p = plan_script("cifar_grafting.sh", tmp_path, EXTRA="--resume", **settings)
    assert {a.resume for a in trained(p)} == {"auto"}


# ----------------------------------------------------------------------------------------------
# The queue, here, with a stand-in interpreter for the networks

STUB = r"""#!/usr/bin/env bash
# Stands in for python: records when network --i of ring --s started and ended.
while (( $# )); do
    case "$1" in --s) ring="$2"; shift ;; --i) net="$2"; shift ;; esac
    shift
done
echo "start $net $(date +%s.%N)" >> "$ring/events"
echo "stand-in network $net"
if [[ "$ring" == *_slr && -n "${STUB_FAIL:-}" ]]; then
    [[ "$net" == 1 ]] && { echo "error: stand-in failure"; exit 3; }
    exec sleep 60
fi
sleep "${STUB_SECONDS:-0.5}"
echo "end $net $(date +%s.%N)" >> "$ring/events"
"""


def stub(tmp_path: Path) -> str:
    path = tmp_path / "stub-python"
    path.write_text(STUB)
    path.chmod(0o755)
    return str(path)


def events(ring: Path) -> dict[str, list[float]]:
    found: dict[str, list[float]] = defaultdict(list)
    for line in (ring / "events").read_text().splitlines():
        kind, _, when = line.split()
        found[kind].append(float(when))
    return found


def queue(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, **settings: str):
    """Run cifar_grafting.sh's queue (resnet20 on CIFAR-10, both recipes) in this process; its exit code and output."""
    for name, value in settings.items():
        if name.startswith("STUB_"):
            monkeypatch.setenv(name, value)
    ring_settings = {k: v for k, v in settings.items() if not k.startswith("STUB_")}
    p = plan_script(
        "cifar_grafting.sh", tmp_path, MODELS="resnet20", DATASETS="10", OUT="out", POLL="1", **ring_settings
    )
    code = nohup.Queue(p, results="(results)").run()
    return code, capsys.readouterr().out


@pytest.mark.e2e
def test_queue_runs_rings_one_after_another_when_gpus_are_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = queue(tmp_path, capsys, monkeypatch, PYTHON=stub(tmp_path), GPUS="0,1")
    assert code == 0, out
    first, second = tmp_path / "out" / "resnet20_c10_slr", tmp_path / "out" / "resnet20_c10_dlr"
    one, two = events(first), events(second)
    assert len(one["end"]) == len(two["end"]) == 2
    assert min(two["start"]) >= max(one["end"]), "the second ring started before the first had finished"
    assert max(one["start"]) - min(one["start"]) < 1.0, "the networks of a ring start together"
    pids = [line.split() for line in (first / "pids").read_text().splitlines()]
    assert [(net, gpu) for net, _, gpu in pids] == [("1", "0"), ("2", "1")]
    assert (first / "1.log").read_text().splitlines()[1:] == ["stand-in network 1"]
    assert "all rings finished; results: (results)" in out and f"tail -f {first}/*.log" in out
    # Each ring's result line as soon as it has finished, before the next ring starts.
    assert out.index(f"ring {first} finished: ") < out.index(f"starting {second}")
    assert f"ring {second} finished: " in out


@pytest.mark.e2e
def test_a_failed_network_stops_its_ring_and_the_queue_moves_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    code, out = queue(tmp_path, capsys, monkeypatch, PYTHON=stub(tmp_path), GPUS="0,1", STUB_FAIL="1")
    assert code == 1
    assert time.monotonic() - started < 30, "the surviving network of the failed ring was not stopped"
    failed = tmp_path / "out" / "resnet20_c10_slr"
    assert f"network 1 of {failed} failed (exit 3); see {failed}/1.log: error: stand-in failure" in out
    assert f"failed rings: {failed}" in out and f"ring {failed} finished" not in out
    assert len(events(tmp_path / "out" / "resnet20_c10_dlr")["end"]) == 2


@pytest.mark.e2e
def test_network_logs_are_appended_with_a_header_per_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resuming a ring (EXTRA=--resume) keeps the log lines of the networks' earlier runs.
    settings = {"PYTHON": stub(tmp_path), "GPUS": "0,1", "METHODS": "slr", "STUB_SECONDS": "0"}
    assert queue(tmp_path, capsys, monkeypatch, **settings)[0] == 0
    (tmp_path / "out" / "resnet20_c10_slr" / "net1").mkdir()
    (tmp_path / "out" / "resnet20_c10_slr" / "net1" / "last.pt").write_bytes(b"")
    assert queue(tmp_path, capsys, monkeypatch, EXTRA="--resume", **settings)[0] == 0
    log = (tmp_path / "out" / "resnet20_c10_slr" / "1.log").read_text().splitlines()
    assert log.count("stand-in network 1") == 2, log
    headers = [line for line in log if line.startswith("==== ")]
    assert len(headers) == 2 and all("network 1 on GPU 0, started by cifar_grafting.sh" in h for h in headers), log
    assert log[0] == headers[0] and all(h.endswith("--resume auto --i 1") for h in headers)


# ----------------------------------------------------------------------------------------------
# The scripts for real


@pytest.mark.e2e
def test_help_and_a_refused_setting_through_the_script(tmp_path: Path) -> None:
    data_folders(tmp_path)
    script = str(REPO / "scripts" / "cifar_grafting.sh")
    shown = subprocess.run(
        ["bash", script, "--help"], env=script_environment(), capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0 and "  EPOCHS         '200'" in shown.stdout and "  THROTTLE " in shown.stdout
    refused = subprocess.run(
        ["bash", script],
        cwd=tmp_path,
        env=script_environment(MODEL="resnet20"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and refused.stdout == ""
    assert one_line(refused.stderr).startswith(
        "error: MODEL is not a setting of cifar_grafting.sh; did you mean MODELS?"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_queue_detaches_and_logs_to_queue_log(tmp_path: Path) -> None:
    data_folders(tmp_path)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "cifar_baselines.sh")],
        cwd=tmp_path,
        env=script_environment(PYTHON=stub(tmp_path), GPUS="0", MODELS="resnet20", DATASETS="10 100", OUT="out"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "started in the background" in result.stdout and "tail -f" in result.stdout
    queue_log = tmp_path / "out" / "queue.log"
    deadline = time.monotonic() + 120
    while "all rings finished" not in (queue_log.read_text() if queue_log.exists() else ""):
        assert time.monotonic() < deadline, "the detached queue did not finish"
        time.sleep(0.2)
    print(f"\nthe detached queue finished {time.monotonic() - started:.1f} s after the script started")
    assert "# cifar_baselines.sh: 2 ring(s), 2 network(s)" in queue_log.read_text()
    for cifar in (10, 100):
        assert len(events(tmp_path / "out" / f"resnet20_c{cifar}_baseline")["end"]) == 1


@pytest.mark.e2e
def test_missing_data_advice_downloads_into_the_folder_the_script_reads(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as refused:
        plan_script("cifar_baselines.sh", tmp_path, DATA="elsewhere", DATASETS="100", MODELS="resnet20")
    command = shlex.split(str(refused.value).split("download it: ", 1)[1])
    assert command[-4:] == ["download", str(tmp_path / "elsewhere"), "--cifar", "100"], command
    # Followed literally where the internet is out of reach (a proxy that refuses at once): it tries that
    # folder and says in one line what to do instead; with the internet it would download there.
    offline = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    done = subprocess.run(command, cwd=tmp_path, env=offline, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and f"could not download CIFAR-100 into {tmp_path / 'elsewhere'}" in line, line


@pytest.mark.e2e
@pytest.mark.slow
def test_the_quickstart_trains_two_grafted_networks_with_the_launcher(tmp_path: Path) -> None:
    """bash scripts/quickstart.sh as the README prints it, in a folder laid out like the checkout (its data/ and
    runs/ its own), offline, on a small stand-in already in place, for one epoch."""
    workspace = tmp_path / "checkout"
    workspace.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("data", "runs", ".git", ".pytest_cache"):
            (workspace / entry.name).symlink_to(entry)
    write_fake_cifar(workspace / "data" / "generated-cifar10", 10, train_size=64, test_size=32)
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(
        ["bash", "scripts/quickstart.sh"],
        cwd=workspace,
        env={**env, **offline, "EPOCHS": "1", "RUN": "runs/qs"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ring = workspace / "runs" / "qs"
    assert "data: GENERATED stand-in in data/generated-cifar10" in done.stdout
    assert f"ring {ring} finished: resnet20 cifar10 slr, 2 network(s), 1 epochs" in done.stdout, done.stdout
    for net in (1, 2):
        assert (ring / f"{net}.log").read_text().startswith("==== ") and (ring / f"net{net}" / "last.pt").exists()
