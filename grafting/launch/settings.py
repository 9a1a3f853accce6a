"""The launcher's settings: their defaults and meaning, the settings block at the top of an experiment
script, and the checks every value passes before anything starts.

A setting comes from the environment (the experiment scripts export what their settings block assigns);
a setting the script does not assign falls back to the script's default in its block, then to the
launcher's default below. An environment variable that is no setting but looks like one (``MODEL`` next
to ``MODELS``) is refused with "did you mean", so that a typo never runs the default plan silently.

A settings block line is ``NAME="${NAME:-default}"  # comment`` (the environment may override it) or
``NAME=value  # comment`` (fixed). A comment ``any of: a b c`` or ``one of: a b c`` makes the launcher
check the value's words against those choices.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from grafting.errors import UsageError

__all__ = [
    "LauncherSetting",
    "LAUNCHER_SETTINGS",
    "ScriptSetting",
    "read_script_settings",
    "Settings",
    "read_settings",
    "SIGNAL_LEAD_S",
    "MIN_TIME_S",
    "parse_time",
]

# Slurm sends the time-limit signal this long before the end (up to 60 s earlier: its resolution).
SIGNAL_LEAD_S = 180
# The shortest TIME a ring's job may have: the signal lead, Slurm's minute of resolution and a minute to train.
MIN_TIME_S = SIGNAL_LEAD_S + 60 + 60


@dataclass(frozen=True)
class LauncherSetting:
    """A setting every experiment script has: its default and one help line (``group``: where --help lists it)."""

    name: str
    default: str
    help: str
    group: str = "all launchers"


LAUNCHER_SETTINGS: tuple[LauncherSetting, ...] = (
    LauncherSetting("OUT", "", "the experiment's output folder: ring folders, queue.log, Slurm job scripts"),
    LauncherSetting(
        "LAUNCHER", "nohup", "nohup: processes on this machine, queued; slurm: one job array per experiment"
    ),
    LauncherSetting("DRY", "0", "1: check everything, print the commands (pasteable), start nothing, write nothing"),
    LauncherSetting(
        "GPUS", "0", "GPU ids, separated by commas or spaces (0,1,2,3), or cpu; each network gets --device"
    ),
    LauncherSetting("GPUS_PER_NET", "1", "GPUs of each network; more than 1 starts each network with torchrun"),
    LauncherSetting("JOBS_PER_GPU", "1", "networks sharing one GPU"),
    LauncherSetting(
        "EXTRA",
        "",
        "more training flags for every network, e.g. '--amp --peer-timeout 7200'; EXTRA=--resume continues "
        "rings that ran before (each network with --resume auto)",
    ),
    LauncherSetting("PYTHON", "", "the networks' interpreter (default: the launcher's own)"),
    LauncherSetting("TRAIN", "grafting_cifar/train.py", "the training script, relative to the repository"),
    LauncherSetting("FOREGROUND", "0", "1: run the queue in this terminal instead of in the background", "nohup"),
    LauncherSetting("MAX_JOBS", "", "networks running at once (default: GPUs / GPUS_PER_NET x JOBS_PER_GPU)", "nohup"),
    LauncherSetting("POLL", "2", "seconds between the queue's checks", "nohup"),
    LauncherSetting("PARTITION", "", "--partition of every job (default: the cluster's)", "slurm"),
    LauncherSetting("ACCOUNT", "", "--account (default: the cluster's)", "slurm"),
    LauncherSetting("QOS", "", "--qos (default: the cluster's)", "slurm"),
    LauncherSetting(
        "TIME",
        "",
        f"time limit of a ring's start, e.g. 24:00:00 (it requeues itself); at least {MIN_TIME_S // 60}:00",
        "slurm",
    ),
    LauncherSetting("THROTTLE", "", "rings of the experiment running at once (the array's %K; default: all)", "slurm"),
    LauncherSetting("CPUS_PER_NET", "4", "cores of each network (on each of its nodes)", "slurm"),
    LauncherSetting("MEM_PER_NET", "", "memory of each network (on each of its nodes), e.g. 16G", "slurm"),
    LauncherSetting("NODES_PER_NET", "1", "nodes of each network (torchrun on each, c10d rendezvous)", "slurm"),
    LauncherSetting("MAX_REQUEUES", "3", "how often a ring's job requeues itself after the time-limit signal", "slurm"),
    LauncherSetting(
        "SBATCH_EXTRA", "", "more #SBATCH options, --option=value words, e.g. '--constraint=a100'", "slurm"
    ),
)
_LAUNCHER_NAMES = {s.name for s in LAUNCHER_SETTINGS}


@dataclass(frozen=True)
class ScriptSetting:
    """A line of an experiment script's settings block."""

    name: str
    default: str
    comment: str
    fixed: bool  # NAME=value: the environment cannot change it
    choices: tuple[str, ...] = ()
    several: bool = False  # 'any of': several words; 'one of': exactly one


_OVERRIDABLE = re.compile(r'^([A-Z][A-Z0-9_]*)="\$\{\1:-(.*)\}"\s*(?:#\s*(.*))?$')
_FIXED = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S*)\s*(?:#\s*(.*))?$")
_CHOICES = re.compile(r"\b(any|one) of: ([^;()]+)")


def read_script_settings(text: str) -> dict[str, ScriptSetting]:
    """The settings an experiment script assigns at the top level (its settings block), by name."""
    found = {}
    for line in text.splitlines():
        overridable = _OVERRIDABLE.match(line)
        match = overridable or _FIXED.match(line)
        if match is None:
            continue
        name, default, comment = match.group(1), match.group(2), (match.group(3) or "").strip()
        if not overridable:
            with contextlib.suppress(ValueError):
                default = " ".join(shlex.split(default))
        choices = _CHOICES.search(comment)
        found[name] = ScriptSetting(
            name=name,
            default=default,
            comment=comment,
            fixed=not overridable,
            choices=tuple(choices.group(2).split()) if choices else (),
            several=choices is not None and choices.group(1) == "any",
        )
    return found


def parse_time(text: str) -> int:
    """Seconds of a Slurm time limit: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds; ValueError when it is none of them."""
    days, _, clock = text.rpartition("-") if "-" in text else ("", "", text)
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or (days and not days.isdigit()) or not 1 <= len(parts) <= 3:
        raise ValueError(text)
    numbers = [int(p) for p in parts]
    if days:  # days-hours[:minutes[:seconds]]
        numbers += [0] * (3 - len(numbers))
        return int(days) * 86400 + numbers[0] * 3600 + numbers[1] * 60 + numbers[2]
    if len(numbers) == 1:
        return numbers[0] * 60
    if len(numbers) == 2:
        return numbers[0] * 60 + numbers[1]
    return numbers[0] * 3600 + numbers[1] * 60 + numbers[2]


def _check_time(name: str, time: str, launcher: str) -> None:
    """A Slurm time limit, long enough to train between a start and the stop signal before the limit."""
    try:
        seconds = parse_time(time)
    except ValueError:
        raise UsageError(f"{name} must be a Slurm time limit like 24:00:00 or 2-00:00:00, got '{time}'") from None
    if launcher == "slurm" and seconds < MIN_TIME_S:
        raise UsageError(
            f"{name}={time} is too short: Slurm sends the stop signal {SIGNAL_LEAD_S} s (up to "
            f"{SIGNAL_LEAD_S + 60} s) before the time limit, which leaves no time to train; give a time limit of "
            f"at least {MIN_TIME_S // 60}:00"
        )


def _count(name: str, text: str, *, zero: bool = False) -> int:
    if not re.fullmatch(r"[0-9]+", text) or (not zero and int(text) == 0):
        kind = "a whole number (0: none)" if zero else "a positive whole number"
        raise UsageError(f"{name} must be {kind}, got '{text}'")
    return int(text)


@dataclass
class Settings:
    """Every setting's value, checked."""

    script: str  # the experiment script's name (graft-launch when the rings came without one)
    values: dict[str, str]  # every setting by name, the script's own included
    out: Path
    launcher: str
    dry: bool
    gpus: list[str] | None  # None: the CPU
    gpus_per_net: int
    jobs_per_gpu: int
    extra: list[str]
    python: str
    train: str
    foreground: bool
    max_jobs: int | None
    poll: float
    partition: str
    account: str
    qos: str
    time: str
    throttle: int | None
    cpus_per_net: int
    mem_per_net: str
    nodes_per_net: int
    max_requeues: int
    sbatch_extra: list[str] = field(default_factory=list)

    @property
    def on_gpus(self) -> bool:
        """Whether the networks train on GPUs (GPUS is not cpu)."""
        return self.gpus is not None

    def mem_per_cpu(self) -> str:
        """MEM_PER_NET (Slurm units, default M) spread over CPUS_PER_NET cores, in MB, rounded up."""
        number, unit = int(self.mem_per_net.rstrip("KMGTkmgt")), self.mem_per_net[-1].upper()
        megabytes = {"K": -(-number // 1024), "G": number * 1024, "T": number * 1024 * 1024}.get(unit, number)
        return f"{-(-megabytes // self.cpus_per_net)}M"


_SLURM_NAME = re.compile(r"[A-Za-z0-9_.,:@+-]*")


# Slurm's own input variables (SBATCH_EXPORT, SLURM_CONF ...) are never typos of ours.
_SLURM_INPUT = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


def _did_you_mean(environ: Mapping[str, str], known: set[str], script: str) -> None:
    """Refuse an environment variable that is no setting of ``script`` but looks like one of them."""
    for name in sorted(environ):
        if name in known or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name) or name.startswith(_SLURM_INPUT):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close:
            raise UsageError(
                f"{name} is not a setting of {script}; did you mean {close[0]}? "
                f"({script} --help lists them; unset {name} if it is meant for another program)"
            )


def _check_choices(setting: ScriptSetting, value: str) -> None:
    words = value.split()
    if not setting.several and len(words) != 1:
        raise UsageError(f"{setting.name} takes one of: {' '.join(setting.choices)}; got '{value}'")
    for word in words:
        if word not in setting.choices:
            raise UsageError(f"{setting.name}: unknown value '{word}'; choose from: {' '.join(setting.choices)}")


def _gpu_ids(text: str) -> list[str] | None:
    """GPUS as a list of ids (commas and spaces both separate), or None for cpu."""
    if text.strip() == "cpu":
        return None
    ids = re.split(r"\s*,\s*|\s+", text.strip())
    if not text.strip() or "" in ids:
        raise UsageError(f"GPUS='{text}' has an empty entry; write ids like GPUS=0,1,2,3 or GPUS=cpu")
    for gpu in ids:
        if not re.fullmatch(r"[A-Za-z0-9:_-]+", gpu):
            raise UsageError(f"GPUS: '{gpu}' is not a GPU id; write ids like GPUS=0,1,2,3 or GPUS=cpu")
    return ids


def read_settings(
    environ: Mapping[str, str], *, script_name: str, script_settings: Mapping[str, ScriptSetting], python: str
) -> Settings:
    """Every setting's value from ``environ`` (the script's and the launcher's defaults where it has none),
    checked; a bad value is a :class:`UsageError` naming the setting. ``python`` is the launcher's
    own interpreter, the networks' default."""
    known = set(script_settings) | _LAUNCHER_NAMES
    _did_you_mean(environ, known, script_name)
    values = {s.name: s.default for s in LAUNCHER_SETTINGS}
    for setting in script_settings.values():
        values[setting.name] = setting.default
    for name in known:
        if environ.get(name) and not (name in script_settings and script_settings[name].fixed):
            values[name] = environ[name]
    for name, value in values.items():
        if name != "SBATCH_EXTRA" and re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
            raise UsageError(f"{name} holds a line break or another control character; give it on one line")
    for setting in script_settings.values():
        if setting.choices:
            _check_choices(setting, values[setting.name])

    launcher = values["LAUNCHER"]
    if launcher not in ("nohup", "slurm"):
        raise UsageError(f"LAUNCHER must be nohup or slurm, got '{launcher}'")
    if values["DRY"] not in ("0", "1") or values["FOREGROUND"] not in ("0", "1"):
        bad = "DRY" if values["DRY"] not in ("0", "1") else "FOREGROUND"
        raise UsageError(f"{bad} must be 0 or 1, got '{values[bad]}'")
    if not values["OUT"]:
        raise UsageError("OUT is not set; set it to the experiment's output folder, e.g. OUT=runs/mine")
    for name in ("PARTITION", "ACCOUNT", "QOS"):
        if not _SLURM_NAME.fullmatch(values[name]):
            raise UsageError(f"{name} must be a Slurm name (letters, digits and - _ . , : @ +), got '{values[name]}'")
    mem = values["MEM_PER_NET"]
    if mem and not re.fullmatch(r"[1-9][0-9]*[KMGTkmgt]?", mem):
        raise UsageError(f"MEM_PER_NET must be a size like 16G or 4000M, got '{mem}'")
    time = values["TIME"]
    if time:
        _check_time("TIME", time, launcher)
    try:
        extra = shlex.split(values["EXTRA"])
    except ValueError as err:
        raise UsageError(f"EXTRA cannot be split into flags ({err}): '{values['EXTRA']}'") from None
    settings = Settings(
        script=script_name,
        values=values,
        out=Path(values["OUT"]),
        launcher=launcher,
        dry=values["DRY"] == "1",
        gpus=_gpu_ids(values["GPUS"]),
        gpus_per_net=_count("GPUS_PER_NET", values["GPUS_PER_NET"]),
        jobs_per_gpu=_count("JOBS_PER_GPU", values["JOBS_PER_GPU"]),
        extra=extra,
        python=values["PYTHON"] or python,
        train=values["TRAIN"],
        foreground=values["FOREGROUND"] == "1",
        max_jobs=_count("MAX_JOBS", values["MAX_JOBS"]) if values["MAX_JOBS"] else None,
        poll=_count("POLL", values["POLL"]),
        partition=values["PARTITION"],
        account=values["ACCOUNT"],
        qos=values["QOS"],
        time=time,
        throttle=_count("THROTTLE", values["THROTTLE"]) if values["THROTTLE"] else None,
        cpus_per_net=_count("CPUS_PER_NET", values["CPUS_PER_NET"]),
        mem_per_net=mem,
        nodes_per_net=_count("NODES_PER_NET", values["NODES_PER_NET"]),
        max_requeues=_count("MAX_REQUEUES", values["MAX_REQUEUES"], zero=True),
        sbatch_extra=values["SBATCH_EXTRA"].split(),
    )
    for option in settings.sbatch_extra:
        if not re.fullmatch(r"--[a-z][a-z-]*(=\S+)?", option):
            raise UsageError(f"SBATCH_EXTRA: '{option}' is not an sbatch option in the --option=value form")
        if option.startswith("--time="):  # it replaces TIME's line: the same limits apply
            _check_time("SBATCH_EXTRA --time", option.partition("=")[2], launcher)
    if settings.nodes_per_net > 1:
        if launcher != "slurm":
            raise UsageError(
                f"NODES_PER_NET={settings.nodes_per_net} needs LAUNCHER=slurm (nohup runs on this machine only)"
            )
        if settings.jobs_per_gpu > 1:
            raise UsageError(
                f"NODES_PER_NET={settings.nodes_per_net} and JOBS_PER_GPU={settings.jobs_per_gpu}: a network on "
                f"several nodes cannot share its GPUs"
            )
    if launcher == "nohup" and settings.gpus is not None and len(settings.gpus) < settings.gpus_per_net:
        raise UsageError(
            f"GPUS='{values['GPUS']}' lists {len(settings.gpus)} GPU(s) but each network needs "
            f"GPUS_PER_NET={settings.gpus_per_net}"
        )
    return settings
