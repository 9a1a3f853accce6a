# shellcheck shell=bash
# Sourced first by every experiment script in scripts/: the words a script describes its rings with, and
# the hand-over to the launcher (python -m grafting.launch, the package grafting/launch), which checks every
# network's command and then starts the rings on this machine or submits them to Slurm.
#
#   ring FOLDER NETWORKS TRAINING-FLAGS...   one ring; the launcher adds --s, --num, --i, --device, --resume auto
#   after scripts/ensemble.py ARGS...        a command to run once every ring has finished well
#   recipe NAME                              the training flags of a recipe (docs/METHOD.md §6)
#   launch "$@"                              the script's last line: check, then start or submit the rings
#
# `scripts/X.sh --help` lists the script's settings with their defaults; `scripts/X.sh --rings` prints the
# ring description (one line per ring) that it hands over.
# -a: every setting the script assigns is exported, so the launcher reads the values the script computed.
set -aeuo pipefail
shopt -s inherit_errexit

_ring_words() {
    # The words, quoted where the launcher's shell-word parser would read them differently.
    local word out=()
    for word in "$@"; do
        if [[ "$word" == *$'\n'* ]]; then
            echo "error: a ring's word holds a line break: ${word%%$'\n'*}..." >&2
            return 2
        elif [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$word")
        else
            out+=("'${word//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

ring() { echo "ring $(_ring_words "$@")"; }

after() { echo "after $(_ring_words "$@")"; }

recipe() {
    case "$1" in
        slr|baseline) ;;                # lr 0.1 for every network, x0.1 every --step-epochs (60 on CIFAR)
        dlr) echo "--difflr --cos" ;;   # cosine per iteration, network i of N starts at lr (1 + cos(pi (N-i)/N)) / 2
        cos) echo "--cos" ;;            # cosine per iteration, the same lr for every network
        *) echo "--unknown-recipe=$1" ;;  # refused by the launcher, naming the setting or the ring
    esac
}

launch() {
    local repo python lines
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    # The launcher's interpreter: the active environment, this checkout's (scripts/env.sh), the shared one.
    for python in "${VIRTUAL_ENV:-/nonexistent}/bin/python" "$repo/.venv/bin/python" \
            "${GRAFTING_VENV:-$HOME/.cache/filter-grafting/venv}/bin/python" "$(command -v python3)"; do
        [[ -x "$python" ]] && break
    done
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    case "${1:-}" in
        -h|--help) exec "$python" -m grafting.launch --script "$0" --help ;;
        --rings) rings; return 0 ;;
    esac
    lines="$(rings)"
    exec "$python" -m grafting.launch --script "$0" "$@" <<< "$lines"
}
