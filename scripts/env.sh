# Sourced by the other scripts: creates (once) and activates the project's Python environment.
#
# Two layers, so that torch (5.6 GB) is installed once per machine and every checkout still runs its own code:
#   ~/.cache/filter-grafting/venv   shared: torch 2.14.1, torchvision 0.29.1, numpy, tensorboard, pytest, pytest-xdist,
#                                   matplotlib, ruff and mypy (the static checks), lightning (the callback's tests)
#                                   (override the place with GRAFTING_VENV)
#   <checkout>/.venv                this checkout's own: sees the shared packages and holds an editable
#                                   install of this checkout (graft-cifar & co. run this checkout's code) and
#                                   the commands pytest, ruff and mypy, run by this environment's Python
# A second checkout gets its own .venv in seconds and never repoints another checkout's commands.
#
# Bring your own torch (a cluster's module, a conda environment, the active virtual environment, a CUDA build that
# matches the driver): GRAFTING_PYTHON=/path/to/python makes that Python's packages (torch, torchvision, numpy,
# tensorboard, pip, setuptools; pytest, pytest-xdist, matplotlib and lightning when present) the shared layer
# instead: nothing is downloaded and the shared environment is neither created nor used. .venv remembers the
# choice; GRAFTING_PYTHON= (empty) goes back to the shared environment. See docs/setup.md.
GRAFTING_VENV="${GRAFTING_VENV:-$HOME/.cache/filter-grafting/venv}"
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_local="$_repo/.venv"
_has() {  # _has PYTHON MODULE...: every module is importable (looked up, not imported: fast; -I: not from the
    local python="$1"; shift  # current folder, where a stray filter_grafting.egg-info or torch/ would count)
    "$python" -I -c 'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))' \
        "$@" 2>/dev/null
}
_base="${GRAFTING_PYTHON-$(cat "$_local/.base" 2>/dev/null || true)}"  # the Python .venv uses, if not the shared
if [ -n "$_base" ]; then
    _missing="$("$_base" -c 'import importlib.util as u; print(*(m for m in ("torch", "torchvision", "numpy", "tensorboard", "pip", "setuptools") if u.find_spec(m) is None))' 2>/dev/null)" \
        || _missing="everything (it does not run)"
    if [ -n "$_missing" ]; then
        echo "[env] GRAFTING_PYTHON=$_base lacks $_missing: install them into that Python, or run" \
            "'GRAFTING_PYTHON= source scripts/env.sh' for the shared environment" >&2
        return 1
    fi
    _base="$(command -v "$_base")"  # a path, kept unresolved: a virtual environment's python stays its own
elif ! _has "$GRAFTING_VENV/bin/python" torch torchvision numpy tensorboard pytest xdist setuptools pip matplotlib ruff \
    mypy lightning; then
    echo "[env] setting up $GRAFTING_VENV (torch 2.14.1, torchvision 0.29.1, ...; a few minutes the first time)"
    python3 -m venv "$GRAFTING_VENV" || return 1
    "$GRAFTING_VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 numpy tensorboard pytest pytest-xdist setuptools \
        matplotlib ruff==0.17.6 mypy==2.4.1 lightning==2.6.6 \
        || return 1
fi
if [ -z "$_base" ]; then
    # Earlier versions installed a checkout into the shared environment itself; remove it, or it would shadow.
    # (-I: a filter_grafting.egg-info in the current folder, left by `pip install -e .` elsewhere, is no install.)
    if "$GRAFTING_VENV/bin/python" -I -c 'import importlib.metadata as m; m.version("filter-grafting")' 2>/dev/null; then
        "$GRAFTING_VENV/bin/pip" uninstall -q -y filter-grafting >/dev/null || return 1
    fi
fi
if ! _has "$_local/bin/python" torch || [ "$(cat "$_local/.base" 2>/dev/null)" != "$_base" ]; then
    rm -rf "$_local"
    if [ -n "$_base" ]; then
        # the folder torch is imported from (also where a module puts it on PYTHONPATH) and the site-packages
        _shared="$("$_base" -c 'import os, sys, torch; print(os.path.dirname(os.path.dirname(torch.__file__))); print(*(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))), sep="\n")')" \
            || return 1
    else
        _shared="$("$GRAFTING_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    fi
    "${_base:-$GRAFTING_VENV/bin/python}" -m venv --without-pip "$_local" || return 1
    # the shared packages (or GRAFTING_PYTHON's), searched after this environment's own
    printf '%s\n' "$_shared" \
        > "$("$_local/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/filter_grafting_shared.pth" \
        || return 1
    [ -z "$_base" ] || echo "$_base" > "$_local/.base"
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
_tool="$(dirname "${_base:-$GRAFTING_VENV/bin/python}")/ruff"  # (a GRAFTING_PYTHON may have none: then no ruff)
[ -e "$_local/bin/ruff" ] || [ ! -x "$_tool" ] || ln -sf "$_tool" "$_local/bin/ruff" || return 1
export PATH="$_local/bin:$PATH"
export VIRTUAL_ENV="$_local"
unset -f _has
unset _base _shared _missing _tool
