#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests of LAUNCHER=slurm (tests/test_slurm.py) and for
# trying the Slurm path without a cluster. Needs root (it installs Debian's packages and starts daemons).
#
#   scripts/ci/local_slurm.sh install     apt-get install slurm-wlm and munge (when sbatch or munged is missing)
#   scripts/ci/local_slurm.sh start       install if needed, then start munged, slurmctld and slurmd; prints the
#                                         line to paste: export SLURM_CONF=...
#   scripts/ci/local_slurm.sh status      exit 0 when this cluster answers and its node takes jobs
#   scripts/ci/local_slurm.sh stop        cancel this cluster's jobs, stop the daemons this script started
#
# The cluster is this project's alone, so that it can run next to a real Slurm on the same machine:
#   - its own name (GRAFTING_SLURM_CLUSTER, default grafting-local) and ports (GRAFTING_SLURM_PORT for
#     slurmctld, default 16817, and the next one for slurmd), not Slurm's defaults 6817/6818;
#   - its own folder, GRAFTING_SLURM_DIR (default /tmp/grafting-slurm): slurm.conf, state, spool, logs and
#     pid files (munged's, when this script starts it, in /run/munge/munged-<cluster>.pid). /etc/slurm is not touched, so the client commands need SLURM_CONF=<folder>/slurm.conf
#     (jobs inherit it from the submitting shell);
#   - every command it sends first asks the controller that answers for its cluster name, and does nothing
#     when that is not this cluster's: status fails, stop cancels nothing, start refuses.
# The node is this machine, with its CPUs and memory (as `slurmd -C` reports them): one partition, no
# accounting, no cgroups (proctrack/linuxproc), so it runs in a container too. Each start begins with an empty
# job list.
set -euo pipefail

DIR="${GRAFTING_SLURM_DIR:-/tmp/grafting-slurm}"
CLUSTER="${GRAFTING_SLURM_CLUSTER:-grafting-local}"
PORT="${GRAFTING_SLURM_PORT:-16817}"  # slurmctld; slurmd listens on the next port
CONF="$DIR/slurm.conf"
MUNGED_PID="/run/munge/munged-$CLUSTER.pid"  # the munged this script started, if it started one
START_TIMEOUT_S="${START_TIMEOUT_S:-60}"

die() {
    echo "local_slurm: $*" >&2
    exit 1
}

say() { echo "local_slurm: $*" >&2; }

[[ "$PORT" =~ ^[0-9]+$ ]] && (( PORT >= 1024 && PORT < 65535 )) \
    || die "GRAFTING_SLURM_PORT must be a port number in 1024..65534, got '$PORT'"
[[ "$CLUSTER" =~ ^[a-z0-9_-]+$ ]] \
    || die "GRAFTING_SLURM_CLUSTER must be lower-case letters, digits, - and _, got '$CLUSTER'"

slurm() { SLURM_CONF="$CONF" "$@"; }  # a client command, talking to this cluster's ports

install_packages() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root: apt-get install slurm-wlm munge"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get; install slurm-wlm and munge"
    say "installing slurm-wlm and munge (apt-get, about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_works && return 0
    [[ -s /etc/munge/munge.key ]] || mungekey --create >/dev/null 2>&1 || die "no /etc/munge/munge.key and mungekey failed"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
    chmod 0755 /run/munge
    # munged runs as munge: its pid file goes to munge's own folder (DIR may sit in a folder munge cannot enter).
    runuser -u munge -- munged --pid-file="$MUNGED_PID" || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
    die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

write_config() {
    local node
    node="$(slurmd -C | head -n 1)"  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this machine: $node"
    mkdir -p "$DIR/state" "$DIR/spool"
    cat > "$CONF" <<EOF
# Written by scripts/ci/local_slurm.sh: a one-node cluster for tests, with its own name and ports.
ClusterName=$CLUSTER
# This machine, reached on the loopback address whatever its name resolves to.
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 seconds before it may start again (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Short waits: a cancelled or requeued test job is gone within seconds.
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

answering_cluster() {
    # The name of the cluster whose controller answers on this cluster's port (empty: none answers).
    [[ -f "$CONF" ]] || return 0
    (: < "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || return 0  # nothing listens (scontrol would retry for 9 s)
    { slurm timeout 10 scontrol show config 2>/dev/null || true; } | sed -n 's/^ClusterName *= *//p' | head -n 1
}

ours_answers() { [[ "$(answering_cluster)" == "$CLUSTER" ]]; }

node_ready() {
    local state
    ours_answers || return 1
    state="$(slurm sinfo -h -N -o %T 2>/dev/null | head -n 1)" || return 1
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

daemon_of_ours() {
    # daemon_of_ours PID NAME: whether PID is a NAME started with this cluster's slurm.conf (a pid file can
    # be stale and its number reused, by another cluster's daemon too).
    local pid="$1" name="$2"
    [[ "$(ps -p "$pid" -o comm= 2>/dev/null)" == "$name" ]] || return 1
    [[ "$name" == munged ]] && return 0  # started with this folder's pid file, checked by the caller's path
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-f $CONF "
}

stop_pidfile() {
    # stop_pidfile FILE NAME: stop the process FILE names, if it is still this cluster's NAME.
    local file="$1" name="$2" pid
    [[ -s "$file" ]] || return 0
    pid="$(cat "$file")"
    if daemon_of_ours "$pid" "$name"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

cancel_jobs() {
    # This cluster's jobs (all of them were submitted to it), before its daemons: a job step whose slurmd
    # is gone would run on, orphaned. Nothing when another cluster answers on this port.
    local answering jobs
    answering="$(answering_cluster)"
    [[ -n "$answering" ]] || return 0
    if [[ "$answering" != "$CLUSTER" ]]; then
        say "port $PORT answers as cluster '$answering', not '$CLUSTER': its jobs are left alone"
        return 0
    fi
    jobs="$(slurm squeue -h -o %i 2>/dev/null | grep -E '^[0-9]')" || return 0
    [[ -n "$jobs" ]] || return 0
    # shellcheck disable=SC2086  # one id per word
    slurm scancel $jobs 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -z "$(slurm squeue -h -o %i 2>/dev/null | grep -E '^[0-9]')" ]] && return 0
        sleep 0.2
    done
    say "jobs still ending after 20 s: $(slurm squeue -h -o '%i %T' | tr '\n' ' ')"
}

other_slurm_daemons() {
    # Whether a slurmctld or slurmd runs that is not this cluster's (it needs munged).
    local pid
    for pid in $(pgrep -x slurmctld || true) $(pgrep -x slurmd || true); do
        daemon_of_ours "$pid" "$(ps -p "$pid" -o comm=)" || return 0
    done
    return 1
}

stop_cluster() {
    cancel_jobs
    stop_pidfile "$DIR/slurmd.pid" slurmd
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    # Only the munged this script started, and only when no other cluster's daemon relies on it.
    if other_slurm_daemons; then
        [[ ! -s "$MUNGED_PID" ]] || say "munged keeps running: another cluster's Slurm daemons use it"
    else
        stop_pidfile "$MUNGED_PID" munged
    fi
}

start_cluster() {
    install_packages
    [[ $(id -u) == 0 ]] || node_ready || die "starting munged, slurmctld and slurmd needs root"
    start_munge  # first: every client command authenticates with it
    if node_ready; then
        say "already running"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    mkdir -p "$DIR"
    cancel_jobs  # leftovers of an earlier start
    stop_pidfile "$DIR/slurmd.pid" slurmd
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    local answering
    answering="$(answering_cluster)"
    [[ -z "$answering" ]] \
        || die "port $PORT already answers as cluster '$answering'; choose free ports with GRAFTING_SLURM_PORT=<port>"
    rm -rf "$DIR/state" "$DIR/spool"
    write_config
    slurm slurmctld -c -f "$CONF" || die "slurmctld did not start (see $DIR/slurmctld.log)"
    slurm slurmd -f "$CONF" || die "slurmd did not start (see $DIR/slurmd.log)"
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until node_ready; do
        if (( SECONDS > deadline )); then
            tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
            die "the node did not become ready within ${START_TIMEOUT_S} s (logs: $DIR/slurmctld.log, $DIR/slurmd.log)"
        fi
        sleep 0.5
    done
    say "running: cluster $CLUSTER on ports $PORT-$((PORT + 1)): $(slurm sinfo -h -N -o '%N %c CPUs %m MB %T')"
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    install) install_packages ;;
    start) start_cluster ;;
    status) node_ready ;;
    stop) stop_cluster ;;
    *) die "usage: $0 install|start|status|stop" ;;
esac
