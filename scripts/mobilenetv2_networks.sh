#!/usr/bin/env bash
# MobileNetV2 with more networks. docs/METHOD.md §8, "MobileNetV2, number of networks": grafting (dlr) with 2, 3, 4, 6
# and 8 networks on CIFAR-10 and CIFAR-100, and the "6 models ensemble" row: 6 independently trained baselines
# whose softmax outputs are averaged (scripts/ensemble.py runs when they have finished). The baseline row
# comes from cifar_baselines.sh.
#
#   scripts/mobilenetv2_networks.sh                   10 rings (2+3+4+6+8 networks per dataset) + 12 baselines
#   DRY=1 scripts/mobilenetv2_networks.sh             print the commands, run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/mobilenetv2_networks.sh  one Slurm job per ring (docs/slurm.md)
#   GPUS=0,1,2,3,4,5,6,7 NETS="6 8" ENSEMBLE=0 scripts/mobilenetv2_networks.sh
#
# Queue: one network per GPU; a ring waits until all its networks fit (a ring larger than the GPU list runs
# alone, its networks round-robin over the GPUs, which is slower but works). JOBS_PER_GPU=2 packs two per GPU.
# Results: python scripts/summarize.py $OUT. Settings below can also be given in the environment.
set -euo pipefail

GPUS="${GPUS:-0,1,2,3,4,5,6,7}"                         # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: a job per ring
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/mobilenetv2_networks}"
EPOCHS="${EPOCHS:-200}"
DATASETS="${DATASETS:-10 100}"
NETS="${NETS:-2 3 4 6 8}"                               # ring sizes
METHOD="${METHOD:-dlr}"                                 # the published rows are dlr
ENSEMBLE="${ENSEMBLE:-6}"                               # independent baselines for the ensemble row (0: none)
ENSEMBLE_CKPT="${ENSEMBLE_CKPT:-best.pt}"               # best.pt (best test epoch) or last.pt (final weights)
MODEL=mobilenetv2

source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
check_choices DATASETS "$DATASETS" 10 100
check_choices METHOD "$METHOD" slr dlr
check_choices ENSEMBLE_CKPT "$ENSEMBLE_CKPT" best.pt last.pt
[[ "$ENSEMBLE" =~ ^[0-9]+$ ]] || _launch_die "ENSEMBLE must be a whole number of models, got '$ENSEMBLE'"
check_cifar_data "$DATA" "$DATASETS"

rings() {
    data="$(_abspath "$DATA")"
    for cifar in $DATASETS; do
        for num in $NETS; do
            # shellcheck disable=SC2046  # the recipe's flags are separate words
            launch_ring "$OUT/${MODEL}_c${cifar}_${METHOD}_x${num}" "$num" -- --model "$MODEL" --cifar "$cifar" \
                --data "$data" --epochs "$EPOCHS" $(recipe_flags "$METHOD")
        done
        # The ensemble's members: baselines that differ only in their seed (network i uses --seed + i).
        for (( k = 1; k <= ENSEMBLE; k++ )); do
            launch_ring "$OUT/${MODEL}_c${cifar}_ensemble/m$k" 1 -- --model "$MODEL" --cifar "$cifar" \
                --data "$data" --epochs "$EPOCHS" --seed "$((k - 1))"
        done
    done
    if (( ENSEMBLE > 0 )); then
        for cifar in $DATASETS; do
            members=()
            for (( k = 1; k <= ENSEMBLE; k++ )); do members+=("$(_abspath "$OUT")/${MODEL}_c${cifar}_ensemble/m$k/net1/$ENSEMBLE_CKPT"); done
            run_after "$PYTHON" "$REPO/scripts/ensemble.py" --model "$MODEL" --cifar "$cifar" --data "$data" "${members[@]}"
        done
    fi
}
run_rings rings "$@"
