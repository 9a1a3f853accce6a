#!/usr/bin/env bash
# Grafting with two networks, slr and dlr. docs/METHOD.md §8, the "grafting (slr)" and "grafting (dlr)" rows of the
# first table: ResNet-32/56/110 and MobileNetV2 on CIFAR-10 and CIFAR-100 (16 rings of 2 networks).
#
#   scripts/cifar_grafting.sh                         all 16 rings, queued in the background
#   DRY=1 scripts/cifar_grafting.sh                   check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/cifar_grafting.sh  one Slurm job array, a task per ring (docs/slurm.md)
#   GPUS=0,1,2,3 MODELS="resnet32 resnet56" DATASETS=10 METHODS=dlr scripts/cifar_grafting.sh
#   scripts/cifar_grafting.sh --help                  every setting with its default
#
# Queue: each network gets a GPU of its own; rings start one after another as GPUs free up, so 8 GPUs run
# 4 rings at once (JOBS_PER_GPU=2 packs two networks per GPU; the CIFAR ResNets leave most of a GPU idle).
# slr: lr 0.1 for both networks, x0.1 every 60 epochs. dlr: cosine per iteration, network i of N starts at
# 0.1 * (1 + cos(pi (N - i) / N)) / 2. Rerunning over existing folders needs EXTRA=--resume.
# Results: python scripts/summarize.py $OUT. Settings below can also be given in the environment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: a job array
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/cifar_grafting}"
EPOCHS="${EPOCHS:-200}"
MODELS="${MODELS:-resnet32 resnet56 resnet110 mobilenetv2}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
METHODS="${METHODS:-slr dlr}"                           # any of: slr dlr
NUM="${NUM:-2}"                                         # networks per ring (the table uses 2)

# The rings, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...
rings() {
    for model in $MODELS; do
        for cifar in $DATASETS; do
            for method in $METHODS; do
                ring "$OUT/${model}_c${cifar}_${method}" "$NUM" --model "$model" --cifar "$cifar" --data "$DATA" \
                    --epochs "$EPOCHS" $(recipe "$method")
            done
        done
    done
}
launch "$@"
