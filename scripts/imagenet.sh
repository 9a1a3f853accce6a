#!/usr/bin/env bash
# ImageNet: ResNet-18/34/50, baseline vs grafting with two networks. docs/METHOD.md §8, "ImageNet top-1 / top-5"
# (6 runs: 3 baselines, 3 rings of 2 networks). torchvision architectures, batch 256 and lr 0.1 per network,
# weight decay 1e-4, 90 epochs. As published: the baselines x0.1 every 30 epochs (BASELINE_RECIPE), the grafting
# rings cosine per iteration (RECIPE=step: x0.1 every 30 epochs).
#
#   scripts/imagenet.sh                               everything, queued in the background
#   DRY=1 scripts/imagenet.sh                         check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/imagenet.sh  Slurm job arrays, a task per ring (docs/slurm.md)
#   GPUS=0,1,2,3 GPUS_PER_NET=2 ARCHS=resnet18 METHODS=grafting scripts/imagenet.sh
#   scripts/imagenet.sh --help                        every setting with its default
#
# GPUs: as published, each network trains on one GPU, its BatchNorms over the whole batch of 256. With
# GPUS_PER_NET=K a network runs on K GPUs (torchrun, DistributedDataParallel; the batch is the network's total,
# split over its GPUs) with SyncBatchNorm, so BatchNorm still sees the whole batch (SYNC_BN=0: each GPU's share,
# faster, not the published statistics). The runs are queued. DATA holds train/ and val/ class folders.
# Rerunning needs EXTRA=--resume. Results: python scripts/summarize.py $OUT. Settings below can also be given
# in the environment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1,2,3,4,5,6,7}"                         # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: job arrays
TIME="${TIME:-24:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-24}"                      # slurm: cores of each network (on each of its nodes)
MEM_PER_NET="${MEM_PER_NET:-128G}"                      # slurm: memory of each network (on each of its nodes)
GPUS_PER_NET="${GPUS_PER_NET:-1}"                       # GPUs per network (1: as published)
SYNC_BN="${SYNC_BN:-1}"                                 # one of: 0 1 (with GPUS_PER_NET > 1, 1: BatchNorm over the whole batch)
DATA="${DATA:-imagenet}"                                # holds train/ and val/
OUT="${OUT:-runs/imagenet}"
EPOCHS="${EPOCHS:-90}"
ARCHS="${ARCHS:-resnet18 resnet34 resnet50}"
METHODS="${METHODS:-baseline grafting}"                 # any of: baseline grafting
RECIPE="${RECIPE:-cos}"                                 # one of: cos step (grafting rows: cosine per iteration, or x0.1 every 30 epochs)
BASELINE_RECIPE="${BASELINE_RECIPE:-step}"              # one of: step cos (baseline rows: step is the published baseline.py)
WORKERS="${WORKERS:-16}"                                # data loading processes per network (-j)
BATCH="${BATCH:-256}"                                   # per network (-b)
TRAIN=grafting_imagenet/train.py

# The rings, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...
rings() {
    layout=()
    [[ "$GPUS_PER_NET" != 1 && "$SYNC_BN" == 1 ]] && layout=(--sync-bn)
    for arch in $ARCHS; do
        for method in $METHODS; do
            num=2 recipe="$RECIPE"
            [[ "$method" == baseline ]] && num=1 recipe="$BASELINE_RECIPE"
            schedule=()
            [[ "$recipe" == step ]] && schedule=(--steplr)  # cos is the ImageNet script's own default
            ring "$OUT/${arch}_${method}" "$num" --data "$DATA" -a "$arch" -j "$WORKERS" -b "$BATCH" \
                --epochs "$EPOCHS" --lr 0.1 "${schedule[@]}" "${layout[@]}"
        done
    done
}
launch "$@"
