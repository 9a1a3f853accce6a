"""LAUNCHER=slurm: one job array per experiment, one array task per ring, one Slurm task per network.

The launcher writes each array's job script (a readable bash script: the Slurm options, then a table
of the rings, one per array task, then what runs on the nodes) to ``$OUT/slurm/`` under a name of its
own (never overwritten: a queued task reads its script when it starts) and submits it. Rings of
different sizes need different resources, so an experiment with several ring sizes is one array per
size, all named after the experiment; ``THROTTLE=K`` (the array's ``%K``) caps the rings of each array
that run at once.

On the node, each task renames itself after its ring (a short name that tells the rings apart in
``squeue``'s default 8 columns), records its job id in ``<ring>/slurm.job`` and writes its lines to
``<ring>/slurm-<array>_<task>.out``. Every network runs with ``--resume auto``. When the networks stop
at the time-limit signal (USR1, to the networks or to the job's shell) the task requeues itself, up to
MAX_REQUEUES times; a network that failed (an exit status other than the stop signal's) is never
requeued: the task ends as failed and says which network and why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grafting.errors import UsageError
from grafting.launch.plan import REPO, Plan, PlannedRing
from grafting.launch.rings import quote
from grafting.launch.settings import SIGNAL_LEAD_S
from grafting.train.signals import STOPPED_EXIT_CODE

__all__ = ["JobArray", "arrays", "short_names", "job_script", "after_script", "dry_lines", "check", "submit"]

# squeue's default format shows this many characters of a job name (%.8j).
NAME_WIDTH = 8
JOB_TABLE_ENTRY = re.compile(r"^ {8}(\d+)\) RING=(\S+) NAME=")


@dataclass
class JobArray:
    """The rings of one size, submitted as one job array; ``path`` is its job script."""

    rings: list[PlannedRing]
    names: list[str]
    path: Path

    @property
    def num(self) -> int:
        """Networks per ring."""
        return self.rings[0].num

    @property
    def tasks(self) -> str:
        """The array's task range, e.g. ``0-15``."""
        return "0" if len(self.rings) == 1 else f"0-{len(self.rings) - 1}"


def _abbreviation(token: str) -> str:
    """resnet32 -> r32, mobilenetv2 -> mv2, c100 -> c100, dlr -> d: each run of letters by its first letter."""
    return re.sub(r"[A-Za-z]+", lambda m: m.group(0)[0], token)


def short_names(relatives: Sequence[str], experiment: str = "ring") -> list[str]:
    """Job names whose first 8 characters (what ``squeue`` shows) tell the rings apart: the parts of each
    folder name relative to OUT, abbreviated (resnet32_c10_dlr: r32c10d), with or without the parts every ring
    shares, in their order or reversed (dc100r110); else the experiment's initials and the ring's number."""
    tokens = [[_abbreviation(t) for t in re.split(r"[_/\-]+", name) if t] for name in relatives]
    shared = Counter(tokens[0])
    for parts in tokens[1:]:
        shared &= Counter(parts)
    common = shared if len(tokens) > 1 else Counter()

    def without(parts: list[str], drop: Counter) -> list[str]:
        left = list(parts)
        for token, times in drop.items():
            for _ in range(times):
                left.remove(token)
        return left

    for order, drop in ((1, Counter()), (1, common), (-1, Counter()), (-1, common)):
        names = ["".join(without(parts, drop)[::order]) or "ring" for parts in tokens]
        if len({n[:NAME_WIDTH] for n in names}) == len(names) and all(len(n) <= 2 * NAME_WIDTH for n in names):
            return names
    initials = "".join(part[0] for part in re.split(r"[_\-]+", experiment) if part)[: NAME_WIDTH - 4] or "r"
    return [f"{initials}{k}" for k in range(len(tokens))]


def arrays(plan: Plan, stamp: str) -> list[JobArray]:
    """The job arrays of the plan, one per ring size, in the order of their first ring."""
    out = plan.settings.out.resolve() if not plan.settings.out.is_absolute() else plan.settings.out
    by_size: dict[int, list[PlannedRing]] = {}
    for ring in plan.runnable:
        by_size.setdefault(ring.num, []).append(ring)
    experiment = _experiment(plan)
    result = []
    for num, rings in by_size.items():
        relatives = [os.path.relpath(ring.folder, out) for ring in rings]
        suffix = f"_x{num}" if len(by_size) > 1 else ""
        path = out / "slurm" / f"{experiment}{suffix}.{stamp}.sbatch"
        result.append(JobArray(rings, short_names(relatives, experiment), path))
    return result


def _experiment(plan: Plan) -> str:
    return re.sub(r"\.sh$", "", plan.settings.script)


def _resources(plan: Plan, num: int) -> tuple[list[str], list[str]]:
    """The #SBATCH resource options of a ring of ``num`` networks and the srun options of its step."""
    s = plan.settings
    gpus = s.gpus_per_net if s.on_gpus else 0
    if s.nodes_per_net > 1:
        # One torchrun agent per node: tasks 0..K-1 are network 1's nodes, K..2K-1 network 2's, ...
        tasks = num * s.nodes_per_net
        options = [f"--nodes={tasks}", "--ntasks-per-node=1"] + ([f"--gpus-per-node={gpus}"] if gpus else [])
        srun = [f"--ntasks={tasks}", "--ntasks-per-node=1"]
    elif gpus and s.jobs_per_gpu > 1:
        # Networks share GPUs: one node, the job's GPUs handed out per task by the job script.
        options = ["--nodes=1", f"--ntasks={num}", f"--gpus={-(-num // s.jobs_per_gpu) * gpus}"]
        srun = [f"--ntasks={num}"]
    else:
        options = [f"--ntasks={num}"] + ([f"--gpus-per-task={gpus}"] if gpus else [])
        srun = [f"--ntasks={num}"] + ([f"--gpus-per-task={gpus}"] if gpus else [])
    options.append(f"--cpus-per-task={s.cpus_per_net}")
    srun.append(f"--cpus-per-task={s.cpus_per_net}")
    if s.mem_per_net:
        options.append(f"--mem-per-cpu={s.mem_per_cpu()}  # MEM_PER_NET={s.mem_per_net}")
    return options, srun


def _placement(plan: Plan) -> list[str]:
    s = plan.settings
    named = [("--partition", s.partition), ("--account", s.account), ("--qos", s.qos), ("--time", s.time)]
    return [f"{option}={value}" for option, value in named if value]


def job_script(plan: Plan, array: JobArray, tools_python: str) -> str:
    """The job script of ``array``: options, the ring of each task, and the node side (:data:`NODE_SIDE`)."""
    s = plan.settings
    options, srun = _resources(plan, array.num)
    throttle = f"%{s.throttle}" if s.throttle else ""
    experiment = _experiment(plan)
    lines = [
        "#!/bin/bash",
        f"# {experiment}: {len(array.rings)} ring(s) of {array.num} network(s), one array task per ring, one",
        f"# Slurm task per network; written by graft-launch for {s.script}. Submit it again by hand (every",
        "# network continues from its last checkpoint: --resume auto):",
        f"#   sbatch {quote([str(array.path)])}                 every ring",
        f"#   sbatch --array=<task> {quote([str(array.path)])}  one ring (its task number is in the table below)",
        f"#SBATCH --job-name={experiment}",
        f"#SBATCH --array={array.tasks}{throttle}",
        f"#SBATCH --output={array.path.parent}/slurm-%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=USR1@{SIGNAL_LEAD_S}",
        *(f"#SBATCH {option}" for option in options + _placement(plan)),
        *(f"#SBATCH {option}" for option in s.sbatch_extra),
        "",
        f"JOB_SCRIPT={quote([str(array.path)])}",
        f"NUM={array.num}  # networks per ring",
        f"NODES_PER_NET={s.nodes_per_net}",
        f"PROCS_PER_NODE={plan.procs_per_net}  # processes per network and node (torchrun when more than 1)",
        f"GPUS_PER_NET={s.gpus_per_net}",
        f"JOBS_PER_GPU={s.jobs_per_gpu}",
        f"MAX_REQUEUES={s.max_requeues}  # requeues after the time-limit signal",
        f"STOPPED={STOPPED_EXIT_CODE}  # exit status of a network stopped by a signal (grafting/train/signals.py)",
        f"REPO={quote([str(REPO)])}",
        f"PYTHON={quote([s.python])}  # the networks' interpreter",
        f"RESULT=({quote([tools_python, '-m', 'grafting.launch', '--result'])})  # a finished ring's result line",
        f"SRUN=({quote(srun)})",
        "",
        "ring_of_task() {",
        "    # The ring of array task $1: its folder, its name in squeue, and its networks' training command",
        "    # (each network adds --i <network>).",
        '    case "$1" in',
    ]
    for task, (ring, name) in enumerate(zip(array.rings, array.names)):
        train = quote([str(REPO / plan.trainer.path), *ring.args])
        lines.append(f"        {task}) RING={quote([str(ring.folder)])} NAME={name}")
        lines.append(f"           TRAIN=({train}) ;;")
    lines.append(f'        *) echo "task $1 is not a ring of $JOB_SCRIPT (tasks {array.tasks})" >&2; exit 2 ;;')
    lines += ["    esac", "}", ""]
    return "\n".join(lines) + NODE_SIDE


# What runs on the nodes: the batch step (ring) and one task per network (network). Read by people, so
# kept plain.
NODE_SIDE = r"""
set -uo pipefail

network() {
    # One Slurm task: network NET of the ring, or node NODE of it (NODES_PER_NET > 1: a torchrun agent).
    ring_of_task "$SLURM_ARRAY_TASK_ID"
    local net=$(( SLURM_PROCID / NODES_PER_NET + 1 )) node=$(( SLURM_PROCID % NODES_PER_NET ))
    local log="$RING/$net.log" cmd=("$PYTHON") stop="" signals=0 seen status again pid hosts ids groups first how
    (( node == 0 )) || log="$RING/$net.node$node.log"
    if (( NODES_PER_NET > 1 )); then
        read -r -a hosts <<< "$RING_HOSTS"
        first="${hosts[(net - 1) * NODES_PER_NET]}"
        cmd+=(-m torch.distributed.run --nnodes "$NODES_PER_NET" --nproc_per_node "$PROCS_PER_NODE"
              --rdzv_backend c10d --rdzv_endpoint "$first:$(( 20000 + SLURM_JOB_ID % 1000 * 32 + net % 32 ))"
              --rdzv_id "job$SLURM_JOB_ID-net$net-start${SLURM_RESTART_COUNT:-0}"
              --rdzv_conf "is_host=$(( node == 0 ))" --)
    elif (( PROCS_PER_NODE > 1 )); then
        cmd+=(-m torch.distributed.run --standalone --nproc_per_node "$PROCS_PER_NODE" --)
    fi
    cmd+=("${TRAIN[@]}" --i "$net")
    if (( JOBS_PER_GPU > 1 )) && [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        # The networks share the job's GPUs: this task takes group (local id mod groups), round-robin.
        IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        groups=$(( ${#ids[@]} / GPUS_PER_NET ))
        ids=("${ids[@]:$(( SLURM_LOCALID % groups * GPUS_PER_NET )):$GPUS_PER_NET}")
        CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${ids[*]}")"
        export CUDA_VISIBLE_DEVICES
    fi
    echo "==== $(date '+%F %T') network $net, Slurm job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" \
        "start $(( ${SLURM_RESTART_COUNT:-0} + 1 )), $(hostname)${CUDA_VISIBLE_DEVICES:+, GPU $CUDA_VISIBLE_DEVICES}:" \
        "${cmd[*]}" >> "$log"
    # The time-limit signal (USR1) and SIGTERM reach every process of the task: the training processes
    # stop at once, last.pt keeps their last finished epoch. torchrun itself would die of USR1 without a
    # word, so it ignores it (its training processes install their own handler).
    trap 'stop="${stop:-USR1}"; signals=$((signals + 1))' USR1  # the first signal is the one that stopped it
    trap 'stop="${stop:-TERM}"; signals=$((signals + 1))' TERM
    cd "$REPO" || exit 1
    if (( ${#cmd[@]} > 1 )) && [[ "${cmd[1]}" == -m ]]; then
        (trap '' USR1; exec "${cmd[@]}") >> "$log" 2>&1 < /dev/null &
    else
        "${cmd[@]}" >> "$log" 2>&1 < /dev/null &
    fi
    pid=$!
    seen=0
    wait "$pid"; status=$?
    while (( signals != seen )); do  # a trapped signal ended `wait` early: wait for the network itself
        seen=$signals
        wait "$pid"; again=$?
        (( again < 0 || again > 255 || again == 127 )) || status=$again  # else it had ended with the signal
    done
    # How it ended, for the batch step: a stop signal (also one that came before the training script
    # installed its handler: exit 138 or 143) is a stop; any other failure is the ring's end.
    if (( status == 0 )); then
        how=finished
    elif [[ -n "$stop" ]] || (( status == STOPPED || status == 128 + 10 || status == 128 + 15 )); then
        how=stopped
        [[ -n "$stop" ]] || stop="$(kill -l $(( status - 128 )) 2> /dev/null || echo TERM)"
        echo "==== $(date '+%F %T') network $net stopped by SIG$stop (exit $status)" >> "$log"
    else
        how=failed
    fi
    echo "$net $status $how" > "$STATUS/task$SLURM_PROCID"
    case "$how" in finished) exit 0 ;; stopped) exit "$STOPPED" ;; *) exit "$status" ;; esac
}

ring() {
    # The batch step: start every network of the task's ring (srun), then finish, requeue or report.
    ring_of_task "$SLURM_ARRAY_TASK_ID"
    local task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" start=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))
    local resubmit="sbatch --array=$SLURM_ARRAY_TASK_ID $JOB_SCRIPT" signalled="" signals=0 seen=0
    local pid status again file net code how failed=""
    mkdir -p "$RING" || exit 1
    echo "$(date '+%F %T') task $task, start $start: ring $RING (its lines: $RING/slurm-$task.out)"
    exec >> "$RING/slurm-$task.out" 2>&1
    echo "$(date '+%F %T') job $task (job id $SLURM_JOB_ID), start $start, on $SLURM_JOB_NODELIST:" \
        "$NUM network(s) in $RING"
    echo "$task" > "$RING/slurm.job"  # graft-launch refuses to submit this ring again while this job is queued
    scontrol update JobId="$SLURM_JOB_ID" JobName="$NAME" > /dev/null 2>&1 || true  # squeue tells rings apart
    STATUS="$RING/.slurm-status"
    rm -rf "$STATUS" && mkdir -p "$STATUS" || exit 1
    RING_HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')"
    export STATUS RING_HOSTS
    # USR1 to this shell (--signal=B:USR1@..., scancel --batch --signal=USR1) stops the networks as the
    # time-limit signal does. SIGTERM reaches it on preemption, scancel and at the time limit: Slurm then
    # requeues or ends the job itself.
    trap 'signalled="${signalled:-USR1}"; signals=$((signals + 1)); scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
    trap 'signalled="${signalled:-TERM}"; signals=$((signals + 1))' TERM
    srun --kill-on-bad-exit=1 "${SRUN[@]}" bash "$JOB_SCRIPT" --network &
    pid=$!
    wait "$pid"; status=$?
    while (( signals != seen )); do  # as in network()
        seen=$signals
        wait "$pid"; again=$?
        (( again < 0 || again > 255 || again == 127 )) || status=$again
    done
    for file in "$STATUS"/task*; do
        [[ -e "$file" ]] || continue
        read -r net code how < "$file"
        [[ "$how" == failed ]] || continue
        failed+="network $net failed (exit $code): $(tail -n 1 "$RING/$net.log" 2> /dev/null); "
    done
    if [[ -n "$failed" ]]; then
        echo "$(date '+%F %T') ${failed}its ring was stopped and is not requeued (it would fail again);" \
            "see $RING/<i>.log, fix the cause, then: $resubmit"
        exit 1
    fi
    if (( status == 0 )); then
        echo "$(date '+%F %T') ring finished: $(cd "$REPO" && "${RESULT[@]}" "$RING" 2>&1)"
        exit 0
    fi
    if [[ "$signalled" == TERM ]]; then
        echo "$(date '+%F %T') stopped by Slurm (preemption, scancel or the time limit):" \
            "the networks keep their last finished epoch"
        exit "$STOPPED"
    fi
    local why="the networks stopped at the time-limit signal${signalled:+ (SIG$signalled to the batch shell)}"
    if (( start <= MAX_REQUEUES )); then
        echo "$(date '+%F %T') $why; requeueing ($start of at most $MAX_REQUEUES)"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "scontrol requeue failed; to continue, submit again: $resubmit"
    else
        echo "$(date '+%F %T') $why; not requeued: MAX_REQUEUES=$MAX_REQUEUES reached;" \
            "to continue, submit again: $resubmit"
    fi
    exit "$STOPPED"
}

if [[ "${1:-}" == --network ]]; then
    network
else
    ring
fi
"""


def after_script(plan: Plan, argv: Sequence[str], cwd: Path, path: Path) -> str:
    """The job script of a follow-up command: it runs once every ring job before it has finished well
    (its dependency is given to sbatch)."""
    s = plan.settings
    lines = [
        "#!/bin/bash",
        f"# Runs once every ring of {_experiment(plan)} has finished well (submitted with --dependency=afterok:<the",
        "# ring arrays>); written by graft-launch.",
        f"#SBATCH --job-name={_experiment(plan)}",
        f"#SBATCH --output={path.parent}/{path.stem}-%j.out",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={s.cpus_per_net}",
    ]
    if s.on_gpus:
        lines.append("#SBATCH --gpus=1")
    if s.mem_per_net:
        lines.append(f"#SBATCH --mem-per-cpu={s.mem_per_cpu()}  # MEM_PER_NET={s.mem_per_net}")
    lines += [f"#SBATCH {option}" for option in _placement(plan) if not option.startswith("--time")]
    lines += ["", f"cd {quote([str(cwd)])} && exec {quote([s.python, *argv])}", ""]
    return "\n".join(lines)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _scripts(plan: Plan, tools_python: str, stamp: str) -> tuple[list[tuple[JobArray, str]], list[tuple[Path, str]]]:
    """The ring arrays with their job scripts, and the follow-up job scripts with their paths."""
    ring_arrays = [(array, job_script(plan, array, tools_python)) for array in arrays(plan, stamp)]
    folder = ring_arrays[0][0].path.parent if ring_arrays else plan.settings.out / "slurm"
    after = []
    for k, follow in enumerate(plan.after, 1):
        path = folder / f"{_experiment(plan)}_after{k}.{stamp}.sbatch"
        after.append((path, after_script(plan, follow.argv, follow.cwd, path)))
    return ring_arrays, after


def dry_lines(plan: Plan, tools_python: str) -> list[str]:
    """What DRY=1 prints: a shell script, pasteable as it is, that writes every job script and submits it."""
    ring_arrays, after = _scripts(plan, tools_python, "DRY")
    lines = [f"# skipped {ring.folder}: {ring.skipped}" for ring in plan.rings if ring.skipped]
    ids = []
    for k, (array, text) in enumerate(ring_arrays, 1):
        lines += _heredoc(array.path, text)
        for task, ring in enumerate(array.rings):
            lines.append(f"#   task {task}: {ring.folder} ({array.names[task]})")
        lines.append(
            f'array{k}=$(sbatch --parsable {quote([str(array.path)])}) && echo "submitted: job array $array{k}"'
        )
        ids.append(f"$array{k}")
    for path, text in after:
        lines += _heredoc(path, text)
        lines.append(f"sbatch --dependency=afterok:{':'.join(ids)} {quote([str(path)])}")
    return lines


def _heredoc(path: Path, text: str) -> list[str]:
    return [
        f"mkdir -p {quote([str(path.parent)])} && cat > {quote([str(path)])} <<'END_OF_JOB_SCRIPT'",
        *text.rstrip("\n").splitlines(),
        "END_OF_JOB_SCRIPT",
    ]


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=120)


def _first_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower()), lines[0] if lines else "no message")


def queued_rings(plan: Plan) -> dict[Path, str]:
    """The rings of the plan that a queued or running job of this user trains, with that job: by the job id
    a ring's task recorded (``<ring>/slurm.job``), and by the job script a queued job runs (its path resolved
    against the job's working folder: the same file however it was named at submission)."""
    done = _run(["squeue", "--me", "--noheader", "--array", "--format=%i|%Z|%o"])
    if done.returncode != 0:
        raise UsageError(f"squeue failed ({_first_error(done.stderr)}); check that Slurm answers: squeue --me")
    jobs: dict[str, tuple[str, str]] = {}
    for line in done.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        workdir, _, command = rest.partition("|")
        jobs[job] = (workdir, command)
    wanted = {ring.folder.resolve(): ring.folder for ring in plan.runnable}
    found: dict[Path, str] = {}
    for ring in plan.runnable:
        record = ring.folder / "slurm.job"
        job = record.read_text().strip() if record.is_file() else ""
        if job in jobs:
            found[ring.folder] = job
    for job, (workdir, command) in jobs.items():
        script = Path(os.path.realpath(os.path.join(workdir, command))) if command else None
        array, _, task = job.partition("_")
        if script is None or not script.is_file() or not task.isdigit():
            continue
        for entry in script.read_text(errors="replace").splitlines():
            match = JOB_TABLE_ENTRY.match(entry)
            if match and match.group(1) == task:
                folder = Path(os.path.realpath(match.group(2)))
                if folder in wanted:
                    found.setdefault(wanted[folder], job)
    return found


def check(plan: Plan, tools_python: str) -> None:
    """Before submitting: sbatch is there, no ring of the plan is queued already, and Slurm accepts each job
    (partition, account, QOS, time and resources: ``sbatch --test-only``)."""
    if shutil.which("sbatch") is None:
        raise UsageError("LAUNCHER=slurm: sbatch not found; run this on a Slurm login node, or use LAUNCHER=nohup")
    for folder, job in queued_rings(plan).items():
        raise UsageError(
            f"{folder} is already queued or running as Slurm job {job}; wait for it, or stop it: scancel {job}"
        )
    ring_arrays, _ = _scripts(plan, tools_python, _stamp())
    for array, text in ring_arrays:
        done = _run(["sbatch", "--test-only"], stdin=text)
        if done.returncode != 0:
            raise UsageError(
                f"sbatch --test-only refused the job of {array.rings[0].folder}: "
                f"{_first_error(done.stderr + done.stdout)}"
            )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    os.replace(temp, path)


def submit(plan: Plan, tools_python: str, say=print) -> list[str]:
    """Write and submit every job array (and follow-up job); returns the job ids."""
    ring_arrays, after = _scripts(plan, tools_python, _stamp())
    submitted: list[str] = []

    def sbatch(path: Path, *options: str) -> str:
        done = _run(["sbatch", "--parsable", *options, str(path)])
        if done.returncode != 0:
            already = f"; already submitted: {' '.join(submitted)}" if submitted else ""
            raise UsageError(f"sbatch {path} failed: {_first_error(done.stderr)}{already}")
        job = done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        submitted.append(job)
        return job

    arrays_submitted = []
    for array, text in ring_arrays:
        _write(array.path, text)
        job = sbatch(array.path)
        arrays_submitted.append(job)
        for task, ring in enumerate(array.rings):
            ring.folder.mkdir(parents=True, exist_ok=True)
            (ring.folder / "slurm.job").write_text(f"{job}_{task}\n")
        throttle = f", at most {plan.settings.throttle} at once" if plan.settings.throttle else ""
        say(f"submitted {array.path}: job array {job}, {len(array.rings)} ring(s) of {array.num} network(s){throttle}")
        for task, (ring, name) in enumerate(zip(array.rings, array.names)):
            say(f"  {job}_{task}  {name:<8}  {ring.folder}")
    for path, text in after:
        _write(path, text)
        job = sbatch(path, f"--dependency=afterok:{':'.join(arrays_submitted)}")
        say(f"submitted {path}: job {job}, once every ring above has finished well")
    return submitted
