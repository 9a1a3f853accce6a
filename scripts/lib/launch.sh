# shellcheck shell=bash
# The launcher every experiment script in scripts/ sources. A script describes its rings in a function and
# hands it to run_rings, which checks everything first and then starts the rings in one of two ways:
#
#   LAUNCHER=nohup (default)  one `nohup` process per network on this machine, spread over GPUS; rings that do
#                             not fit wait in a queue that runs detached ($OUT/queue.log)
#   LAUNCHER=slurm            one `sbatch` job per ring (one Slurm task per network), written to <ring>/job.sbatch
#                             and submitted; Slurm is the queue, the script returns at once
#
# Settings (the scripts set some at their top; all can come from the environment):
#   OUT           the experiment's output folder (ring folders, queue.log)
#   DRY=1         check the settings and the data, print every command (nohup: one per line, shell-quoted;
#                 slurm: every job script), start nothing, write nothing
#   EXTRA         more training flags appended to every command (word-split), e.g. "--amp --peer-timeout 7200";
#                 EXTRA=--resume continues rings that ran before (without it the script refuses to start them)
#   PYTHON        the interpreter; default: the active venv, else this checkout's .venv, else the shared venv
#   GPUS_PER_NET  GPUs of each network (default 1); more than 1 starts each network with torchrun
#   JOBS_PER_GPU  networks sharing one GPU (default 1)
#   TRAIN         the training script, relative to the repository (default grafting_cifar/train.py)
# nohup only:
#   GPUS          comma list of GPU ids ("0,1,2,3"), or "cpu" (default 0; with slurm only "cpu" matters: no GPUs)
#   MAX_JOBS      networks running at once (default #GPUs / GPUS_PER_NET x JOBS_PER_GPU)
#   FOREGROUND=1  run the queue in this shell instead of detaching it; POLL: seconds between queue checks (2)
# slurm only (empty: the cluster's default):
#   PARTITION, ACCOUNT, QOS, TIME (a ring's time limit, e.g. 24:00:00)
#   CPUS_PER_NET  cores of each network (on each of its nodes) (default 4); MEM_PER_NET its memory, e.g. 16G
#   NODES_PER_NET nodes of each network (default 1); K > 1 starts a torchrun agent on each of K nodes, with
#                 GPUS_PER_NET GPUs on each, meeting at a c10d rendezvous on the network's first node
#   MAX_REQUEUES  how often a ring's job requeues itself after the time-limit signal (default 3)
#   SBATCH_EXTRA  further sbatch options, one #SBATCH line each, in the --option=value form
#
# Functions for the scripts: run_rings, launch_ring, run_after, recipe_flags, check_choices, check_cifar_data,
# check_imagenet_data, echo_note. Relative paths (DATA, OUT) are taken from the folder the script was started in.

_LAUNCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REPO="$_LAUNCH_REPO"
CALLER_PWD="${CALLER_PWD:-$PWD}"

DRY="${DRY:-0}"
LAUNCHER="${LAUNCHER:-nohup}"
GPUS="${GPUS:-0}"
EXTRA="${EXTRA:-}"
JOBS_PER_GPU="${JOBS_PER_GPU:-1}"
GPUS_PER_NET="${GPUS_PER_NET:-1}"
FOREGROUND="${FOREGROUND:-0}"
POLL="${POLL:-2}"
TRAIN="${TRAIN:-grafting_cifar/train.py}"
PARTITION="${PARTITION:-}"
ACCOUNT="${ACCOUNT:-}"
QOS="${QOS:-}"
TIME="${TIME:-}"
CPUS_PER_NET="${CPUS_PER_NET:-4}"
MEM_PER_NET="${MEM_PER_NET:-}"
NODES_PER_NET="${NODES_PER_NET:-1}"
MAX_REQUEUES="${MAX_REQUEUES:-3}"
SBATCH_EXTRA="${SBATCH_EXTRA:-}"

# The exit status of a network stopped by a signal: STOPPED_EXIT_CODE of grafting/train/signals.py.
_STOPPED_STATUS=75
# Slurm sends the time-limit signal this many seconds before the end (up to 60 s earlier, its resolution).
_STOP_SIGNAL_AHEAD_S=180

# One line on stderr and exit 2: the user can fix it at the top of the script or in the environment.
_launch_die() {
    echo "error: $*" >&2
    exit 2
}

_launch_warn() { echo "warning: $*" >&2; }

_is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

_contains() {
    # _contains VALUE ITEMS...: whether VALUE is one of ITEMS.
    local value="$1" item
    shift
    for item in "$@"; do [[ "$item" == "$value" ]] && return 0; done
    return 1
}

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    elif [[ -x "$REPO/.venv/bin/python" ]]; then
        PYTHON="$REPO/.venv/bin/python"  # this checkout's environment (scripts/env.sh)
    elif [[ -x "${GRAFTING_VENV:-$HOME/.cache/filter-grafting/venv}/bin/python" ]]; then
        PYTHON="${GRAFTING_VENV:-$HOME/.cache/filter-grafting/venv}/bin/python"
    else
        PYTHON="python3"
    fi
fi

[[ "$LAUNCHER" == nohup || "$LAUNCHER" == slurm ]] || _launch_die "LAUNCHER must be nohup or slurm, got '$LAUNCHER'"
_is_count "$JOBS_PER_GPU" || _launch_die "JOBS_PER_GPU must be a positive whole number, got '$JOBS_PER_GPU'"
_is_count "$GPUS_PER_NET" || _launch_die "GPUS_PER_NET must be a positive whole number, got '$GPUS_PER_NET'"
_is_count "$POLL" || _launch_die "POLL must be a positive whole number of seconds, got '$POLL'"
_is_count "$CPUS_PER_NET" || _launch_die "CPUS_PER_NET must be a positive whole number, got '$CPUS_PER_NET'"
_is_count "$NODES_PER_NET" || _launch_die "NODES_PER_NET must be a positive whole number, got '$NODES_PER_NET'"
[[ "$MAX_REQUEUES" =~ ^[0-9]+$ ]] || _launch_die "MAX_REQUEUES must be a whole number (0: never requeue), got '$MAX_REQUEUES'"
[[ -z "$MEM_PER_NET" || "$MEM_PER_NET" =~ ^[1-9][0-9]*[KMGTkmgt]?$ ]] \
    || _launch_die "MEM_PER_NET must be a size like 16G or 4000M, got '$MEM_PER_NET'"
[[ "$TIME" =~ ^[0-9:-]*$ ]] || _launch_die "TIME must be a Slurm time limit like 24:00:00 or 2-00:00:00, got '$TIME'"
if (( NODES_PER_NET > 1 )); then
    [[ "$LAUNCHER" == slurm ]] || _launch_die "NODES_PER_NET=$NODES_PER_NET needs LAUNCHER=slurm (nohup runs on this machine only)"
    (( JOBS_PER_GPU == 1 )) || _launch_die "NODES_PER_NET=$NODES_PER_NET and JOBS_PER_GPU=$JOBS_PER_GPU: a network on several nodes cannot share its GPUs"
fi

# Slots: what one network runs on under nohup. On GPUs, groups of GPUS_PER_NET ids ("0" or "0,1,2,3"); else "cpu".
_SLOTS=()
_GPU_IDS=()
if [[ "$GPUS" == "cpu" ]]; then
    _SLOTS=(cpu)
else
    IFS=',' read -r -a _GPU_IDS <<< "${GPUS// /}"
    for _id in "${_GPU_IDS[@]}"; do
        [[ -n "$_id" ]] || _launch_die "GPUS='$GPUS' has an empty entry; write ids like GPUS=0,1,2,3 or GPUS=cpu"
    done
    if [[ "$LAUNCHER" == nohup ]]; then
        (( ${#_GPU_IDS[@]} >= GPUS_PER_NET )) \
            || _launch_die "GPUS='$GPUS' lists ${#_GPU_IDS[@]} GPU(s) but each network needs GPUS_PER_NET=$GPUS_PER_NET"
        (( ${#_GPU_IDS[@]} % GPUS_PER_NET == 0 )) \
            || _launch_warn "GPUS lists ${#_GPU_IDS[@]} GPUs, not a multiple of GPUS_PER_NET=$GPUS_PER_NET; the rest stay idle"
    fi
    for (( _g = 0; _g + GPUS_PER_NET <= ${#_GPU_IDS[@]}; _g += GPUS_PER_NET )); do
        _group="${_GPU_IDS[*]:_g:GPUS_PER_NET}"
        _SLOTS+=("${_group// /,}")
    done
fi
MAX_JOBS="${MAX_JOBS:-$(( ${#_SLOTS[@]} * JOBS_PER_GPU ))}"
_is_count "$MAX_JOBS" || _launch_die "MAX_JOBS must be a positive whole number, got '$MAX_JOBS'"
if (( GPUS_PER_NET > 1 || NODES_PER_NET > 1 )) && [[ "$TRAIN" != grafting_imagenet/train.py ]]; then
    _launch_die "GPUS_PER_NET=$GPUS_PER_NET NODES_PER_NET=$NODES_PER_NET: only grafting_imagenet/train.py trains one network on several processes; use 1 for $TRAIN"
fi

# The plan: the rings the script's function describes, collected by a first pass that starts nothing.
_PLANNING=0
_PLAN_RINGS=()
_PLAN_NUMS=()
_PLAN_ARGS0=()  # launch_ring's arguments for the first ring: sbatch --test-only checks its job
# The networks this shell started (nohup) and still tracks: pid, slot index, ring folder, network number.
_JOB_PIDS=()
_JOB_SLOTS=()
_JOB_RINGS=()
_JOB_NETS=()
_FAILED_RINGS=()
# The Slurm jobs this shell submitted.
_SLURM_JOBS=()
_SUBMITTED=""  # the job id of the last _submit

echo_note() {
    # A comment line: fine to print in DRY mode, where every other line is a command.
    echo "# $*"
}

_abspath() {
    local path="$1"
    [[ "$path" == "~/"* ]] && path="$HOME/${path#"~/"}"
    [[ "$path" == /* ]] && echo "$path" || echo "$CALLER_PWD/$path"
}

_quoted() {
    # The words of a command, shell-quoted, on one line.
    local out="" word
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+="$word "  # nothing the shell would read differently: keep it readable
        else
            out+="$(printf '%q' "$word") "
        fi
    done
    echo "${out% }"
}

_has_resume() {
    # Whether EXTRA asks every network to continue from its last.pt.
    # shellcheck disable=SC2086  # EXTRA is a list of words
    _contains --resume $EXTRA
}

check_choices() {
    # check_choices NAME "VALUES" ALLOWED...: stop with one line when a value is not allowed.
    local name="$1" values="$2" value
    shift 2
    for value in $values; do
        _contains "$value" "$@" || _launch_die "$name: unknown value '$value'; choose from: $*"
    done
}

check_cifar_data() {
    # check_cifar_data DATA "10 100": the folders torchvision reads must be there before anything starts.
    local data cifar folder
    data="$(_abspath "$1")"
    for cifar in $2; do
        folder=cifar-10-batches-py
        [[ "$cifar" == 100 ]] && folder=cifar-100-python
        [[ -d "$data/$folder" ]] && continue
        _launch_die "DATA=$1: no CIFAR-$cifar in $data ($folder/ is missing); set DATA to the folder that holds it, or download it: $(_quoted env "PYTHONPATH=$REPO" "$PYTHON" -m grafting.tools.data download "$data" --cifar "$cifar")"
    done
}

check_imagenet_data() {
    # check_imagenet_data DATA: an ImageFolder tree with train/ and val/.
    local data split
    data="$(_abspath "$1")"
    for split in train val; do
        [[ -d "$data/$split" ]] \
            || _launch_die "DATA=$1: $data/$split/ is missing; set DATA to the folder that holds ImageNet's train/ and val/ class folders"
    done
}

recipe_flags() {
    # The training flags of a recipe name (docs/METHOD.md §6): baseline and slr = x0.1 steps, lr 0.1 for every
    # network; dlr = cosine per iteration with a different initial lr per network; cos = cosine, same lr.
    case "$1" in
        baseline|slr) ;;
        dlr) echo "--difflr --cos" ;;
        cos) echo "--cos" ;;
        *) _launch_die "unknown recipe '$1'; choose baseline, slr, dlr or cos" ;;
    esac
}

# ---------------------------------------------------------------------------------------------- checks

_check_gpus() {
    # nohup: every id in GPUS must be a GPU of this machine, as far as nvidia-smi can tell.
    [[ "$LAUNCHER" == nohup && "$GPUS" != cpu ]] || return 0
    if ! command -v nvidia-smi >/dev/null; then
        _launch_warn "nvidia-smi not found, so GPUS=$GPUS is not checked; on a machine without GPUs use GPUS=cpu"
        return 0
    fi
    local listed id
    listed="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>&1)" \
        || _launch_die "nvidia-smi failed ($(head -n 1 <<< "$listed")); check the GPU driver, or use GPUS=cpu"
    listed="$(tr -d ' ' <<< "$listed" | paste -sd, -)"
    for id in "${_GPU_IDS[@]}"; do
        [[ "$id" =~ ^[0-9]+$ ]] || continue  # a UUID or MIG name: CUDA resolves it
        [[ ",$listed," == *",$id,"* ]] \
            || _launch_die "GPUS=$GPUS: this machine has no GPU $id (nvidia-smi lists ${listed:-none}); set GPUS to those ids, or GPUS=cpu"
    done
}

_check_plan() {
    # Rings that ran before need EXTRA=--resume; two rings in one folder would share their files.
    local k ring i
    (( ${#_PLAN_RINGS[@]} > 0 )) || _launch_die "the settings select no ring to run; check the lists at the top of the script"
    for k in "${!_PLAN_RINGS[@]}"; do
        ring="${_PLAN_RINGS[k]}"
        ! _contains "$ring" "${_PLAN_RINGS[@]:0:k}" || _launch_die "two rings share the folder $ring; give them different names"
        _has_resume && continue
        for (( i = 1; i <= _PLAN_NUMS[k]; i++ )); do
            [[ ! -e "$ring/net$i/last.pt" ]] \
                || _launch_die "$ring/net$i/last.pt exists: that ring has run before; continue it with EXTRA=--resume, or choose another OUT"
        done
    done
}

_check_slurm() {
    [[ "$LAUNCHER" == slurm && "$DRY" != 1 ]] || return 0
    command -v sbatch >/dev/null \
        || _launch_die "LAUNCHER=slurm: sbatch not found; run this on a Slurm login node, or use LAUNCHER=nohup"
    # A ring whose job is still queued or running would get a second job, and two networks per lock.
    local queued ring k
    queued="$(squeue -h --me -o '%i %o' 2>/dev/null || true)"
    for ring in "${_PLAN_RINGS[@]}"; do
        k="$(awk -v job="$ring/job.sbatch" '$2 == job { print $1; exit }' <<< "$queued")"
        [[ -z "$k" ]] || _launch_die "$ring is already queued or running as Slurm job $k; wait for it, or stop it: scancel $k"
    done
    # Partition, account, QOS, time and resources: sbatch checks the first job without submitting it.
    local answer
    answer="$(_slurm_job_script "${_PLAN_RINGS[0]}" "${_PLAN_NUMS[0]}" "${_PLAN_ARGS0[@]}" | sbatch --test-only 2>&1)" \
        || _launch_die "sbatch --test-only refused the job of ${_PLAN_RINGS[0]}: $(grep -m 1 -i error <<< "$answer" || head -n 1 <<< "$answer")"
}

_plan_summary() {
    local networks=0 n where
    for n in "${_PLAN_NUMS[@]}"; do networks=$((networks + n)); done
    if [[ "$LAUNCHER" == slurm ]]; then
        where="LAUNCHER=slurm: one job per ring"
    elif [[ "$GPUS" == cpu ]]; then
        where="LAUNCHER=nohup on the CPU, at most $MAX_JOBS network(s) at a time"
    else
        where="LAUNCHER=nohup on GPUs $GPUS, at most $MAX_JOBS network(s) at a time"
    fi
    echo_note "$(basename "$0"): ${#_PLAN_RINGS[@]} ring(s), $networks network(s); $where"
}

# ---------------------------------------------------------------------------------------------- nohup

_ring_finished() {
    # A ring whose networks all ended well: its result line (the summary row) for queue.log.
    local ring="$1"
    echo "$(date '+%F %T') ring $ring finished:"
    (cd "$REPO" && "$PYTHON" "$REPO/scripts/summarize.py" "$ring" 2>&1) | sed '/^$/d; s/^/    /' || true
}

_job_finished() {
    # Drop finished networks from the tables; when one failed, stop the rest of its ring, whose
    # networks would otherwise wait for it forever and hold the queue. A ring whose networks have all
    # ended well gets its result line.
    local keep_pids=() keep_slots=() keep_rings=() keep_nets=() ended=() k status ring
    for k in "${!_JOB_PIDS[@]}"; do
        if [[ "${_JOB_PIDS[k]}" == dry ]] || kill -0 "${_JOB_PIDS[k]}" 2>/dev/null; then
            keep_pids+=("${_JOB_PIDS[k]}"); keep_slots+=("${_JOB_SLOTS[k]}")
            keep_rings+=("${_JOB_RINGS[k]}"); keep_nets+=("${_JOB_NETS[k]}")
            continue
        fi
        ended+=("${_JOB_RINGS[k]}")
        if wait "${_JOB_PIDS[k]}" 2>/dev/null; then status=0; else status=$?; fi
        if (( status != 0 )); then
            if ! _contains "${_JOB_RINGS[k]}" "${_FAILED_RINGS[@]+"${_FAILED_RINGS[@]}"}"; then
                _FAILED_RINGS+=("${_JOB_RINGS[k]}")
                echo "$(date '+%F %T') network ${_JOB_NETS[k]} of ${_JOB_RINGS[k]} failed (exit $status); see ${_JOB_RINGS[k]}/${_JOB_NETS[k]}.log; stopping its ring"
            fi
        fi
    done
    _JOB_PIDS=("${keep_pids[@]+"${keep_pids[@]}"}"); _JOB_SLOTS=("${keep_slots[@]+"${keep_slots[@]}"}")
    _JOB_RINGS=("${keep_rings[@]+"${keep_rings[@]}"}"); _JOB_NETS=("${keep_nets[@]+"${keep_nets[@]}"}")
    for k in "${!_JOB_PIDS[@]}"; do
        if [[ "${_JOB_PIDS[k]}" != dry ]] && _contains "${_JOB_RINGS[k]}" "${_FAILED_RINGS[@]+"${_FAILED_RINGS[@]}"}"; then
            kill "${_JOB_PIDS[k]}" 2>/dev/null || true
        fi
    done
    for ring in $(printf '%s\n' "${ended[@]+"${ended[@]}"}" | sort -u); do
        _contains "$ring" "${_JOB_RINGS[@]+"${_JOB_RINGS[@]}"}" "${_FAILED_RINGS[@]+"${_FAILED_RINGS[@]}"}" \
            || _ring_finished "$ring"
    done
}

_wait_for_room() {
    # Block until `need` more networks fit under MAX_JOBS (a ring larger than MAX_JOBS waits for an idle
    # machine). The networks of one ring must run at the same time: they wait for each other every epoch.
    local need="$1"
    while :; do
        _job_finished
        local running=${#_JOB_PIDS[@]}
        (( running == 0 || running + need <= MAX_JOBS )) && return 0
        if [[ "$DRY" == 1 ]]; then
            echo_note "queued: starts when the rings above have finished (MAX_JOBS=$MAX_JOBS)"
            _JOB_PIDS=(); _JOB_SLOTS=(); _JOB_RINGS=(); _JOB_NETS=()
            return 0
        fi
        sleep "$POLL"
    done
}

_least_busy_slot() {
    # The slot running the fewest networks; ties go to the earliest in GPUS, which makes it round-robin.
    local best=0 best_load=-1 s k load
    for s in "${!_SLOTS[@]}"; do
        load=0
        for k in "${!_JOB_SLOTS[@]}"; do [[ "${_JOB_SLOTS[k]}" == "$s" ]] && load=$((load + 1)); done
        if (( best_load < 0 || load < best_load )); then best=$s; best_load=$load; fi
    done
    echo "$best"
}

_nohup_ring() {
    # _nohup_ring FOLDER NUM TRAIN_FLAGS...: one nohup process per network, after waiting for room.
    local ring="$1" num="$2"
    shift 2
    local extra_words=()
    read -r -a extra_words <<< "$EXTRA"

    _wait_for_room "$num"
    if [[ "$DRY" != 1 ]]; then
        mkdir -p "$ring"
        : > "$ring/pids"
        echo "$(date '+%F %T') starting $ring: $num network(s)"
    fi
    local i slot device cmd env_words pid log
    for (( i = 1; i <= num; i++ )); do
        slot="$(_least_busy_slot)"
        device="${_SLOTS[slot]}"
        cmd=("$PYTHON")
        if [[ "$device" != cpu ]] && (( GPUS_PER_NET > 1 )); then
            # One network on several GPUs: torchrun starts a process per GPU; --standalone picks a free
            # port, so the networks of a ring on one machine do not collide. The "--" keeps torchrun's own
            # parser off our flags (it would read --num as an abbreviation of its --numa-binding).
            cmd+=(-m torch.distributed.run --standalone --nproc_per_node "$GPUS_PER_NET" --)
        fi
        cmd+=("$REPO/$TRAIN" "$@" "${extra_words[@]+"${extra_words[@]}"}" --s "$ring" --num "$num" --i "$i")
        env_words=()
        if [[ "$device" == cpu ]]; then
            cmd+=(--device cpu)
        else
            env_words=("CUDA_VISIBLE_DEVICES=$device")
        fi
        log="$ring/$i.log"
        if [[ "$DRY" == 1 ]]; then
            echo "$(_quoted "${env_words[@]+"${env_words[@]}"}" nohup "${cmd[@]}") >> $(printf '%q' "$log") 2>&1 &"
            pid=dry
        else
            # Appended, with a header per start: a resumed network's log keeps the lines of its earlier runs.
            echo "==== $(date '+%F %T') network $i on $device, started by $(basename "$0"): $(_quoted "${cmd[@]}")" >> "$log"
            (cd "$REPO" && exec env "${env_words[@]+"${env_words[@]}"}" nohup "${cmd[@]}") >> "$log" 2>&1 < /dev/null &
            pid=$!
            echo "$i $pid $device" >> "$ring/pids"
            echo "  net $i on $device, pid $pid: $(_quoted "${cmd[@]}")"
        fi
        _JOB_PIDS+=("$pid"); _JOB_SLOTS+=("$slot"); _JOB_RINGS+=("$ring"); _JOB_NETS+=("$i")
    done
    if [[ "$DRY" != 1 ]]; then
        local shown
        shown="$(printf '%q' "$ring")"
        echo "  follow: tail -f $shown/*.log    stop: kill \$(cut -d' ' -f2 $shown/pids)"
    fi
}

_queue_detach() {
    # Re-run the calling script detached (nohup), so that its rings can be queued for days; the queue's
    # own log is $OUT/queue.log. Does nothing with DRY=1 or FOREGROUND=1, or inside the detached copy.
    [[ "$DRY" == 1 || "$FOREGROUND" == 1 || "${_LAUNCH_DETACHED:-0}" == 1 ]] && return 0
    [[ -n "${OUT:-}" ]] || _launch_die "set OUT (the experiment's output folder) before run_rings"
    local out
    out="$(_abspath "$OUT")"
    mkdir -p "$out"
    _LAUNCH_DETACHED=1 CALLER_PWD="$CALLER_PWD" nohup bash "$0" "$@" >> "$out/queue.log" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$out/queue.pid"
    echo "queue of $(basename "$0") started in the background, pid $pid (kill it to stop queueing; running networks go on)"
    out="$(printf '%q' "$out")"
    echo "  follow: tail -f $out/queue.log        networks: tail -f $out/*/*.log"
    echo "  results: $(_quoted "$PYTHON" "$REPO/scripts/summarize.py") $out"
    exit 0
}

_queue_wait() {
    # Wait for every network this script started, then say where the results are. Exit 1 when a ring failed.
    [[ "$DRY" == 1 ]] && return 0
    if [[ "$FOREGROUND" != 1 && "${_LAUNCH_DETACHED:-0}" != 1 ]]; then
        return 0
    fi
    while (( ${#_JOB_PIDS[@]} > 0 )); do
        _job_finished
        (( ${#_JOB_PIDS[@]} > 0 )) && sleep "$POLL"
    done
    local out
    out="$(_abspath "${OUT:-.}")"
    echo "$(date '+%F %T') all rings finished; results: $PYTHON $REPO/scripts/summarize.py $out"
    if (( ${#_FAILED_RINGS[@]} > 0 )); then
        echo "failed rings: ${_FAILED_RINGS[*]}"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------- slurm

_mem_per_cpu() {
    # MEM_PER_NET (Slurm units, default M) spread over CPUS_PER_NET cores, in MB, rounded up.
    local value="${MEM_PER_NET%[KMGTkmgt]}" unit="${MEM_PER_NET##*[0-9]}" mb
    case "$unit" in
        K|k) mb=$(( (value + 1023) / 1024 )) ;;
        G|g) mb=$(( value * 1024 )) ;;
        T|t) mb=$(( value * 1024 * 1024 )) ;;
        *) mb=$value ;;
    esac
    echo "$(( (mb + CPUS_PER_NET - 1) / CPUS_PER_NET ))M"
}

_job_name() {
    # squeue/sacct show the ring's folder under OUT, which names model, dataset and method
    # (resnet32_c10_dlr); ImageNet folders (resnet50_grafting) get the dataset in front.
    local ring="$1" out name
    out="$(_abspath "${OUT:-.}")"
    name="${ring#"$out"/}"
    name="${name//\//_}"
    [[ "$TRAIN" == grafting_imagenet/* ]] && name="imagenet_$name"
    echo "$name"
}

_slurm_job_script() {
    # _slurm_job_script FOLDER NUM TRAIN_FLAGS...: the job script of one ring, on stdout.
    local ring="$1" num="$2"
    shift 2
    local extra_words=() train=() srun=() procs=1 gpus=0 word line
    read -r -a extra_words <<< "$EXTRA"
    train=("$REPO/$TRAIN" "$@" "${extra_words[@]+"${extra_words[@]}"}" --s "$ring" --num "$num")
    if [[ "$GPUS" == cpu ]]; then
        train+=(--device cpu)
    else
        gpus=$GPUS_PER_NET
        procs=$GPUS_PER_NET
    fi
    echo "#!/bin/bash"
    echo "# Ring $ring: $num network(s), one Slurm task each, written by $(basename "$0") (scripts/lib/launch.sh)."
    echo "# Edit and submit again by hand: sbatch $(printf '%q' "$ring/job.sbatch")"
    echo "# (networks with a last.pt resume from it, the others start fresh)."
    echo "#SBATCH --job-name=$(_job_name "$ring")"
    echo "#SBATCH --output=$ring/slurm-%j.out"
    echo "#SBATCH --open-mode=append"
    echo "#SBATCH --requeue"
    echo "#SBATCH --signal=USR1@$_STOP_SIGNAL_AHEAD_S"
    if (( NODES_PER_NET > 1 )); then
        # One torchrun agent per node: tasks 0..K-1 are network 1's nodes, K..2K-1 network 2's, ...
        echo "#SBATCH --nodes=$(( num * NODES_PER_NET ))"
        echo "#SBATCH --ntasks-per-node=1"
        srun=(--ntasks="$(( num * NODES_PER_NET ))" --ntasks-per-node=1)
        (( gpus > 0 )) && echo "#SBATCH --gpus-per-node=$gpus"
    elif (( gpus > 0 && JOBS_PER_GPU > 1 )); then
        # Networks share GPUs: one node, the job's GPUs handed out per task by the job script.
        echo "#SBATCH --nodes=1"
        echo "#SBATCH --ntasks=$num"
        echo "#SBATCH --gpus=$(( (num + JOBS_PER_GPU - 1) / JOBS_PER_GPU * gpus ))"
        srun=(--ntasks="$num")
    else
        echo "#SBATCH --ntasks=$num"
        srun=(--ntasks="$num")
        if (( gpus > 0 )); then
            echo "#SBATCH --gpus-per-task=$gpus"
            srun+=(--gpus-per-task="$gpus")
        fi
    fi
    echo "#SBATCH --cpus-per-task=$CPUS_PER_NET"
    srun+=(--cpus-per-task="$CPUS_PER_NET")
    [[ -n "$MEM_PER_NET" ]] && echo "#SBATCH --mem-per-cpu=$(_mem_per_cpu)  # MEM_PER_NET=$MEM_PER_NET"
    [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
    [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
    [[ -n "$QOS" ]] && echo "#SBATCH --qos=$QOS"
    [[ -n "$TIME" ]] && echo "#SBATCH --time=$TIME"
    while read -r line; do
        for word in $line; do echo "#SBATCH $word"; done
    done <<< "$SBATCH_EXTRA"
    echo
    echo "RING=$(printf '%q' "$ring")"
    echo "NUM=$num"
    echo "NODES_PER_NET=$NODES_PER_NET"
    echo "PROCS_PER_NODE=$procs  # processes per network and node (torchrun when more than 1)"
    echo "GPUS_PER_NET=$GPUS_PER_NET"
    echo "JOBS_PER_GPU=$JOBS_PER_GPU"
    echo "MAX_REQUEUES=$MAX_REQUEUES  # requeues after the time-limit signal"
    echo "STOPPED=$_STOPPED_STATUS  # exit status of a network stopped by a signal (grafting/train/signals.py)"
    echo "REPO=$(printf '%q' "$REPO")"
    echo "PYTHON=$(printf '%q' "$PYTHON")"
    echo "TRAIN=($(_quoted "${train[@]}"))  # + --i <network> [--resume]"
    echo "SRUN=($(_quoted "${srun[@]}"))"
    cat <<'EOF'

set -uo pipefail

network() {
    # One Slurm task: network NET of the ring, or node NODE of it (NODES_PER_NET > 1: a torchrun agent).
    local net=$(( SLURM_PROCID / NODES_PER_NET + 1 )) node=$(( SLURM_PROCID % NODES_PER_NET ))
    local log="$RING/$net.log" cmd=("$PYTHON") stop="" signals=0 seen status again pid hosts ids groups first
    (( node == 0 )) || log="$RING/$net.node$node.log"
    if (( NODES_PER_NET > 1 )); then
        read -r -a hosts <<< "$RING_HOSTS"
        first="${hosts[(net - 1) * NODES_PER_NET]}"
        cmd+=(-m torch.distributed.run --nnodes "$NODES_PER_NET" --nproc_per_node "$PROCS_PER_NODE"
              --rdzv_backend c10d --rdzv_endpoint "$first:$(( 20000 + SLURM_JOB_ID % 1000 * 32 + net % 32 ))"
              --rdzv_id "job$SLURM_JOB_ID-net$net-start${SLURM_RESTART_COUNT:-0}" --rdzv_conf "is_host=$(( node == 0 ))" --)
    elif (( PROCS_PER_NODE > 1 )); then
        cmd+=(-m torch.distributed.run --standalone --nproc_per_node "$PROCS_PER_NODE" --)
    fi
    cmd+=("${TRAIN[@]}" --i "$net")
    [[ " $RESUME_NETS " == *" $net "* ]] && cmd+=(--resume)
    if (( JOBS_PER_GPU > 1 )) && [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        # The networks share the job's GPUs: this task takes group (local id mod groups), round-robin.
        IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        groups=$(( ${#ids[@]} / GPUS_PER_NET ))
        ids=("${ids[@]:$(( SLURM_LOCALID % groups * GPUS_PER_NET )):$GPUS_PER_NET}")
        CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${ids[*]}")"
        export CUDA_VISIBLE_DEVICES
    fi
    echo "==== $(date '+%F %T') network $net, Slurm job ${SLURM_JOB_ID} start $(( ${SLURM_RESTART_COUNT:-0} + 1 )), $(hostname)${CUDA_VISIBLE_DEVICES:+, GPU $CUDA_VISIBLE_DEVICES}: ${cmd[*]}" >> "$log"
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
    if [[ -n "$stop" ]] && (( status != 0 )); then
        echo "==== $(date '+%F %T') network $net stopped by SIG$stop (exit $status)" >> "$log"
        exit "$STOPPED"
    fi
    exit "$status"
}

ring() {
    # The batch step: start every network (srun), then finish, requeue or report.
    local start=$(( ${SLURM_RESTART_COUNT:-0} + 1 )) net pid status again terminated=0 seen
    echo "$(date '+%F %T') job $SLURM_JOB_ID, start $start, on $SLURM_JOB_NODELIST: $NUM network(s) in $RING"
    RESUME_NETS=""
    for (( net = 1; net <= NUM; net++ )); do
        [[ -e "$RING/net$net/last.pt" ]] && RESUME_NETS+=" $net"
    done
    RING_HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')"
    export RESUME_NETS RING_HOSTS
    [[ -z "$RESUME_NETS" ]] || echo "resuming network(s)$RESUME_NETS from their last.pt"
    # SIGTERM reaches this shell on preemption, scancel and at the time limit: Slurm then requeues or
    # ends the job itself.
    trap 'terminated=$((terminated + 1))' TERM
    srun --kill-on-bad-exit=1 "${SRUN[@]}" bash "$RING/job.sbatch" --network &
    pid=$!
    seen=0
    wait "$pid"; status=$?
    while (( terminated != seen )); do  # as in network()
        seen=$terminated
        wait "$pid"; again=$?
        (( again < 0 || again > 255 || again == 127 )) || status=$again
    done
    if (( status == 0 )); then
        echo "$(date '+%F %T') ring finished:"
        "$PYTHON" "$REPO/scripts/summarize.py" "$RING" 2>&1 | sed '/^$/d; s/^/    /'
        exit 0
    fi
    if (( terminated )); then
        echo "$(date '+%F %T') stopped by Slurm (preemption, scancel or the time limit): the networks keep their last finished epoch"
        exit "$STOPPED"
    fi
    if (( status == STOPPED )); then
        if (( start <= MAX_REQUEUES )); then
            echo "$(date '+%F %T') the networks stopped at the time-limit signal; requeueing ($start of at most $MAX_REQUEUES)"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            echo "scontrol requeue failed; to continue, submit again: sbatch $RING/job.sbatch"
        else
            echo "$(date '+%F %T') not requeued: MAX_REQUEUES=$MAX_REQUEUES reached; to continue, submit again: sbatch $RING/job.sbatch"
        fi
        exit "$STOPPED"
    fi
    echo "$(date '+%F %T') a network failed (exit $status) and its ring was stopped; see $RING/<i>.log, fix the cause, then: sbatch $RING/job.sbatch"
    exit "$status"
}

if [[ "${1:-}" == --network ]]; then
    network
else
    ring
fi
EOF
}

_submit() {
    # _submit FILE WRITER ARGS...: write the job script FILE with WRITER ARGS and sbatch it from FILE's folder
    # (DRY=1: print it instead and return 1: nothing submitted); the job id goes to _SLURM_JOBS and _SUBMITTED.
    local job="$1" answer
    shift
    if [[ "$DRY" == 1 ]]; then
        echo_note "---- $job: sbatch $(printf '%q' "$job")"
        "$@"
        echo_note "---- end of $job"
        return 1
    fi
    mkdir -p "$(dirname "$job")"
    "$@" > "$job.tmp" && mv "$job.tmp" "$job" || _launch_die "could not write $job"
    answer="$(cd "$(dirname "$job")" && sbatch --parsable "$job" 2>&1)" \
        || _launch_die "sbatch $job failed: $(grep -m 1 -i error <<< "$answer" || head -n 1 <<< "$answer")${_SLURM_JOBS[*]:+; already submitted: ${_SLURM_JOBS[*]}}"
    _SUBMITTED="${answer%%;*}"  # --parsable: "id" or "id;cluster"
    _SLURM_JOBS+=("$_SUBMITTED")
}

_slurm_ring() {
    # _slurm_ring FOLDER NUM TRAIN_FLAGS...: write FOLDER/job.sbatch and submit it (DRY=1: print it).
    local ring="$1" num="$2"
    _submit "$ring/job.sbatch" _slurm_job_script "$@" || return 0
    echo "submitted $ring: job $_SUBMITTED ($num network(s))"
}

_after_job_script() {
    # _after_job_script NAME CMD...: a job that runs CMD once every ring job submitted so far has ended well.
    local name="$1" out dependency
    shift
    out="$(_abspath "${OUT:-.}")"
    dependency="${_SLURM_JOBS[*]:-<the ring jobs above>}"
    echo "#!/bin/bash"
    echo "# Runs once every ring job before it has finished well; written by $(basename "$0") (scripts/lib/launch.sh)."
    echo "#SBATCH --job-name=$(basename "$out")_$name"
    echo "#SBATCH --output=$out/$name-%j.out"
    echo "#SBATCH --dependency=afterok:${dependency// /:}"
    echo "#SBATCH --ntasks=1"
    echo "#SBATCH --cpus-per-task=$CPUS_PER_NET"
    [[ "$GPUS" == cpu ]] || echo "#SBATCH --gpus=1"
    [[ -n "$MEM_PER_NET" ]] && echo "#SBATCH --mem-per-cpu=$(_mem_per_cpu)  # MEM_PER_NET=$MEM_PER_NET"
    [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
    [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
    [[ -n "$QOS" ]] && echo "#SBATCH --qos=$QOS"
    echo
    echo "cd $(printf '%q' "$REPO") && exec $(_quoted "$@")"
}

_slurm_after() {
    # run_after under Slurm: OUT/after_<k>.sbatch, submitted with a dependency on the ring jobs (afterok).
    local name job
    _AFTER_COUNT=$(( ${_AFTER_COUNT:-0} + 1 ))
    name="after_$_AFTER_COUNT"
    job="$(_abspath "${OUT:-.}")/$name.sbatch"
    _submit "$job" _after_job_script "$name" "$@" || return 0
    echo "submitted $job: job $_SUBMITTED, after the ring jobs before it"
}

# ---------------------------------------------------------------------------------------------- the scripts' API

launch_ring() {
    # launch_ring FOLDER NUM [--] TRAIN_FLAGS...: the networks 1..NUM of a ring whose shared folder is FOLDER.
    # Adds --s FOLDER --num NUM --i i (and --device cpu when GPUS=cpu); logs go to FOLDER/<i>.log.
    (( $# >= 2 )) || _launch_die "launch_ring needs a folder and a number of networks"
    local ring num
    ring="$(_abspath "$1")"
    num="$2"
    shift 2
    [[ "${1:-}" == "--" ]] && shift
    _is_count "$num" || _launch_die "launch_ring $ring: the number of networks must be a positive whole number, got '$num'"
    if (( _PLANNING )); then
        (( ${#_PLAN_RINGS[@]} == 0 )) && _PLAN_ARGS0=("$ring" "$num" "$@")
        _PLAN_RINGS+=("$ring")
        _PLAN_NUMS+=("$num")
        return 0
    fi
    if [[ "$LAUNCHER" == slurm ]]; then
        _slurm_ring "$ring" "$num" "$@"
    else
        _nohup_ring "$ring" "$num" "$@"
    fi
}

run_after() {
    # run_after CMD...: a follow-up command (e.g. the ensemble evaluation) once every ring has finished.
    (( _PLANNING )) && return 0
    if [[ "$LAUNCHER" == slurm ]]; then
        _slurm_after "$@"
        return 0
    fi
    if [[ "$DRY" == 1 ]]; then
        _quoted "$@"
        return 0
    fi
    while (( ${#_JOB_PIDS[@]} > 0 )); do
        _job_finished
        (( ${#_JOB_PIDS[@]} > 0 )) && sleep "$POLL"
    done
    echo "$(date '+%F %T') running: $(_quoted "$@")"
    (cd "$REPO" && "$@") || echo "$(date '+%F %T') the command above failed (exit $?)"
}

run_rings() {
    # run_rings FUNCTION "$@": FUNCTION calls launch_ring (and run_after) for every ring of the experiment.
    # It runs twice: first only to collect the plan, which is checked (rings that ran before, GPUs,
    # Slurm) and summed up, then to start the rings.
    local rings="$1"
    shift
    _PLANNING=1
    "$rings"
    _PLANNING=0
    _check_plan
    _check_gpus
    _check_slurm
    _plan_summary
    if [[ "$LAUNCHER" == slurm ]]; then
        "$rings"
        if [[ "$DRY" != 1 ]]; then
            local out
            out="$(printf '%q' "$(_abspath "${OUT:-.}")")"
            echo "${#_SLURM_JOBS[@]} job(s) submitted: ${_SLURM_JOBS[*]}"
            echo "  follow: squeue --me    logs: tail -f $out/*/*.log    stop: scancel ${_SLURM_JOBS[*]}"
            echo "  results: $(_quoted "$PYTHON" "$REPO/scripts/summarize.py") $out"
        fi
        return 0
    fi
    _queue_detach "$@"
    "$rings"
    _queue_wait
}
