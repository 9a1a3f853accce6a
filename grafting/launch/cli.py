"""``graft-launch``: check every network of an experiment, then start the rings (nohup queue) or submit them
(Slurm job arrays). The experiment scripts in scripts/ hand over to it; it can be used directly too:

    graft-launch --script scripts/cifar_grafting.sh < rings.txt     the rings of a description (stdin)
    GPUS=cpu OUT=runs/mine graft-launch --ring runs/mine/r20 2 --model resnet20 --epochs 3
    graft-launch --result runs/mine/r20                              a ring's result line
    scripts/cifar_grafting.sh --help                                 a script's settings with their defaults

Settings come from the environment (``--help`` lists them); errors are one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from grafting.errors import UsageError
from grafting.launch import nohup, slurm
from grafting.launch.plan import REPO, Plan, make_plan
from grafting.launch.rings import Description, RingLine, absolute, parse_description, quote
from grafting.launch.settings import LAUNCHER_SETTINGS, ScriptSetting, Settings, read_script_settings, read_settings
from grafting.launch.supervisor import ring_result_line
from grafting.train.cli import ArgumentParser

__all__ = ["main", "run", "help_text", "banner", "plan_experiment", "script_rings", "read_script"]

# Set in the queue that runs in the background, so that it does not detach again.
DETACHED = "GRAFT_LAUNCH_DETACHED"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags of graft-launch."""
    parser = ArgumentParser(
        prog="graft-launch",
        description="Check every network's command of an experiment, then start its rings on this machine "
        "(LAUNCHER=nohup) or submit them to Slurm (LAUNCHER=slurm). The ring description comes on stdin, one "
        "line per ring: 'ring FOLDER NETWORKS TRAINING-FLAGS...', or 'after scripts/ensemble.py ARGS...'.",
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="the settings, with their defaults, and exit")
    parser.add_argument("--script", metavar="PATH", help="the experiment script whose settings block applies")
    parser.add_argument("--result", metavar="RING", help="print the result line of a ring folder and exit")
    parser.add_argument(
        "--ring",
        nargs=argparse.REMAINDER,
        metavar="FOLDER NETWORKS FLAGS",
        help="one ring from the command line instead of a description on stdin (the rest of the line)",
    )
    return parser.parse_args(argv)


def _script_header(text: str) -> list[str]:
    """The comment block after the shebang: what the script runs and how."""
    lines = text.splitlines()[1:]
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    return header


def help_text(script: str, text: str, settings: Mapping[str, ScriptSetting]) -> str:
    """``scripts/X.sh --help``: what the script does, its settings and the launcher's, with their defaults."""
    lines = _script_header(text) if text else []
    if settings:
        lines += ["", f"Settings of {script} (edit them at its top, or give them in the environment):"]
        for s in settings.values():
            fixed = "(fixed in the script) " if s.fixed else ""
            lines.append(f"  {s.name:<14} {s.default!r:<30} {fixed}{s.comment}".rstrip())
    groups = {"all launchers": "Launcher settings", "nohup": "LAUNCHER=nohup", "slurm": "LAUNCHER=slurm"}
    for group, title in groups.items():
        lines += ["", f"{title}:"]
        for setting in LAUNCHER_SETTINGS:
            if setting.group == group and setting.name not in settings:
                lines.append(f"  {setting.name:<14} {setting.default!r:<30} {setting.help}")
    lines += [
        "",
        "Everything is checked before anything starts (DRY=1 checks and prints the commands): every network's",
        "command by its training script's parser, the data, the GPUs, rings that ran before. docs/reproducing.md",
        "and docs/slurm.md explain the rest.",
    ]
    return "\n".join(lines)


def banner(plan: Plan) -> str:
    """The plan in one line: rings, networks and processes, and where they run."""
    s = plan.settings
    rings = plan.runnable
    networks = sum(ring.num for ring in rings)
    processes = networks * plan.procs_per_net * s.nodes_per_net
    device = "--device cuda" if s.on_gpus else "--device cpu"
    if s.launcher == "slurm":
        sizes = len({ring.num for ring in rings})
        throttle = f", at most {s.throttle} ring(s) of each at once" if s.throttle else ""
        where = f"LAUNCHER=slurm: {sizes} job array(s), one task per ring{throttle} ({device})"
    else:
        machine = "on the CPU" if s.gpus is None else f"on GPUs {','.join(s.gpus)}"
        where = f"LAUNCHER=nohup {machine} ({device}), at most {nohup.most_at_once(plan)} process(es) at a time"
    skipped = len(plan.rings) - len(rings)
    skipped_text = f" ({skipped} skipped)" if skipped else ""
    return f"# {s.script}: {len(rings)} ring(s){skipped_text}, {networks} network(s), {processes} process(es); {where}"


def _ring_from_argv(words: Sequence[str], cwd: Path) -> Description:
    if len(words) < 2 or not words[1].isdigit():
        raise UsageError("--ring needs a folder and a number of networks, then the training flags")
    return Description((RingLine(absolute(words[0], cwd), int(words[1]), tuple(words[2:]), 1),), ())


def read_script(script: str | None, cwd: Path) -> tuple[str, str]:
    """The experiment script's name and text ("graft-launch" and nothing without one)."""
    if not script:
        return "graft-launch", ""
    path = absolute(script, cwd)
    try:
        return path.name, path.read_text()
    except OSError as err:
        raise UsageError(f"--script {script}: cannot read it ({err.strerror or err})") from None


def script_rings(script: str, environ: Mapping[str, str], cwd: Path) -> str:
    """The ring description an experiment script prints with ``--rings`` (bash alone, no Python)."""
    done = subprocess.run(
        ["bash", str(absolute(script, cwd)), "--rings"],
        cwd=cwd,
        env=dict(environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        raise UsageError(f"{script} --rings failed: {said[-1] if said else f'exit {done.returncode}'}")
    return done.stdout


def plan_experiment(script: str | None, description: str | Description, environ: Mapping[str, str], cwd: Path) -> Plan:
    """The checked plan of an experiment: its script's settings (``environ`` over the script's defaults), and
    its rings (a description's text, or parsed)."""
    name, text = read_script(script, cwd)
    settings = read_settings(
        environ, script_name=name, script_settings=read_script_settings(text), python=sys.executable
    )
    settings.out = absolute(str(settings.out), cwd)
    if isinstance(description, str):
        description = parse_description(description, cwd, f"the rings of {name}")
    return make_plan(description, settings, cwd, sys.executable)


def _detach(settings: Settings, argv: Sequence[str], stdin: str, environ: Mapping[str, str], results: str) -> int:
    """Run the queue again in the background (it outlives this terminal), its lines going to $OUT/queue.log."""
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "queue.log", "ab") as log:
        queue = subprocess.Popen(
            [sys.executable, "-m", "grafting.launch", *argv],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**environ, DETACHED: "1", "PYTHONPATH": _pythonpath(environ)},
            start_new_session=True,
        )
    assert queue.stdin is not None
    queue.stdin.write(stdin.encode())
    queue.stdin.close()
    (out / "queue.pid").write_text(f"{queue.pid}\n")
    shown = quote([str(out)])
    print(
        f"queue of {settings.script} started in the background, pid {queue.pid} (kill it to stop queueing; "
        f"running networks go on)"
    )
    print(f"  follow: tail -f {shown}/queue.log        networks: tail -f {shown}/*/*.log")
    print(f"  results: {results}")
    return 0


def _results_command(out: Path) -> str:
    """The command that shows the experiment's results: the checkout's script, or the installed console command."""
    script = REPO / "scripts" / "summarize.py"
    return quote([sys.executable, str(script), str(out)] if script.is_file() else ["graft-summary", str(out)])


def _pythonpath(environ: Mapping[str, str]) -> str:
    parts = [str(REPO), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


def run(
    argv: Sequence[str] | None = None,
    *,
    stdin: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """graft-launch without the exit: returns the exit status (UsageError propagates). ``stdin``, ``environ``
    and ``cwd`` stand in for the process's own (tests plan experiments in-process with them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    if args.result:
        print(ring_result_line(absolute(args.result, cwd)))
        return 0
    if args.help:
        name, text = read_script(args.script, cwd)
        print(help_text(name, text, read_script_settings(text)))
        return 0
    stdin_text = ""
    if args.ring is not None:
        description: str | Description = _ring_from_argv(args.ring, cwd)
    else:
        description = stdin_text = sys.stdin.read() if stdin is None else stdin
    plan = plan_experiment(args.script, description, environ, cwd)
    settings = plan.settings
    results = _results_command(settings.out)
    if settings.launcher == "nohup":
        warning = nohup.check_gpus(settings)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    elif not settings.dry:
        slurm.check(plan, sys.executable)
    if settings.dry:
        print(banner(plan))
        lines = nohup.dry_lines(plan) if settings.launcher == "nohup" else slurm.dry_lines(plan, sys.executable)
        print("\n".join(lines))
        return 0
    if settings.launcher == "slurm":
        print(banner(plan))
        jobs = slurm.submit(plan, sys.executable)
        shown = quote([str(settings.out)])
        print(f"{len(jobs)} job(s) submitted: {' '.join(jobs)}")
        print(
            f"  follow: squeue -j {','.join(jobs)}    logs: tail -f {shown}/*/*.log    stop: scancel {' '.join(jobs)}"
        )
        print(f"  results: {results}")
        return 0
    if not settings.foreground and environ.get(DETACHED) != "1":
        return _detach(settings, argv, stdin_text, environ, results)
    print(banner(plan), flush=True)
    return nohup.Queue(plan, say=lambda line: print(line, flush=True), results=results).run()


def main(argv: Sequence[str] | None = None) -> None:
    """The console command: :func:`run`, a UsageError as one line and exit 2."""
    try:
        code = run(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)
