#!/usr/bin/env bash
# Leaky-ReLU ResNets (slope 0.01), baseline vs grafting. docs/METHOD.md §8, "Leaky-ReLU ResNets": ResNet-32/56/110
# with leaky ReLU on CIFAR-10 and CIFAR-100 (12 runs: 6 baselines, 6 rings of 2 networks).
#
#   scripts/leaky_resnets.sh                          everything, queued in the background
#   DRY=1 scripts/leaky_resnets.sh                    print the commands, run nothing
#   GPUS=0,1 MODELS=resnet56_leaky METHODS=dlr scripts/leaky_resnets.sh
#
# The paper does not say which grafting recipe this table used; dlr (its best) is the default, METHODS="baseline
# slr" runs the other. Queue: one network per GPU, rings start as GPUs free up (JOBS_PER_GPU=2 packs two).
# Results: python scripts/summarize.py $OUT. Settings below can also be given in the environment.
set -euo pipefail

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/leaky_resnets}"
EPOCHS="${EPOCHS:-200}"
MODELS="${MODELS:-resnet32_leaky resnet56_leaky resnet110_leaky}"
DATASETS="${DATASETS:-10 100}"
METHODS="${METHODS:-baseline dlr}"

source "$(dirname "${BASH_SOURCE[0]}")/lib/launch.sh"
check_choices DATASETS "$DATASETS" 10 100
check_choices METHODS "$METHODS" baseline slr dlr
queue_start "$@"

# Method outermost: runs of the same size follow each other, so the queue packs them without idle GPUs.
for method in $METHODS; do
    num=2
    [[ "$method" == baseline ]] && num=1
    for model in $MODELS; do
        for cifar in $DATASETS; do
            # shellcheck disable=SC2046  # the recipe's flags are separate words
            launch_ring "$OUT/${model}_c${cifar}_${method}" "$num" -- --model "$model" --cifar "$cifar" \
                --data "$(_abspath "$DATA")" --epochs "$EPOCHS" $(recipe_flags "$method")
        done
    done
done
queue_finish
