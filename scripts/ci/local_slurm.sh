#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests of LAUNCHER=slurm (tests/test_slurm.py) and for
# trying the Slurm path without a cluster. Needs root (it installs Debian's packages and starts daemons).
#
#   scripts/ci/local_slurm.sh install     apt-get install slurm-wlm and munge (when sbatch or munged is missing)
#   scripts/ci/local_slurm.sh start       install if needed, then start munged, slurmctld and slurmd; prints the
#                                         line to paste: export SLURM_CONF=...
#   scripts/ci/local_slurm.sh status      exit 0 when the cluster answers and its node takes jobs
#   scripts/ci/local_slurm.sh stop        stop the daemons this script started
#
# Everything lives in one folder, GRAFTING_SLURM_DIR (default /tmp/grafting-slurm): slurm.conf, state, spool,
# logs and pid files. /etc/slurm is not touched, so the client commands need SLURM_CONF=<folder>/slurm.conf
# (jobs inherit it from the submitting shell). The cluster: one node, this machine, with its CPUs and memory
# (as `slurmd -C` reports them), one partition, no accounting, no cgroups (proctrack/linuxproc), so it runs in
# a container too. Each start begins with an empty job list.
set -euo pipefail

DIR="${GRAFTING_SLURM_DIR:-/tmp/grafting-slurm}"
CONF="$DIR/slurm.conf"
START_TIMEOUT_S="${START_TIMEOUT_S:-60}"

die() {
    echo "local_slurm: $*" >&2
    exit 1
}

say() { echo "local_slurm: $*" >&2; }

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
    mkdir -p "$DIR/munge"
    chown munge:munge "$DIR/munge"  # munged runs as munge and writes its pid file there
    runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
    die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

write_config() {
    local node
    node="$(slurmd -C | head -n 1)"  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this machine: $node"
    mkdir -p "$DIR/state" "$DIR/spool"
    cat > "$CONF" <<EOF
# Written by scripts/ci/local_slurm.sh: a one-node cluster for tests.
ClusterName=grafting-local
# This machine, reached on the loopback address whatever its name resolves to.
SlurmctldHost=$(hostname -s)(127.0.0.1)
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

node_ready() {
    local state
    state="$(SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | head -n 1)" || return 1
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

stop_pidfile() {
    # stop_pidfile FILE NAME: stop the process FILE names, if it still is NAME (a stale pid may be reused).
    local file="$1" name="$2" pid
    [[ -s "$file" ]] || return 0
    pid="$(cat "$file")"
    if [[ "$(ps -p "$pid" -o comm= 2>/dev/null)" == "$name" ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

cancel_jobs() {
    # Jobs first: a job step whose slurmd is gone would run on, orphaned.
    [[ -f "$CONF" ]] && SLURM_CONF="$CONF" scontrol ping >/dev/null 2>&1 || return 0
    local jobs
    jobs="$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" || return 0
    [[ -n "$jobs" ]] || return 0
    # shellcheck disable=SC2086  # one id per word
    SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -z "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" ]] && return 0
        sleep 0.2
    done
    say "jobs still ending after 20 s: $(SLURM_CONF="$CONF" squeue -h -o '%i %T' | tr '\n' ' ')"
}

stop_cluster() {
    cancel_jobs
    stop_pidfile "$DIR/slurmd.pid" slurmd
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/munge/munged.pid" munged  # only the munged this script started
}

start_cluster() {
    install_packages
    if [[ -f "$CONF" ]] && node_ready; then
        say "already running"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "starting slurmctld and slurmd needs root"
    mkdir -p "$DIR"
    stop_cluster  # leftovers of an earlier start
    rm -rf "$DIR/state" "$DIR/spool"
    start_munge
    write_config
    SLURM_CONF="$CONF" slurmctld -c -f "$CONF" || die "slurmctld did not start (see $DIR/slurmctld.log)"
    SLURM_CONF="$CONF" slurmd -f "$CONF" || die "slurmd did not start (see $DIR/slurmd.log)"
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until node_ready; do
        if (( SECONDS > deadline )); then
            tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
            die "the node did not become ready within ${START_TIMEOUT_S} s (logs: $DIR/slurmctld.log, $DIR/slurmd.log)"
        fi
        sleep 0.5
    done
    say "running: $(SLURM_CONF="$CONF" sinfo -h -N -o '%N %c CPUs %m MB %T')"
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    install) install_packages ;;
    start) start_cluster ;;
    status) [[ -f "$CONF" ]] && node_ready ;;
    stop) stop_cluster ;;
    *) die "usage: $0 install|start|status|stop" ;;
esac
