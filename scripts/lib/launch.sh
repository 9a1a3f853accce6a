# shellcheck shell=bash
# The launcher every experiment script in scripts/ sources. It starts the networks of a ring,
# one `nohup` process each, spreads them over the GPUs and queues rings that do not fit.
#
# Settings it reads (the scripts set the first four at their top; all can come from the environment):
#   GPUS          comma list of GPU ids ("0,1,2,3"), or "cpu"                      (default 0)
#   OUT           the experiment's output folder; queue.log lands there
#   DRY=1         print every command, one per line and shell-quoted, and run nothing
#   EXTRA         more training flags appended to every command (word-split), e.g. "--amp --peer-timeout 7200"
#   PYTHON        the interpreter; default: the active venv, else ~/.cache/filter-grafting/venv, else python3
#   JOBS_PER_GPU  networks sharing one GPU (default 1); MAX_JOBS (default #GPUs x JOBS_PER_GPU) caps running networks
#   GPUS_PER_NET  GPUs given to each network (default 1); more than 1 starts each network with torchrun
#   TRAIN         the training script, relative to the repository (default grafting_cifar/train.py)
#   FOREGROUND=1  run the queue in this shell instead of detaching it; POLL: seconds between queue checks (30)
#
# Functions: launch_ring, queue_start, queue_finish, run_after, recipe_flags, check_choices, echo_note.
# Relative paths (DATA, OUT) are taken from the folder the script was started in.

_LAUNCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REPO="$_LAUNCH_REPO"
CALLER_PWD="${CALLER_PWD:-$PWD}"

DRY="${DRY:-0}"
GPUS="${GPUS:-0}"
EXTRA="${EXTRA:-}"
JOBS_PER_GPU="${JOBS_PER_GPU:-1}"
GPUS_PER_NET="${GPUS_PER_NET:-1}"
FOREGROUND="${FOREGROUND:-0}"
POLL="${POLL:-30}"
TRAIN="${TRAIN:-grafting_cifar/train.py}"

# One line on stderr and exit 2: the user can fix it at the top of the script or in the environment.
_launch_die() {
    echo "error: $*" >&2
    exit 2
}

_is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

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

_is_count "$JOBS_PER_GPU" || _launch_die "JOBS_PER_GPU must be a positive whole number, got '$JOBS_PER_GPU'"
_is_count "$GPUS_PER_NET" || _launch_die "GPUS_PER_NET must be a positive whole number, got '$GPUS_PER_NET'"
_is_count "$POLL" || _launch_die "POLL must be a positive whole number of seconds, got '$POLL'"

# Slots: what one network runs on. On GPUs, groups of GPUS_PER_NET ids ("0" or "0,1,2,3"); else "cpu".
_SLOTS=()
if [[ "$GPUS" == "cpu" ]]; then
    _SLOTS=(cpu)
else
    IFS=',' read -r -a _gpu_ids <<< "${GPUS// /}"
    for _id in "${_gpu_ids[@]}"; do
        [[ -n "$_id" ]] || _launch_die "GPUS='$GPUS' has an empty entry; write ids like GPUS=0,1,2,3 or GPUS=cpu"
    done
    (( ${#_gpu_ids[@]} >= GPUS_PER_NET )) \
        || _launch_die "GPUS='$GPUS' lists ${#_gpu_ids[@]} GPU(s) but each network needs GPUS_PER_NET=$GPUS_PER_NET"
    (( ${#_gpu_ids[@]} % GPUS_PER_NET == 0 )) \
        || echo "warning: GPUS lists ${#_gpu_ids[@]} GPUs, not a multiple of GPUS_PER_NET=$GPUS_PER_NET; the rest stay idle" >&2
    for (( _g = 0; _g + GPUS_PER_NET <= ${#_gpu_ids[@]}; _g += GPUS_PER_NET )); do
        _group="${_gpu_ids[*]:_g:GPUS_PER_NET}"
        _SLOTS+=("${_group// /,}")
    done
fi
MAX_JOBS="${MAX_JOBS:-$(( ${#_SLOTS[@]} * JOBS_PER_GPU ))}"
_is_count "$MAX_JOBS" || _launch_die "MAX_JOBS must be a positive whole number, got '$MAX_JOBS'"

# The networks this shell started and still tracks: pid, slot index, ring folder, network number.
_JOB_PIDS=()
_JOB_SLOTS=()
_JOB_RINGS=()
_JOB_NETS=()
_FAILED_RINGS=()

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

check_choices() {
    # check_choices NAME "VALUES" ALLOWED...: stop with one line when a value is not allowed.
    local name="$1" values="$2" value allowed ok
    shift 2
    for value in $values; do
        ok=0
        for allowed in "$@"; do [[ "$value" == "$allowed" ]] && ok=1; done
        (( ok )) || _launch_die "$name: unknown value '$value'; choose from: $*"
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

_job_finished() {
    # Drop finished networks from the tables; when one failed, stop the rest of its ring, whose
    # networks would otherwise wait for it forever and hold the queue.
    local keep_pids=() keep_slots=() keep_rings=() keep_nets=() k status failed ring
    for k in "${!_JOB_PIDS[@]}"; do
        if [[ "${_JOB_PIDS[k]}" == dry ]] || kill -0 "${_JOB_PIDS[k]}" 2>/dev/null; then
            keep_pids+=("${_JOB_PIDS[k]}"); keep_slots+=("${_JOB_SLOTS[k]}")
            keep_rings+=("${_JOB_RINGS[k]}"); keep_nets+=("${_JOB_NETS[k]}")
            continue
        fi
        if wait "${_JOB_PIDS[k]}" 2>/dev/null; then status=0; else status=$?; fi
        if (( status != 0 )); then
            failed=0
            for ring in "${_FAILED_RINGS[@]+"${_FAILED_RINGS[@]}"}"; do [[ "$ring" == "${_JOB_RINGS[k]}" ]] && failed=1; done
            if (( ! failed )); then
                _FAILED_RINGS+=("${_JOB_RINGS[k]}")
                echo "$(date '+%F %T') network ${_JOB_NETS[k]} of ${_JOB_RINGS[k]} failed (exit $status); see ${_JOB_RINGS[k]}/${_JOB_NETS[k]}.log; stopping its ring"
            fi
        fi
    done
    _JOB_PIDS=("${keep_pids[@]+"${keep_pids[@]}"}"); _JOB_SLOTS=("${keep_slots[@]+"${keep_slots[@]}"}")
    _JOB_RINGS=("${keep_rings[@]+"${keep_rings[@]}"}"); _JOB_NETS=("${keep_nets[@]+"${keep_nets[@]}"}")
    for k in "${!_JOB_PIDS[@]}"; do
        for ring in "${_FAILED_RINGS[@]+"${_FAILED_RINGS[@]}"}"; do
            [[ "$ring" == "${_JOB_RINGS[k]}" && "${_JOB_PIDS[k]}" != dry ]] && kill "${_JOB_PIDS[k]}" 2>/dev/null || true
        done
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

launch_ring() {
    # launch_ring FOLDER NUM [--] TRAIN_FLAGS...: start networks 1..NUM of a ring whose shared folder is FOLDER.
    # Adds --s FOLDER --num NUM --i i (and --device cpu when GPUS=cpu); logs go to FOLDER/<i>.log.
    # Waits first (queue) until the ring fits under MAX_JOBS.
    (( $# >= 2 )) || _launch_die "launch_ring needs a folder and a number of networks"
    local ring num
    ring="$(_abspath "$1")"
    num="$2"
    shift 2
    [[ "${1:-}" == "--" ]] && shift
    _is_count "$num" || _launch_die "launch_ring $ring: the number of networks must be a positive whole number, got '$num'"
    local extra_words=()
    read -r -a extra_words <<< "$EXTRA"

    _wait_for_room "$num"
    if [[ "$DRY" != 1 ]]; then
        mkdir -p "$ring"
        : > "$ring/pids"
        echo "$(date '+%F %T') starting $ring: $num network(s)"
    fi
    local i slot device cmd env_words pid
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
        if [[ "$DRY" == 1 ]]; then
            echo "$(_quoted "${env_words[@]+"${env_words[@]}"}" nohup "${cmd[@]}") > $(printf '%q' "$ring/$i.log") 2>&1 &"
            pid=dry
        else
            (cd "$REPO" && exec env "${env_words[@]+"${env_words[@]}"}" nohup "${cmd[@]}") > "$ring/$i.log" 2>&1 < /dev/null &
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

queue_start() {
    # Re-run the calling script detached (nohup), so that its rings can be queued for days; the queue's
    # own log is $OUT/queue.log. Does nothing with DRY=1 or FOREGROUND=1, or inside the detached copy.
    [[ "$DRY" == 1 || "$FOREGROUND" == 1 || "${_LAUNCH_DETACHED:-0}" == 1 ]] && return 0
    [[ -n "${OUT:-}" ]] || _launch_die "set OUT (the experiment's output folder) before queue_start"
    local out
    out="$(_abspath "$OUT")"
    mkdir -p "$out"
    _LAUNCH_DETACHED=1 CALLER_PWD="$CALLER_PWD" nohup bash "$0" "$@" > "$out/queue.log" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$out/queue.pid"
    echo "queue of $(basename "$0") started in the background, pid $pid (kill it to stop queueing; running networks go on)"
    out="$(printf '%q' "$out")"
    echo "  follow: tail -f $out/queue.log        networks: tail -f $out/*/*.log"
    echo "  results: $(_quoted "$PYTHON" "$REPO/scripts/summarize.py") $out"
    exit 0
}

run_after() {
    # run_after CMD...: a follow-up command (e.g. the ensemble evaluation) once every ring has finished.
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

queue_finish() {
    # Wait for every network this script started, then say where the results are. Exit 1 when a ring failed.
    [[ "$DRY" == 1 ]] && return 0
    if [[ "$FOREGROUND" != 1 && "${_LAUNCH_DETACHED:-0}" != 1 ]]; then
        return 0  # a script without queue_start: its networks run on under nohup
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
