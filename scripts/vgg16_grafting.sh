#!/usr/bin/env bash
# VGG-16 (BN): baseline, layer grafting and filter grafting. docs/METHOD.md §8, "VGG-16 (BN)": CIFAR-10 and CIFAR-100
# (6 runs: 2 baselines, 2 rings of layer grafting, 2 rings of filter grafting; 2 networks per ring).
#
#   scripts/vgg16_grafting.sh                         everything, queued in the background
#   DRY=1 scripts/vgg16_grafting.sh                   check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/vgg16_grafting.sh  Slurm job arrays, a task per ring (docs/slurm.md)
#   DATASETS=10 METHODS=filter scripts/vgg16_grafting.sh
#   scripts/vgg16_grafting.sh --help                  every setting with its default
#
# layer = entropy-weighted layers (--level layer; the convs and BatchNorms, the classifier keeps its own weights);
# filter = per-channel weights from the BatchNorm scales (--level filter); FILTER_BN_BLEND=repeated-whole blends
# the BatchNorms as the published loop did (docs/METHOD.md §10.2, folder <...>_filter-repeated-whole_<recipe>).
# Both grafting rows use the published VGG script's recipe by default: the same lr 0.1 for both networks, x0.1
# every 60 epochs (RECIPE=slr); RECIPE=dlr gives the networks different learning rates and the cosine schedule.
# Queue: one network per GPU, rings start as GPUs free up. Results: python scripts/summarize.py $OUT.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: a job array
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/vgg16_grafting}"
EPOCHS="${EPOCHS:-200}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
METHODS="${METHODS:-baseline layer filter}"             # any of: baseline layer filter
RECIPE="${RECIPE:-slr}"                                 # one of: slr dlr (the schedule of the grafting rows)
FILTER_BN_BLEND="${FILTER_BN_BLEND:-per-channel}"       # one of: per-channel repeated-whole (filter rows; repeated-whole: the published loop)
MODEL=vgg16

# The rings, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...
rings() {
    # Method outermost: runs of the same size follow each other, so the queue packs them without idle GPUs.
    for method in $METHODS; do
        for cifar in $DATASETS; do
            folder="$OUT/${MODEL}_c${cifar}_${method}"
            common=(--model "$MODEL" --cifar "$cifar" --data "$DATA" --epochs "$EPOCHS")
            if [[ "$method" == baseline ]]; then
                ring "$folder" 1 "${common[@]}"
            else
                if [[ "$method" == filter ]]; then
                    common+=(--filter-bn-blend "$FILTER_BN_BLEND")
                    [[ "$FILTER_BN_BLEND" == per-channel ]] || folder+="-$FILTER_BN_BLEND"
                fi
                ring "${folder}_${RECIPE}" 2 "${common[@]}" --level "$method" $(recipe "$RECIPE")
            fi
        done
    done
}
launch "$@"
