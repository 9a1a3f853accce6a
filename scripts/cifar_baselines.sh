#!/usr/bin/env bash
# CIFAR baselines: one network per row, no grafting (--num 1). docs/METHOD.md §8, the "baseline" rows of the first
# table: ResNet-32/56/110 and MobileNetV2 on CIFAR-10 and CIFAR-100 (8 runs). The leaky-ReLU and VGG-16
# baselines are in leaky_resnets.sh and vgg16_grafting.sh.
#
#   scripts/cifar_baselines.sh                        all 8 runs, queued in the background
#   DRY=1 scripts/cifar_baselines.sh                  check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/cifar_baselines.sh  one Slurm job array, a task per run (docs/slurm.md)
#   GPUS=0,1,2,3 MODELS="resnet56" DATASETS=100 scripts/cifar_baselines.sh
#   scripts/cifar_baselines.sh --help                 every setting with its default
#
# Queue: each run gets a GPU of its own and the runs are queued, as many at once as there are GPUs (set
# JOBS_PER_GPU=2 to pack two small networks per GPU). Recipe: SGD lr 0.1, x0.1 every 60 epochs (slr's
# schedule; RECIPE=cos for cosine). Rerunning over existing folders needs EXTRA=--resume.
# Results: python scripts/summarize.py $OUT. Settings below can also be given in the environment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: a job array
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/cifar_baselines}"
EPOCHS="${EPOCHS:-200}"
MODELS="${MODELS:-resnet32 resnet56 resnet110 mobilenetv2}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
RECIPE="${RECIPE:-baseline}"                            # one of: baseline cos (baseline: the step schedule)

# The runs, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...
rings() {
    for model in $MODELS; do
        for cifar in $DATASETS; do
            ring "$OUT/${model}_c${cifar}_baseline" 1 --model "$model" --cifar "$cifar" --data "$DATA" \
                --epochs "$EPOCHS" $(recipe "$RECIPE")
        done
    done
}
launch "$@"
