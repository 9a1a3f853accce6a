#!/usr/bin/env bash
# Leaky-ReLU ResNets (slope 0.01), baseline vs grafting. docs/METHOD.md §8, "Leaky-ReLU ResNets": ResNet-32/56/110
# with leaky ReLU on CIFAR-10 and CIFAR-100 (12 runs: 6 baselines, 6 rings of 2 networks).
#
#   scripts/leaky_resnets.sh                          everything, queued in the background
#   DRY=1 scripts/leaky_resnets.sh                    check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/leaky_resnets.sh  Slurm job arrays, a task per ring (docs/slurm.md)
#   GPUS=0,1 MODELS=resnet56_leaky METHODS=dlr scripts/leaky_resnets.sh
#   scripts/leaky_resnets.sh --help                   every setting with its default
#
# The paper does not say which grafting recipe this table used; dlr (its best) is the default, METHODS="baseline
# slr" runs the other. Queue: one network per GPU, rings start as GPUs free up (JOBS_PER_GPU=2 packs two).
# Results: python scripts/summarize.py $OUT. Settings below can also be given in the environment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: a job array
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/leaky_resnets}"
EPOCHS="${EPOCHS:-200}"
MODELS="${MODELS:-resnet32_leaky resnet56_leaky resnet110_leaky}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
METHODS="${METHODS:-baseline dlr}"                      # any of: baseline slr dlr

# The rings, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...
rings() {
    # Method outermost: runs of the same size follow each other, so the queue packs them without idle GPUs.
    for method in $METHODS; do
        num=2
        [[ "$method" == baseline ]] && num=1
        for model in $MODELS; do
            for cifar in $DATASETS; do
                ring "$OUT/${model}_c${cifar}_${method}" "$num" --model "$model" --cifar "$cifar" --data "$DATA" \
                    --epochs "$EPOCHS" $(recipe "$method")
            done
        done
    done
}
launch "$@"
