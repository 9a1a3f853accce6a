# Sourced by the other scripts: creates (once) and activates the project's Python environment.
#
# Two layers, so that torch (5.6 GB) is installed once per machine and every checkout still runs its own code:
#   ~/.cache/filter-grafting/venv   shared: torch 2.14.1, torchvision 0.29.1, numpy, tensorboard, pytest, matplotlib,
#                                   ruff and mypy (the static checks)
#                                   (override the place with GRAFTING_VENV)
#   <checkout>/.venv                this checkout's own: sees the shared packages and holds an editable
#                                   install of this checkout (graft-cifar & co. run this checkout's code) and
#                                   the commands pytest, ruff and mypy, run by this environment's Python
# A second checkout gets its own .venv in seconds and never repoints another checkout's commands.
GRAFTING_VENV="${GRAFTING_VENV:-$HOME/.cache/filter-grafting/venv}"
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_local="$_repo/.venv"
_has() {  # _has PYTHON MODULE...: every module is importable (looked up, not imported: fast)
    local python="$1"; shift
    "$python" -c 'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))' \
        "$@" 2>/dev/null
}
if ! _has "$GRAFTING_VENV/bin/python" torch torchvision numpy tensorboard pytest setuptools pip matplotlib ruff mypy; then
    echo "[env] setting up $GRAFTING_VENV (torch 2.14.1, torchvision 0.29.1, ...; a few minutes the first time)"
    python3 -m venv "$GRAFTING_VENV" || return 1
    "$GRAFTING_VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 numpy tensorboard pytest setuptools matplotlib \
        ruff==0.17.6 mypy==2.4.1 \
        || return 1
fi
# Earlier versions installed a checkout into the shared environment itself; remove it, or it would shadow.
if "$GRAFTING_VENV/bin/python" -c 'import importlib.metadata as m; m.version("filter-grafting")' 2>/dev/null; then
    "$GRAFTING_VENV/bin/pip" uninstall -q -y filter-grafting >/dev/null || return 1
fi
if ! _has "$_local/bin/python" torch; then
    rm -rf "$_local"
    "$GRAFTING_VENV/bin/python" -m venv --without-pip "$_local" || return 1
    "$GRAFTING_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        > "$("$_local/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/filter_grafting_shared.pth" \
        || return 1  # the shared packages, searched after this environment's own
fi
# Editable install of this checkout into its own environment (pip comes from the shared one), redone only
# when setup.py or pyproject.toml (packages, console commands, tools) changed since.
_stamp="$(cat "$_repo/setup.py" "$_repo/pyproject.toml" 2>/dev/null | cksum)"
if [ "$(cat "$_local/.installed" 2>/dev/null)" != "$_stamp" ]; then
    "$_local/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$_repo" >/dev/null || return 1
    echo "$_stamp" > "$_local/.installed"
fi
# The tools as commands of this environment, so that a bare `pytest`, `ruff` or `mypy` after sourcing this file
# runs with this checkout's Python (and torch), whatever else is on PATH. ruff is a program of its own (and
# `python -m ruff` looks for it next to this Python): linked, not wrapped.
for _tool in pytest mypy; do
    if [ ! -x "$_local/bin/$_tool" ]; then
        printf '#!/bin/sh\nexec "%s" -m %s "$@"\n' "$_local/bin/python" "$_tool" > "$_local/bin/$_tool" \
            && chmod +x "$_local/bin/$_tool" || return 1
    fi
done
[ -e "$_local/bin/ruff" ] || ln -s "$GRAFTING_VENV/bin/ruff" "$_local/bin/ruff" || return 1
export PATH="$_local/bin:$PATH"
export VIRTUAL_ENV="$_local"
unset -f _has
unset _tool
