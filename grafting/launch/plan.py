"""The plan of an experiment: every network's complete command, checked before anything starts.

Each network's command is parsed by its training script's own parser, in this process: an unknown flag,
a bad value or an unknown model stops the plan with the trainer's own message, naming the ring. The data
each network reads must be there; a ring whose ``--teacher`` checkpoint is missing is skipped with a
note (its teacher comes from another experiment that has not run yet); a ring folder that holds an
earlier run needs ``EXTRA=--resume``.

The launcher owns ``--s``, ``--num``, ``--i``, ``--device`` and ``--resume``: every network gets
``--device cuda`` when GPUs are given (so a node without a usable CUDA stops at once instead of training
on the CPU), ``--device cpu`` otherwise, and ``--resume auto`` (continue what there is, else start).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from grafting.errors import UsageError
from grafting.launch.rings import Description, RingLine, absolute, quote
from grafting.launch.settings import Settings
from grafting.ring.layout import NetworkFiles
from grafting.train.config import RESUME_AUTO

__all__ = ["REPO", "Trainer", "trainer_of", "PlannedRing", "FollowUp", "Plan", "make_plan", "LAUNCHER_FLAGS"]

REPO = Path(__file__).resolve().parents[2]
# Flags the launcher sets in every network's command; a ring line or EXTRA may not give them.
LAUNCHER_FLAGS = ("--s", "--num", "--i", "--device", "--gpu", "--resume")
# torchvision's folder names of the CIFAR files under --data.
CIFAR_FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}


@dataclass(frozen=True)
class Trainer:
    """A training script: its path in the repository, its console command, its module and configuration class."""

    path: str
    prog: str
    module: str
    config: str  # the class in grafting.train.config

    def parse(self, argv: list[str]) -> Any:
        """The checked configuration of ``argv`` (raises SystemExit or UsageError, as the script would)."""
        return importlib.import_module(self.module).parse_args(argv)

    def path_flags(self) -> set[str]:
        """The flags whose values are paths (metavar DIR or PATH): made absolute, so that commands paste anywhere."""
        settings = getattr(importlib.import_module("grafting.train.config"), self.config).settings()
        return {
            flag
            for f in settings
            if f.metadata["argparse"].get("metavar") in ("DIR", "PATH")
            for flag in f.metadata["flags"]
        }


TRAINERS = {
    "grafting_cifar/train.py": Trainer("grafting_cifar/train.py", "graft-cifar", "grafting_cifar.train", "CifarConfig"),
    "grafting_imagenet/train.py": Trainer(
        "grafting_imagenet/train.py", "graft-imagenet", "grafting_imagenet.train", "ImagenetConfig"
    ),
}
# Programs an 'after' line may run, with the parser that checks their flags.
FOLLOW_UPS = {"scripts/ensemble.py": "grafting.tools.ensemble"}


def trainer_of(train: str) -> Trainer:
    """The training script TRAIN names."""
    if train not in TRAINERS:
        raise UsageError(f"TRAIN must be one of {', '.join(TRAINERS)}, got '{train}'")
    return TRAINERS[train]


@dataclass
class PlannedRing:
    """A ring of the plan: its folder, its networks' shared flags (the command without ``--i``) and, when
    it cannot run yet, why (``skipped``)."""

    folder: Path
    num: int
    args: list[str]
    line: int
    skipped: str | None = None

    def network_args(self, net: int) -> list[str]:
        """Network ``net``'s training flags."""
        return [*self.args, "--i", str(net)]


@dataclass(frozen=True)
class FollowUp:
    """An 'after' command, run in ``cwd`` with the networks' interpreter once every ring has finished well."""

    argv: tuple[str, ...]
    cwd: Path


@dataclass
class Plan:
    """Everything the launcher starts: the rings in order, then the follow-up commands."""

    settings: Settings
    trainer: Trainer
    rings: list[PlannedRing]
    after: list[FollowUp] = field(default_factory=list)

    @property
    def runnable(self) -> list[PlannedRing]:
        """The rings that start (not skipped)."""
        return [ring for ring in self.rings if ring.skipped is None]

    @property
    def procs_per_net(self) -> int:
        """Training processes of one network: torchrun starts one per GPU."""
        return self.settings.gpus_per_net if self.settings.on_gpus else 1

    def program(self) -> list[str]:
        """The interpreter and launcher words before the training script's flags (torchrun with several GPUs)."""
        words = [self.settings.python]
        if self.procs_per_net > 1:
            # --standalone picks a free port, so the networks of a ring on one machine do not collide; the
            # "--" keeps torchrun's parser off our flags (it reads --num as its --numa-binding).
            words += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.procs_per_net), "--"]
        return [*words, str(REPO / self.trainer.path)]


def _launcher_flag(word: str) -> str | None:
    for flag in LAUNCHER_FLAGS:
        if word == flag or word.startswith(flag + "="):
            return flag
    return None


def _extra_flags(extra: Sequence[str]) -> tuple[list[str], bool]:
    """EXTRA without its --resume [auto], and whether it had one."""
    words, resume, k = [], False, 0
    while k < len(extra):
        word = extra[k]
        if word in ("--resume", f"--resume={RESUME_AUTO}"):
            resume = True
            k += 2 if word == "--resume" and k + 1 < len(extra) and extra[k + 1] == RESUME_AUTO else 1
            continue
        flag = _launcher_flag(word)
        if flag:
            raise UsageError(f"EXTRA: {flag} is set by the launcher for every network; remove it from EXTRA")
        words.append(word)
        k += 1
    return words, resume


def _absolute_paths(flags: Sequence[str], path_flags: set[str], cwd: Path) -> list[str]:
    """``flags`` with the values of path flags made absolute (``~`` expanded)."""
    out, expects_path = [], False
    for word in flags:
        if expects_path:
            out.append(str(absolute(word, cwd)))
            expects_path = False
            continue
        name, eq, value = word.partition("=")
        if eq and name in path_flags:
            out.append(f"{name}={absolute(value, cwd)}")
        else:
            out.append(word)
            expects_path = word in path_flags
    return out


def _parse_message(parse: Callable[[list[str]], Any], argv: list[str]) -> tuple[Any, str | None]:
    """``parse(argv)`` in this process: the configuration, or None and the parser's one-line message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parse(argv), None
    except SystemExit:
        said = stderr.getvalue().strip().splitlines()
        return None, (said[-1] if said else "the flags were refused").removeprefix("error: ")
    except UsageError as err:
        return None, str(err)


def _check_data(config: Any, ring: Path, python: str) -> None:
    """The dataset a network reads must be in its --data folder before anything starts."""
    data = Path(config.data)
    if config.dataset.startswith("cifar"):
        folder = CIFAR_FOLDERS[config.num_classes]
        if (data / folder).is_dir() or config.download:
            return
        advice = quote(
            [
                "env",
                f"PYTHONPATH={REPO}",
                python,
                "-m",
                "grafting.tools.data",
                "download",
                str(data),
                "--cifar",
                str(config.num_classes),
            ]
        )
        raise UsageError(
            f"--data {data} (ring {ring}): no CIFAR-{config.num_classes} there ({folder}/ is missing); set DATA to "
            f"the folder that holds it, or download it: {advice}"
        )
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise UsageError(
                f"--data {data} (ring {ring}): {data / split}/ is missing; set DATA to the folder that holds "
                f"ImageNet's train/ and val/ class folders"
            )


def _ran_before(ring: PlannedRing) -> Path | None:
    """A checkpoint of an earlier run in the ring's folder (None: nothing to continue)."""
    from grafting.train.files import something_to_continue

    for net in range(1, ring.num + 1):
        files = NetworkFiles(ring.folder, net)
        if something_to_continue(files):
            return files.last
    return None


def make_plan(description: Description, settings: Settings, cwd: Path, launcher_python: str) -> Plan:
    """Check the rings of ``description`` with ``settings`` and plan every network's command; a
    :class:`UsageError` names the first problem. ``launcher_python`` runs the data download advice."""
    trainer = trainer_of(settings.train)
    several = settings.gpus_per_net > 1 or settings.nodes_per_net > 1
    if several and trainer.path != "grafting_imagenet/train.py":
        raise UsageError(
            f"GPUS_PER_NET={settings.gpus_per_net} NODES_PER_NET={settings.nodes_per_net}: only "
            f"grafting_imagenet/train.py trains one network on several processes; use 1 for {trainer.path}"
        )
    extra, resume = _extra_flags(settings.extra)
    path_flags = trainer.path_flags()
    device = "cuda" if settings.on_gpus else "cpu"
    rings: list[PlannedRing] = []
    seen: dict[Path, int] = {}
    for line in description.rings:
        _check_ring_line(line)
        if line.folder in seen:
            raise UsageError(f"two rings share the folder {line.folder} (lines {seen[line.folder]} and {line.line})")
        seen[line.folder] = line.line
        flags = _absolute_paths([*line.flags, *extra], path_flags, cwd)
        args = [*flags, "--s", str(line.folder), "--num", str(line.num), "--device", device, "--resume", RESUME_AUTO]
        ring = PlannedRing(line.folder, line.num, args, line.line)
        for net in range(1, line.num + 1):
            config, message = _parse_message(trainer.parse, ring.network_args(net))
            if message is not None:
                message = message.replace("(see --help)", f"(see {trainer.prog} --help)")
                raise UsageError(f"ring {line.folder} (network {net}): {message}")
            if net == 1:
                _check_data(config, line.folder, launcher_python)
                missing = [t for t in config.teacher if not Path(t).is_file()]
                if missing:
                    ring.skipped = f"its teacher {missing[0]} is not there yet (train that run first)"
        rings.append(ring)
    if not rings:
        raise UsageError("the settings select no ring to run; check the lists at the top of the script")
    earlier = {ring.folder: _ran_before(ring) for ring in rings}
    if not resume:
        for ring in rings:
            if earlier[ring.folder] is not None:
                raise UsageError(
                    f"{earlier[ring.folder]} exists: that ring has run before; continue it with EXTRA=--resume, or "
                    f"choose another OUT"
                )
    elif not any(earlier.values()):
        raise UsageError(
            f"EXTRA=--resume, but none of the {len(rings)} ring(s) has anything to continue (no net<i>/last.pt "
            f"under them); check OUT, or leave --resume out to start them"
        )
    after = [_follow_up(line.argv, line.line, cwd) for line in description.after]
    return Plan(settings, trainer, rings, after)


def _check_ring_line(line: RingLine) -> None:
    for word in line.flags:
        flag = _launcher_flag(word)
        if flag:
            advice = "use EXTRA=--resume" if flag == "--resume" else "remove it"
            raise UsageError(f"ring {line.folder}: {flag} is set by the launcher for every network; {advice}")


def _follow_up(argv: Sequence[str], number: int, cwd: Path) -> FollowUp:
    """An 'after' line: a program of this repository and its flags, checked by its own parser."""
    program = argv[0]
    if program not in FOLLOW_UPS:
        raise UsageError(f"after (line {number}): runs {program}; it may run {', '.join(FOLLOW_UPS)}")
    parse = importlib.import_module(FOLLOW_UPS[program]).parse_args
    _, message = _parse_message(parse, list(argv[1:]))
    if message is not None:
        raise UsageError(f"after {program} (line {number}): {message}")
    return FollowUp((str(REPO / program), *argv[1:]), cwd)
