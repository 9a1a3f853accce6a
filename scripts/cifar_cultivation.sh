#!/usr/bin/env bash
# Cultivation: grafting plus knowledge distillation (docs/METHOD.md §7), next to the plain grafting runs of
# scripts/cifar_grafting.sh. Four variants per model and dataset:
#
#   peers             a ring of NUM grafting networks, each also distilling from its ring predecessor's weights of
#                     the latest exchange (textbook KL, T = KD_T, lambda = KD_WEIGHT); dlr, like the best grafting rows.
#   teacher           a ring of NUM grafting networks, each distilling from a trained teacher: the baseline of the
#                     same model from scripts/cifar_baselines.sh (TEACHER_RUNS/<model>_c<cifar>_baseline/net1/best.pt);
#                     dlr recipe.
#   authors           the authors' own distillation script: ONE network, no grafting, distilling from one trained
#                     teacher of its architecture (the same baseline best.pt; theirs was epoch 149 of an earlier run),
#                     T = 2, only the student softened (--no-kd-soften-teacher), lr 0.1 x0.1 every 60 epochs.
#   grafted-teachers  a ring of NUM grafting networks (slr) distilling, in the authors' form (T = 2, student softened
#                     only), from the mean logits of the grafted networks of a finished grafting run
#                     (GRAFTED_RUNS/<model>_c<cifar>_dlr/net*/best.pt).
#
#   scripts/cifar_cultivation.sh                      every variant for every model and dataset, queued
#   DRY=1 scripts/cifar_cultivation.sh                check, then print the commands; run nothing
#   LAUNCHER=slurm PARTITION=gpu scripts/cifar_cultivation.sh  one Slurm job array, a task per ring (docs/slurm.md)
#   GPUS=0,1 MODELS=resnet56 DATASETS=100 VARIANTS=peers scripts/cifar_cultivation.sh
#   scripts/cifar_cultivation.sh --help               every setting with its default
#
# 'teacher', 'authors' and 'grafted-teachers' need their teachers' checkpoints: run scripts/cifar_baselines.sh
# and scripts/cifar_grafting.sh first (with the same OUT layout); a ring whose teacher is missing is skipped with
# a note (also with DRY=1). Queue and GPUs as in the other scripts (one GPU per network, rings queued; a
# distilling network also runs its teacher's forward pass, about +30% time). Rerunning needs EXTRA=--resume.
# Results: python scripts/summarize.py $OUT. Settings below can also be given in the environment.
source "$(dirname "${BASH_SOURCE[0]}")/lib/rings.sh"

GPUS="${GPUS:-0,1}"                                     # GPU ids, or cpu
LAUNCHER="${LAUNCHER:-nohup}"                           # nohup: processes on this machine; slurm: a job array
TIME="${TIME:-12:00:00}"                                # slurm: time limit of a ring's job (it requeues itself)
CPUS_PER_NET="${CPUS_PER_NET:-4}"                       # slurm: cores of each network
MEM_PER_NET="${MEM_PER_NET:-16G}"                       # slurm: memory of each network
DATA="${DATA:-data}"                                    # holds cifar-10-batches-py/ and cifar-100-python/
OUT="${OUT:-runs/cifar_cultivation}"
EPOCHS="${EPOCHS:-200}"
MODELS="${MODELS:-resnet32 resnet56 resnet110 mobilenetv2}"
DATASETS="${DATASETS:-10 100}"                          # any of: 10 100
VARIANTS="${VARIANTS:-peers teacher authors grafted-teachers}"  # any of: peers teacher authors grafted-teachers
NUM="${NUM:-2}"                                         # networks per ring
KD_T="${KD_T:-4}"                                       # temperature of the textbook variants
KD_WEIGHT="${KD_WEIGHT:-1}"                             # lambda
TEACHER_RUNS="${TEACHER_RUNS:-runs/cifar_baselines}"    # where 'teacher' and 'authors' find their teachers
GRAFTED_RUNS="${GRAFTED_RUNS:-runs/cifar_grafting}"     # where 'grafted-teachers' finds its teachers

# The rings, one line each: ring FOLDER NETWORKS TRAINING-FLAGS...
rings() {
    for model in $MODELS; do
        for cifar in $DATASETS; do
            common=(--model "$model" --cifar "$cifar" --data "$DATA" --epochs "$EPOCHS")
            baseline="$TEACHER_RUNS/${model}_c${cifar}_baseline/net1/best.pt"
            authors_form=(--kd-temperature 2 --kd-weight 1 --no-kd-soften-teacher)
            for variant in $VARIANTS; do
                case "$variant" in
                    peers)
                        ring "$OUT/${model}_c${cifar}_dlr_kd_peers" "$NUM" "${common[@]}" $(recipe dlr) \
                            --distill peers --kd-temperature "$KD_T" --kd-weight "$KD_WEIGHT" ;;
                    teacher)
                        ring "$OUT/${model}_c${cifar}_dlr_kd_teacher" "$NUM" "${common[@]}" $(recipe dlr) \
                            --distill teacher --teacher "$baseline" --kd-temperature "$KD_T" --kd-weight "$KD_WEIGHT" ;;
                    authors)
                        ring "$OUT/${model}_c${cifar}_slr_kd_authors" 1 "${common[@]}" $(recipe slr) \
                            --distill teacher --teacher "$baseline" "${authors_form[@]}" ;;
                    grafted-teachers)
                        teachers=()
                        for (( net = 1; net <= NUM; net++ )); do
                            teachers+=(--teacher "$GRAFTED_RUNS/${model}_c${cifar}_dlr/net$net/best.pt")
                        done
                        ring "$OUT/${model}_c${cifar}_slr_kd_grafted" "$NUM" "${common[@]}" $(recipe slr) \
                            --distill teacher "${teachers[@]}" "${authors_form[@]}" ;;
                esac
            done
        done
    done
}
launch "$@"
