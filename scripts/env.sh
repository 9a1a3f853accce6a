# Sourced by the other scripts: creates (once) and activates the project's virtual environment.
# The environment lives outside the clone so that fresh clones and CI reuse it instead of
# reinstalling torch (5.6 GB). Override its location with GRAFTING_VENV.
GRAFTING_VENV="${GRAFTING_VENV:-$HOME/.cache/filter-grafting/venv}"
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! "$GRAFTING_VENV/bin/python" -c "import torch, torchvision, numpy, tensorboard, pytest" 2>/dev/null; then
    echo "[env] creating $GRAFTING_VENV (torch 2.14.1, torchvision 0.29.1; a few minutes, once)"
    python3 -m venv "$GRAFTING_VENV" || return 1
    "$GRAFTING_VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 numpy tensorboard pytest || return 1
fi
# Editable install of this checkout: cheap, and points the console scripts at this clone.
"$GRAFTING_VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$_repo" >/dev/null || return 1
export PATH="$GRAFTING_VENV/bin:$PATH"
