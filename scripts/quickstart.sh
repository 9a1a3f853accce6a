#!/usr/bin/env bash
# Quickstart: two ResNet-20s train side by side and graft each other after every epoch.
#
#   bash scripts/quickstart.sh                      # CIFAR-10 from ./data, else a generated stand-in
#   DATA=/datasets/cifar bash scripts/quickstart.sh  # the folder that holds cifar-10-batches-py/
#   EPOCHS=5 bash scripts/quickstart.sh
#
# Data: real CIFAR-10 when $DATA holds it or it can be downloaded there (a 10-second probe decides);
# otherwise a small generated stand-in in data/generated-cifar10, in the real CIFAR file format but
# NOT CIFAR: its accuracies say nothing about the paper. Real data runs 2 epochs (the least that
# grafts: the final epoch never does), the stand-in 3. Each run gets its own folder under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

DATA="${DATA:-data}"
RUN="${RUN:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}"
CIFAR10_URL="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
GENERATED="data/generated-cifar10"

say() { echo "[quickstart] $*"; }

has_real_cifar10() {  # the six files torchvision reads, and no marker of a generated stand-in
    local folder="$1/cifar-10-batches-py" name
    [ -e "$1/GENERATED_STAND_IN.txt" ] && return 1
    for name in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch batches.meta; do
        [ -f "$folder/$name" ] || return 1
    done
}

cifar10_reachable() {  # a HEAD request; the outer timeout also bounds a hanging DNS lookup
    timeout 15 python - "$CIFAR10_URL" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=10)
EOF
}

download_cifar10() {
    python - "$1" <<'EOF'
import sys
from grafting.data.cifar import load_cifar
from grafting.errors import GraftingError
try:
    load_cifar(sys.argv[1], 10, download=True)
except GraftingError as err:
    sys.exit(f"[quickstart] download failed: {err}")
EOF
}

# ---------------------------------------------------------------- data
generated=0
if has_real_cifar10 "$DATA"; then
    say "data: CIFAR-10 in $DATA"
elif say "no CIFAR-10 in $DATA; checking whether it can be downloaded (10 s at most)" && cifar10_reachable \
        && download_cifar10 "$DATA" && has_real_cifar10 "$DATA"; then
    say "data: CIFAR-10, downloaded into $DATA"
else
    generated=1
    DATA="$GENERATED"
    if ! has_real_cifar10 "$DATA" && [ ! -e "$DATA/GENERATED_STAND_IN.txt" ] ; then
        say "CIFAR-10 is not available: writing a generated stand-in to $DATA"
        python -c "from grafting.data.fake import write_fake_cifar; write_fake_cifar('$DATA', 10, train_size=2000, test_size=500)"
    fi
    say "data: GENERATED stand-in in $DATA (CIFAR-10 file format, NOT CIFAR-10: accuracies mean nothing)"
fi

if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then device=cuda; else device=cpu; fi
if [ "$generated" = 1 ]; then epochs="${EPOCHS:-3}"; else epochs="${EPOCHS:-2}"; fi
if [ "$generated" = 0 ] && [ "$device" = cpu ]; then
    say "note: on the CPU one epoch of CIFAR-10 takes several minutes per network"
fi

# ---------------------------------------------------------------- two networks, one process each
# graft-launch starts them, follows them, stops the ring if one fails and prints the ring's result line.
if [ "$device" = cuda ]; then gpus=0; else gpus=cpu; fi
say "two networks: resnet20, $epochs epochs on $device; logs: $RUN/1.log $RUN/2.log (follow: tail -f $RUN/1.log)"
say "checkpoints: $RUN/net1/{last,best}.pt  $RUN/net2/{last,best}.pt;  TensorBoard: tensorboard --logdir $RUN/tb"
if ! OUT="$RUN" GPUS="$gpus" JOBS_PER_GPU=2 FOREGROUND=1 POLL=1 \
        python -m grafting.launch --ring "$RUN" 2 --model resnet20 --data "$DATA" --epochs "$epochs"; then
    say "the ring did not finish: see the line above and $RUN/1.log, $RUN/2.log"
    exit 1
fi
if [ "$generated" = 1 ]; then
    say "these accuracies are on the GENERATED stand-in, not CIFAR-10; put CIFAR-10 in ./data (or set DATA) for real numbers"
fi
say "done. The paper's recipe (CIFAR-10, ResNet-32, dlr, 200 epochs), one line per network:"
say "  graft-cifar --data data --s runs/r32 --num 2 --i 1 --model resnet32 --difflr --cos > r32_1.log 2>&1 &"
say "  graft-cifar --data data --s runs/r32 --num 2 --i 2 --model resnet32 --difflr --cos > r32_2.log 2>&1 &"
