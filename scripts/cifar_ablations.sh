#!/usr/bin/env bash
# The CVPR paper's ablations (docs/METHOD.md §9): why external grafting with the entropy criterion. For each model
# and dataset it runs the whole set, one ring folder per ablation under $OUT:
#
#   baseline   one network, no grafting                                  (--num 1)
#   noise      one network; after each epoch Gaussian noise on its invalid filters, scale x0.975 per epoch
#              (a unit Gaussian after the first epoch, as published)     (--num 1 --graft-source noise)
#   internal   one network; each layer's invalid filters, weakest first, get the filter at the mirrored
#              position of the l1 ranking added                            (--num 1 --graft-source internal)
#   external   NUM networks, ring grafting with the entropy criterion (the method)
#   l1         NUM networks, ring grafting with the l1 norm as the criterion            (--criterion l1)
#   average    NUM networks, each replaced by the plain mean of all NUM               (--graft-source average)
#   filter-entropy  (not in the default set: the early code's, in no published table) NUM networks; each filter
#              whose entropy is below THRESHOLD gets the other networks' highest-entropy one added
#                                                                          (--graft-source filter-entropy)
#
#   scripts/cifar_ablations.sh                        the whole set for resnet32 on CIFAR-10 and CIFAR-100, queued
#   DRY=1 scripts/cifar_ablations.sh                  check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/cifar_ablations.sh  Slurm job arrays, a task per ring (docs/slurm.md)
#   GPUS=0,1,2,3 MODELS=resnet56 DATASETS=10 ABLATIONS="noise internal" scripts/cifar_ablations.sh
#   scripts/cifar_ablations.sh --help                 every setting with its default
#
# Each run's <ring>/net<i>/config.json records 'source' and 'criterion', which scripts/summarize.py uses to
# label the rows. Every ablation uses the same RECIPE (default slr: lr 0.1, x0.1 every 60 epochs). Queue and
# GPUs as in the other scripts: one GPU per network, rings queued as GPUs free up (9 GPU-runs per model and
# dataset). Rerunning over existing folders needs EXTRA=--resume. Settings below can also come from the environment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: job arrays
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/cifar_ablations}"
EPOCHS="${EPOCHS:-200}"
MODELS="${MODELS:-resnet32}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
ABLATIONS="${ABLATIONS:-baseline noise internal external l1 average}"  # any of: baseline noise internal external l1 average filter-entropy
RECIPE="${RECIPE:-slr}"                                 # one of: slr dlr cos (the same for every ablation)
NUM="${NUM:-2}"                                         # networks of the exchanging ablations
THRESHOLD="${THRESHOLD:-0.1}"                           # l1 norm under which a filter is invalid (filter-entropy: entropy)

# The rings, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...
rings() {
    for model in $MODELS; do
        for cifar in $DATASETS; do
            common=(--model "$model" --cifar "$cifar" --data "$DATA" --epochs "$EPOCHS" --invalid-threshold "$THRESHOLD")
            for ablation in $ABLATIONS; do
                folder="$OUT/${model}_c${cifar}_${ablation}"
                case "$ablation" in
                    baseline) ring "$folder" 1 "${common[@]}" $(recipe "$RECIPE") ;;
                    noise|internal) ring "$folder" 1 "${common[@]}" $(recipe "$RECIPE") --graft-source "$ablation" ;;
                    external) ring "$folder" "$NUM" "${common[@]}" $(recipe "$RECIPE") --criterion entropy ;;
                    l1) ring "$folder" "$NUM" "${common[@]}" $(recipe "$RECIPE") --criterion l1 ;;
                    average|filter-entropy)
                        ring "$folder" "$NUM" "${common[@]}" $(recipe "$RECIPE") --graft-source "$ablation" ;;
                esac
            done
        done
    done
}
launch "$@"
