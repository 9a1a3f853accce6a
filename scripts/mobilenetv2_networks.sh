#!/usr/bin/env bash
# MobileNetV2 with more networks. docs/METHOD.md §8, "MobileNetV2, number of networks": grafting (dlr) with 2, 3, 4, 6
# and 8 networks on CIFAR-10 and CIFAR-100, and the "6 models ensemble" row: 6 independently trained baselines
# whose softmax outputs are averaged (scripts/ensemble.py runs when they have finished). The baseline row
# comes from cifar_baselines.sh.
#
#   scripts/mobilenetv2_networks.sh                   10 rings (2+3+4+6+8 networks per dataset) + 12 baselines
#   DRY=1 scripts/mobilenetv2_networks.sh             check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/mobilenetv2_networks.sh  Slurm job arrays, one per ring size (docs/slurm.md)
#   GPUS=0,1,2,3,4,5,6,7 NETS="6 8" ENSEMBLE=0 scripts/mobilenetv2_networks.sh
#   scripts/mobilenetv2_networks.sh --help            every setting with its default
#
# Queue: one network per GPU; a ring waits until all its networks fit (a ring larger than the GPU list runs
# alone, its networks round-robin over the GPUs, which is slower but works). JOBS_PER_GPU=2 packs two per GPU.
# Results: python scripts/summarize.py $OUT. Settings below can also be given in the environment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1,2,3,4,5,6,7}"                         # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: job arrays
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/mobilenetv2_networks}"
EPOCHS="${EPOCHS:-200}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
NETS="${NETS:-2 3 4 6 8}"                               # ring sizes
METHOD="${METHOD:-dlr}"                                 # one of: slr dlr (the published rows are dlr)
ENSEMBLE="${ENSEMBLE:-6}"                               # independent baselines for the ensemble row (0: none)
ENSEMBLE_CKPT="${ENSEMBLE_CKPT:-best.pt}"               # one of: best.pt last.pt (best test epoch or final weights)
MODEL=mobilenetv2

# The rings, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...; then the ensemble's evaluation.
rings() {
    [[ "$ENSEMBLE" =~ ^[0-9]+$ ]] || { echo "error: ENSEMBLE must be a whole number of models, got '$ENSEMBLE'" >&2; return 2; }
    for cifar in $DATASETS; do
        for num in $NETS; do
            ring "$OUT/${MODEL}_c${cifar}_${METHOD}_x${num}" "$num" --model "$MODEL" --cifar "$cifar" --data "$DATA" \
                --epochs "$EPOCHS" $(recipe "$METHOD")
        done
        # The ensemble's members: baselines that differ only in their seed (network i uses --seed + i).
        for (( k = 1; k <= ENSEMBLE; k++ )); do
            ring "$OUT/${MODEL}_c${cifar}_ensemble/m$k" 1 --model "$MODEL" --cifar "$cifar" --data "$DATA" \
                --epochs "$EPOCHS" --seed "$((k - 1))"
        done
    done
    for cifar in $DATASETS; do
        members=()
        for (( k = 1; k <= ENSEMBLE; k++ )); do members+=("$OUT/${MODEL}_c${cifar}_ensemble/m$k/net1/$ENSEMBLE_CKPT"); done
        (( ENSEMBLE == 0 )) || after scripts/ensemble.py --model "$MODEL" --cifar "$cifar" --data "$DATA" "${members[@]}"
    done
}
launch "$@"
