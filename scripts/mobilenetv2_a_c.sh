#!/usr/bin/env bash
# The a and c study. docs/METHOD.md §8, "MobileNetV2, hyper-parameters": two networks on CIFAR-10 and CIFAR-100 with
# a = 0.4 and c = 1, 5, 10, 50, 500, then c = 100 and a = 0, 0.2, 0.4, 0.6, 0.8, 1 (22 rings of 2 networks).
#
#   scripts/mobilenetv2_a_c.sh                        all 22 rings, queued in the background
#   DRY=1 scripts/mobilenetv2_a_c.sh                  check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/mobilenetv2_a_c.sh  one Slurm job array, a task per ring (docs/slurm.md)
#   DATASETS=10 C_VALUES="1 500" A_VALUES="" scripts/mobilenetv2_a_c.sh
#   scripts/mobilenetv2_a_c.sh --help                 every setting with its default
#
# The paper does not say which recipe this study used; its numbers sit nearer slr's than dlr's, so slr is the
# default (RECIPE=dlr for the other). Queue: one network per GPU, rings start as GPUs free up.
# Results: python scripts/summarize.py $OUT. Settings below can also be given in the environment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: a job array
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/mobilenetv2_a_c}"
EPOCHS="${EPOCHS:-200}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
C_VALUES="${C_VALUES:-1 5 10 50 500}"                   # swept at a = A_FIXED
A_FIXED="${A_FIXED:-0.4}"
A_VALUES="${A_VALUES:-0 0.2 0.4 0.6 0.8 1}"             # swept at c = C_FIXED
C_FIXED="${C_FIXED:-100}"
RECIPE="${RECIPE:-slr}"                                 # one of: slr dlr
MODEL=mobilenetv2

# The rings, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...
rings() {
    pairs=()
    for c in $C_VALUES; do pairs+=("$A_FIXED $c"); done
    for a in $A_VALUES; do pairs+=("$a $C_FIXED"); done
    for cifar in $DATASETS; do
        seen=" "
        for pair in "${pairs[@]}"; do
            read -r a c <<< "$pair"
            [[ "$seen" == *" a${a}_c${c} "* ]] && continue  # a pair in both lists runs once
            seen+="a${a}_c${c} "
            ring "$OUT/${MODEL}_c${cifar}_${RECIPE}_a${a}_c${c}" 2 --model "$MODEL" --cifar "$cifar" --data "$DATA" \
                --epochs "$EPOCHS" --a "$a" --c "$c" $(recipe "$RECIPE")
        done
    done
}
launch "$@"
